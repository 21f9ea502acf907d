"""DownloadOutput: a task's output held by reference, streamed from the object store to its tenant.

An output's object key is derived from its tenant, task and name (``objects.output_key``), so any notifier replica
serves it without knowing the task, and a tenant can only ever name its own objects: another tenant's output is
NOT_FOUND exactly as one that does not exist. The SHA-256 recorded with the object is checked as it is read; a
mismatch ends the stream DATA_LOSS after the chunks already sent, which the client discards.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any, NoReturn

import grpc
from google.rpc import code_pb2

from aimesh import auth
from aimesh.errors import InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info
from aimesh.objects import DigestMismatch, ObjectNotFound, ObjectStore, ObjectStoreUnavailable, output_key
from aimesh.v1 import notifier_pb2

from .refusals import check_task_id

CHUNK_BYTES = 1 << 20
_DONE = object()


class Downloads:
    def __init__(self, store: ObjectStore | None) -> None:
        self._store = store

    async def download(
        self, request: notifier_pb2.DownloadOutputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[notifier_pb2.DownloadOutputResponse]:
        await check_task_id(context, request.task_id)
        if not request.output_name:
            await abort_invalid(context, InvalidTask([("output_name", "required")]))
        tenant = auth.current_tenant()
        if self._store is None:
            await _not_found(context, request)
        store = self._store
        key = output_key(tenant, request.task_id, request.output_name)
        try:
            found, chunks = await asyncio.to_thread(store.read, key, CHUNK_BYTES)
        except ObjectNotFound:
            await _not_found(context, request)
        except ObjectStoreUnavailable as e:
            await _unavailable(context, e)
        yield notifier_pb2.DownloadOutputResponse(object=found.to_proto())
        try:
            while (chunk := await asyncio.to_thread(_next, chunks)) is not _DONE:
                assert isinstance(chunk, bytes)
                yield notifier_pb2.DownloadOutputResponse(chunk=chunk)
        except ObjectStoreUnavailable as e:
            await _unavailable(context, e)
        except DigestMismatch as e:
            await abort_with(context, code_pb2.DATA_LOSS, f"output {request.output_name}: {e}")
        finally:
            # A client gone mid-stream: release the store's connection now (unless a read is still running on
            # its thread: it ends with the stream's next chunk).
            with contextlib.suppress(ValueError):
                chunks.close()


def _next(chunks: Iterator[bytes]) -> object:
    return next(chunks, _DONE)


async def _not_found(
    context: grpc.aio.ServicerContext[Any, Any], request: notifier_pb2.DownloadOutputRequest
) -> NoReturn:
    await abort_with(
        context,
        code_pb2.NOT_FOUND,
        f"task {request.task_id} has no output {request.output_name!r} held by reference (unknown, not finished, "
        "inline in its result, or expired)",
        [error_info("OUTPUT_NOT_FOUND", task_id=request.task_id, output_name=request.output_name)],
    )


async def _unavailable(context: grpc.aio.ServicerContext[Any, Any], error: Exception) -> NoReturn:
    await abort_with(context, code_pb2.UNAVAILABLE, f"object store: {error}", [error_info("OBJECT_STORE_UNAVAILABLE")])
