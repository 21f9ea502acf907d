"""VADER sentiment scores and the label derived from them.

Plain Python and numpy: imported both by the Triton model and by unit tests.
"""

from __future__ import annotations

import numpy as np
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

# The thresholds VADER's authors recommend for the normalised compound score.
POSITIVE_THRESHOLD = 0.05
NEGATIVE_THRESHOLD = -0.05
SCORE_NAMES = ("neg", "neu", "pos", "compound")


def label_for(compound: float) -> str:
    """Map a compound score in [-1, 1] to ``positive``, ``negative`` or ``neutral``."""
    if compound >= POSITIVE_THRESHOLD:
        return "positive"
    if compound <= NEGATIVE_THRESHOLD:
        return "negative"
    return "neutral"


class PolarityScorer:
    """Scores texts with one VADER analyzer (loading its lexicon takes tens of milliseconds, so reuse it)."""

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, text: str) -> tuple[str, np.ndarray]:
        """Return the label and the float32 scores in ``SCORE_NAMES`` order."""
        polarity = self._analyzer.polarity_scores(text)
        scores = np.array([polarity[name] for name in SCORE_NAMES], dtype=np.float32)
        return label_for(polarity["compound"]), scores
