"""One logical watch of one or many tasks over as many WatchTask/WatchTasks streams as it takes: a stream that
drops is opened again from the last sequence seen of each task, so the caller sees no gap and no repeat."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import grpc

from aimesh import events
from aimesh.client.errors import ClientError, deadline_exceeded
from aimesh.v1 import notifier_pb2


class _Update(Protocol):
    """WatchTaskResponse and WatchTasksResponse alike."""

    @property
    def state(self) -> notifier_pb2.TaskState: ...


# The ErrorInfo reason of a stream the server ended because its client fell behind.
STREAM_BEHIND = "STREAM_BEHIND"

# Opens a stream of responses with a `state` field for these tasks (task id -> resume after this sequence),
# with this gRPC timeout in seconds (None: none).
OpenStream = Callable[[Mapping[str, int], float | None], grpc.aio.UnaryStreamCall[Any, Any]]


class WatchCursor:
    """Reads the next update of the watched tasks, opening a stream whenever none is open.

    ``next`` raises ``ClientError`` when the stream fails; the caller retries it (a retryable error) and
    the next call resumes on a new stream. Two ends are resumed here at once: the server's idle or send
    timeout (DEADLINE_EXCEEDED), and a stream that fell behind its buffer (RESOURCE_EXHAUSTED, STREAM_BEHIND)
    after delivering something, so that resuming always makes progress. Updates whose sequence is not past
    the last one seen of their task are dropped, so even a server that ignores ``after_sequence`` causes no
    repeat. ``deadline`` (time.monotonic) bounds the whole watch.
    """

    def __init__(self, open_stream: OpenStream, after: Mapping[str, int], deadline: float | None) -> None:
        self._open_stream = open_stream
        self._last = dict(after)
        self._ended: set[str] = set()
        self.deadline = deadline
        self._call: grpc.aio.UnaryStreamCall[Any, Any] | None = None
        self._delivered = False  # whether the open stream delivered an update

    @property
    def last_sequences(self) -> dict[str, int]:
        return dict(self._last)

    async def next(self) -> notifier_pb2.TaskState | None:
        """The next new update, or None once the server ended the watch (every task had its terminal update)."""
        while True:
            if self._call is None:
                pending = {task: seq for task, seq in self._last.items() if task not in self._ended}
                if not pending:
                    return None
                self._call = self._open_stream(pending, self._remaining_s())
                self._delivered = False
            call = self._call
            try:
                response = await call.read()
            except grpc.aio.AioRpcError as e:
                self._call = None
                error = ClientError.from_rpc_error(e)
                if not self._resumable(error):
                    raise error from e
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    raise deadline_exceeded("no terminal update within the watch's timeout") from e
                continue  # watch again, from the last sequence seen
            if response is grpc.aio.EOF:
                # A stream ends with status OK only after the terminal update (possibly one sent before
                # after_sequence, on a resumed watch): the watch is over. A dropped stream ends with an error.
                self._call = None
                self._ended |= self._last.keys()
                return None
            state = cast(_Update, response).state
            task = state.task_id if state.task_id in self._last else self._only_task()
            if task is None or task in self._ended:
                continue
            if state.sequence and state.sequence <= self._last[task]:
                continue  # seen already
            if state.sequence:
                self._last[task] = state.sequence
            if events.is_terminal(state.status):
                self._ended.add(task)
            self._delivered = True
            return state

    def _resumable(self, error: ClientError) -> bool:
        if error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return True
        behind = error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == STREAM_BEHIND
        return behind and self._delivered

    def close(self) -> None:
        """Cancel the open stream, if any; safe to call twice."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    def _remaining_s(self) -> float | None:
        if self.deadline is None:
            return None
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise deadline_exceeded("no terminal update within the watch's timeout")
        return remaining

    def _only_task(self) -> str | None:
        return next(iter(self._last)) if len(self._last) == 1 else None
