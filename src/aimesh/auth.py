"""API keys and tenants at the gRPC edge.

A client sends ``authorization: Bearer <key>`` metadata; the key maps to a tenant. Servers hold only the
SHA-256 of each key (a key is 32 random bytes, so a plain hash is enough: nothing to brute-force), in
``tenant:sha256hex`` entries read from ``AIMESH_API_KEYS_FILE`` and ``AIMESH_API_KEYS``. A tenant may have
several keys (rotation). With ``AIMESH_AUTH=off`` no key is asked for and every call belongs to the default
tenant: for local development only.

``AuthInterceptor`` checks every call except health checks and reflection, answers UNAUTHENTICATED for a
missing or unknown key, and runs the handler with its tenant in ``current_tenant()``.

Mint a key: ``python -m aimesh.auth new-key <tenant>`` prints the key (give it to the tenant) and the
``tenant:sha256hex`` line for the keys file.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import inspect
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from aimesh.errors import AimeshError
from aimesh.grpc_handlers import Behavior, rewrap
from aimesh.settings import TENANT_PATTERN, ServerSettings

if TYPE_CHECKING:
    from aimesh.grpc_handlers import Handler

# Services a caller may reach without a key: load balancers and grpcurl need them before anything else.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
KEY_PREFIX = "aimesh_"

_TENANT = re.compile(TENANT_PATTERN)
_HASH = re.compile(r"[0-9a-f]{64}")
_tenant_var: ContextVar[str | None] = ContextVar("aimesh_tenant", default=None)


class AuthConfigError(AimeshError, ValueError):
    """The keys configuration cannot be used (a malformed entry, a key hash listed twice, auth on without keys)."""


class Unauthenticated(AimeshError):
    """The call carries no usable API key."""


def current_tenant() -> str:
    """The tenant of the call being handled; set by AuthInterceptor (GrpcServer always installs it)."""
    tenant = _tenant_var.get()
    if tenant is None:
        raise RuntimeError("no tenant: the call did not pass through AuthInterceptor")
    return tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_entries(text: str, *, source: str) -> list[tuple[str, str]]:
    """``tenant:sha256hex`` entries separated by newlines, commas or spaces; ``#`` starts a comment."""
    entries = []
    for line in text.splitlines():
        for item in re.split(r"[,\s]+", line.split("#", 1)[0]):
            if not item:
                continue
            tenant, _, digest = item.rpartition(":")
            digest = digest.lower()
            if not _TENANT.fullmatch(tenant) or not _HASH.fullmatch(digest):
                raise AuthConfigError(
                    f"{source}: {item[:80]!r} is not `tenant:sha256hex` (tenant: 1-64 of [A-Za-z0-9._-])"
                )
            entries.append((tenant, digest))
    return entries


@dataclass(frozen=True)
class Authenticator:
    """Maps API keys to tenants; when ``enabled`` is false every call is ``default_tenant``'s."""

    enabled: bool
    default_tenant: str = "default"
    key_hashes: tuple[tuple[bytes, str], ...] = ()  # (sha256 digest, tenant)

    @classmethod
    def disabled(cls, default_tenant: str = "default") -> Authenticator:
        return cls(enabled=False, default_tenant=default_tenant)

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[str, str]]) -> Authenticator:
        hashes: dict[str, str] = {}
        for tenant, digest in entries:
            if hashes.setdefault(digest, tenant) != tenant:
                raise AuthConfigError(f"one key hash is listed for tenants {hashes[digest]} and {tenant}")
        if not hashes:
            raise AuthConfigError(
                "AIMESH_AUTH=on but no API keys are configured: set AIMESH_API_KEYS_FILE or AIMESH_API_KEYS "
                "(mint one with `python -m aimesh.auth new-key <tenant>`), or AIMESH_AUTH=off for local development"
            )
        return cls(enabled=True, key_hashes=tuple((bytes.fromhex(d), t) for d, t in hashes.items()))

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> Authenticator:
        if not settings.auth_enabled:
            return cls.disabled(settings.default_tenant)
        entries = parse_entries(settings.api_keys, source="AIMESH_API_KEYS")
        if settings.api_keys_file:
            path = Path(settings.api_keys_file)
            try:
                text = path.read_text()
            except OSError as e:
                raise AuthConfigError(f"cannot read AIMESH_API_KEYS_FILE {path}: {e.strerror}") from e
            entries += parse_entries(text, source=str(path))
        return cls.from_entries(entries)

    def tenant_of(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        """The tenant whose key ``metadata`` carries; raises Unauthenticated."""
        if not self.enabled:
            return self.default_tenant
        values = [v for k, v in metadata or () if k.lower() == "authorization"]
        if len(values) != 1 or not isinstance(values[0], str):
            raise Unauthenticated("an API key is required: send the metadata `authorization: Bearer <key>`")
        scheme, _, key = values[0].strip().partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthenticated("an API key is required: send the metadata `authorization: Bearer <key>`")
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found = None
        for known, tenant in self.key_hashes:  # every entry is compared: the time says nothing about a match
            if hmac.compare_digest(digest, known):
                found = tenant
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return found


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health checks and reflection; handlers read ``current_tenant()``."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        try:
            tenant = self._auth.tenant_of(handler_call_details.invocation_metadata)
        except Unauthenticated as e:
            return rewrap(handler, _denied(str(e)))
        return rewrap(handler, lambda behavior: _with_tenant(behavior, tenant))


def _with_tenant(behavior: Behavior, tenant: str) -> Behavior:
    """``behavior`` run with ``tenant`` as the current tenant, keeping its kind (coroutine or async generator)."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            _tenant_var.set(tenant)  # the call runs in its own asyncio task: this leaks into no other call
            async for response in behavior(request, context):
                yield response

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _tenant_var.set(tenant)
        return await behavior(request, context)

    return call


def _denied(message: str) -> Callable[[Behavior], Behavior]:
    """A behavior of the same kind that answers UNAUTHENTICATED (other interceptors, such as OpenTelemetry's,
    iterate a streaming behavior)."""

    def wrap(behavior: Behavior) -> Behavior:
        if inspect.isasyncgenfunction(behavior):

            async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - abort raises; this line makes an async generator

            return deny_stream

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return deny

    return wrap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aimesh.auth", description="Mint and hash aimesh API keys.")
    commands = parser.add_subparsers(dest="command", required=True)
    mint = commands.add_parser("new-key", help="print a new key and its `tenant:sha256hex` line")
    mint.add_argument("tenant")
    hashed = commands.add_parser("hash-key", help="print the `tenant:sha256hex` line of a key read from stdin")
    hashed.add_argument("tenant")
    args = parser.parse_args(argv)
    if not _TENANT.fullmatch(args.tenant):
        parser.error("a tenant is 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit")
    if args.command == "new-key":
        key = new_key()
        print(f"key (give it to the tenant; it is not stored anywhere): {key}", file=sys.stderr)
        print(f"{args.tenant}:{hash_key(key)}")
        return 0
    key = sys.stdin.readline().strip()
    if not key:
        parser.error("no key on stdin")
    print(f"{args.tenant}:{hash_key(key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
