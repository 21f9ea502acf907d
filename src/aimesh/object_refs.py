"""What the object store adapter (``aimesh.objects``) shares with its parts: the references a Kafka record carries
instead of tensor contents (``StoredObject``), the key layout with its tenant check, and the errors, with the
mapping of botocore's failures onto them (``translate_error``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from botocore.exceptions import ClientError, NoCredentialsError

from aimesh.errors import AimeshError
from aimesh.v1 import tensor_pb2

DEFAULT_CONTENT_TYPE = "application/octet-stream"
# The user metadata (x-amz-meta-sha256) in which every object this adapter writes records its SHA-256.
DIGEST_METADATA = "sha256"
# Parts of a multipart upload: S3's minimum is 5 MiB (all parts but the last).
PART_BYTES = 8 << 20
# Error codes that say the store is overloaded or failing, not that the request is wrong.
_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket", "NoSuchUpload"})
_KEY_ROOTS = ("inputs", "outputs")


class ObjectStoreError(AimeshError):
    """An object store call failed in a way no retry mends (a refused request, missing credentials)."""


class ObjectStoreUnavailable(ObjectStoreError):
    """The store did not answer, answered 5xx or throttled, after botocore's retries: a later try may succeed."""

    retryable = True


class ObjectNotFound(ObjectStoreError):
    """No such object (expired, swept, or never written)."""


class DigestMismatch(ObjectStoreError):
    """An object's contents are not what its reference says: another size or another SHA-256."""


class ObjectTooLarge(ObjectStoreError):
    """Contents larger than ``AIMESH_MAX_OBJECT_BYTES``."""


class ObjectSizeMismatch(ObjectStoreError):
    """The chunks of a streamed upload do not add up to the size it declared."""


@dataclass(frozen=True)
class StoredObject:
    """A reference to contents in the store: what a Kafka record carries instead of them (``ObjectRef``)."""

    bucket: str
    key: str
    size: int
    sha256: str  # 64 lowercase hex digits
    content_type: str = DEFAULT_CONTENT_TYPE

    def to_proto(self) -> tensor_pb2.ObjectRef:
        return tensor_pb2.ObjectRef(
            bucket=self.bucket, key=self.key, size=self.size, sha256=self.sha256, content_type=self.content_type
        )

    @classmethod
    def from_proto(cls, ref: tensor_pb2.ObjectRef) -> StoredObject:
        return cls(
            bucket=ref.bucket,
            key=ref.key,
            size=ref.size,
            sha256=ref.sha256,
            content_type=ref.content_type or DEFAULT_CONTENT_TYPE,
        )

    @property
    def tenant(self) -> str | None:
        return tenant_of_key(self.key)


# --- key layout ---------------------------------------------------------------------------------------------------
def _part(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"an object key needs a non-empty {what}")
    return quote(value, safe="")  # no "/" or ".." can change the layout


def upload_key(tenant: str, upload_id: str) -> str:
    """Where an input uploaded ahead of its task lives: ``inputs/<tenant>/<upload id>``."""
    return f"inputs/{_part(tenant, 'tenant')}/{_part(upload_id, 'upload id')}"


def output_key(tenant: str, task_id: str, output_name: str) -> str:
    """Where a task's large output lives: ``outputs/<tenant>/<task id>/<output name>``. The same for every run of
    the task, so a retried or re-run task overwrites its output instead of leaving an orphan."""
    return f"outputs/{_part(tenant, 'tenant')}/{_part(task_id, 'task id')}/{_part(output_name, 'output name')}"


def tenant_of_key(key: str) -> str | None:
    """The tenant a key of this layout belongs to; None for a key outside it (which no tenant may read)."""
    parts = key.split("/")
    if len(parts) < 3 or parts[0] not in _KEY_ROOTS or not parts[1] or not all(parts[2:]):
        return None
    return unquote(parts[1])


def translate_error(e: Exception, what: str, *, writing: bool = False) -> ObjectStoreError:
    """The aimesh error for a botocore failure of ``what`` (an operation and key, for the message)."""
    if isinstance(e, NoCredentialsError):
        return ObjectStoreError(
            f"{what}: no object store credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
        )
    if isinstance(e, ClientError):
        error = e.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        if status >= 500 or code in _UNAVAILABLE_CODES or (writing and code == "NoSuchBucket"):
            return ObjectStoreUnavailable(f"{what}: object store answered {code or status}")
        if code in _NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{what}: no such object ({code or status})")
        return ObjectStoreError(
            f"{what}: object store refused the request: {code or status} {error.get('Message', '')}"
        )
    return ObjectStoreUnavailable(f"{what}: object store unreachable: {e}")
