"""The gateway benchmark's own event-stream reading (benchmarks/gateway.py): what it counts as delivered."""

import json

import pytest

from benchmarks.gateway import SseDecoder, SseEvent, subscription_env, update_status


def decode(text: str) -> list[SseEvent]:
    decoder = SseDecoder()
    return [e for line in text.split("\n") if (e := decoder.line(line)) is not None]


def test_events_end_at_a_blank_line_and_heartbeat_comments_are_skipped() -> None:
    stream = ': ping - 2026-12-07 10:00:00\n\nid: 1\nevent: update\ndata: {"a":1}\n\n: ping\n\nid: 2\ndata:x\n\n'
    assert decode(stream) == [SseEvent("update", "1", '{"a":1}'), SseEvent("message", "2", "x")]


def test_data_lines_join_with_newlines_and_one_leading_space_is_dropped() -> None:
    assert decode("data:  two spaces\ndata: b\n\n") == [SseEvent("message", "", " two spaces\nb")]


def test_a_block_without_data_and_an_unfinished_event_make_no_event() -> None:
    assert decode("event: update\nid: 3\n\ndata: cut off") == []


def test_update_status_reads_the_state_and_refuses_other_events() -> None:
    data = json.dumps({"state": {"taskId": "t", "status": "TASK_STATUS_SUCCEEDED", "sequence": 3}})
    assert update_status(SseEvent("update", "3", data)) == "TASK_STATUS_SUCCEEDED"
    with pytest.raises(RuntimeError, match="error"):
        update_status(SseEvent("error", "", '{"status": 503}'))


def test_subscription_room_covers_the_streams_and_never_lowers_the_tenant_default() -> None:
    assert subscription_env(1000) == {
        "AIMESH_MAX_SUBSCRIPTIONS_PER_CONNECTION": "10000",
        "AIMESH_MAX_SUBSCRIPTIONS_PER_TENANT": "10000",
    }
    assert subscription_env(8000)["AIMESH_MAX_SUBSCRIPTIONS_PER_CONNECTION"] == "16000"


def test_the_report_pairs_the_paths_round_by_round_and_judges_both_targets() -> None:
    from benchmarks.gateway import latency_lines

    # Round 1: HTTP 3 ms over gRPC from the submit call, 1 ms after its answer; round 2: 5 ms and 3 ms.
    rounds = [
        {"grpc_ms": [10.0], "http_ms": [13.0], "grpc_after_submit_ms": [4.0], "http_after_submit_ms": [5.0]},
        {"grpc_ms": [20.0], "http_ms": [25.0], "grpc_after_submit_ms": [6.0], "http_after_submit_ms": [9.0]},
    ]
    lines = latency_lines(rounds)
    extra = next(line for line in lines if line.startswith("| extra"))
    assert extra.split(" | ")[1:] == ["4.0 (3.0-5.0)", "4.0 (3.0-5.0)", "2.0 (1.0-3.0)", "2.0 (1.0-3.0) |"]
    assert lines[-1].endswith(
        "From the submit call: not met (4.0 ms); from the submit's answer (the event stream's delivery): met (2.0 ms)."
    )
