"""Declared request parameters of each model, with their limits, checked before a task is accepted.

A model with a declaration accepts only the parameters it declares, each within its bounds; anything else is
refused at ingest (``INVALID_ARGUMENT``) rather than ignored or failed by the model in a worker. Unknown names
are refused, not ignored: a misspelt ``delay_sm`` would otherwise run with the default silently, an operator's
own model may read a name nobody bounded, and every distinct parameter set splits the worker's micro-batches.
A model without a declaration (an operator's model nobody declared) passes its parameters on as before.

The built-in declarations match the repository's models (``models/*/1/model.py``); ``AIMESH_MODEL_PARAMETERS_FILE``
names a JSON file whose entries replace them model by model, e.g.
``{"sleep": {"delay_ms": {"type": "integer", "minimum": 0, "maximum": 1000}}, "embed": {}}``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

# Strict forms: Python's int() and float() also take " 5", "5_000", "+5", "nan" and non-ASCII digits ("٥"),
# which a model may read differently or not at all.
_INTEGER = re.compile(r"-?[0-9]{1,19}")
_NUMBER = re.compile(r"-?[0-9]{1,19}(\.[0-9]{1,19})?([eE][-+]?[0-9]{1,3})?")


class _Declared(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IntegerParameter(_Declared):
    """An integer in ASCII digits, within [minimum, maximum]."""

    type: Literal["integer"] = "integer"
    minimum: int
    maximum: int

    @model_validator(mode="after")
    def _ordered(self) -> IntegerParameter:
        if self.minimum > self.maximum:
            raise ValueError(f"minimum {self.minimum} is above maximum {self.maximum}")
        return self

    def check(self, value: str) -> str | None:
        if not _INTEGER.fullmatch(value):
            return f"must be an integer in ASCII digits, between {self.minimum} and {self.maximum}"
        if not self.minimum <= int(value) <= self.maximum:
            return f"is {value}; must be between {self.minimum} and {self.maximum}"
        return None


class NumberParameter(_Declared):
    """A finite decimal number, within [minimum, maximum]."""

    type: Literal["number"] = "number"
    minimum: float
    maximum: float

    @model_validator(mode="after")
    def _ordered(self) -> NumberParameter:
        if not self.minimum <= self.maximum:
            raise ValueError(f"minimum {self.minimum:g} is above maximum {self.maximum:g}")
        return self

    def check(self, value: str) -> str | None:
        number = float(value) if _NUMBER.fullmatch(value) else math.nan
        if math.isnan(number):
            return f"must be a decimal number between {self.minimum:g} and {self.maximum:g}"
        if not self.minimum <= number <= self.maximum:
            return f"is {value}; must be between {self.minimum:g} and {self.maximum:g}"
        return None


class StringParameter(_Declared):
    """A string of at most ``max_chars`` characters, one of ``choices`` when they are given."""

    type: Literal["string"] = "string"
    max_chars: int = Field(1024, ge=1)
    choices: tuple[str, ...] = ()

    def check(self, value: str) -> str | None:
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if len(value) > self.max_chars:
            return f"is {len(value)} characters; the limit is {self.max_chars}"
        return None


Parameter = Annotated[IntegerParameter | NumberParameter | StringParameter, Field(discriminator="type")]
ModelParameters = Mapping[str, Parameter]

# What the repository's models read (models/*/1/model.py, generate's ngram.py) and the bounds they enforce.
BUILT_IN: dict[str, dict[str, Parameter]] = {
    "sleep": {"delay_ms": IntegerParameter(minimum=0, maximum=60_000)},
    "summarize": {"sentences": IntegerParameter(minimum=1, maximum=20)},
    "generate": {
        "max_tokens": IntegerParameter(minimum=1, maximum=512),
        "seed": IntegerParameter(minimum=0, maximum=2**63 - 1),
        "temperature": NumberParameter(minimum=0.0, maximum=2.0),
        "token_delay_ms": IntegerParameter(minimum=0, maximum=1000),
    },
    "sentiment": {},
    "embed": {},
    "digits": {},
    "resize": {"scale": IntegerParameter(minimum=1, maximum=8)},
    "identity": {},
}

_FILE = TypeAdapter(dict[str, dict[str, Parameter]])


class ParameterCatalog:
    """The declared parameters of each model; ``check`` lists what is wrong with a request's parameters."""

    def __init__(self, declarations: Mapping[str, ModelParameters]) -> None:
        self._declarations = dict(declarations)

    @classmethod
    def built_in(cls) -> ParameterCatalog:
        return cls(BUILT_IN)

    @classmethod
    def from_file(cls, path: str | Path) -> ParameterCatalog:
        """The built-in declarations, with those of the models the JSON file names replaced by the file's.
        Raises ValueError naming the file and what is wrong with it."""
        try:
            declared = _FILE.validate_json(Path(path).read_bytes())
        except (OSError, ValidationError) as e:
            raise ValueError(f"AIMESH_MODEL_PARAMETERS_FILE {path}: {e}") from e
        return cls({**BUILT_IN, **declared})

    def declared(self, model: str) -> ModelParameters | None:
        """The model's declaration, or None when it has none (its parameters are not checked)."""
        return self._declarations.get(model)

    def check(self, model: str, parameters: Mapping[str, str]) -> list[tuple[str, str]]:
        """(parameter name, what is wrong) for each parameter the model's declaration refuses."""
        declaration = self.declared(model)
        if declaration is None:
            return []
        problems = []
        for name, value in parameters.items():
            spec = declaration.get(name)
            if spec is None:
                known = ", ".join(sorted(declaration)) or "none"
                problems.append((name, f"is not a parameter of model {model!r} (its parameters: {known})"))
            elif (why := spec.check(value)) is not None:
                problems.append((name, why))
        return problems
