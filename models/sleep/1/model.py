"""Triton Python backend model ``sleep``: a fixed cost per batch execution, for benchmarks and fault tests."""

from __future__ import annotations

import json
import time
from typing import Any

import triton_python_backend_utils as pb_utils

DEFAULT_DELAY_MS = 20
MAX_DELAY_MS = 60_000


def _delay_ms(raw: object) -> int:
    # Parameters usually arrive as strings; bool is an int subclass but never a duration.
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"parameter 'delay_ms' must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter 'delay_ms' must be an integer, got {raw!r}") from None
    if not 0 <= value <= MAX_DELAY_MS:
        raise ValueError(f"parameter 'delay_ms' must be between 0 and {MAX_DELAY_MS}, got {value}")
    return value


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        configured = parameters.get("DELAY_MS", {}).get("string_value", str(DEFAULT_DELAY_MS))
        self._delay_ms = _delay_ms(configured)

    def execute(self, requests: list[Any]) -> list[Any]:
        delays: list[int | ValueError] = []
        for request in requests:
            try:
                delays.append(
                    _delay_ms(json.loads(request.parameters() or "{}").get("delay_ms", self._delay_ms))
                )
            except ValueError as e:
                delays.append(e)
        time.sleep(max((d for d in delays if isinstance(d, int)), default=0) / 1000)

        responses = []
        for request, delay in zip(requests, delays, strict=True):
            if isinstance(delay, ValueError):
                error = pb_utils.TritonError(str(delay), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
            else:
                text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TEXT", text)]))
        return responses
