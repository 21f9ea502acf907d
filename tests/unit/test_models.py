"""The Triton models' logic, imported from the model repository without a server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"


def _load(model: str, module: str) -> ModuleType:
    # Model code lives in ``models/<name>/1/``, which is not an importable package name.
    name = f"_triton_model_{model}_{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, MODELS / model / "1" / f"{module}.py")
    assert spec is not None and spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


textrank = _load("summarize", "textrank")
polarity = _load("sentiment", "polarity")
minilm = _load("embed", "minilm")

DOCUMENT = (
    "The solar system has eight planets that orbit the sun. "
    "My neighbour bought a new bicycle yesterday. "
    "Jupiter is the largest planet and it orbits the sun every twelve years. "
    "Fresh bread smells wonderful in the morning. "
    "Every planet in the solar system follows an elliptical orbit around the sun."
)


class TestSummarize:
    def test_splits_sentences_but_not_abbreviations(self) -> None:
        text = (
            'Dr. Smith arrived, e.g. by train. "Great!" she said.  Then?\n\nA new paragraph\nwith two lines'
        )
        assert textrank.split_sentences(text) == [
            "Dr. Smith arrived, e.g. by train.",
            '"Great!" she said.',
            "Then?",
            "A new paragraph with two lines",
        ]

    def test_central_sentences_score_highest(self) -> None:
        scores = textrank.centrality(textrank.split_sentences(DOCUMENT))
        assert set(np.argsort(-scores)[:3]) == {0, 2, 4}  # the three sentences about planets and the sun
        assert scores[[1, 3]] == pytest.approx(0.0, abs=1e-9)  # no term shared with any other sentence

    def test_keeps_original_order_and_honours_count(self) -> None:
        assert textrank.summarize(DOCUMENT, 2) == (
            "The solar system has eight planets that orbit the sun. "
            "Every planet in the solar system follows an elliptical orbit around the sun."
        )
        assert textrank.summarize(DOCUMENT, 3) == (
            "The solar system has eight planets that orbit the sun. "
            "Jupiter is the largest planet and it orbits the sun every twelve years. "
            "Every planet in the solar system follows an elliptical orbit around the sun."
        )
        assert textrank.summarize(DOCUMENT) == textrank.summarize(DOCUMENT, textrank.DEFAULT_SENTENCES)

    def test_short_text_comes_back_whole(self) -> None:
        assert textrank.summarize("Only one.  And two!", 3) == "Only one. And two!"
        assert textrank.summarize("", 3) == ""

    @pytest.mark.parametrize("count", [0, 21])
    def test_rejects_count_out_of_range(self, count: int) -> None:
        with pytest.raises(ValueError, match="between 1 and 20"):
            textrank.summarize(DOCUMENT, count)

    def test_scales_to_many_sentences(self) -> None:
        # Degree centrality needs no n-by-n matrix; 20,000 sentences would need 3.2 GB for one in float64.
        text = " ".join(f"Sentence {i} mentions topic{i % 97} and topic{i % 89}." for i in range(20_000))
        assert len(textrank.split_sentences(textrank.summarize(text, 5))) == 5


class TestSentiment:
    def test_clear_texts_get_the_right_sign(self) -> None:
        scorer = polarity.PolarityScorer()
        label, scores = scorer.score("I absolutely love this, it is wonderful and works great!")
        assert label == "positive" and scores[3] > 0.5
        label, scores = scorer.score("This is awful. I hate it, the worst purchase ever.")
        assert label == "negative" and scores[3] < -0.5
        label, scores = scorer.score("The parcel is on the table.")
        assert label == "neutral"
        assert scores.dtype == np.float32 and scores.shape == (4,)

    @pytest.mark.parametrize(
        ("compound", "label"),
        [(0.05, "positive"), (0.0499, "neutral"), (-0.0499, "neutral"), (-0.05, "negative")],
    )
    def test_standard_thresholds(self, compound: float, label: str) -> None:
        assert polarity.label_for(compound) == label


@pytest.fixture(scope="module")
def encoder() -> Any:
    return minilm.MiniLMEncoder()


class TestEmbed:
    def test_matches_sentence_transformers_reference(self, encoder: Any) -> None:
        reference = json.loads((REPO_ROOT / "tests" / "data" / "minilm_reference.json").read_text())
        expected = np.array(reference["embeddings"], dtype=np.float32)
        vectors = encoder.encode(reference["sentences"])
        assert vectors.shape == expected.shape == (len(reference["sentences"]), minilm.EMBEDDING_DIM)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
        cosines = (vectors * expected).sum(axis=1) / np.linalg.norm(expected, axis=1)
        assert cosines.min() >= 0.999, cosines

    def test_padding_does_not_change_a_vector(self, encoder: Any) -> None:
        short, long = "Short.", "A much longer sentence that forces padding onto the short one in the batch."
        alone = encoder.encode([short])
        batched = encoder.encode([short, long])
        np.testing.assert_allclose(batched[0], alone[0], atol=1e-5)

    def test_empty_batch(self, encoder: Any) -> None:
        assert encoder.encode([]).shape == (0, minilm.EMBEDDING_DIM)
