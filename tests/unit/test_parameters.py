"""Declared model parameters: the built-in declarations match the repository's models, an operator's file
replaces them model by model, and values are checked strictly."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from aimesh.ingest.parameters import IntegerParameter, ParameterCatalog

REPO = Path(__file__).resolve().parents[2]


def test_built_in_limits_are_the_models_own() -> None:
    sys.path.insert(0, str(REPO / "models" / "generate" / "1"))
    try:
        import ngram  # the generate model's option parsing, plain Python
    finally:
        sys.path.pop(0)
    generate = ParameterCatalog.built_in().declared("generate")
    assert generate is not None
    assert generate["max_tokens"] == IntegerParameter(minimum=1, maximum=ngram.MAX_MAX_TOKENS)
    assert generate["token_delay_ms"] == IntegerParameter(minimum=0, maximum=ngram.MAX_TOKEN_DELAY_MS)
    sleep_model = (REPO / "models" / "sleep" / "1" / "model.py").read_text()
    assert "MAX_DELAY_MS = 60_000" in sleep_model
    assert ParameterCatalog.built_in().check("sleep", {"delay_ms": "60000"}) == []


def test_values_are_checked_strictly() -> None:
    catalog = ParameterCatalog.built_in()
    for value in ("", " 5", "+5", "5_000", "٥", "2.0", "1e3"):
        assert [name for name, _ in catalog.check("summarize", {"sentences": value})] == ["sentences"], value
    for value in ("nan", "inf", "-0.1", "2.01", "1,5"):
        assert [name for name, _ in catalog.check("generate", {"temperature": value})] == ["temperature"], value
    assert catalog.check("generate", {"temperature": "1.5", "seed": str(2**63 - 1), "max_tokens": "512"}) == []


def test_unknown_parameters_of_a_declared_model_are_refused_and_undeclared_models_pass() -> None:
    catalog = ParameterCatalog.built_in()
    assert catalog.check("sentiment", {"x": "1"}) == [
        ("x", "is not a parameter of model 'sentiment' (its parameters: none)")
    ]
    assert catalog.check("my-model", {"x": "1"}) == []


def test_a_file_replaces_the_declarations_of_the_models_it_names(tmp_path: Path) -> None:
    path = tmp_path / "parameters.json"
    path.write_text(
        json.dumps(
            {
                "sleep": {"delay_ms": {"type": "integer", "minimum": 0, "maximum": 1000}},
                "mine": {"style": {"type": "string", "choices": ["short", "long"]}},
            }
        )
    )
    catalog = ParameterCatalog.from_file(path)
    assert catalog.check("sleep", {"delay_ms": "1001"}) == [("delay_ms", "is 1001; must be between 0 and 1000")]
    assert catalog.check("mine", {"style": "medium"}) == [("style", "must be one of short, long")]
    assert catalog.check("summarize", {"sentences": "21"}) != []  # built-in declarations stay


def test_a_malformed_file_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "parameters.json"
    path.write_text(json.dumps({"sleep": {"delay_ms": {"type": "integer", "minimum": 5, "maximum": 1}}}))
    with pytest.raises(ValueError, match="AIMESH_MODEL_PARAMETERS_FILE"):
        ParameterCatalog.from_file(path)
    path.write_text(json.dumps({"sleep": {"delay_ms": {"type": "duration"}}}))
    with pytest.raises(ValueError, match="AIMESH_MODEL_PARAMETERS_FILE"):
        ParameterCatalog.from_file(path)
