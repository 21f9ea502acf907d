"""The contracts proved from outside with third-party clients: grpcurl (through server reflection, with no
proto files) and kcat (reading what the services wrote to Kafka)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from aimesh.auth import hash_key, new_key
from aimesh.devstack.ports import free_ports
from aimesh.devstack.stack import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".cache" / "bin"))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools`")
    return path


def grpcurl(
    address: str, method: str, body: dict | None = None, *, timeout_s: float = 60, headers: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    argv = [tool("grpcurl"), "-plaintext", "-max-time", str(int(timeout_s))]
    for header in headers:
        argv += ["-H", header]
    if body is not None:
        argv += ["-d", json.dumps(body)]
    argv += [address, method]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s + 10)


def kcat_keys_and_headers(mesh: Stack, topic: str) -> list[str]:
    """Every record of ``topic`` as kcat prints it: ``<key> <headers>``, one line each."""
    argv = [tool("kcat"), "-C", "-b", mesh.kafka_bootstrap, "-t", topic, "-o", "beginning", "-e", "-q"]
    read = subprocess.run([*argv, "-f", "%k %h\n"], capture_output=True, text=True, timeout=60)
    assert read.returncode == 0, read.stderr
    return read.stdout.splitlines()


def stream_messages(stdout: str) -> list[dict]:
    """The messages of a grpcurl stream: pretty JSON objects one after another, with the proto's own
    snake_case field names."""
    decoder = json.JSONDecoder()
    messages, index = [], 0
    text = stdout.strip()
    while index < len(text):
        message, end = decoder.raw_decode(text, index)
        messages.append(message)
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return messages


def test_reflection_lists_the_services(mesh: Stack) -> None:
    for address, service in (
        (mesh.ingest_address, "aimesh.v1.IngestService"),
        (mesh.notifier_address, "aimesh.v1.NotifierService"),
    ):
        listed = grpcurl(address, "list")
        assert listed.returncode == 0, listed.stderr
        assert service in listed.stdout.split() and "grpc.health.v1.Health" in listed.stdout.split()
        health = grpcurl(address, "grpc.health.v1.Health/Check", {})
        assert json.loads(health.stdout) == {"status": "SERVING"}


def test_submit_watch_and_get_with_grpcurl_and_kcat(mesh: Stack) -> None:
    submitted = grpcurl(
        mesh.ingest_address,
        "aimesh.v1.IngestService/SubmitTask",
        {"modelName": "sentiment", "input": {"text": "grpcurl makes this delightful"}, "idempotencyKey": "e2e-1"},
    )
    assert submitted.returncode == 0, submitted.stderr
    task_id = json.loads(submitted.stdout)["task_id"]

    watched = grpcurl(mesh.notifier_address, "aimesh.v1.NotifierService/WatchTask", {"taskId": task_id})
    assert watched.returncode == 0, watched.stderr
    states = [m["state"] for m in stream_messages(watched.stdout)]
    assert states[-1]["status"] == "TASK_STATUS_SUCCEEDED"
    outputs = {t["name"]: t for t in states[-1]["result"]["output"]["tensors"]}
    assert outputs["LABEL"]["string_data"] == ["positive"]

    got = grpcurl(mesh.notifier_address, "aimesh.v1.NotifierService/GetTask", {"taskId": task_id})
    assert json.loads(got.stdout)["state"]["status"] == "TASK_STATUS_SUCCEEDED"

    again = grpcurl(
        mesh.ingest_address,
        "aimesh.v1.IngestService/SubmitTask",
        {"modelName": "sentiment", "input": {"text": "grpcurl makes this delightful"}, "idempotencyKey": "e2e-1"},
    )
    assert json.loads(again.stdout) | {"accepted_at": None} == {
        "task_id": task_id,
        "duplicate": True,
        "accepted_at": None,
    }

    # kcat, a third-party Kafka client, sees the task and its results keyed by the task id.
    for topic in (mesh.topics.tasks_topic, mesh.topics.results_topic):
        lines = [line for line in kcat_keys_and_headers(mesh, topic) if line.startswith(task_id)]
        assert lines, f"{task_id} not on {topic}"
        assert all("content-type=application/x-protobuf" in line for line in lines)
        if topic == mesh.topics.tasks_topic:
            assert len(lines) == 1  # the idempotent repeat published nothing


@pytest.mark.parametrize(
    ("service", "method", "body", "code", "fragment"),
    [
        ("ingest", "IngestService/SubmitTask", {"modelName": "sentiment"}, "InvalidArgument", "input"),
        (
            "ingest",
            "IngestService/SubmitTask",
            {"modelName": "sentiment", "input": {"text": " "}},
            "InvalidArgument",
            "input.text",
        ),
        ("ingest", "IngestService/SubmitTask", {"modelName": "nope", "input": {"text": "hi"}}, "NotFound", "nope"),
        (
            "ingest",
            "IngestService/SubmitTask",
            {"modelName": "sentiment", "input": {"text": "hi"}, "parameters": {"Bad Key": "1"}},
            "InvalidArgument",
            "parameters",
        ),
        (
            "ingest",
            "IngestService/SubmitTask",
            {"modelName": "sentiment", "input": {"text": "hi"}, "deadline": "2001-01-01T00:00:00Z"},
            "FailedPrecondition",
            "deadline",
        ),
        ("ingest", "IngestService/SubmitTasks", {"tasks": []}, "InvalidArgument", "tasks"),
        ("notifier", "NotifierService/GetTask", {"taskId": "not-a-uuid"}, "InvalidArgument", "task_id"),
        (
            "notifier",
            "NotifierService/GetTask",
            {"taskId": "00000000-0000-4000-8000-000000000000"},
            "NotFound",
            "not known",
        ),
        ("notifier", "NotifierService/WatchTask", {"taskId": ""}, "InvalidArgument", "task_id"),
    ],
)
def test_bad_input_gets_the_documented_status(mesh: Stack, service, method, body, code, fragment) -> None:
    address = mesh.ingest_address if service == "ingest" else mesh.notifier_address
    answer = grpcurl(address, f"aimesh.v1.{method}", body)
    assert answer.returncode != 0
    assert f"Code: {code}" in answer.stderr, answer.stderr
    assert fragment in answer.stderr


def test_an_ingest_with_api_keys_wants_one(mesh: Stack, tmp_path: Path) -> None:
    """The session mesh runs with AIMESH_AUTH=off; a second ingest beside it turns keys on."""
    key = new_key()
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# e2e\nacme:{hash_key(key)}\n")
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    mesh.start_service(
        "ingest-keys",
        "aimesh.ingest",
        {"AIMESH_AUTH": "on", "AIMESH_API_KEYS_FILE": str(keys_file), "AIMESH_INGEST_ADDRESS": address},
    )
    try:
        mesh.wait_grpc_healthy(address, "ingest-keys")  # health needs no key
        body = {"modelName": "sleep", "input": {"text": "keyed"}}
        for headers in ((), ("authorization: Bearer aimesh_not-a-key",)):
            refused = grpcurl(address, "aimesh.v1.IngestService/SubmitTask", body, headers=headers)
            assert "Code: Unauthenticated" in refused.stderr, refused.stderr
        accepted = grpcurl(
            address, "aimesh.v1.IngestService/SubmitTask", body, headers=(f"authorization: Bearer {key}",)
        )
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["task_id"]
    finally:
        mesh.services.pop("ingest-keys").stop()
