"""Write tests/data/digits/digit_<d>.png: one 8x8 grey PNG per digit, from the held-out images of the ``digits``
model (scikit-learn's handwritten digits it is not trained on), each the first of its class that the model
classifies right. The file name carries the true label; a pixel is scikit-learn's value (0..16) * 255 / 16,
rounded, 255 the most ink.

Run from anywhere: ``.venv/bin/python scripts/digit_images.py``. Deterministic: the same images and bytes every
run, so the committed PNGs only change when the model or the data set does.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "data" / "digits"


def _classifier_module() -> ModuleType:
    # The model's own module, from models/digits/1/ (not an importable package name).
    spec = importlib.util.spec_from_file_location(
        "_digits_classifier", ROOT / "models" / "digits" / "1" / "classifier.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    classifier = _classifier_module()
    pixels, labels = classifier.held_out()
    predicted, _ = classifier.DigitClassifier().classify(pixels)
    OUT.mkdir(parents=True, exist_ok=True)
    for digit in range(classifier.CLASSES):
        index = next(i for i in range(len(labels)) if labels[i] == digit and predicted[i] == digit)
        path = OUT / f"digit_{digit}.png"
        Image.fromarray(pixels[index]).save(path, format="PNG")
        print(f"{path.relative_to(ROOT)}: held-out image {index} (data set index {classifier.TRAIN_IMAGES + index})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
