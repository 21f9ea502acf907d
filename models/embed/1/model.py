"""Triton Python backend model ``embed``: all-MiniLM-L6-v2 embeddings in numpy (see ``minilm.py``)."""

from __future__ import annotations

from typing import Any

import triton_python_backend_utils as pb_utils

from .minilm import MiniLMEncoder


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self._encoder = MiniLMEncoder()

    def execute(self, requests: list[Any]) -> list[Any]:
        # Decode every request first so that the whole batch shares one forward pass; a request whose text is
        # not UTF-8 fails alone.
        texts: list[str] = []
        rows: list[slice | Any] = []  # each request's rows of the batch, or its TritonError
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                decoded = [item.decode("utf-8") for item in items]
            except UnicodeDecodeError as e:
                rows.append(pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
                continue
            rows.append(slice(len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)

        vectors = self._encoder.encode(texts)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", vectors[span])])
            if isinstance(span, slice)
            else pb_utils.InferenceResponse(error=span)
            for span in rows
        ]
