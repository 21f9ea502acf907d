"""The repository's models served by the real tritonserver, called through tritonclient's gRPC aio client."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from aimesh.devstack.ports import free_ports
from aimesh.devstack.triton import TritonServer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = ("embed", "sentiment", "sleep", "summarize")
REFERENCE = json.loads((REPO_ROOT / "tests" / "data" / "minilm_reference.json").read_text())

DOCUMENT = (
    "The solar system has eight planets that orbit the sun. "
    "My neighbour bought a new bicycle yesterday. "
    "Jupiter is the largest planet and it orbits the sun every twelve years. "
    "Fresh bread smells wonderful in the morning. "
    "Every planet in the solar system follows an elliptical orbit around the sun."
)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    grpc_port, http_port, metrics_port = free_ports(3)
    server = TritonServer(
        model_repository=REPO_ROOT / "models",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        log_dir=tmp_path_factory.mktemp("triton-logs"),
    )
    started = time.monotonic()
    with server:
        print(f"tritonserver ready in {time.monotonic() - started:.1f} s")
        yield server


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
        return await self._client.infer(
            model, [text], outputs=outputs, parameters=parameters, client_timeout=30.0
        )


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
        for name, labels, value in re.findall(
            r"^(nv_inference_(?:exec_)?count)\{([^}]*)\} (\S+)$", text, re.M
        ):
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
        assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
            ("TEXT", "TYPE_STRING", ["1"])
        ]
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
        blockers = [
            asyncio.create_task(caller.infer("sleep", ["blocker"], {"delay_ms": "300"})) for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        burst = [
            caller.infer("sleep", [f"ok-{i}"], {"delay_ms": "10", "unknown": "ignored"}) for i in range(6)
        ]
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
