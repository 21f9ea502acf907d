"""Triton Python backend model ``generate``: streams a continuation of TEXT one token per response.

Decoupled: ``execute`` validates each request and hands it to a thread pool, so one model instance serves
many streams at once; each stream sends one response per token through the request's response sender, with
TRITONSERVER_RESPONSE_COMPLETE_FINAL on the last token's response (or on one response with an empty TEXT when
nothing was generated). A cancelled request stops before its next token and ends with a CANCELLED error. The
generator is the trigram model of ``ngram.py``.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from .ngram import MAX_TOKEN_DELAY_MS, GenerationOptions, TrigramModel

_FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_STREAMS = 16


def _config_int(config: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    raw = config.get("parameters", {}).get(key, {}).get("string_value", str(default))
    try:
        value = int(raw)
    except ValueError:
        raise pb_utils.TritonModelException(f"{key} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise pb_utils.TritonModelException(f"{key} must be between {low} and {high}, got {value}")
    return value


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException(
                f"{args['model_name']} streams tokens: it needs model_transaction_policy {{ decoupled: true }}"
            )
        self._token_delay_ms = _config_int(config, "TOKEN_DELAY_MS", 0, 0, MAX_TOKEN_DELAY_MS)
        max_streams = _config_int(config, "MAX_STREAMS", DEFAULT_MAX_STREAMS, 1, 1024)
        self._model = TrigramModel.from_corpus()
        self._pool = ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix="generate")
        self._stopping = threading.Event()
        pb_utils.Logger.log_info(
            f"generate: trigram model trained on {self._model.paragraphs} paragraphs, "
            f"{self._model.tokens} tokens; up to {max_streams} concurrent streams"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                options = GenerationOptions.from_parameters(
                    json.loads(request.parameters() or "{}"), default_token_delay_ms=self._token_delay_ms
                )
                # max_batch_size 1: the tensor is [1, 1], one prompt.
                items = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
                if len(items) != 1:
                    raise ValueError(f"TEXT must hold exactly one prompt, got {len(items)}")
                prompt = items[0].decode("utf-8")
            except ValueError as e:  # UnicodeDecodeError included
                sender.send(_error(str(e), pb_utils.TritonError.INVALID_ARG), flags=_FINAL)
                continue
            self._pool.submit(self._stream, sender, prompt, options)
        # Decoupled: every response goes through the senders.
        return None

    def _stream(self, sender: Any, prompt: str, options: GenerationOptions) -> None:
        sent = 0
        try:
            pieces = self._model.generate(
                prompt, max_tokens=options.max_tokens, seed=options.seed, temperature=options.temperature
            )
            # One token of look-ahead, so that the last token's response carries the FINAL flag: a client
            # that cannot ask for an empty final response still sees where the stream ends.
            piece = next(pieces, None)
            while piece is not None:
                if options.token_delay_ms:
                    time.sleep(options.token_delay_ms / 1000)
                if self._stopping.is_set():
                    message = f"generate is unloading: stream stopped after {sent} tokens"
                    sender.send(_error(message, pb_utils.TritonError.UNAVAILABLE), flags=_FINAL)
                    return
                if sender.is_cancelled():
                    pb_utils.Logger.log_info(f"generate: stream cancelled after {sent} tokens")
                    message = f"generation cancelled after {sent} tokens"
                    sender.send(_error(message, pb_utils.TritonError.CANCELLED), flags=_FINAL)
                    return
                following = next(pieces, None)
                text = pb_utils.Tensor("TEXT", np.array([[piece.encode("utf-8")]], dtype=np.object_))
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=[text]), flags=_FINAL if following is None else 0
                )
                sent += 1
                piece = following
            if sent == 0:
                # Nothing generated (the model ended the text at once): one final response with an empty token,
                # not a flag-only response, which gRPC stream clients do not see unless they ask for it.
                empty = pb_utils.Tensor("TEXT", np.array([[b""]], dtype=np.object_))
                sender.send(pb_utils.InferenceResponse(output_tensors=[empty]), flags=_FINAL)
        except Exception as e:  # noqa: BLE001 - a stream must always end with a final response
            pb_utils.Logger.log_error(f"generate: stream failed after {sent} tokens: {e!r}")
            try:
                sender.send(_error(f"generation failed: {e}", pb_utils.TritonError.INTERNAL), flags=_FINAL)
            except Exception as again:  # noqa: BLE001 - e.g. the final response already went out
                pb_utils.Logger.log_error(f"generate: could not end the stream: {again!r}")

    def finalize(self) -> None:
        # Streams still running end with UNAVAILABLE at their next token; wait for them to say so.
        self._stopping.set()
        self._pool.shutdown(wait=True, cancel_futures=False)
