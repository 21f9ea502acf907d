"""Property-based fuzzing of every public gRPC method against the real mesh.

Hypothesis throws random and malformed requests at each method: arbitrary bytes as the request body, and
structured requests with random field values (strings, task ids, parameters, deadlines with out-of-range
nanoseconds, unknown enum numbers). A body that does not parse is INVALID_ARGUMENT (grpc_edge's
MalformedRequestInterceptor; gRPC alone would answer UNKNOWN). Every answer must be a status the method
documents in its proto comment (OK included); after the run every service still answers its health check
and a real task still succeeds.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aimesh.devstack.stack import Stack
from aimesh.v1 import ingest_pb2, ingest_pb2_grpc, notifier_pb2, notifier_pb2_grpc, task_pb2, tensor_pb2

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

Code = grpc.StatusCode

# Documented in protos/aimesh/v1/*.proto for each method (auth is off in the test mesh, so no
# UNAUTHENTICATED; UNAVAILABLE is documented for a broker or a notifier that is not ready).
SUBMIT = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED}
READ = {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAVAILABLE}
# Watches are cut by the client's own short deadline: a watched task that never ends is no error.
WATCH = READ | {Code.DEADLINE_EXCEEDED, Code.RESOURCE_EXHAUSTED}

MODELS = ["summarize", "sentiment", "embed", "sleep", "generate", "ghost", "digits", "resize", "identity"]

texts = st.text(max_size=200) | st.sampled_from(["", " ", "\x00", "a" * 5000, "héllo wörld"])
task_ids = st.uuids().map(str) | st.text(max_size=60) | st.sampled_from(["", "not-a-uuid", str(uuid.UUID(int=0))])
timestamps = st.builds(
    lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
    st.integers(-(2**40), 2**40),
    st.integers(-(2**31), 2**31 - 1),
)
# Only known models with sane parameters would run real inference: keep those rare and cheap.
parameters = st.dictionaries(
    st.text(max_size=20) | st.sampled_from(["delay_ms", "max_tokens", "seed", "temperature", "triton_final_response"]),
    st.text(max_size=20) | st.sampled_from(["0", "1", "-1", "1e99", "NaN", "60001"]),
    max_size=4,
)


@st.composite
def input_tensors(draw: st.DrawFn) -> tensor_pb2.InputTensor:
    """Tensors right and wrong: known and unknown names and datatypes, shapes with negative or huge dimensions,
    contents of any length, or references to objects that may not exist."""
    tensor = tensor_pb2.InputTensor(
        name=draw(st.sampled_from(["IMAGE", "UINT8_1", "FP32_2", "BYTES_1", ""]) | st.text(max_size=10)),
        datatype=draw(st.sampled_from(["BOOL", "UINT8", "FP16", "FP32", "INT64", "BYTES"]) | st.text(max_size=8)),
        shape=draw(st.lists(st.integers(-3, 10) | st.integers(-(2**63), 2**63 - 1), max_size=4)),
    )
    contents = draw(st.sampled_from(["raw", "object", "none"]))
    if contents == "raw":
        tensor.raw_contents = draw(st.binary(max_size=300))
    elif contents == "object":
        tensor.object.key = draw(st.sampled_from(["inputs/default/x", "outputs/a/b/c"]) | st.text(max_size=40))
        tensor.object.size = draw(st.integers(0, 2**64 - 1))
        tensor.object.sha256 = draw(st.sampled_from(["0" * 64]) | st.text(max_size=70))
    return tensor


@st.composite
def submit_requests(draw: st.DrawFn) -> ingest_pb2.SubmitTaskRequest:
    request = ingest_pb2.SubmitTaskRequest(
        model_name=draw(st.sampled_from(MODELS) | st.text(max_size=30)),
        model_version=draw(st.sampled_from(["", "1", "0", "-3"]) | st.text(max_size=10)),
        parameters=draw(parameters),
        idempotency_key=draw(st.sampled_from([""]) | st.text(max_size=200)),
        priority=draw(st.integers(-5, 5) | st.integers(-(2**31), 2**31 - 1)),  # type: ignore[arg-type]
    )
    kind = draw(st.sampled_from(["none", "text", "tensors"]))
    if kind == "text":
        request.input.text = draw(texts)
    elif kind == "tensors":
        request.input.tensors.tensors.extend(draw(st.lists(input_tensors(), max_size=3)))
    if draw(st.booleans()):
        deadline = draw(timestamps)
        request.deadline.seconds, request.deadline.nanos = deadline["seconds"], deadline["nanos"]
    return request


watch_requests = st.builds(
    lambda task_id, after: notifier_pb2.WatchTaskRequest(task_id=task_id, after_sequence=after),
    task_ids,
    st.integers(0, 2**32 - 1),
)


def _code(call: Callable[[], Any]) -> Code:
    try:
        result = call()
        if isinstance(result, Iterator):
            for _ in result:
                pass
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return Code.OK


def _raw_call(channel: grpc.Channel, method: str, streaming: bool) -> Callable[..., Any]:
    identity = lambda b: b  # noqa: E731 - bytes in, bytes out
    if streaming:
        return channel.unary_stream(method, request_serializer=identity, response_deserializer=identity)
    return channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)


@pytest.fixture(scope="module")
def channels(mesh: Stack) -> Iterator[tuple[grpc.Channel, grpc.Channel]]:
    with grpc.insecure_channel(mesh.ingest_address) as ingest, grpc.insecure_channel(mesh.notifier_address) as notifier:
        yield ingest, notifier


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

METHODS = [
    ("/aimesh.v1.IngestService/SubmitTask", 0, False, SUBMIT),
    ("/aimesh.v1.IngestService/SubmitTasks", 0, False, SUBMIT),
    ("/aimesh.v1.NotifierService/GetTask", 1, False, READ),
    ("/aimesh.v1.NotifierService/CancelTask", 1, False, READ),
    ("/aimesh.v1.NotifierService/WatchTask", 1, True, WATCH),
    ("/aimesh.v1.NotifierService/WatchTasks", 1, True, WATCH),
    ("/aimesh.v1.NotifierService/DownloadOutput", 1, True, READ | {Code.DEADLINE_EXCEEDED}),
]


@pytest.mark.parametrize(
    ("method", "server", "streaming", "allowed"), METHODS, ids=[m[0].rsplit("/", 1)[1] for m in METHODS]
)
def test_arbitrary_bytes_get_a_documented_status(
    channels: tuple[grpc.Channel, grpc.Channel], method: str, server: int, streaming: bool, allowed: set[Code]
) -> None:
    call = _raw_call(channels[server], method, streaming)

    @FUZZ
    @given(body=st.binary(max_size=512))
    def run(body: bytes) -> None:
        code = _code(lambda: call(body, timeout=1.0))
        assert code in allowed, f"{method} answered {code} to {body!r}"

    run()


def test_random_submissions_get_a_documented_status(channels: tuple[grpc.Channel, grpc.Channel]) -> None:
    ingest = ingest_pb2_grpc.IngestServiceStub(channels[0])
    submit, submit_many = ingest.SubmitTask, ingest.SubmitTasks

    @FUZZ
    @given(request=submit_requests(), batch=st.lists(submit_requests(), max_size=4))
    def run(request: ingest_pb2.SubmitTaskRequest, batch: list[ingest_pb2.SubmitTaskRequest]) -> None:
        code = _code(lambda: submit(request, timeout=10))
        assert code in SUBMIT, f"SubmitTask answered {code} to {request}"
        code = _code(lambda: submit_many(ingest_pb2.SubmitTasksRequest(tasks=batch), timeout=10))
        assert code in SUBMIT, f"SubmitTasks answered {code} to {batch}"

    run()


def test_random_lookups_watches_and_cancels_get_a_documented_status(
    channels: tuple[grpc.Channel, grpc.Channel],
) -> None:
    notifier = notifier_pb2_grpc.NotifierServiceStub(channels[1])
    get, cancel, watch, watch_many = notifier.GetTask, notifier.CancelTask, notifier.WatchTask, notifier.WatchTasks

    @FUZZ
    @given(task_id=task_ids, one=watch_requests, many=st.lists(watch_requests, max_size=5))
    def run(task_id: str, one: notifier_pb2.WatchTaskRequest, many: list[notifier_pb2.WatchTaskRequest]) -> None:
        code = _code(lambda: get(notifier_pb2.GetTaskRequest(task_id=task_id), timeout=5))
        assert code in READ, f"GetTask answered {code} to {task_id!r}"
        code = _code(lambda: cancel(notifier_pb2.CancelTaskRequest(task_id=task_id), timeout=5))
        assert code in READ, f"CancelTask answered {code} to {task_id!r}"
        code = _code(lambda: watch(one, timeout=0.5))
        assert code in WATCH, f"WatchTask answered {code} to {one}"
        code = _code(lambda: watch_many(notifier_pb2.WatchTasksRequest(tasks=many), timeout=0.5))
        assert code in WATCH, f"WatchTasks answered {code} to {many}"

    run()


def test_every_service_is_healthy_and_serves_after_the_fuzzing(
    mesh: Stack, channels: tuple[grpc.Channel, grpc.Channel]
) -> None:
    """Runs after the fuzz tests above (pytest keeps file order): nothing they sent broke a service."""
    for name, channel in zip(("ingest", "notifier"), channels, strict=True):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{name} is {reply.status} after fuzzing"
        assert mesh.services[name].alive(), f"{name} process died during fuzzing"
    for index in range(2):
        assert mesh.services[f"worker-{index}"].alive(), f"worker-{index} died during fuzzing"

    submit = ingest_pb2_grpc.IngestServiceStub(channels[0]).SubmitTask
    watch = notifier_pb2_grpc.NotifierServiceStub(channels[1]).WatchTask
    accepted = submit(
        ingest_pb2.SubmitTaskRequest(model_name="sentiment", input=task_pb2.TaskInput(text="still fine")), timeout=10
    )
    states = [u.state for u in watch(notifier_pb2.WatchTaskRequest(task_id=accepted.task_id), timeout=60)]
    assert states[-1].status == 3, states[-1]  # TASK_STATUS_SUCCEEDED
