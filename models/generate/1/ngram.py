"""A word-level trigram language model with backoff, trained on the aimesh documentation.

A small, honest stand-in for an LLM: it continues a prompt one token at a time, and the Triton model
``generate`` streams each token as its own response, the contract a real LLM backend offers. It knows only
the text in ``corpus.txt`` (prose paragraphs of the project's README and docs, one per line; rebuild it with
``python models/generate/1/ngram.py README.md docs/*.md > models/generate/1/corpus.txt``).

Counts are kept for every context of two, one and zero preceding tokens (lower-cased); the next token is
drawn from the longest context seen in training, so an unseen prompt falls back to the start of a
paragraph. A paragraph's end is the end-of-text token: drawing it ends the generation before
``max_tokens``.

Plain Python only: imported both by the Triton model and by unit tests.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).with_name("corpus.txt")

DEFAULT_MAX_TOKENS = 32
MAX_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 2.0
MAX_SEED = 2**63 - 1
MAX_TOKEN_DELAY_MS = 1000

# A word, possibly with inner punctuation (``127.0.0.1:9092``, ``don't``, ``at-least-once``), or one
# punctuation mark.
_TOKEN = re.compile(r"\w[\w'.:/@+-]*\w|\w|[^\w\s]")
_NO_SPACE_BEFORE = frozenset(".,;:!?)]}%")
_NO_SPACE_AFTER = frozenset("([{")
_START = "<s>"  # padding before a paragraph's first token; never generated
_END = "</s>"  # a paragraph's end; drawing it ends the generation, never emitted
_ORDER = 3


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _context(tokens: list[str]) -> tuple[str, ...]:
    """The last ``_ORDER - 1`` tokens, lower-cased, padded with start markers."""
    padded = [_START] * (_ORDER - 1) + [t.lower() for t in tokens]
    return tuple(padded[-(_ORDER - 1) :])


def _needs_space(previous: str | None, token: str) -> bool:
    if previous is None:
        return False
    return token not in _NO_SPACE_BEFORE and previous not in _NO_SPACE_AFTER


@dataclass(frozen=True)
class GenerationOptions:
    """Validated request parameters of ``generate``."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    seed: int | None = None  # None: a fresh random seed per request
    temperature: float = DEFAULT_TEMPERATURE
    token_delay_ms: int = 0

    @classmethod
    def from_parameters(
        cls, parameters: Mapping[str, object], *, default_token_delay_ms: int = 0
    ) -> GenerationOptions:
        """Read ``max_tokens``, ``seed``, ``temperature`` and ``token_delay_ms``; others are ignored.

        Values usually arrive as strings (the worker sends string parameters), but ints, and floats for
        ``temperature``, are accepted as well. Raises ValueError naming the parameter on a bad value.
        """
        seed = parameters.get("seed")
        return cls(
            max_tokens=_integer(parameters, "max_tokens", DEFAULT_MAX_TOKENS, 1, MAX_MAX_TOKENS),
            seed=None if seed is None else _integer(parameters, "seed", 0, 0, MAX_SEED),
            temperature=_number(parameters, "temperature", DEFAULT_TEMPERATURE, 0.0, MAX_TEMPERATURE),
            token_delay_ms=_integer(
                parameters, "token_delay_ms", default_token_delay_ms, 0, MAX_TOKEN_DELAY_MS
            ),
        )


def _integer(parameters: Mapping[str, object], name: str, default: int, low: int, high: int) -> int:
    raw = parameters.get(name, default)
    # bool is an int subclass but never a count.
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"parameter '{name}' must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter '{name}' must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ValueError(f"parameter '{name}' must be between {low} and {high}, got {value}")
    return value


def _number(parameters: Mapping[str, object], name: str, default: float, low: float, high: float) -> float:
    raw = parameters.get(name, default)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ValueError(f"parameter '{name}' must be a number, got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"parameter '{name}' must be a number, got {raw!r}") from None
    if not low <= value <= high:  # NaN fails this too
        raise ValueError(f"parameter '{name}' must be between {low:g} and {high:g}, got {raw!r}")
    return value


class _Distribution:
    """Next-token counts of one context, in first-seen order (which makes sampling reproducible)."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def sample(self, rng: random.Random, temperature: float) -> str:
        tokens = list(self.counts)
        if temperature == 0.0:
            return max(tokens, key=self.counts.__getitem__)  # the first seen among equals
        # count ** (1 / T): T = 1 samples the training frequencies, lower T sharpens, higher T flattens.
        exponent = 1.0 / temperature
        cumulative = list(itertools.accumulate(math.pow(self.counts[t], exponent) for t in tokens))
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return tokens[min(index, len(tokens) - 1)]


class TrigramModel:
    """Trigram counts with backoff to bigram and to a paragraph's start."""

    def __init__(self, paragraphs: Iterable[str]) -> None:
        self._table: dict[tuple[str, ...], _Distribution] = {}
        self.paragraphs = 0
        self.tokens = 0
        for paragraph in paragraphs:
            tokens = tokenize(paragraph)
            if not tokens:
                continue
            self.paragraphs += 1
            self.tokens += len(tokens)
            history: list[str] = []
            for token in [*tokens, _END]:
                context = _context(history)
                for n in range(len(context) + 1):
                    key = context[n:]
                    distribution = self._table.get(key)
                    if distribution is None:
                        distribution = self._table[key] = _Distribution()
                    distribution.counts[token] = distribution.counts.get(token, 0) + 1
                history.append(token)
        if not self.paragraphs:
            raise ValueError("the training text has no tokens")

    @classmethod
    def from_corpus(cls, path: Path = CORPUS) -> TrigramModel:
        """Train on a corpus file: one paragraph per line."""
        return cls(path.read_text(encoding="utf-8").splitlines())

    def _distribution(self, context: tuple[str, ...]) -> _Distribution:
        # Longest context seen in training first; the empty context then falls back to a paragraph's start,
        # which reads better than the unigram distribution.
        for n in range(len(context)):
            found = self._table.get(context[n:])
            if found is not None:
                return found
        return self._table[(_START,) * (_ORDER - 1)]

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        seed: int | None = None,
        temperature: float = DEFAULT_TEMPERATURE,
    ) -> Iterator[str]:
        """Continue ``prompt``, lazily yielding at most ``max_tokens`` pieces.

        Each piece is a token with the space that separates it from what precedes it, so
        ``prompt + "".join(pieces)`` reads as text. The same prompt, seed and temperature give the same
        pieces. Stops early at the end of a paragraph.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must not be negative, got {max_tokens}")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}")
        rng = random.Random(seed)
        history = tokenize(prompt)
        previous: str | None = history[-1] if history else None
        if prompt[-1:].isspace():
            previous = None  # the prompt already ends with the separating space
        for _ in range(max_tokens):
            token = self._distribution(_context(history)).sample(rng, temperature)
            if token == _END:
                return
            yield f" {token}" if _needs_space(previous, token) else token
            history.append(token)
            previous = token


_FENCE = re.compile(r"^\s*(```|~~~)")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_AUTOLINK = re.compile(r"<(https?://[^>]+)>")
_MARKUP = re.compile(r"[`*\"]|(?<!\w)_|_(?!\w)")


def markdown_prose(markdown: str) -> list[str]:
    """The prose paragraphs of a Markdown text (list items count as paragraphs), without markup.

    Code blocks, tables, headings, quote markers and HTML comments are dropped; links keep their text.
    """
    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        text = " ".join(current).strip()
        current.clear()
        if text:
            text = _AUTOLINK.sub(r"\1", _LINK.sub(r"\1", text))
            paragraphs.append(re.sub(r"\s+", " ", _MARKUP.sub("", text)).strip())

    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            flush()
            in_fence = not in_fence
            continue
        stripped = line.strip()
        if in_fence or not stripped or stripped.startswith(("#", "|", "<!--")):
            flush()
            continue
        stripped = stripped.removeprefix(">").strip()
        if _LIST_ITEM.match(line):
            flush()
            stripped = _LIST_ITEM.sub("", line).strip()
        current.append(stripped)
    flush()
    return paragraphs


if __name__ == "__main__":
    for name in sys.argv[1:]:
        for paragraph in markdown_prose(Path(name).read_text(encoding="utf-8")):
            print(paragraph)
