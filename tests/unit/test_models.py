"""The Triton models' logic, imported from the model repository without a server."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from aimesh.ingest.parameters import IntegerParameter, ParameterCatalog

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
ngram = _load("generate", "ngram")
digits_classifier = _load("digits", "classifier")
resize = _load("resize", "resize")

DOCUMENT = (
    "The solar system has eight planets that orbit the sun. "
    "My neighbour bought a new bicycle yesterday. "
    "Jupiter is the largest planet and it orbits the sun every twelve years. "
    "Fresh bread smells wonderful in the morning. "
    "Every planet in the solar system follows an elliptical orbit around the sun."
)


class TestSummarize:
    def test_splits_sentences_but_not_abbreviations(self) -> None:
        text = 'Dr. Smith arrived, e.g. by train. "Great!" she said.  Then?\n\nA new paragraph\nwith two lines'
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


@pytest.fixture(scope="module")
def trigram() -> Any:
    return ngram.TrigramModel.from_corpus()


class TestGenerate:
    def test_trains_on_the_shipped_corpus_quickly(self) -> None:
        # Trained at model load: Triton's start-up (and every integration test's) waits for it.
        started = time.monotonic()
        model = ngram.TrigramModel.from_corpus()
        assert time.monotonic() - started < 1.0
        assert model.paragraphs > 20 and model.tokens > 1000

    def test_same_seed_same_tokens(self, trigram: Any) -> None:
        first = list(trigram.generate("The worker", max_tokens=20, seed=7))
        assert first == list(trigram.generate("The worker", max_tokens=20, seed=7))
        others = {tuple(trigram.generate("The worker", max_tokens=20, seed=s)) for s in range(8)}
        assert len(others) > 1  # the seed matters

    def test_respects_max_tokens(self, trigram: Any) -> None:
        for seed in range(20):
            assert len(list(trigram.generate("Kafka", max_tokens=5, seed=seed))) <= 5
        assert list(trigram.generate("Kafka", max_tokens=0, seed=1)) == []
        # A paragraph rarely ends within 5 tokens, so most runs use them all.
        assert any(len(list(trigram.generate("Kafka", max_tokens=5, seed=s))) == 5 for s in range(20))

    @pytest.mark.parametrize("temperature", [0.0, 1.0])
    def test_continues_the_prompt(self, trigram: Any, temperature: float) -> None:
        # Every three consecutive tokens of prompt and continuation occur in the training text: the model picks
        # up from the prompt's last two words (which the docs contain), not from a fresh start.
        prompt = "the worker asks"
        pieces = list(trigram.generate(prompt, max_tokens=12, seed=2, temperature=temperature))
        assert len(pieces) >= 3
        trigrams = set()
        for line in ngram.CORPUS.read_text().splitlines():
            tokens = [t.lower() for t in ngram.tokenize(line)]
            trigrams |= set(zip(tokens, tokens[1:], tokens[2:], strict=False))
        tokens = [t.lower() for t in ngram.tokenize(prompt + "".join(pieces))]
        assert set(zip(tokens, tokens[1:], tokens[2:], strict=False)) <= trigrams
        assert pieces[0].startswith(" ")  # separated from the prompt
        # A continuation reads as text: punctuation attaches to the word before it.
        for seed in range(10):
            text = "".join(trigram.generate("Each service", max_tokens=60, seed=seed))
            assert not any(s in text for s in (" ,", " .", " )", "( ", "  ")), text

    def test_tokens_are_pieces_of_text(self, trigram: Any) -> None:
        assert ngram.tokenize("Kafka (127.0.0.1:9092), at-least-once.") == [
            "Kafka", "(", "127.0.0.1:9092", ")", ",", "at-least-once", ".",
        ]  # fmt: skip
        assert "".join(trigram.generate("", max_tokens=3, seed=1))[:1] != " "  # nothing to separate from
        model = ngram.TrigramModel(["The worker asks Triton (once), then stops."])
        assert "".join(model.generate("The worker", max_tokens=20)) == " asks Triton (once), then stops."
        assert next(model.generate("The worker ", max_tokens=1)) == "asks"  # the prompt has the space

    @pytest.mark.parametrize("prompt", ["", "   ", "zebra quantum flux", "日本語のテキスト"])
    def test_empty_or_unknown_prompt_starts_a_paragraph(self, trigram: Any, prompt: str) -> None:
        pieces = list(trigram.generate(prompt, max_tokens=10, seed=5))
        assert pieces and all(p.strip() for p in pieces)

    def test_stops_at_the_end_of_a_paragraph(self) -> None:
        model = ngram.TrigramModel(["the end comes here.", "a b c"])
        assert list(model.generate("comes here.", max_tokens=10, temperature=0.0)) == []
        assert list(model.generate("the end", max_tokens=10, temperature=0.0)) == [" comes", " here", "."]

    def test_temperature_shapes_the_choice(self) -> None:
        model = ngram.TrigramModel(["a b c", "a b c", "a b c", "a b d"])
        assert "".join(model.generate("a b", max_tokens=1, temperature=0.0)) == " c"
        drawn = [next(model.generate("a b", max_tokens=1, seed=s, temperature=0.2)) for s in range(200)]
        assert drawn.count(" d") < 5  # (1/3) ** 5 of the weight: about 1 in 250
        drawn = [next(model.generate("a b", max_tokens=1, seed=s, temperature=2.0)) for s in range(200)]
        assert 40 < drawn.count(" d") < 110  # sqrt(1/3) of the weight: about 37 %

    def test_parameters(self) -> None:
        options = ngram.GenerationOptions.from_parameters({})
        assert options == ngram.GenerationOptions(max_tokens=32, seed=None, temperature=1.0, token_delay_ms=0)
        options = ngram.GenerationOptions.from_parameters(
            {"max_tokens": "8", "seed": "42", "temperature": "0.5", "token_delay_ms": 10, "other": "x"}
        )
        assert options == ngram.GenerationOptions(max_tokens=8, seed=42, temperature=0.5, token_delay_ms=10)
        assert ngram.GenerationOptions.from_parameters({}, default_token_delay_ms=25).token_delay_ms == 25

    @pytest.mark.parametrize(
        ("parameters", "message"),
        [
            ({"max_tokens": "0"}, "'max_tokens' must be between 1 and 512"),
            ({"max_tokens": "513"}, "'max_tokens' must be between 1 and 512"),
            ({"max_tokens": "many"}, "'max_tokens' must be an integer"),
            ({"max_tokens": True}, "'max_tokens' must be an integer"),
            ({"max_tokens": 3.5}, "'max_tokens' must be an integer"),
            ({"seed": "-1"}, "'seed' must be between 0 and"),
            ({"seed": "x"}, "'seed' must be an integer"),
            ({"temperature": "3"}, "'temperature' must be between 0 and 2"),
            ({"temperature": "nan"}, "'temperature' must be between 0 and 2"),
            ({"temperature": "warm"}, "'temperature' must be a number"),
            ({"token_delay_ms": "1001"}, "'token_delay_ms' must be between 0 and 1000"),
        ],
    )
    def test_rejects_bad_parameters(self, parameters: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            ngram.GenerationOptions.from_parameters(parameters)


class TestEmbedBoundedMemory:
    def test_a_long_text_is_tokenized_from_a_prefix_with_the_same_tokens(self, encoder: Any) -> None:
        words = ["kafka", "triton,", "worker's", "naïve", "résumé", "(batch)", "x" * 120, "日本語", "end."]
        text = " ".join(words[i % len(words)] for i in range(40_000))  # about 400 KB
        prefix = encoder.tokenized_prefix(text)
        assert len(prefix) < 20_000
        tokenizer = encoder._tokenizer
        assert tokenizer.encode(prefix).ids == tokenizer.encode(text).ids

    def test_short_and_unbroken_texts_are_tokenized_whole(self, encoder: Any) -> None:
        assert encoder.tokenized_prefix("A short one.") == "A short one."
        unbroken = "x" * 50_000  # no whitespace to cut before: the whole text, as before
        assert encoder.tokenized_prefix(unbroken) == unbroken

    def test_a_batch_runs_in_passes_with_the_vectors_of_one_pass(self, encoder: Any) -> None:
        texts = [
            f"Sentence number {i} about {'streams ' * (i % 7)}and queues." for i in range(minilm.ROWS_PER_PASS * 3 + 5)
        ]
        whole = encoder.encode(texts)
        one_by_one = np.concatenate([encoder.encode([t]) for t in texts])
        assert whole.shape == (len(texts), minilm.EMBEDDING_DIM)
        np.testing.assert_allclose(whole, one_by_one, atol=1e-5)


@pytest.fixture(scope="module")
def digit_classifier() -> Any:
    return digits_classifier.DigitClassifier()


class TestDigits:
    def test_trains_quickly_and_classifies_held_out_images(self) -> None:
        # Trained at model load: Triton's start-up waits for it.
        started = time.monotonic()
        classifier = digits_classifier.DigitClassifier()
        assert time.monotonic() - started < 3.0
        pixels, labels = digits_classifier.held_out()
        assert pixels.shape == (297, 8, 8) and pixels.dtype == np.uint8 and pixels.max() == 255
        predicted, probabilities = classifier.classify(pixels)
        assert predicted.dtype == np.int64 and probabilities.dtype == np.float32
        assert probabilities.shape == (297, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert (predicted == probabilities.argmax(axis=1)).all()
        assert (predicted == labels).mean() >= 0.9

    def test_the_test_pngs_are_held_out_images_classified_right(self, digit_classifier: Any) -> None:
        pixels, labels = digits_classifier.held_out()
        for digit in range(10):
            image = np.asarray(Image.open(REPO_ROOT / "tests" / "data" / "digits" / f"digit_{digit}.png"))
            assert image.shape == (8, 8) and image.dtype == np.uint8
            assert any((image == held).all() and label == digit for held, label in zip(pixels, labels, strict=True))
            assert digit_classifier.classify(image[np.newaxis])[0].tolist() == [digit]

    def test_pixels_scale_sklearn_values(self) -> None:
        assert digits_classifier.to_pixels(np.array([0, 1, 8, 15, 16])).tolist() == [0, 16, 128, 239, 255]

    def test_empty_batch_and_wrong_shape(self, digit_classifier: Any) -> None:
        labels, probabilities = digit_classifier.classify(np.zeros((0, 8, 8), dtype=np.uint8))
        assert labels.shape == (0,) and probabilities.shape == (0, 10)
        with pytest.raises(ValueError, match="8x8"):
            digit_classifier.classify(np.zeros((1, 8, 7), dtype=np.uint8))


class TestResize:
    def test_each_pixel_becomes_a_block(self) -> None:
        image = np.array([[0, 255], [7, 9], [1, 2]], dtype=np.uint8)
        assert resize.resize(image, 2).tolist() == np.repeat(np.repeat(image, 2, axis=0), 2, axis=1).tolist()
        assert resize.resize(image, 1).tolist() == image.tolist()

    def test_png_decodes_to_the_image_and_is_deterministic(self) -> None:
        image = np.random.default_rng(3).integers(0, 256, size=(9, 13), dtype=np.uint8)
        png = resize.encode_png(image)
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and png == resize.encode_png(image.copy())
        decoded = Image.open(io.BytesIO(png))
        assert decoded.mode == "L" and np.array_equal(np.asarray(decoded), image)

    @pytest.mark.parametrize(("raw", "scale"), [("1", 1), ("8", 8), (3, 3), ("02", 2)])
    def test_scale_parameter(self, raw: object, scale: int) -> None:
        assert resize.scale_parameter(raw) == scale

    @pytest.mark.parametrize("raw", ["0", "9", "two", "", "2.5", True, 2.0, None])
    def test_bad_scale_parameter(self, raw: object) -> None:
        with pytest.raises(ValueError, match="parameter 'scale' must be"):
            resize.scale_parameter(raw)

    def test_ingest_declares_the_same_bounds(self) -> None:
        declared = ParameterCatalog.built_in().declared("resize")
        assert declared == {"scale": IntegerParameter(minimum=resize.MIN_SCALE, maximum=resize.MAX_SCALE)}

    def test_refuses_empty_and_oversized_images(self) -> None:
        with pytest.raises(ValueError, match="empty"):
            resize.resize(np.zeros((0, 3), dtype=np.uint8), 2)
        with pytest.raises(ValueError, match="exceeds"):
            resize.resize(np.zeros((1025, 1025), dtype=np.uint8), 8)
        with pytest.raises(ValueError, match="grey UINT8"):
            resize.resize(np.zeros((2, 2), dtype=np.uint16), 2)
