"""The one adapter over the S3-compatible object store that holds tensor contents too large for a Kafka record (the
claim check): the record carries a ``StoredObject`` (bucket, key, size, SHA-256, content type) and whoever reads it
verifies the digest.

Synchronous (boto3); async callers run each call with ``asyncio.to_thread``. Every failure is one of the errors
below: ``ObjectStoreUnavailable`` after botocore's own retries (standard mode) for an unreachable store, a 5xx, a
throttle or a timeout; ``ObjectNotFound``; ``DigestMismatch`` for contents that are not what the reference says;
``ObjectTooLarge`` past ``AIMESH_MAX_OBJECT_BYTES``. Credentials come from boto3's default chain (the standard
``AWS_*`` variables, a profile, an instance role), never from aimesh's settings.

Keys are laid out per tenant (``upload_key``, ``output_key``), so a reference's tenant can be checked against the
caller's (``tenant_of_key``); an output's key is deterministic, so a retried task overwrites rather than orphans.
Nothing deletes an object when its task ends: ``sweep`` (run by ``ObjectSweeper``) deletes every object older than
the retention, which also takes uploads no task ever named and the outputs of aborted transactions.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.response import StreamingBody

from aimesh.background import BackgroundThread
from aimesh.object_refs import (
    DEFAULT_CONTENT_TYPE,
    DIGEST_METADATA,
    PART_BYTES,
    DigestMismatch,
    ObjectNotFound,
    ObjectSizeMismatch,
    ObjectStoreError,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    StoredObject,
    output_key,
    tenant_of_key,
    translate_error,
    upload_key,
)
from aimesh.object_upload import Upload
from aimesh.shared_settings import ObjectStoreSettings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "DIGEST_METADATA",
    "PART_BYTES",
    "DigestMismatch",
    "ObjectNotFound",
    "ObjectSizeMismatch",
    "ObjectStore",
    "ObjectStoreError",
    "ObjectStoreUnavailable",
    "ObjectSweeper",
    "ObjectTooLarge",
    "StoredObject",
    "Upload",
    "output_key",
    "tenant_of_key",
    "upload_key",
]

log = logging.getLogger(__name__)


class ObjectStore:
    """One bucket of an S3-compatible store. Thread-safe (a boto3 client is)."""

    def __init__(
        self,
        endpoint_url: str,
        *,
        bucket: str = "aimesh",
        region: str = "us-east-1",
        max_object_bytes: int = 256 << 20,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 30.0,
        max_attempts: int = 3,
        credentials: Mapping[str, str] | None = None,
    ) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        self.max_object_bytes = max_object_bytes
        config = Config(
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            retries={"mode": "standard", "max_attempts": max_attempts},
            s3={"addressing_style": "path"},
            signature_version="s3v4",
            # CRC checksums only where S3 requires them: not every S3-compatible server knows the newer headers,
            # and the SHA-256 in the reference is what readers verify.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # ``credentials`` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) for tests and the local stack; otherwise boto3's
        # default chain finds them.
        keys = credentials or {}
        self._client: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=config,
            aws_access_key_id=keys.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=keys.get("AWS_SECRET_ACCESS_KEY"),
        )

    @classmethod
    def of(cls, settings: ObjectStoreSettings) -> ObjectStore | None:
        """The store ``settings`` name; None when no endpoint is configured (the mesh then runs without one)."""
        if not settings.object_store_url:
            return None
        return cls(
            settings.object_store_url,
            bucket=settings.object_store_bucket,
            region=settings.object_store_region,
            max_object_bytes=settings.max_object_bytes,
            connect_timeout_s=settings.object_store_connect_timeout_s,
            read_timeout_s=settings.object_store_read_timeout_s,
        )

    def close(self) -> None:
        self._client.close()

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists (several services may race to: either wins)."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            if not isinstance(translate_error(e, "head bucket"), ObjectNotFound):
                raise translate_error(e, f"head bucket {self.bucket}") from e
        except BotoCoreError as e:
            raise translate_error(e, f"head bucket {self.bucket}") from e
        try:
            if self.region == "us-east-1":
                self._client.create_bucket(Bucket=self.bucket)
            else:
                self._client.create_bucket(
                    Bucket=self.bucket,
                    CreateBucketConfiguration={"LocationConstraint": self.region},  # type: ignore[typeddict-item]
                )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise translate_error(e, f"create bucket {self.bucket}", writing=True) from e
        except BotoCoreError as e:
            raise translate_error(e, f"create bucket {self.bucket}", writing=True) from e

    def _check_size(self, size: int, key: str) -> None:
        if size > self.max_object_bytes:
            raise ObjectTooLarge(f"{key}: {size} bytes is over the object store limit of {self.max_object_bytes}")

    def put(self, key: str, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> StoredObject:
        """Write ``data`` at ``key`` (replacing what was there) and return its reference."""
        self._check_size(len(data), key)
        digest = hashlib.sha256(data).hexdigest()
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata={DIGEST_METADATA: digest}
            )
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"put {key}", writing=True) from e
        return StoredObject(self.bucket, key, len(data), digest, content_type)

    def put_stream(
        self, key: str, chunks: Iterable[bytes], *, size: int, content_type: str = DEFAULT_CONTENT_TYPE
    ) -> StoredObject:
        """Write the concatenated ``chunks``, which must add up to ``size`` bytes, at ``key``: a multipart upload
        of ``PART_BYTES`` parts (one plain put when it fits one), hashed as it goes. On any failure (the chunks'
        own included) the multipart upload is aborted, so nothing is left behind, and the error propagates."""
        upload = self.open_upload(key, size=size, content_type=content_type)
        try:
            for chunk in chunks:
                upload.write(chunk)
            return upload.finish()
        except BaseException:
            upload.abort()
            raise

    def open_upload(self, key: str, *, size: int, content_type: str = DEFAULT_CONTENT_TYPE) -> Upload:
        """A streamed write of ``size`` bytes at ``key``, chunk by chunk (``Upload``): for callers whose chunks
        arrive on an event loop, each step in ``asyncio.to_thread``. Raises ObjectTooLarge before anything is sent."""
        self._check_size(size, key)
        return Upload(self._client, self.bucket, key, size=size, content_type=content_type)

    def _get_object(self, ref: StoredObject) -> StreamingBody:
        try:
            response = self._client.get_object(Bucket=ref.bucket, Key=ref.key)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"get {ref.key}") from e
        if response["ContentLength"] != ref.size:
            response["Body"].close()
            raise DigestMismatch(f"{ref.key}: {response['ContentLength']} bytes stored, the reference says {ref.size}")
        return response["Body"]

    def get(self, ref: StoredObject) -> bytes:
        """The contents ``ref`` names, verified against its size and SHA-256 (DigestMismatch)."""
        return b"".join(self.iter_chunks(ref, chunk_bytes=PART_BYTES))

    def iter_chunks(self, ref: StoredObject, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
        """The contents ``ref`` names, streamed in chunks of at most ``chunk_bytes``. The digest is known only at
        the end: DigestMismatch is raised after the last chunk, so a caller must not trust what it has taken until
        the iteration ends."""
        self._check_size(ref.size, ref.key)
        return _verified(ref, self._get_object(ref), chunk_bytes)

    def read(self, key: str, chunk_bytes: int = 1 << 20) -> tuple[StoredObject, Generator[bytes, None, None]]:
        """The object at ``key`` as ``head`` describes it and its contents, streamed and checked against the
        SHA-256 recorded with it as ``iter_chunks`` does, in one request (no HEAD first). Raises ObjectNotFound."""
        try:
            answer = self._client.get_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"get {key}") from e
        ref = StoredObject(
            self.bucket,
            key,
            answer["ContentLength"],
            answer.get("Metadata", {}).get(DIGEST_METADATA, ""),
            answer.get("ContentType") or DEFAULT_CONTENT_TYPE,
        )
        return ref, _verified(ref, answer["Body"], chunk_bytes)

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a key that does not exist is not an error."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"delete {key}") from e

    def sweep(self, older_than_s: float) -> int:
        """Delete every object of the bucket last modified more than ``older_than_s`` ago (by this machine's clock
        against the store's) and abort multipart uploads started that long ago; return how many objects went."""
        cutoff = time.time() - older_than_s
        deleted = 0
        try:
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
                old = [o["Key"] for o in page.get("Contents", []) if o["LastModified"].timestamp() < cutoff]
                if old:
                    self._client.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in old], "Quiet": True}
                    )
                    deleted += len(old)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, "sweep") from e
        self.abort_stale_uploads(older_than_s)
        return deleted

    def abort_stale_uploads(self, older_than_s: float) -> int:
        """Abort the multipart uploads started more than ``older_than_s`` ago (a crash in the middle of one leaves
        its parts behind); return how many. A store that cannot list uploads is logged and skipped."""
        cutoff = time.time() - older_than_s
        try:
            uploads = self._client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        except (BotoCoreError, ClientError) as e:
            log.warning("listing the multipart uploads of %s failed: %s", self.bucket, e)
            return 0
        stale = [u for u in uploads if u["Initiated"].timestamp() < cutoff]
        for u in stale:
            try:
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"], UploadId=u["UploadId"])
            except (BotoCoreError, ClientError) as e:
                log.warning("aborting the upload of %s failed: %s", u["Key"], e)
        return len(stale)

    def pending_uploads(self) -> list[str]:
        """The keys of the multipart uploads in progress (tests: an aborted upload leaves none)."""
        try:
            uploads = self._client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", [])
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, "list uploads") from e
        return [u["Key"] for u in uploads]

    def head(self, key: str) -> StoredObject:
        """The reference of the object at ``key`` as the store describes it: its size and content type, and the
        SHA-256 this adapter recorded in its metadata when it wrote it (empty for an object written by other means).
        Raises ObjectNotFound."""
        try:
            answer = self._client.head_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"head {key}") from e
        return StoredObject(
            self.bucket,
            key,
            answer["ContentLength"],
            answer.get("Metadata", {}).get(DIGEST_METADATA, ""),
            answer.get("ContentType") or DEFAULT_CONTENT_TYPE,
        )

    def exists(self, key: str) -> bool:
        try:
            self._client.head_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as e:
            error = translate_error(e, f"head {key}")
            if isinstance(error, ObjectNotFound):
                return False
            raise error from e
        return True


class ObjectSweeper(BackgroundThread):
    """Sweeps ``store`` every ``interval_s``: deletes objects older than ``retention_s`` (``ObjectStore.sweep``).
    A store that is down is logged and tried again next time; it never ends the thread."""

    def __init__(self, store: ObjectStore, *, retention_s: float, interval_s: float) -> None:
        super().__init__("object-sweeper")
        self._store = store
        self._retention_s = retention_s
        self._interval_s = interval_s
        self.swept = 0  # objects deleted so far

    @classmethod
    def of(cls, store: ObjectStore, settings: ObjectStoreSettings) -> ObjectSweeper:
        return cls(store, retention_s=settings.object_retention_s, interval_s=settings.object_sweep_interval_s)

    def run(self) -> None:
        while True:
            try:
                deleted = self._store.sweep(self._retention_s)
                self.swept += deleted
                if deleted:
                    log.info("swept %d objects older than %.0f s", deleted, self._retention_s)
            except ObjectStoreError as e:
                log.warning("object sweep failed, next in %.0f s: %s", self._interval_s, e)
            if self.stopping.wait(self._interval_s):
                return


def _verified(ref: StoredObject, body: StreamingBody, chunk_bytes: int) -> Generator[bytes, None, None]:
    """``body``'s chunks, checked against ``ref``'s size as they come and its SHA-256 after the last."""
    digest, received = hashlib.sha256(), 0
    try:
        for chunk in body.iter_chunks(chunk_bytes):
            received += len(chunk)
            if received > ref.size:
                raise DigestMismatch(f"{ref.key}: more than the {ref.size} bytes the reference says")
            digest.update(chunk)
            yield chunk
    except BotoCoreError as e:
        raise translate_error(e, f"read {ref.key}") from e
    finally:
        body.close()
    if received != ref.size or digest.hexdigest() != ref.sha256:
        raise DigestMismatch(f"{ref.key}: contents differ from the reference's size and SHA-256")
