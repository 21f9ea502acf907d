"""The blocking client: the AsyncClient run on a private event loop in a thread of its own, so both share
one implementation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime, timedelta
from typing import Any, TypeVar

import numpy.typing as npt

from aimesh.client.async_client import (
    DEFAULT_INGEST_ADDRESS,
    DEFAULT_NOTIFIER_ADDRESS,
    AsyncClient,
    PriorityName,
    TaskSpec,
)
from aimesh.client.payloads import DEFAULT_UPLOAD_THRESHOLD_BYTES, OCTET_STREAM, Tensors
from aimesh.client.retry import RetryPolicy
from aimesh.client.tls import ClientTls
from aimesh.v1 import ingest_pb2, notifier_pb2, result_pb2, task_pb2, tensor_pb2

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread; ``run`` blocks the caller until a coroutine is done there."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aimesh-client", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # the caller gave up (KeyboardInterrupt): stop the work in the loop too
            raise

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(_anext(iterator))
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self.run(_aclose(iterator))

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()


async def _anext(iterator: AsyncIterator[T]) -> T:
    return await anext(iterator)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


class Client:
    """The blocking twin of ``AsyncClient``, with the same arguments and methods; ``watch`` and
    ``watch_many`` are plain iterators. ``close`` (or ``with``) closes the channels and stops the loop
    thread; safe to call twice."""

    def __init__(
        self,
        ingest_address: str | Sequence[str] = DEFAULT_INGEST_ADDRESS,
        notifier_address: str | Sequence[str] = DEFAULT_NOTIFIER_ADDRESS,
        *,
        api_key: str | None = None,
        tls: ClientTls | None = None,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        upload_threshold_bytes: int = DEFAULT_UPLOAD_THRESHOLD_BYTES,
    ) -> None:
        self._async = AsyncClient(
            ingest_address,
            notifier_address,
            api_key=api_key,
            tls=tls,
            timeout_s=timeout_s,
            retry=retry,
            upload_threshold_bytes=upload_threshold_bytes,
        )
        self._loop = _LoopThread()
        self._closed = False

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run(self._async.close())
        finally:
            self._loop.stop()

    def submit(
        self,
        model: str,
        text: str = "",
        *,
        tensors: Tensors | None = None,
        parameters: Mapping[str, str] | None = None,
        deadline: datetime | timedelta | None = None,
        priority: PriorityName | task_pb2.Priority.ValueType | None = None,
        idempotency_key: str | None = None,
        model_version: str = "",
        timeout_s: float | None = None,
    ) -> str:
        """See ``AsyncClient.submit``."""
        spec = TaskSpec(model, text, parameters or {}, deadline, priority, idempotency_key, model_version, tensors)
        return self.submit_task(spec, timeout_s=timeout_s).task_id

    def submit_task(self, spec: TaskSpec, *, timeout_s: float | None = None) -> ingest_pb2.SubmitTaskResponse:
        """See ``AsyncClient.submit_task``."""
        return self._loop.run(self._async.submit_task(spec, timeout_s=timeout_s))

    def submit_many(
        self, specs: Sequence[TaskSpec], *, timeout_s: float | None = None
    ) -> list[ingest_pb2.SubmitTaskResponse]:
        """See ``AsyncClient.submit_many``."""
        return self._loop.run(self._async.submit_many(specs, timeout_s=timeout_s))

    def get(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.TaskState:
        """See ``AsyncClient.get``."""
        return self._loop.run(self._async.get(task_id, timeout_s=timeout_s))

    def cancel(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.CancelTaskResponse:
        """See ``AsyncClient.cancel``."""
        return self._loop.run(self._async.cancel(task_id, timeout_s=timeout_s))

    def watch(
        self, task_id: str, *, after_sequence: int = 0, timeout_s: float | None = None
    ) -> Iterator[notifier_pb2.TaskState]:
        """See ``AsyncClient.watch``."""
        return self._loop.iterate(self._async.watch(task_id, after_sequence=after_sequence, timeout_s=timeout_s))

    def watch_many(
        self, after: Mapping[str, int] | Sequence[str], *, timeout_s: float | None = None
    ) -> Iterator[notifier_pb2.TaskState]:
        """See ``AsyncClient.watch_many``."""
        return self._loop.iterate(self._async.watch_many(after, timeout_s=timeout_s))

    def result(self, task_id: str, *, timeout_s: float | None = None) -> notifier_pb2.TaskState:
        """See ``AsyncClient.result``."""
        return self._loop.run(self._async.result(task_id, timeout_s=timeout_s))

    def upload(
        self, data: bytes, *, content_type: str = OCTET_STREAM, timeout_s: float | None = None
    ) -> tensor_pb2.ObjectRef:
        """See ``AsyncClient.upload``."""
        return self._loop.run(self._async.upload(data, content_type=content_type, timeout_s=timeout_s))

    def download(self, task_id: str, output_name: str, *, timeout_s: float | None = None) -> bytes:
        """See ``AsyncClient.download``."""
        return self._loop.run(self._async.download(task_id, output_name, timeout_s=timeout_s))

    def outputs(
        self, result: notifier_pb2.TaskState | result_pb2.AIResultEvent, *, timeout_s: float | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        """See ``AsyncClient.outputs``."""
        return self._loop.run(self._async.outputs(result, timeout_s=timeout_s))
