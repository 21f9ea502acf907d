"""Triton Python backend model ``summarize``: extractive summaries (see ``textrank.py``)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .textrank import DEFAULT_SENTENCES, MAX_SENTENCES, MIN_SENTENCES, summarize


def _sentences_parameter(request: Any) -> int:
    raw = json.loads(request.parameters() or "{}").get("sentences", DEFAULT_SENTENCES)
    # Parameters usually arrive as strings; bool is an int subclass but never a count.
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise ValueError(f"parameter 'sentences' must be an integer, got {raw!r}")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"parameter 'sentences' must be an integer, got {raw!r}") from None
    if not MIN_SENTENCES <= value <= MAX_SENTENCES:
        raise ValueError(
            f"parameter 'sentences' must be between {MIN_SENTENCES} and {MAX_SENTENCES}, got {value}"
        )
    return value


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        try:
            sentences = _sentences_parameter(request)
            items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            texts = [item.decode("utf-8") for item in items]
        except ValueError as e:  # UnicodeDecodeError included
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            )
        summaries = np.array(
            [[summarize(text, sentences).encode("utf-8")] for text in texts], dtype=np.object_
        )
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SUMMARY", summaries)])
