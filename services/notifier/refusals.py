"""The notifier's refusals: the status each call or stream can end with, and the details a client can act on
(what to retry, when, and how to resume a stream without a gap)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, NoReturn

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2

from aimesh.errors import InvalidTask
from aimesh.grpc_edge import abort_invalid, abort_with, error_info

from .buffers import BufferLimits

log = logging.getLogger(__name__)

# How long the status of a stream cut for not reading may take to be handed to gRPC core.
UNREAD_ABORT_WAIT_S = 1.0

NOT_A_TASK_ID = (
    "must be a task id as SubmitTask returned it: a UUID in canonical form (lower-case hex in 8-4-4-4-12 groups, "
    "no braces, no urn:uuid: prefix)"
)


def is_task_id(task_id: str) -> bool:
    """Whether ``task_id`` is a UUID in the one form ingest makes. Other spellings of a UUID are refused, not
    translated: an answer then always names the task as the request did, and no two spellings of one task
    are two subscriptions."""
    try:
        return str(uuid.UUID(task_id)) == task_id
    except ValueError:
        return False


async def check_task_id(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> None:
    if not is_task_id(task_id):
        await abort_invalid(context, InvalidTask([("task_id", NOT_A_TASK_ID)]))


async def abort_not_found(context: grpc.aio.ServicerContext[Any, Any], task_id: str) -> NoReturn:
    """The one answer for a task that is unknown and for a task of another tenant: they must not differ."""
    await abort_with(
        context,
        code_pb2.NOT_FOUND,
        f"task {task_id} is not known (never submitted, past retention, or not yet read)",
        [error_info("TASK_NOT_FOUND", task_id=task_id)],
    )


async def abort_starting(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await abort_with(
        context,
        code_pb2.UNAVAILABLE,
        "the notifier is still reading task history; retry shortly",
        [error_info("NOTIFIER_STARTING")],
    )


async def abort_quota(
    context: grpc.aio.ServicerContext[Any, Any],
    scope: str,
    message: str,
    description: str,
    *,
    limit: str = "",
    retry_s: float | None = None,
) -> NoReturn:
    details: list[Message] = [
        error_info("TOO_MANY_SUBSCRIPTIONS", scope=scope, limit=limit),
        error_details_pb2.QuotaFailure(
            violations=[error_details_pb2.QuotaFailure.Violation(subject=scope, description=description)]
        ),
    ]
    if retry_s is not None:
        delay = Duration()
        delay.FromNanoseconds(int(retry_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    await abort_with(context, code_pb2.RESOURCE_EXHAUSTED, message, details)


async def abort_idle(context: grpc.aio.ServicerContext[Any, Any], idle_timeout_s: float) -> NoReturn:
    await abort_with(
        context,
        code_pb2.DEADLINE_EXCEEDED,
        f"no update for {idle_timeout_s:g}s: the stream is closed; watch again to "
        "resume (pass the last sequence seen as after_sequence)",
        [error_info("STREAM_IDLE", idle_timeout_s=f"{idle_timeout_s:g}")],
    )


async def abort_unread(context: grpc.aio.ServicerContext[Any, Any], send_timeout_s: float) -> NoReturn:
    timeout = f"{send_timeout_s:g}"
    log.info("closing a stream whose client took no update for %ss", timeout)
    abort = abort_with(
        context,
        code_pb2.DEADLINE_EXCEEDED,
        f"the client took no update for {timeout}s: the stream is closed; watch again to resume "
        "(pass the last sequence seen as after_sequence)",
        [error_info("STREAM_SEND_TIMEOUT", send_timeout_s=timeout)],
    )
    try:
        await asyncio.wait_for(abort, UNREAD_ABORT_WAIT_S)
    except TimeoutError:
        # The status waits behind the update the client does not take (gRPC core sends it if the client
        # ever reads, or drops it with the connection). End the call as a cancelled one, so that all
        # it holds here is freed now.
        raise asyncio.CancelledError from None


async def abort_behind(context: grpc.aio.ServicerContext[Any, Any], limits: BufferLimits, resume: str) -> NoReturn:
    """End a stream whose buffer overflowed; ``resume`` names the last sequence sent of each task still open."""
    log.info("closing a stream that fell behind (%s)", resume)
    await abort_with(
        context,
        code_pb2.RESOURCE_EXHAUSTED,
        f"the stream fell behind: its client did not keep up (more than {limits.max_bytes} bytes or "
        f"{limits.max_items} updates waiting, or the notifier's stream buffers full); watch again with "
        f"after_sequence set to the last sequence received ({resume}) for the rest, without a gap",
        [
            error_info("STREAM_BEHIND", max_bytes=str(limits.max_bytes), max_updates=str(limits.max_items)),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject="stream", description=f"at most {limits.max_bytes} bytes buffered"
                    )
                ]
            ),
        ],
    )
