"""Python client of the mesh: ``AsyncClient`` (asyncio) and ``Client`` (blocking), with retries that honour
the server's RetryInfo, idempotent submits and watches that resume where a dropped stream left off; tasks carry
text or numpy tensors, large contents by reference (upload, download, outputs)."""

from aimesh.client.async_client import (
    DEFAULT_INGEST_ADDRESS,
    DEFAULT_NOTIFIER_ADDRESS,
    PRIORITIES,
    AsyncClient,
    PriorityName,
    TaskSpec,
)
from aimesh.client.errors import ClientError, DigestMismatch
from aimesh.client.payloads import DEFAULT_UPLOAD_THRESHOLD_BYTES, UPLOAD_CHUNK_BYTES, input_tensor
from aimesh.client.retry import RetryPolicy
from aimesh.client.sync_client import Client
from aimesh.client.tls import ClientTls

__all__ = [
    "DEFAULT_INGEST_ADDRESS",
    "DEFAULT_NOTIFIER_ADDRESS",
    "DEFAULT_UPLOAD_THRESHOLD_BYTES",
    "PRIORITIES",
    "UPLOAD_CHUNK_BYTES",
    "AsyncClient",
    "Client",
    "ClientError",
    "ClientTls",
    "DigestMismatch",
    "PriorityName",
    "RetryPolicy",
    "TaskSpec",
    "input_tensor",
]
