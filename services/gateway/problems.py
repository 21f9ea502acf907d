"""Errors as ``application/problem+json`` (RFC 9457): the gRPC status of a failed call, with its google.rpc
details, becomes an HTTP status and a problem object; the gateway's own refusals (body too large, wrong
content type, malformed JSON, FastAPI's request validation) take the same shape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from aimesh.client.errors import ClientError
from aimesh.errors import AimeshError

PROBLEM_JSON = "application/problem+json"

# google.rpc's HTTP mapping (google/rpc/code.proto), but FAILED_PRECONDITION is 422, not 400: the one the
# gateway sees is a deadline already past, a request well formed and still unprocessable, which a client
# must not retry unchanged and should not read as a syntax error.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

# UNAVAILABLE is always worth retrying, so a 503 always says when; the server's RetryInfo wins.
DEFAULT_UNAVAILABLE_RETRY_S = 1


@dataclass(eq=False)
class Problem(AimeshError):
    """One problem object. ``grpc_status`` names the upstream status (empty for the gateway's own refusals);
    ``retry_after_s`` becomes the ``Retry-After`` header (and ``retryAfterS`` where there are no headers)."""

    status: int
    detail: str
    grpc_status: str = ""
    violations: Sequence[tuple[str, str]] = ()
    reason: str = ""
    retry_after_s: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        name = self.grpc_status or _PHRASES.get(self.status, "error")
        return name.lower().replace("_", "-").replace(" ", "-")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"urn:aimesh:problem:{self.slug}",
            "title": _PHRASES.get(self.status, "Error"),
            "status": self.status,
            "detail": self.detail,
        }
        if self.grpc_status:
            body["grpcStatus"] = self.grpc_status
        if self.violations:
            body["violations"] = [{"field": f, "description": d} for f, d in self.violations]
        if self.reason:
            body["reason"] = self.reason
        if self.retry_after_s is not None:
            body["retryAfterS"] = self.retry_after_s
        return {**body, **self.extra}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers, media_type=PROBLEM_JSON)


_PHRASES = {s.value: s.phrase for s in HTTPStatus} | {499: "Client Closed Request"}


def from_client_error(error: ClientError) -> Problem:
    """The problem a failed gRPC call answers: its status, message, field violations, reason and retry delay."""
    status = HTTP_STATUS.get(error.code, 500)
    return Problem(
        status,
        error.message,
        grpc_status=error.code.name,
        violations=error.field_violations,
        reason=error.reason,
        retry_after_s=_retry_after_s(error),
    )


def from_rpc_error(error: grpc.aio.AioRpcError) -> Problem:
    return from_client_error(ClientError.from_rpc_error(error))


def _retry_after_s(error: ClientError) -> int | None:
    delay = error.retry_delay_s
    if delay is not None:
        return max(1, math.ceil(delay))  # Retry-After is whole seconds; never tell a client to retry at once
    return DEFAULT_UNAVAILABLE_RETRY_S if error.code == grpc.StatusCode.UNAVAILABLE else None


def bad_request(detail: str, field_name: str = "") -> Problem:
    return Problem(400, detail, violations=[(field_name, detail)])


async def on_problem(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, Problem)
    return error.response()


async def on_validation_error(_request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own request validation (path, query, headers) as a 400 problem with one violation per error."""
    assert isinstance(error, RequestValidationError)
    violations = [(".".join(str(p) for p in e.get("loc", ())), str(e.get("msg", ""))) for e in error.errors()]
    return Problem(400, "the request is not valid", violations=violations).response()


async def on_http_error(_request: Request, error: Exception) -> JSONResponse:
    """Starlette's refusals (an unknown route 404, a wrong method 405) as problems too."""
    assert isinstance(error, HTTPException)
    response = Problem(error.status_code, str(error.detail)).response()
    response.headers.update(error.headers or {})
    return response
