"""The object store adapter's pure parts: the key layout and its tenant check, references and their protobuf form,
the settings, how botocore failures map to aimesh errors, the checks made before anything is sent, and what the
local stack gives its services. tests/integration/test_object_store.py runs the rest against a real server."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from pydantic import ValidationError

from aimesh.devstack.seaweedfs import DEV_CREDENTIALS, ObjectStoreServerError, weed_binary
from aimesh.devstack.stack import Stack, StackSettings
from aimesh.errors import AimeshError
from aimesh.object_refs import translate_error
from aimesh.objects import (
    DigestMismatch,
    ObjectNotFound,
    ObjectSizeMismatch,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    StoredObject,
    output_key,
    tenant_of_key,
    upload_key,
)
from aimesh.settings import GatewaySettings, IngestSettings, NotifierSettings, WorkerSettings
from aimesh.v1 import tensor_pb2

# A port nothing listens on is never contacted by these tests: every check here fails before a request.
NOWHERE = "http://127.0.0.1:9"


def test_keys_are_laid_out_per_tenant_and_name_their_tenant() -> None:
    assert upload_key("acme", "u-1") == "inputs/acme/u-1"
    assert output_key("acme", "t-1", "image") == "outputs/acme/t-1/image"
    assert tenant_of_key(upload_key("acme", "u-1")) == "acme"
    assert tenant_of_key(output_key("acme", "t-1", "image")) == "acme"


def test_an_output_key_is_the_same_for_every_run_of_a_task() -> None:
    assert output_key("acme", "t-1", "probs") == output_key("acme", "t-1", "probs")
    assert output_key("acme", "t-1", "probs") != output_key("acme", "t-1", "logits")


def test_no_name_can_escape_its_place_in_the_layout() -> None:
    key = output_key("acme", "t-1", "../../inputs/other/x")
    assert key.count("/") == 3 and tenant_of_key(key) == "acme"
    assert tenant_of_key(upload_key("acme", "a/b")) == "acme"
    with pytest.raises(ValueError):
        upload_key("acme", "")


@pytest.mark.parametrize("key", ["", "inputs", "inputs/acme", "inputs//x", "other/acme/x", "outputs/acme/t/"])
def test_a_key_outside_the_layout_has_no_tenant(key: str) -> None:
    assert tenant_of_key(key) is None


def test_a_reference_round_trips_through_its_protobuf_form() -> None:
    ref = StoredObject("aimesh", "inputs/acme/u-1", 50 << 20, hashlib.sha256(b"x").hexdigest(), "image/png")
    wire = tensor_pb2.ObjectRef.FromString(ref.to_proto().SerializeToString())
    assert StoredObject.from_proto(wire) == ref
    assert ref.tenant == "acme"
    assert StoredObject.from_proto(tensor_pb2.ObjectRef(key="k")).content_type == "application/octet-stream"


def test_every_object_store_error_has_the_one_root_and_only_unavailability_is_retryable() -> None:
    errors = (ObjectStoreUnavailable, ObjectNotFound, DigestMismatch, ObjectTooLarge, ObjectSizeMismatch)
    assert all(issubclass(e, ObjectStoreError) and issubclass(e, AimeshError) for e in errors)
    assert issubclass(ObjectStoreServerError, AimeshError)
    assert [e for e in errors if e.retryable] == [ObjectStoreUnavailable]


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (EndpointConnectionError(endpoint_url=NOWHERE), ObjectStoreUnavailable),
        (ReadTimeoutError(endpoint_url=NOWHERE), ObjectStoreUnavailable),
        (_client_error("InternalError", 500), ObjectStoreUnavailable),
        (_client_error("SlowDown", 503), ObjectStoreUnavailable),
        (_client_error("NoSuchKey", 404), ObjectNotFound),
        (_client_error("404", 404), ObjectNotFound),
        (_client_error("AccessDenied", 403), ObjectStoreError),
        (NoCredentialsError(), ObjectStoreError),
    ],
)
def test_botocore_failures_become_aimesh_errors(error: Exception, expected: type[ObjectStoreError]) -> None:
    assert type(translate_error(error, "get k")) is expected


def test_a_missing_bucket_is_unavailability_for_a_writer() -> None:
    assert type(translate_error(_client_error("NoSuchBucket", 404), "get k")) is ObjectNotFound
    assert type(translate_error(_client_error("NoSuchBucket", 404), "put k", writing=True)) is ObjectStoreUnavailable


def test_the_store_is_off_without_an_endpoint_and_built_from_the_settings_with_one() -> None:
    assert ObjectStore.of(WorkerSettings.model_construct()) is None
    settings = WorkerSettings(object_store_url=NOWHERE, object_store_bucket="tensors", max_object_bytes=1000)
    store = ObjectStore.of(settings)
    assert store is not None
    assert (store.endpoint_url, store.bucket, store.max_object_bytes) == (NOWHERE, "tensors", 1000)
    store.close()


def test_contents_over_the_limit_are_refused_before_anything_is_sent() -> None:
    store = ObjectStore(NOWHERE, max_object_bytes=10, credentials=DEV_CREDENTIALS)
    with pytest.raises(ObjectTooLarge):
        store.put("inputs/a/u", b"x" * 11)
    with pytest.raises(ObjectTooLarge):
        store.put_stream("inputs/a/u", iter([b"x"]), size=11)
    with pytest.raises(ObjectTooLarge):
        store.get(StoredObject("aimesh", "inputs/a/u", 11, "0" * 64))


def test_a_stream_longer_than_it_declared_is_refused_at_the_first_byte_too_many() -> None:
    store = ObjectStore(NOWHERE, credentials=DEV_CREDENTIALS)
    upload = store.open_upload("inputs/a/u", size=4)
    upload.write(b"abc")
    with pytest.raises(ObjectSizeMismatch):
        upload.write(b"de")
    with pytest.raises(ObjectSizeMismatch):
        store.open_upload("inputs/a/u", size=4).finish()  # fewer bytes than declared


@pytest.mark.parametrize("cls", [IngestSettings, WorkerSettings, NotifierSettings])
def test_ingest_the_worker_and_the_notifier_read_the_object_store_settings(
    cls: type[WorkerSettings], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIMESH_OBJECT_STORE_URL", "http://store:8333")
    monkeypatch.setenv("AIMESH_INLINE_LIMIT_BYTES", "1024")
    settings = cls()
    assert (settings.object_store_url, settings.inline_limit_bytes) == ("http://store:8333", 1024)
    assert "object_store_url" not in GatewaySettings.model_fields


def test_object_retention_defaults_to_the_notifiers_result_retention() -> None:
    defaults = NotifierSettings.model_construct()
    assert defaults.object_retention_s == defaults.retention_s


def test_inline_contents_must_fit_a_kafka_record() -> None:
    with pytest.raises(ValidationError, match="AIMESH_INLINE_LIMIT_BYTES"):
        WorkerSettings(inline_limit_bytes=2_000_000, max_record_bytes=1_000_000)


def test_the_local_stack_gives_every_service_the_store_and_credentials(tmp_path: Path) -> None:
    stack = Stack(StackSettings.on_free_ports(tmp_path))
    env = stack.service_env()
    assert env["AIMESH_OBJECT_STORE_URL"] == stack.object_store_url
    assert stack.object_store_url.endswith(f":{stack.settings.object_store_port}")
    assert {k: env[k] for k in DEV_CREDENTIALS} == DEV_CREDENTIALS
    ports = [*stack._object_store_ports, *(v for v in stack.settings.model_dump().values() if isinstance(v, int))]
    assert len(stack._object_store_ports) == 7 and len(set(stack._object_store_ports)) == 7
    assert not set(stack._object_store_ports) & set(ports[7:])


def test_a_stack_without_an_object_store_gives_no_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIMESH_OBJECT_STORE_URL", raising=False)
    stack = Stack(StackSettings.on_free_ports(tmp_path, object_store_port=0))
    assert "AIMESH_OBJECT_STORE_URL" not in stack.service_env()
    assert stack.object_store_url == ""
    with pytest.raises(ObjectStoreServerError):
        stack.start_object_store()


def test_a_missing_weed_binary_says_how_to_build_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ObjectStoreServerError, match="make tools"):
        weed_binary(tmp_path)
