"""The finished-offsets metadata a worker commits with its offsets: exact round trips and the size limit."""

import random

import pytest

from aimesh.finished_offsets import MAX_METADATA_BYTES, PREFIX, decode, encode, fitting


def size(metadata: str) -> int:
    return len(metadata.encode("ascii"))


def test_nothing_finished_is_empty_metadata_and_decodes_to_nothing() -> None:
    assert encode(100, []) == ""
    assert decode(100, "") == frozenset()


@pytest.mark.parametrize(
    "finished",
    [
        {101},
        {1_000_000_000_123},
        set(range(101, 5_101)),  # dense: one run
        {101, 103, 105, 200, 201, 202, 10_000},  # sparse, with a run
        set(range(102, 2_102, 2)),  # every other offset: the worst case
    ],
    ids=["one", "far", "dense", "sparse", "alternating"],
)
def test_round_trip(finished: set[int]) -> None:
    committed = 100
    metadata = encode(committed, finished)
    assert metadata.startswith(PREFIX)
    assert decode(committed, metadata) == finished


def test_random_sets_round_trip() -> None:
    rng = random.Random(7)
    for _ in range(200):
        committed = rng.randrange(0, 10**12)
        finished = {committed + 1 + rng.randrange(0, 600) for _ in range(rng.randrange(1, 300))}
        assert decode(committed, encode(committed, finished)) == finished


def test_a_dense_run_is_tiny_and_a_thousand_alternating_offsets_fit_the_broker_default() -> None:
    assert size(encode(0, range(1, 100_001))) < 40
    alternating = list(range(2, 2_002, 2))
    assert len(alternating) == 1000
    assert size(encode(0, alternating)) <= MAX_METADATA_BYTES
    assert fitting(0, alternating) == len(alternating)


def test_offsets_not_above_the_committed_one_are_refused() -> None:
    with pytest.raises(ValueError, match="not above"):
        encode(100, [100, 101])


def test_fitting_gives_the_largest_prefix_that_fits() -> None:
    rng = random.Random(3)
    # Random gaps compress badly: far more offsets than 4 KiB can describe.
    finished, offset = [], 0
    for _ in range(20_000):
        offset += rng.randrange(2, 300)
        finished.append(offset)
    n = fitting(0, finished)
    assert 0 < n < len(finished)
    assert size(encode(0, finished[:n])) <= MAX_METADATA_BYTES
    assert size(encode(0, finished[: n + 1])) > MAX_METADATA_BYTES


def test_fitting_with_a_tiny_limit_fits_nothing() -> None:
    assert fitting(0, [5, 9, 20], limit_bytes=4) == 0


def test_metadata_written_by_someone_else_records_nothing() -> None:
    assert decode(0, "some other client's note") == frozenset()


def test_corrupt_metadata_of_ours_is_an_error() -> None:
    with pytest.raises(ValueError, match="unreadable"):
        decode(0, PREFIX + "!!!not base64!!!")
    truncated = encode(0, [3, 4, 9])[:-3]
    with pytest.raises(ValueError):
        decode(0, truncated)
