"""Large tensor contents by reference (claim check) on ingest's side.

- ``UploadInput``: a client streams a large input's contents; they go to the object store as they arrive (a
  multipart upload, at most one part held here at a time) and the answer is the object's reference.
- ``place``: before a task is published, a tensor's inline contents over the inline limit are moved to the store
  (so a record never carries them), and a reference the client gave is checked: the store configured, the object
  the caller's tenant's and present with the size it names. The worker verifies the digest when it fetches it.

A store that cannot be reached makes both answer UNAVAILABLE; a task whose tensors are all small never touches it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.rpc import code_pb2

from aimesh.errors import AimeshError, InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.object_upload import Upload
from aimesh.objects import (
    DEFAULT_CONTENT_TYPE,
    ObjectNotFound,
    ObjectSizeMismatch,
    ObjectStore,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    StoredObject,
    tenant_of_key,
    upload_key,
)
from aimesh.v1 import ingest_pb2, tensor_pb2

from .tensor_checks import SHA256_HEX

MAX_CHUNK_BYTES = 1 << 20


class UploadRefused(AimeshError):
    """An upload whose messages break the UploadInput contract."""


class ClaimCheck:
    """``store``: None when the mesh runs without one. ``inline_limit_bytes``: larger inline contents go to the
    store. ``max_object_bytes``: the largest upload."""

    def __init__(self, store: ObjectStore | None, *, inline_limit_bytes: int, max_object_bytes: int) -> None:
        self._store = store
        self._inline_limit_bytes = inline_limit_bytes
        self._max_object_bytes = max_object_bytes

    async def upload(
        self,
        requests: AsyncIterator[ingest_pb2.UploadInputRequest],
        context: grpc.aio.ServicerContext[Any, Any],
        tenant: str,
    ) -> ingest_pb2.UploadInputResponse:
        if self._store is None:
            await abort_with(
                context, code_pb2.FAILED_PRECONDITION, "this mesh runs without an object store: send tensors inline"
            )
        store = self._store
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "header":
            await abort_invalid(context, InvalidTask([("header", "the first message must be the header")]))
        header = first.header
        violations = self._header_violations(header)
        if violations:
            await abort_invalid(context, InvalidTask(violations))
        key = upload_key(tenant, str(uuid.uuid4()))
        try:
            stored = await _stored(
                store.open_upload(key, size=header.size, content_type=header.content_type or DEFAULT_CONTENT_TYPE),
                requests,
            )
        except UploadRefused as e:
            await abort_invalid(context, InvalidTask([("chunk", str(e))]))
        except ObjectSizeMismatch as e:
            await abort_invalid(context, InvalidTask([("chunk", f"the chunks do not add up to header.size: {e}")]))
        except ObjectTooLarge as e:
            await abort_invalid(context, InvalidTask([("header.size", str(e))]))
        except ObjectStoreUnavailable as e:
            await abort_with(
                context, code_pb2.UNAVAILABLE, f"object store: {e}", [error_info("OBJECT_STORE_UNAVAILABLE")]
            )
        except ObjectStoreError as e:  # the store refused a well-formed upload: the mesh's configuration, not the call
            await abort_with(context, code_pb2.INTERNAL, f"object store refused the upload: {e}")
        if header.sha256 and header.sha256 != stored.sha256:
            await asyncio.to_thread(store.delete, key)
            await abort_invalid(
                context, InvalidTask([("header.sha256", f"the contents received have SHA-256 {stored.sha256}")])
            )
        return ingest_pb2.UploadInputResponse(object=stored.to_proto())

    def _header_violations(self, header: ingest_pb2.UploadHeader) -> list[tuple[str, str]]:
        violations = []
        if header.size > self._max_object_bytes:
            violations.append(("header.size", f"is {header.size} bytes; the limit is {self._max_object_bytes}"))
        if header.sha256 and not SHA256_HEX.fullmatch(header.sha256):
            violations.append(("header.sha256", "must be empty or 64 lowercase hex digits"))
        if len(header.content_type) > 255:
            violations.append(("header.content_type", "longer than 255 characters"))
        return violations

    async def place(self, tensors: Sequence[tensor_pb2.InputTensor], tenant: str, field: str) -> list[tuple[str, str]]:
        """Move large inline contents to the store and check references, in place; the violations found.
        Raises ObjectStoreUnavailable."""
        violations: list[tuple[str, str]] = []
        for i, tensor in enumerate(tensors):
            path = f"{field}[{i}]"
            if tensor.WhichOneof("contents") == "object":
                violations.extend(await self._checked_reference(tensor.object, tenant, f"{path}.object"))
            elif self._store is not None and len(tensor.raw_contents) > self._inline_limit_bytes:
                key = upload_key(tenant, str(uuid.uuid4()))
                stored = await asyncio.to_thread(self._store.put, key, tensor.raw_contents)
                tensor.object.CopyFrom(stored.to_proto())  # clears raw_contents (one of contents)
        return violations

    async def _checked_reference(self, ref: tensor_pb2.ObjectRef, tenant: str, path: str) -> list[tuple[str, str]]:
        if self._store is None:
            return [(path, "this mesh runs without an object store: send the contents inline")]
        if ref.bucket != self._store.bucket or tenant_of_key(ref.key) != tenant:
            return [(path, "names no object of this tenant: upload it with UploadInput")]
        try:
            found = await asyncio.to_thread(self._store.head, ref.key)
        except ObjectNotFound:
            return [(f"{path}.key", "no such object (never uploaded, or expired)")]
        if found.size != ref.size:
            return [(f"{path}.size", f"the object is {found.size} bytes, not {ref.size}")]
        return []


async def _stored(upload: Upload, requests: AsyncIterator[ingest_pb2.UploadInputRequest]) -> StoredObject:
    """Write each chunk of the stream as it comes (each step on a thread of its own, none held between chunks),
    then finish; on any failure, a client gone included, abort the upload so that no part stays in the store."""
    try:
        async for message in requests:
            if message.WhichOneof("part") != "chunk":
                raise UploadRefused("only the first message may be the header")
            if len(message.chunk) > MAX_CHUNK_BYTES:
                raise UploadRefused(f"a chunk is {len(message.chunk)} bytes; the limit is {MAX_CHUNK_BYTES}")
            await asyncio.to_thread(upload.write, message.chunk)
        return await asyncio.to_thread(upload.finish)
    except BaseException:
        await asyncio.shield(asyncio.to_thread(upload.abort))
        raise
