"""The repository's models served by the real tritonserver, called through tritonclient's gRPC aio client."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from aimesh.devstack.triton import TritonServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = ("embed", "sentiment", "sleep", "summarize")  # the batched TEXT-in, tensors-out models
TENSOR_MODELS = ("digits", "identity", "resize")  # tensors in and out (tests/integration/test_tensor_models.py)
STREAMING_MODELS = ("generate",)  # decoupled: one response per token, served over ModelStreamInfer only
REFERENCE = json.loads((REPO_ROOT / "tests" / "data" / "minilm_reference.json").read_text())

DOCUMENT = (
    "The solar system has eight planets that orbit the sun. "
    "My neighbour bought a new bicycle yesterday. "
    "Jupiter is the largest planet and it orbits the sun every twelve years. "
    "Fresh bread smells wonderful in the morning. "
    "Every planet in the solar system follows an elliptical orbit around the sun."
)


class _Caller:
    """Sends TEXT to a model and asks for every output its metadata declares, as the worker does."""

    def __init__(self, client: InferenceServerClient) -> None:
        self._client = client
        self._outputs: dict[str, list[str]] = {}

    async def infer(
        self, model: str, texts: list[str] | list[bytes], parameters: dict[str, str] | None = None
    ) -> InferResult:
        if model not in self._outputs:
            metadata = await self._client.get_model_metadata(model, as_json=True)
            self._outputs[model] = [o["name"] for o in metadata["outputs"]]
        items = [t if isinstance(t, bytes) else t.encode() for t in texts]
        text = InferInput("TEXT", [len(items), 1], "BYTES")
        text.set_data_from_numpy(np.array(items, dtype=np.object_).reshape(-1, 1))
        outputs = [InferRequestedOutput(name) for name in self._outputs[model]]
        return await self._client.infer(model, [text], outputs=outputs, parameters=parameters, client_timeout=30.0)


@asynccontextmanager
async def _caller(server: TritonServer) -> AsyncIterator[_Caller]:
    # One client per test: the aio client is bound to the event loop it was made on.
    client = InferenceServerClient(server.grpc_url)
    try:
        yield _Caller(client)
    finally:
        await client.close()


def _texts(result: InferResult, name: str) -> list[str]:
    return [item.decode() for item in result.as_numpy(name).reshape(-1)]


def _inference_counts(server: TritonServer, model: str, *, at_least: int = 0) -> tuple[int, int]:
    """``nv_inference_count`` and ``nv_inference_exec_count`` of ``model``, summed over versions.

    Triton counts a request after its response is on the way, so a client can see the response first: poll
    until the count reaches ``at_least`` (a few seconds at most).
    """
    deadline = time.monotonic() + 5.0
    while True:
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text = response.read().decode()
        totals = {"nv_inference_count": 0, "nv_inference_exec_count": 0}
        for name, labels, value in re.findall(r"^(nv_inference_(?:exec_)?count)\{([^}]*)\} (\S+)$", text, re.M):
            if f'model="{model}"' in labels:
                totals[name] += int(float(value))
        if totals["nv_inference_count"] >= at_least or time.monotonic() > deadline:
            return totals["nv_inference_count"], totals["nv_inference_exec_count"]
        time.sleep(0.05)


async def test_every_model_follows_the_text_contract(triton: TritonServer) -> None:
    client = InferenceServerClient(triton.grpc_url)
    try:
        configs = [(await client.get_model_config(model, as_json=True))["config"] for model in MODELS]
    finally:
        await client.close()
    for config in configs:
        assert int(config["max_batch_size"]) > 0
        assert "dynamic_batching" in config
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("TEXT", "TYPE_STRING", ["1"])]
        assert all(group["kind"] == "KIND_CPU" for group in config["instance_group"])


async def test_summarize_returns_central_sentences_in_order(triton: TritonServer) -> None:
    async with _caller(triton) as caller:
        default = await caller.infer("summarize", [DOCUMENT])
        two = await caller.infer("summarize", [DOCUMENT], {"sentences": "2"})
    assert _texts(two, "SUMMARY") == [
        "The solar system has eight planets that orbit the sun. "
        "Every planet in the solar system follows an elliptical orbit around the sun."
    ]
    assert _texts(default, "SUMMARY")[0].count(". ") == 2  # three sentences by default


async def test_sentiment_labels_and_scores(triton: TritonServer) -> None:
    async with _caller(triton) as caller:
        result = await caller.infer(
            "sentiment", ["I love this, it is wonderful!", "This is terrible and I hate it.", "It is a box."]
        )
    assert _texts(result, "LABEL") == ["positive", "negative", "neutral"]
    scores = result.as_numpy("SCORES")
    assert scores.shape == (3, 4) and scores.dtype == np.float32
    assert scores[0, 3] > 0.5 and scores[1, 3] < -0.5
    np.testing.assert_allclose(scores[:, :3].sum(axis=1), 1.0, atol=0.01)  # neg + neu + pos


async def test_embed_matches_sentence_transformers(triton: TritonServer) -> None:
    sentences = REFERENCE["sentences"]
    async with _caller(triton) as caller:
        result = await caller.infer("embed", sentences)
    vectors = result.as_numpy("EMBEDDING")
    reference = np.array(REFERENCE["embeddings"], dtype=np.float32)
    assert vectors.shape == (len(sentences), 384) and vectors.dtype == np.float32
    cosines = (vectors * reference).sum(axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.999, cosines


async def test_sleep_batches_concurrent_requests(triton: TritonServer) -> None:
    concurrency, rounds = 32, 4
    async with _caller(triton) as caller:
        await caller.infer("sleep", ["warm-up"])
        before_items, before_executions = _inference_counts(triton, "sleep", at_least=1)

        async def client_loop(index: int) -> None:
            for round_ in range(rounds):
                result = await caller.infer("sleep", [f"{index}-{round_}"])
                assert _texts(result, "TEXT") == [f"{index}-{round_}"]

        started = time.monotonic()
        await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
        elapsed_s = time.monotonic() - started
    items, executions = _inference_counts(triton, "sleep", at_least=before_items + concurrency * rounds)
    items, executions = items - before_items, executions - before_executions
    assert items == concurrency * rounds
    average_batch = items / executions
    print(
        f"sleep: {items} items in {executions} executions (average batch {average_batch:.1f}), "
        f"{items / elapsed_s:.0f} items/s at concurrency {concurrency}"
    )
    assert average_batch > 1


async def test_bad_parameter_fails_only_its_own_request(triton: TritonServer) -> None:
    async with _caller(triton) as caller:
        # Two slow executions occupy both sleep instances, so the burst behind them queues and is batched.
        blockers = [asyncio.create_task(caller.infer("sleep", ["blocker"], {"delay_ms": "300"})) for _ in range(2)]
        await asyncio.sleep(0.05)
        burst = [caller.infer("sleep", [f"ok-{i}"], {"delay_ms": "10", "unknown": "ignored"}) for i in range(6)]
        bad = caller.infer("sleep", ["bad"], {"delay_ms": "soon"})
        *good_results, bad_result = await asyncio.gather(*burst, bad, return_exceptions=True)
        await asyncio.gather(*blockers)

        bad_summaries = await asyncio.gather(
            caller.infer("summarize", [DOCUMENT], {"sentences": "0"}),
            caller.infer("summarize", [DOCUMENT], {"sentences": "three"}),
            caller.infer("summarize", [DOCUMENT], {"sentences": "1"}),
            return_exceptions=True,
        )

    assert [_texts(r, "TEXT") for r in good_results] == [[f"ok-{i}"] for i in range(6)]
    assert isinstance(bad_result, InferenceServerException)
    assert bad_result.status() == "StatusCode.INVALID_ARGUMENT"
    assert "delay_ms" in str(bad_result.message())
    for error in bad_summaries[:2]:
        assert isinstance(error, InferenceServerException)
        assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert isinstance(bad_summaries[2], InferResult)
    assert len(_texts(bad_summaries[2], "SUMMARY")) == 1


async def test_a_request_queue_timeout_rejects_what_would_start_too_late(triton: TritonServer) -> None:
    """The worker sends a task's remaining time as the request's queue timeout; the models allow the override."""
    async with _caller(triton) as caller:
        await caller.infer("sleep", ["warm-up"])  # the model's metadata is cached: the blockers go out at once
        # Both sleep instances busy for 3 s (one execution each): a request behind them waits in the queue.
        blockers = []
        for _ in range(2):
            blockers.append(asyncio.create_task(caller.infer("sleep", ["blocker"], {"delay_ms": "3000"})))
            await asyncio.sleep(0.1)
        text = InferInput("TEXT", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"late"]], dtype=np.object_))
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as info:
            await caller._client.infer("sleep", [text], timeout=200_000, client_timeout=30.0)
        waited_s = time.monotonic() - started
        await asyncio.gather(*blockers)
    # Triton checks queued requests' timeouts when its batcher wakes, not to the millisecond: well before 3 s is
    # the point (without the override the request would have run once a blocker finished).
    assert waited_s < 2.5, f"rejected only after {waited_s:.2f}s: the queue timeout was not applied"
    assert info.value.status() == "StatusCode.UNAVAILABLE" and "timeout" in str(info.value.message()).lower()
    print(f"rejected after {waited_s:.2f}s: {info.value.status()} {info.value.message()}")


async def test_invalid_utf8_fails_only_its_own_request(triton: TritonServer) -> None:
    async with _caller(triton) as caller:
        good: InferResult | BaseException
        bad: InferResult | BaseException
        good, bad = await asyncio.gather(
            caller.infer("embed", ["fine text"]),
            caller.infer("embed", [b"\xff\xfe not utf-8"]),
            return_exceptions=True,
        )
    assert isinstance(good, InferResult) and good.as_numpy("EMBEDDING").shape == (1, 384)
    assert isinstance(bad, InferenceServerException)
    assert bad.status() == "StatusCode.INVALID_ARGUMENT"


GENERATE_DIR = REPO_ROOT / "models" / "generate" / "1"


def generator_corpus_lines() -> list[str]:
    return (GENERATE_DIR / "corpus.txt").read_text().splitlines()


def _load_generator() -> Any:
    # The generate model's own module, to know what a seeded request must stream.
    path = GENERATE_DIR / "ngram.py"
    name = "_triton_model_generate_ngram"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return module.TrigramModel.from_corpus()


def _prompt(text: str) -> InferInput:
    # The tensor the worker sends: [1, 1] BYTES.
    tensor = InferInput("TEXT", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=np.object_))
    return tensor


class _Token:
    def __init__(self, result: InferResult, arrived_s: float) -> None:
        response = result.get_response()
        self.request_id = response.id
        self.array = result.as_numpy("TEXT")
        self.text = self.array.reshape(-1)[0].decode()
        # Triton marks every response of a decoupled stream with this parameter; true on the last one.
        self.final = response.parameters["triton_final_response"].bool_param
        self.arrived_s = arrived_s


async def _stream(
    server: TritonServer, requests: list[tuple[str, dict[str, str]]], *, cancel_after: int | None = None
) -> tuple[list[_Token], list[InferenceServerException]]:
    """Send ``requests`` (prompt, parameters) on one gRPC stream as request ids "0", "1", ...; collect every
    response until Triton ends the stream (or, with ``cancel_after``, cancel it after that many tokens)."""
    client = InferenceServerClient(server.grpc_url)
    tokens: list[_Token] = []
    errors: list[InferenceServerException] = []

    async def request_iterator() -> AsyncIterator[dict[str, Any]]:
        for i, (prompt, parameters) in enumerate(requests):
            yield {
                "model_name": "generate",
                "inputs": [_prompt(prompt)],
                "parameters": parameters,
                "request_id": str(i),
            }
        # Returning half-closes the stream: Triton still sends every response, then ends it.

    started = time.monotonic()
    try:
        responses = client.stream_infer(request_iterator(), stream_timeout=30.0)
        async for result, error in responses:
            if error is not None:
                errors.append(error)
                continue
            tokens.append(_Token(result, time.monotonic() - started))
            if cancel_after is not None and len(tokens) == cancel_after:
                responses.cancel()
                break
    finally:
        await client.close()
    return tokens, errors


async def test_generate_follows_the_streaming_contract(triton: TritonServer) -> None:
    client = InferenceServerClient(triton.grpc_url)
    try:
        config = (await client.get_model_config("generate", as_json=True))["config"]
        index = await client.get_model_repository_index(as_json=True)
    finally:
        await client.close()
    assert sorted(m["name"] for m in index["models"]) == sorted(MODELS + STREAMING_MODELS + TENSOR_MODELS)
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert int(config["max_batch_size"]) == 1  # one prompt per request, shaped [1, 1] as the worker sends it
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("TEXT", "TYPE_STRING", ["1"])]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [("TEXT", "TYPE_STRING", ["1"])]


async def test_generate_streams_one_token_per_response(triton: TritonServer) -> None:
    prompt, parameters = "The worker", {"max_tokens": "6", "seed": "11", "token_delay_ms": "40"}
    expected = list(_load_generator().generate(prompt, max_tokens=6, seed=11))
    assert len(expected) == 6

    tokens, errors = await _stream(triton, [(prompt, parameters)])

    assert not errors
    assert [t.text for t in tokens] == expected
    assert all(t.array.shape == (1, 1) and t.request_id == "0" for t in tokens)
    assert [t.final for t in tokens] == [False] * 5 + [True]  # the final flag rides on the last token
    # One at a time: each token left the model 40 ms after the one before, not all together at the end.
    assert tokens[-1].arrived_s - tokens[0].arrived_s >= 0.15
    # The same seed streams the same text again.
    again, _ = await _stream(triton, [(prompt, parameters)])
    assert [t.text for t in again] == expected


async def test_generate_serves_concurrent_streams_and_ends_every_one(triton: TritonServer) -> None:
    # Three requests on one stream, told apart by request id. Each ends with exactly one final response,
    # including a prompt the model ends at once (greedy decoding at the end of a paragraph of the docs: one
    # final response with an empty TEXT), and the two slow ones run side by side, not one after the other.
    generator = _load_generator()
    expected = [list(generator.generate(p, max_tokens=8, seed=3)) for p in ("Kafka", "The notifier")]
    assert min(map(len, expected)) >= 4, "the corpus changed: pick a seed that does not end the text that soon"
    # A whole paragraph of the training text as prompt: greedy decoding may well end it right there.
    ending = next(
        line for line in generator_corpus_lines() if not list(generator.generate(line, max_tokens=1, temperature=0.0))
    )
    slow = {"max_tokens": "8", "seed": "3", "token_delay_ms": "50"}
    tokens, errors = await _stream(triton, [("Kafka", slow), ("The notifier", slow), (ending, {"temperature": "0"})])
    assert not errors
    by_request = {rid: [t for t in tokens if t.request_id == rid] for rid in ("0", "1", "2")}
    for stream in by_request.values():
        assert stream and [t.final for t in stream] == [False] * (len(stream) - 1) + [True]
    assert [[t.text for t in by_request[rid]] for rid in ("0", "1")] == expected
    assert [t.text for t in by_request["2"]] == [""]
    assert by_request["1"][0].arrived_s < by_request["0"][-1].arrived_s


async def test_generate_rejects_invalid_max_tokens(triton: TritonServer) -> None:
    tokens, errors = await _stream(triton, [("The worker", {"max_tokens": "0"}), ("The worker", {"max_tokens": "2"})])
    # In a gRPC stream an error is a message in the response, without a status code...
    assert len(errors) == 1 and "parameter 'max_tokens' must be between 1 and 512" in str(errors[0].message())
    assert [t.request_id for t in tokens] == ["1", "1"]  # ...and the stream serves the next request.
    # Triton maps the model's INVALID_ARG to a status where it has one: HTTP generate_stream answers 400.
    request = urllib.request.Request(
        f"http://{triton.http_url}/v2/models/generate/generate_stream",
        data=json.dumps({"TEXT": "The worker", "max_tokens": "lots"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        await asyncio.to_thread(urllib.request.urlopen, request, timeout=10)
    assert raised.value.code == 400
    assert "parameter 'max_tokens' must be an integer" in raised.value.read().decode()


async def test_generate_stops_when_the_stream_is_cancelled(triton: TritonServer) -> None:
    log_start = triton.log_path.stat().st_size
    assert len(list(_load_generator().generate("Kafka", max_tokens=512, seed=1))) > 20
    tokens, _ = await _stream(
        triton, [("Kafka", {"max_tokens": "512", "seed": "1", "token_delay_ms": "50"})], cancel_after=3
    )
    assert len(tokens) == 3 and not tokens[-1].final
    # The model notices before its next token and stops, instead of streaming the 100-odd tokens left.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        with triton.log_path.open("rb") as log:
            log.seek(log_start)
            if b"generate: stream cancelled after" in log.read():
                break
        await asyncio.sleep(0.1)
    else:
        pytest.fail(f"the model did not report the cancellation in {triton.log_path}")
    # And it still serves.
    tokens, errors = await _stream(triton, [("Kafka", {"max_tokens": "2", "seed": "5"})])
    assert not errors and tokens and tokens[-1].final
