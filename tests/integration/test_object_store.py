"""The object store adapter (``aimesh.objects``) against a real SeaweedFS ``weed server -s3``, started as the local
stack starts it (``aimesh.devstack.seaweedfs``): contents come back byte-identical with their digest verified,
tampered references and missing objects are refused, the sweeper deletes old objects only, a failed streamed upload
leaves nothing behind, and a store that is down or unreachable is reported unavailable quickly."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from aimesh.devstack.ports import free_ports
from aimesh.devstack.seaweedfs import DEV_CREDENTIALS, INTERNAL_PORTS, WeedServer, weed_binary
from aimesh.devstack.stack_settings import ROOT
from aimesh.objects import (
    PART_BYTES,
    DigestMismatch,
    ObjectNotFound,
    ObjectSizeMismatch,
    ObjectStore,
    ObjectStoreUnavailable,
    StoredObject,
    output_key,
    upload_key,
)

MB = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    run_dir = tmp_path_factory.mktemp("objectstore")
    s3_port, *internal = free_ports(1 + INTERNAL_PORTS)
    weed = WeedServer(
        binary=weed_binary(ROOT / ".cache"),
        data_dir=run_dir / "data",
        s3_port=s3_port,
        internal_ports=internal,
        log_dir=run_dir / "logs",
    )
    with weed:  # started, ready with its bucket, stopped at the end
        yield weed


@pytest.fixture
def store(server: WeedServer) -> Iterator[ObjectStore]:
    if server.pid is None:  # a test that stopped it failed half-way
        server.start()
        server.wait_ready(60)
    client = server.store()
    yield client
    client.close()


def test_twenty_megabytes_come_back_byte_identical_with_their_digest(store: ObjectStore) -> None:
    data = os.urandom(20 * MB)
    ref = store.put(output_key("acme", "t-1", "image"), data, "image/png")
    assert (ref.size, ref.sha256, ref.content_type) == (len(data), hashlib.sha256(data).hexdigest(), "image/png")
    assert store.get(StoredObject.from_proto(ref.to_proto())) == data
    assert store.head(ref.key) == ref


def test_fifty_megabytes_stream_in_as_a_multipart_upload_and_stream_out_in_chunks(store: ObjectStore) -> None:
    data = os.urandom(50 * MB)
    chunks = (data[i : i + MB] for i in range(0, len(data), MB))
    ref = store.put_stream(upload_key("acme", "u-50"), chunks, size=len(data))
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert store.head(ref.key) == ref  # the digest is recorded with the object
    read = list(store.iter_chunks(ref, chunk_bytes=MB))
    assert max(len(c) for c in read) <= MB and b"".join(read) == data
    assert store.pending_uploads() == []


def test_a_tampered_reference_is_refused(store: ObjectStore) -> None:
    ref = store.put(upload_key("acme", "u-tamper"), b"the real contents")
    with pytest.raises(DigestMismatch):
        store.get(replace(ref, sha256=hashlib.sha256(b"other contents").hexdigest()))
    with pytest.raises(DigestMismatch):
        store.get(replace(ref, size=ref.size - 1))
    with pytest.raises(DigestMismatch):
        list(store.iter_chunks(replace(ref, sha256="0" * 64), chunk_bytes=4))


def test_a_missing_object_is_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.get(StoredObject(store.bucket, upload_key("acme", "never-written"), 1, "0" * 64))
    assert not store.exists(upload_key("acme", "never-written"))
    with pytest.raises(ObjectNotFound):
        store.head(upload_key("acme", "never-written"))
    store.delete(upload_key("acme", "never-written"))  # deleting nothing is no error


def test_a_retried_output_overwrites_the_first(store: ObjectStore) -> None:
    key = output_key("acme", "t-retried", "out")
    store.put(key, b"first run")
    second = store.put(key, b"second run")
    assert store.get(second) == b"second run"


def test_the_sweep_deletes_old_objects_and_keeps_new_ones(server: WeedServer) -> None:
    store = ObjectStore(server.endpoint_url, bucket="swept", credentials=DEV_CREDENTIALS)
    store.ensure_bucket()
    old = store.put(upload_key("acme", "old"), b"old")
    time.sleep(3.5)  # S3 timestamps have whole seconds
    new = store.put(output_key("acme", "t", "new"), b"new")
    assert store.sweep(older_than_s=2.0) == 1
    assert not store.exists(old.key) and store.exists(new.key)
    assert store.get(new) == b"new"
    store.close()


def _failing_after(data: bytes, chunks: int) -> Iterator[bytes]:
    for i in range(chunks):
        yield data[i * MB : (i + 1) * MB]
    raise ConnectionResetError("the client went away")


def test_a_failed_streamed_upload_leaves_no_object_and_no_pending_upload(store: ObjectStore) -> None:
    data = os.urandom(20 * MB)
    key = upload_key("acme", "u-failed")
    with pytest.raises(ConnectionResetError):
        store.put_stream(key, _failing_after(data, 18), size=len(data))  # two parts sent, then the client is gone
    assert not store.exists(key) and key not in store.pending_uploads()
    with pytest.raises(ObjectSizeMismatch):
        store.put_stream(key, iter([data[: 2 * PART_BYTES + MB]]), size=len(data))  # fewer bytes than declared
    assert not store.exists(key) and key not in store.pending_uploads()


def test_a_stopped_store_is_unavailable_quickly_and_keeps_its_objects_over_a_restart(
    server: WeedServer, store: ObjectStore
) -> None:
    ref = store.put(upload_key("acme", "kept"), b"kept over a restart")
    server.stop()
    try:
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            store.get(ref)
        with pytest.raises(ObjectStoreUnavailable):
            store.put(upload_key("acme", "while-down"), b"x" * 1000)
        assert time.monotonic() - started < 5
    finally:
        server.start()
        server.wait_ready(60)
    assert store.get(ref) == b"kept over a restart"


def test_an_unreachable_store_is_unavailable_within_seconds(tmp_path: Path) -> None:
    (port,) = free_ports(1)  # nothing listens there
    store = ObjectStore(f"http://127.0.0.1:{port}", credentials=DEV_CREDENTIALS)
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailable):
        store.put(upload_key("acme", "u"), b"x")
    with pytest.raises(ObjectStoreUnavailable):
        store.ensure_bucket()
    assert time.monotonic() - started < 5
