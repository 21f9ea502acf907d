"""The client's errors: every failed call surfaces as a ``ClientError`` carrying the gRPC status code, its
message and the google.rpc details the server attached (``grpc-status-details-bin``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2, status_pb2

from aimesh.errors import AimeshError

STATUS_DETAILS_KEY = "grpc-status-details-bin"

M = TypeVar("M", bound=Message)

# The google.rpc detail types a server of this project attaches (and a few standard ones a proxy may add).
_DETAIL_TYPES: tuple[type[Message], ...] = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.RetryInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
)


class ClientError(AimeshError):
    """A call failed. ``code`` is the gRPC status code, ``message`` the server's message, ``details`` the
    google.rpc detail messages it sent (ErrorInfo, RetryInfo, BadRequest, QuotaFailure, ...).

    ``retryable`` is true for UNAVAILABLE, and for RESOURCE_EXHAUSTED when the server said when to retry
    (RetryInfo): a message that is too large or a full subscription quota is not helped by waiting.
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: Sequence[Message] = ()) -> None:
        self.code = code
        self.message = message
        self.details = list(details)
        reason = f" [{self.reason}]" if self.reason else ""
        super().__init__(f"{code.name}: {message}{reason}")

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        if self.code == grpc.StatusCode.UNAVAILABLE:
            return True
        return self.code == grpc.StatusCode.RESOURCE_EXHAUSTED and self.retry_delay_s is not None

    @property
    def reason(self) -> str:
        """The ErrorInfo reason (for example BACKLOG_TOO_LONG), or empty."""
        info = self.detail(error_details_pb2.ErrorInfo)
        return info.reason if info is not None else ""

    @property
    def retry_delay_s(self) -> float | None:
        """How long the server asked the client to wait before retrying (RetryInfo), or None."""
        info = self.detail(error_details_pb2.RetryInfo)
        if info is None or not info.HasField("retry_delay"):
            return None
        return max(0.0, float(info.retry_delay.ToTimedelta().total_seconds()))

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        """(field, description) of each BadRequest field violation."""
        bad = self.detail(error_details_pb2.BadRequest)
        return [(v.field, v.description) for v in bad.field_violations] if bad is not None else []

    def detail(self, kind: type[M]) -> M | None:
        """The first detail of type ``kind``, or None."""
        return next((d for d in self.details if isinstance(d, kind)), None)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> ClientError:
        """Translate a failed call, decoding the google.rpc.Status the server put in the trailing metadata."""
        code = error.code()
        message = error.details() or ""
        details: list[Message] = []
        for key, value in error.trailing_metadata() or ():
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                continue  # an unreadable trailer: the code and message still say what happened
            message = status.message or message
            for packed in status.details:
                detail = _unpack(packed)
                if detail is not None:
                    details.append(detail)
        return cls(code, message, details)


class DigestMismatch(ClientError):
    """Contents that are not what their object reference names (size or SHA-256): found by the client after a
    download or an upload, or by the notifier while it read them (its DATA_LOSS). Code DATA_LOSS, not retried:
    the stored object is damaged."""

    def __init__(self, message: str, details: Sequence[Message] = ()) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, message, details)


def _unpack(packed: any_pb2.Any) -> Message | None:
    for kind in _DETAIL_TYPES:
        if packed.Is(kind.DESCRIPTOR):
            detail = kind()
            packed.Unpack(detail)
            return detail
    return None


def deadline_exceeded(message: str) -> ClientError:
    """The error a call's own deadline (not the server's) produces."""
    return ClientError(grpc.StatusCode.DEADLINE_EXCEEDED, message)
