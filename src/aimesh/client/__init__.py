"""Python client of the mesh: ``AsyncClient`` (asyncio) and ``Client`` (blocking), with retries that honour
the server's RetryInfo, idempotent submits and watches that resume where a dropped stream left off."""

from aimesh.client.async_client import (
    DEFAULT_INGEST_ADDRESS,
    DEFAULT_NOTIFIER_ADDRESS,
    PRIORITIES,
    AsyncClient,
    PriorityName,
    TaskSpec,
)
from aimesh.client.errors import ClientError
from aimesh.client.retry import RetryPolicy
from aimesh.client.sync_client import Client
from aimesh.client.tls import ClientTls

__all__ = [
    "DEFAULT_INGEST_ADDRESS",
    "DEFAULT_NOTIFIER_ADDRESS",
    "PRIORITIES",
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientTls",
    "PriorityName",
    "RetryPolicy",
    "TaskSpec",
]
