"""What each model declares it takes, so that ingest refuses a task the model could never run.

A model's signature (its inputs' names, datatypes and dims, which are optional, and whether it batches) comes
from Triton's model configuration, read for every accepted model when ingest starts and again every
``AIMESH_MODEL_METADATA_INTERVAL_S`` by a ``SignatureReader``. A model Triton could not be asked about yet has no
signature: its tensor inputs are checked for consistency only (the worker's Triton call still refuses a mismatch,
as an INVALID_INPUT result). A reader that cannot reach Triton keeps the signatures it had.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from aimesh import tensors
from aimesh.background import BackgroundThread
from aimesh.v1 import tensor_pb2

log = logging.getLogger(__name__)

TEXT_INPUT = "TEXT"


@dataclass(frozen=True)
class InputSpec:
    """One declared input: ``dims`` as the configuration has them (no batch dimension; -1: any size)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    def describe(self) -> str:
        return f"{self.name} {self.datatype} {list(self.dims)}"


@dataclass(frozen=True)
class ModelSignature:
    inputs: Mapping[str, InputSpec]
    max_batch_size: int = 0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelSignature:
        """The signature in a model configuration as Triton answers it in JSON (int64 dims come as strings)."""
        inputs = {}
        for entry in config.get("input", []):
            datatype = tensors.CONFIG_TYPES.get(str(entry.get("data_type", "")), str(entry.get("data_type", "")))
            dims = tuple(int(d) for d in entry.get("dims", []))
            inputs[entry["name"]] = InputSpec(entry["name"], datatype, dims, bool(entry.get("optional", False)))
        return cls(inputs, int(config.get("max_batch_size", 0) or 0))

    @property
    def takes_text(self) -> bool:
        spec = self.inputs.get(TEXT_INPUT)
        return spec is not None and spec.datatype == "BYTES"

    def describe(self) -> str:
        return ", ".join(spec.describe() for spec in self.inputs.values())

    def check(self, given: Iterable[tensor_pb2.InputTensor], field: str) -> list[tuple[str, str]]:
        """Violations of ``given`` against this signature, as (field path, why); ``field`` prefixes the paths."""
        violations: list[tuple[str, str]] = []
        names = set()
        for i, tensor in enumerate(given):
            names.add(tensor.name)
            spec = self.inputs.get(tensor.name)
            path = f"{field}[{i}]"
            if spec is None:
                violations.append(
                    (f"{path}.name", f"the model has no input {tensor.name!r}; it takes {self.describe()}")
                )
                continue
            if tensor.datatype != spec.datatype:
                violations.append((f"{path}.datatype", f"input {spec.name} is {spec.datatype}, not {tensor.datatype}"))
            problem = _shape_mismatch(tuple(tensor.shape), spec.dims)
            if problem:
                violations.append((f"{path}.shape", f"input {spec.name} takes shape {list(spec.dims)}: {problem}"))
        for spec in self.inputs.values():
            if not spec.optional and spec.name not in names:
                violations.append((field, f"the model's input {spec.describe()} is required"))
        return violations


def _shape_mismatch(shape: tuple[int, ...], dims: tuple[int, ...]) -> str | None:
    if len(shape) != len(dims):
        return f"{list(shape)} has {len(shape)} dimensions, not {len(dims)}"
    for i, (size, declared) in enumerate(zip(shape, dims, strict=True)):
        if declared >= 0 and size != declared:
            return f"dimension {i} is {size}, not {declared}"
    return None


class Signatures:
    """The known signatures, by model name; safe to read from the event loop while a reader replaces them."""

    def __init__(self, known: Mapping[str, ModelSignature] | None = None) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, ModelSignature] = dict(known or {})

    def get(self, model: str) -> ModelSignature | None:
        with self._lock:
            return self._known.get(model)

    def update(self, model: str, signature: ModelSignature) -> None:
        with self._lock:
            self._known[model] = signature


def fetch_from_triton(url: str, *, timeout_s: float = 5.0) -> Callable[[str], ModelSignature | None]:
    """A fetcher asking the Triton at ``url`` for a model's configuration; None for a model it does not serve.
    Raises InferenceServerException when Triton cannot be asked."""
    client = triton_grpc.InferenceServerClient(url)

    def fetch(model: str) -> ModelSignature | None:
        try:
            answer = client.get_model_config(model, as_json=True, client_timeout=timeout_s)
        except InferenceServerException as e:
            if "not found" in (e.message() or "") or "unknown model" in (e.message() or ""):
                return None
            raise
        return ModelSignature.from_config(answer.get("config", {}) if isinstance(answer, dict) else {})

    return fetch


class SignatureReader(BackgroundThread):
    """Reads the signature of each of ``models`` at start, then every ``interval_s``."""

    def __init__(
        self,
        signatures: Signatures,
        models: Iterable[str],
        fetch: Callable[[str], ModelSignature | None],
        *,
        interval_s: float,
    ) -> None:
        super().__init__("model-signatures")
        self._signatures, self._models, self._fetch = signatures, sorted(models), fetch
        self._interval_s = interval_s

    def read_once(self) -> None:
        for model in self._models:
            try:
                signature = self._fetch(model)
            except InferenceServerException as e:
                log.info("model signatures: Triton could not be asked about %s (%s); keeping what is known", model, e)
                return
            if signature is not None:
                self._signatures.update(model, signature)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.read_once()
            self.stopping.wait(self._interval_s)
