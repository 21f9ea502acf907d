"""The offsets of a partition already finished beyond its committed offset, written into the offset commit's metadata.

A partition's committed offset is its lowest offset not yet published. Results of later offsets may already be
published (a fast task does not wait for a slow one before it), so the commit that publishes them also records which
offsets beyond the committed one are done, in the commit's metadata string: ``send_offsets_to_transaction`` carries it
in the same transaction as the results, and ``Consumer.committed()`` reads it back. A new owner of the partition skips
exactly those offsets. (Confluent's Parallel Consumer does the same.)

Format: ``aimesh1:`` then URL-safe base64 (unpadded) of zlib-compressed unsigned LEB128 varints, alternating the gap
before a run of finished offsets and the run's length, the first gap counted from the committed offset. A burst of
consecutive offsets costs two varints, so even the worst case (every other offset finished) needs about two bytes per
finished offset before compression.

The broker refuses metadata over ``offset.metadata.max.bytes`` (4,096 by default) by failing the whole transaction
(OFFSET_METADATA_TOO_LARGE): ``fitting`` says how many of the lowest finished offsets fit, and the rest wait to be
published until the committed offset catches up with them.
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Iterable, Sequence

PREFIX = "aimesh1:"
# The broker's default offset.metadata.max.bytes.
MAX_METADATA_BYTES = 4096


def encode(committed: int, finished: Iterable[int]) -> str:
    """The metadata recording ``finished`` (offsets above ``committed``); empty when there are none."""
    offsets = sorted(set(finished))
    if not offsets:
        return ""
    if offsets[0] <= committed:
        raise ValueError(f"finished offset {offsets[0]} is not above the committed offset {committed}")
    varints = bytearray()
    position = committed  # the next offset not yet described
    start = previous = offsets[0]
    for offset in [*offsets[1:], None]:
        if offset is not None and offset == previous + 1:
            previous = offset
            continue
        _put_varint(varints, start - position)
        _put_varint(varints, previous - start + 1)
        position = previous + 1
        if offset is not None:
            start = previous = offset
    return PREFIX + base64.urlsafe_b64encode(zlib.compress(bytes(varints), 9)).rstrip(b"=").decode("ascii")


def decode(committed: int, metadata: str) -> frozenset[int]:
    """The finished offsets that ``metadata`` records above ``committed``. Metadata this module did not write (another
    client's, or none) records nothing; metadata that claims to be ours but does not parse raises ValueError."""
    if not metadata.startswith(PREFIX):
        return frozenset()
    body = metadata[len(PREFIX) :]
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, zlib.error) as e:
        raise ValueError(f"unreadable finished-offsets metadata: {e}") from e
    values = _read_varints(raw)
    if len(values) % 2:
        raise ValueError("finished-offsets metadata has a gap without its run")
    finished: set[int] = set()
    position = committed
    for gap, length in zip(values[::2], values[1::2], strict=True):
        start = position + gap
        finished.update(range(start, start + length))
        position = start + length
    return frozenset(finished)


def fitting(committed: int, finished: Sequence[int], limit_bytes: int = MAX_METADATA_BYTES) -> int:
    """How many of ``finished`` (ascending, all above ``committed``) fit into ``limit_bytes`` of metadata, lowest
    first: all of them, or the largest prefix whose encoding fits."""
    if len(encode(committed, finished).encode("ascii")) <= limit_bytes:
        return len(finished)
    low, high = 0, len(finished)  # low always fits, high never does
    while high - low > 1:
        middle = (low + high) // 2
        if len(encode(committed, finished[:middle]).encode("ascii")) <= limit_bytes:
            low = middle
        else:
            high = middle
    return low


def _put_varint(out: bytearray, value: int) -> None:
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _read_varints(raw: bytes) -> list[int]:
    values: list[int] = []
    value = shift = 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    if shift:
        raise ValueError("finished-offsets metadata ends inside a number")
    return values
