"""The digits classifier: an RBF support vector machine, its class probabilities the softmax of its one-vs-rest
decision values, trained when it is made on the handwritten digits scikit-learn ships (1,797 grey 8x8 images, ink
0..16; no download).

Images arrive as UINT8 pixels, 255 the most ink, as a PNG of a digit is: ``to_pixels`` turns scikit-learn's
0..16 values into such pixels, and the classifier is trained on exactly that form, so a digit written to a PNG
and read back is classified as it was. The first ``TRAIN_IMAGES`` images train it; the rest (other writers)
are held out, and ``held_out`` returns them for measuring accuracy. Training is deterministic (no shuffling,
no random state) and takes a fraction of a second.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.svm import SVC

SIDE = 8
CLASSES = 10
TRAIN_IMAGES = 1500
_INK_MAX = 16  # scikit-learn's value for full ink
# The one-vs-rest decision values (votes plus a confidence below 1/3) are about a class apart: scaled so that the
# probabilities are decisive for a clear digit and spread for an ambiguous one.
SOFTMAX_SCALE = 3.0


def to_pixels(values: np.ndarray) -> np.ndarray:
    """scikit-learn's digit values (0..16) as UINT8 pixels (0..255), rounded to the nearest."""
    return np.rint(np.asarray(values, dtype=np.float64) * 255 / _INK_MAX).astype(np.uint8)


def _dataset() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return to_pixels(digits.images), digits.target.astype(np.int64)


def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The images the classifier is not trained on, as UINT8 pixels [N, 8, 8], and their labels [N]."""
    pixels, labels = _dataset()
    return pixels[TRAIN_IMAGES:], labels[TRAIN_IMAGES:]


def _features(pixels: np.ndarray) -> np.ndarray:
    return pixels.reshape(len(pixels), SIDE * SIDE).astype(np.float64) / 255


class DigitClassifier:
    def __init__(self) -> None:
        pixels, labels = _dataset()
        # gamma for features in 0..1.
        self._model = SVC(gamma=0.25, C=10.0, decision_function_shape="ovr")
        self._model.fit(_features(pixels[:TRAIN_IMAGES]), labels[:TRAIN_IMAGES])

    def classify(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Labels (int64 [N]) and class probabilities (float32 [N, 10]) of UINT8 images [N, 8, 8]."""
        if pixels.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"images must be {SIDE}x{SIDE}, got shape {list(pixels.shape)}")
        if len(pixels) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros((0, CLASSES), dtype=np.float32)
        scores = self._model.decision_function(_features(pixels)) * SOFTMAX_SCALE
        scores -= scores.max(axis=1, keepdims=True)
        weights = np.exp(scores)
        probabilities = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
        return self._model.classes_[probabilities.argmax(axis=1)].astype(np.int64), probabilities
