"""The size librdkafka counts a record at against ``message.max.bytes``, so ingest can refuse a task whose
record can never be produced before it publishes anything."""

from __future__ import annotations

from collections.abc import Iterable

# librdkafka (rd_kafka_msg_new0) refuses a record whose worst-case v2 wire size exceeds message.max.bytes:
# RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD (length, attributes, timestamp, offset, key and value lengths and header
# count, each varint at its widest: 5+1+10+5+5+5+5 bytes) plus the key, the value and the serialized headers.
RECORD_OVERHEAD_BYTES = 36


def record_bytes(key: bytes, value: bytes, headers: Iterable[tuple[str, str | bytes | None]]) -> int:
    """The record's size as librdkafka checks it: overhead, key, value, and each header as a varint of its
    name's length, the name, a varint of its value's length (-1 for none) and the value."""
    size = RECORD_OVERHEAD_BYTES + len(key) + len(value)
    for name, header_value in headers:
        encoded_name = name.encode()
        encoded = header_value.encode() if isinstance(header_value, str) else header_value
        size += _varint_bytes(len(encoded_name)) + len(encoded_name)
        size += _varint_bytes(-1) if encoded is None else _varint_bytes(len(encoded)) + len(encoded)
    return size


def _varint_bytes(n: int) -> int:
    """Length of ``n`` as a Kafka (zigzag) varint."""
    zigzag = (n << 1) ^ (n >> 63)
    length = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        length += 1
    return length
