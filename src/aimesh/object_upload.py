"""A streamed write to the object store (``ObjectStore.open_upload``): chunks gathered into the parts of a multipart
upload, hashed as they come, aborted on failure so no part is left behind."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError

from aimesh.object_refs import DIGEST_METADATA, PART_BYTES, ObjectSizeMismatch, StoredObject, translate_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)


class Upload:
    """One streamed write (``ObjectStore.open_upload``): ``write`` chunks in order, then ``finish``; ``abort`` on
    any failure. Chunks are gathered into parts of ``PART_BYTES``; contents that fit one part go in one plain put
    at ``finish``, so no multipart upload is ever started for them."""

    def __init__(self, client: S3Client, bucket: str, key: str, *, size: int, content_type: str) -> None:
        self._client, self._bucket, self._key = client, bucket, key
        self._size, self._content_type = size, content_type
        self._digest = hashlib.sha256()
        self._received = 0
        self._pending = bytearray()
        self._upload_id = ""
        self._parts: list[tuple[int, str]] = []  # (part number, ETag)

    def write(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._received > self._size:
            raise ObjectSizeMismatch(f"{self._key}: more than the {self._size} bytes declared")
        self._digest.update(chunk)
        self._pending += chunk
        # Contents over one part go as a multipart upload, part by part as they come; the rest wait for finish.
        while len(self._pending) >= PART_BYTES and self._size > PART_BYTES:
            part = bytes(self._pending[:PART_BYTES])
            del self._pending[:PART_BYTES]
            self._send_part(part)

    def _send_part(self, part: bytes) -> None:
        try:
            if not self._upload_id:
                self._upload_id = self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._key, ContentType=self._content_type
                )["UploadId"]
            number = len(self._parts) + 1
            answer = self._client.upload_part(
                Bucket=self._bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=part
            )
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"upload {self._key}", writing=True) from e
        self._parts.append((number, answer["ETag"]))

    def finish(self) -> StoredObject:
        """Complete the write once every byte is written; ObjectSizeMismatch if fewer than declared came."""
        if self._received != self._size:
            raise ObjectSizeMismatch(f"{self._key}: {self._received} bytes written of the {self._size} declared")
        digest = self._digest.hexdigest()
        try:
            if not self._upload_id:
                self._client.put_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Body=bytes(self._pending),
                    ContentType=self._content_type,
                    Metadata={DIGEST_METADATA: digest},
                )
            else:
                if self._pending:
                    self._send_part(bytes(self._pending))
                    self._pending.clear()
                self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etag} for n, etag in self._parts]},
                )
                self._record_digest(digest)
        except (BotoCoreError, ClientError) as e:
            raise translate_error(e, f"upload {self._key}", writing=True) from e
        return StoredObject(self._bucket, self._key, self._size, digest, self._content_type)

    def _record_digest(self, digest: str) -> None:
        """Give the completed object its SHA-256 metadata, known only now: a copy onto itself with the metadata
        replaced (S3 cannot change an object's metadata in place)."""
        self._client.copy_object(
            Bucket=self._bucket,
            Key=self._key,
            CopySource={"Bucket": self._bucket, "Key": self._key},
            Metadata={DIGEST_METADATA: digest},
            MetadataDirective="REPLACE",
            ContentType=self._content_type,
        )

    def abort(self) -> None:
        """Abort the multipart upload, if one was started, so no part stays behind; never raises (a failure is
        logged, and the sweeper's ``abort_stale_uploads`` takes what is left)."""
        self._pending.clear()
        if not self._upload_id:
            return
        upload_id, self._upload_id = self._upload_id, ""
        try:
            self._client.abort_multipart_upload(Bucket=self._bucket, Key=self._key, UploadId=upload_id)
        except (BotoCoreError, ClientError) as e:
            log.warning("aborting the upload of %s failed (the sweeper will): %s", self._key, e)
