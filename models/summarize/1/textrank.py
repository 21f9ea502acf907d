"""Extractive summarisation by sentence centrality in a TF-IDF cosine-similarity graph.

Each sentence is a unit-length TF-IDF vector; the graph joins every pair of sentences with their cosine
similarity. A sentence's score is its weighted degree in that graph (continuous LexRank degree centrality).
For an undirected graph the random walk's stationary distribution is proportional to the weighted degree, so a
TextRank/PageRank power iteration would only add damping on top of this ranking.

The degree is computed without building the n-by-n similarity matrix: with rows x_i of unit length,
``sum_{j != i} x_i . x_j = x_i . (sum_j x_j) - 1``. The TF-IDF matrix itself is kept as coordinate arrays, so
time and memory stay linear in the text length even for a megabyte of input.

Plain numpy and the standard library only: this module is imported both by the Triton model and by unit tests.
"""

from __future__ import annotations

import re

import numpy as np

DEFAULT_SENTENCES = 3
MIN_SENTENCES = 1
MAX_SENTENCES = 20

# Abbreviations that end in a period but almost never end a sentence ("Dr. Smith", "e.g. Paris").
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs fig approx e.g i.e".split())
# A boundary is sentence-final punctuation (with any closing quotes or brackets) followed by whitespace, or a
# blank line. Lower-case continuations ("e.g. this") do not start a new sentence.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])|\n\s*\n")
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
# Words that occur in nearly every English sentence; left in, they make every sentence similar to every other
# and flatten the centrality ranking.
_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have having
    he her here hers herself him himself his how i if in into is it its itself just me more most my myself no
    nor not now of off on once only or other our ours ourselves out over own same she should so some such than
    that the their theirs them themselves then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours yourself
    yourselves""".split()
)


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a punctuation heuristic; whitespace-only pieces are dropped."""
    sentences: list[str] = []
    pending = ""
    position = 0
    for match in _BOUNDARY.finditer(text):
        piece = pending + text[position : match.start()]
        position = match.end()
        words = piece.split()
        if (
            words
            and words[-1].lower().rstrip(".") in _ABBREVIATIONS
            and match.group().isspace()
            and ("\n" not in match.group())
        ):
            pending = piece + match.group()
            continue
        pending = ""
        if piece.strip():
            sentences.append(" ".join(piece.split()))
    tail = pending + text[position:]
    if tail.strip():
        sentences.append(" ".join(tail.split()))
    return sentences


def _tokens(sentence: str) -> list[str]:
    return [w for w in _WORD.findall(sentence.lower()) if w not in _STOPWORDS]


def centrality(sentences: list[str]) -> np.ndarray:
    """Each sentence's weighted degree in the TF-IDF cosine-similarity graph (higher is more central)."""
    vocabulary: dict[str, int] = {}
    rows: list[int] = []
    cols: list[int] = []
    counts: list[float] = []
    for row, sentence in enumerate(sentences):
        term_counts: dict[int, int] = {}
        for token in _tokens(sentence):
            column = vocabulary.setdefault(token, len(vocabulary))
            term_counts[column] = term_counts.get(column, 0) + 1
        rows.extend([row] * len(term_counts))
        cols.extend(term_counts)
        counts.extend(term_counts.values())

    n = len(sentences)
    if not counts:
        return np.zeros(n, dtype=np.float64)
    row_idx = np.asarray(rows, dtype=np.int64)
    col_idx = np.asarray(cols, dtype=np.int64)
    # Sublinear tf and smoothed idf (as scikit-learn's TfidfVectorizer does) keep one repeated word or one
    # rare word from dominating a sentence's vector.
    document_frequency = np.bincount(col_idx, minlength=len(vocabulary))
    idf = np.log((1.0 + n) / (1.0 + document_frequency)) + 1.0
    weights = (1.0 + np.log(np.asarray(counts, dtype=np.float64))) * idf[col_idx]
    norms = np.sqrt(np.bincount(row_idx, weights=weights * weights, minlength=n))
    weights /= norms[row_idx]

    column_sums = np.bincount(col_idx, weights=weights, minlength=len(vocabulary))
    similarity_to_all = np.bincount(row_idx, weights=weights * column_sums[col_idx], minlength=n)
    # Subtract each sentence's similarity to itself (1 for a sentence with any terms, 0 for one without).
    return similarity_to_all - (norms > 0)


def summarize(text: str, sentences: int = DEFAULT_SENTENCES) -> str:
    """Return the ``sentences`` most central sentences of ``text``, joined in their original order.

    A text with no more sentences than asked comes back whole (whitespace normalised). Ties go to the earlier
    sentence.
    """
    if not MIN_SENTENCES <= sentences <= MAX_SENTENCES:
        raise ValueError(f"sentences must be between {MIN_SENTENCES} and {MAX_SENTENCES}, got {sentences}")
    parts = split_sentences(text)
    if len(parts) <= sentences:
        return " ".join(parts)
    ranking = np.argsort(-centrality(parts), kind="stable")
    return " ".join(parts[i] for i in sorted(ranking[:sentences]))
