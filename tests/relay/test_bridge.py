"""The bridge's decisions, driven without sockets."""

from __future__ import annotations

import base64

import orjson
import pytest

from relay.core.bridge import Bridge, BridgeError, Cause, Ending, Limits, Phase, Reply
from relay.core.closecodes import clip_reason, sendable
from relay.core.policy import Policy

SECRET = "sk-secret-key-abcdefghijklmnop"
SESSION_UPDATE = '{"type":"session.update","session":{"type":"realtime"}}'


def make_bridge(**limits: int) -> Bridge:
    values = {"queue_messages": 8, "queue_bytes": 1000, "max_message_bytes": 500}
    values.update(limits)
    return Bridge(session_update=SESSION_UPDATE, limits=Limits(**values), secret=SECRET)


def flush_all(bridge: Bridge) -> list[str | bytes]:
    out = []
    while (data := bridge.next_to_flush()) is not None:
        out.append(data)
    return out


def error_code(text: str) -> str:
    event = orjson.loads(text)
    assert event["type"] == "error"
    return event["error"]["code"]


def test_session_update_is_flushed_before_queued_client_messages() -> None:
    bridge = make_bridge()
    assert bridge.client_message('{"type":"a"}') is None
    assert bridge.client_message('{"type":"b"}') is None
    bridge.upstream_opened()
    assert flush_all(bridge) == [SESSION_UPDATE, '{"type":"a"}', '{"type":"b"}']
    assert bridge.phase is Phase.OPEN


def test_messages_arriving_during_the_flush_join_the_tail_of_the_queue() -> None:
    bridge = make_bridge()
    bridge.client_message("1")
    bridge.upstream_opened()
    assert bridge.next_to_flush() == SESSION_UPDATE
    assert bridge.client_message("2") is None
    assert bridge.next_to_flush() == "1"
    assert bridge.client_message("3") is None
    assert flush_all(bridge) == ["2", "3"]
    assert bridge.phase is Phase.OPEN


def test_open_bridge_passes_client_messages_through_unchanged() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    message = '{"type":"input_audio_buffer.append","audio":"AAAA"}'
    assert bridge.client_message(message) is message


def test_queue_overflow_by_count_ends_with_1013_and_an_error_event() -> None:
    bridge = make_bridge(queue_messages=2)
    bridge.client_message("a")
    bridge.client_message("b")
    ending = bridge.client_message("c")
    assert isinstance(ending, Ending)
    assert ending.cause is Cause.QUEUE_OVERFLOW
    assert ending.client_code == 1013
    assert ending.upstream_code is None  # still dialing: the dial is cancelled
    assert error_code(ending.error) == "relay_queue_overflow"


def test_queue_overflow_by_bytes_ends_with_1013() -> None:
    bridge = make_bridge(queue_bytes=10)
    assert bridge.client_message("x" * 6) is None
    ending = bridge.client_message("y" * 6)
    assert isinstance(ending, Ending) and ending.client_code == 1013


def test_oversized_message_ends_with_1009_and_closes_the_upstream_normally() -> None:
    bridge = make_bridge(max_message_bytes=10)
    bridge.upstream_opened()
    flush_all(bridge)
    ending = bridge.client_message("z" * 11)
    assert isinstance(ending, Ending)
    assert (ending.client_code, ending.upstream_code) == (1009, 1000)
    assert error_code(ending.error) == "relay_message_too_big"


def test_binary_frames_become_input_audio_buffer_appends() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    out = bridge.client_message(b"\x01\x02\x03\x04")
    event = orjson.loads(out)
    assert event == {"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x01\x02\x03\x04").decode()}


def test_binary_frames_are_refused_with_an_error_when_configured() -> None:
    bridge = Bridge(
        session_update=SESSION_UPDATE,
        limits=Limits(8, 1000, 500),
        binary_as_audio=False,
    )
    out = bridge.client_message(b"\x00\x01")
    assert isinstance(out, Reply)
    assert error_code(out.text) == "relay_binary_not_supported"
    assert bridge.phase is Phase.CONNECTING  # the session goes on


@pytest.mark.parametrize(
    ("upstream_code", "reason", "client_code", "error"),
    [
        (1000, "done", 1000, None),
        (1001, "Your session hit the maximum duration of 60 minutes.", 1001, None),
        (4000, "invalid_request_error.invalid_model", 4000, None),
        (1011, "oops", 1011, None),
        (1005, None, 1000, None),
        (1006, None, 1011, "relay_upstream_lost"),
        (1015, None, 1014, "relay_upstream_unavailable"),
        (3000, "invalid_request_error.invalid_api_key", 1011, "relay_upstream_auth_refused"),
    ],
)
def test_upstream_close_codes_map_to_the_table(upstream_code, reason, client_code, error) -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    ending = bridge.upstream_closed(upstream_code, reason)
    assert ending is not None
    assert ending.client_code == client_code
    assert sendable(ending.client_code)
    assert ending.upstream_code is None
    if error is None:
        assert ending.error is None
        assert ending.client_reason == (reason or "")
    else:
        assert error_code(ending.error) == error


def test_upstream_refusing_the_key_is_reported_once_and_without_the_key() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    upstream_error = orjson.dumps(
        {
            "type": "error",
            "event_id": "event_1",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_api_key",
                "message": f"Incorrect API key provided: sk-…{SECRET[-4:]}.",
                "param": None,
                "event_id": None,
            },
        }
    ).decode()
    out = bridge.upstream_message(upstream_error)
    assert isinstance(out, Reply)
    assert SECRET[-4:] not in out.text
    assert error_code(out.text) == "relay_upstream_auth_refused"
    ending = bridge.upstream_closed(3000, "invalid_request_error.invalid_api_key")
    assert ending is not None and ending.client_code == 1011 and ending.error is None


def test_the_upstream_key_is_redacted_from_upstream_messages() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    text = bridge.upstream_message(f'{{"type":"x","echo":"{SECRET}"}}')
    assert SECRET not in text and "[redacted]" in text
    data = bridge.upstream_message(b"raw " + SECRET.encode())
    assert SECRET.encode() not in data


def test_other_upstream_errors_pass_through_unchanged() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    text = '{"type":"error","error":{"type":"invalid_request_error","code":"invalid_json","message":"x"}}'
    assert bridge.upstream_message(text) is text


def test_client_leaving_during_the_dial_needs_no_upstream_close() -> None:
    bridge = make_bridge()
    bridge.client_message("queued")
    ending = bridge.client_closed()
    assert ending is not None
    assert (ending.client_code, ending.upstream_code) == (None, None)


def test_client_leaving_while_flushing_still_flushes_then_closes_upstream_with_1000() -> None:
    bridge = make_bridge()
    bridge.client_message("a")
    bridge.upstream_opened()
    ending = bridge.client_closed()
    assert ending is not None and ending.upstream_code == 1000
    assert flush_all(bridge) == [SESSION_UPDATE, "a"]


def test_only_the_first_ending_counts() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    first = bridge.upstream_closed(4000, "bye")
    assert bridge.client_closed() is None
    assert bridge.upstream_closed(1000, "") is None
    assert bridge.ending is first
    assert bridge.upstream_message('{"type":"late"}') is None
    assert bridge.client_message('{"type":"late"}') is None


def test_dial_failures_are_1014_or_1011_when_the_credential_was_refused() -> None:
    unreachable = make_bridge().dial_failed("Connection refused")
    assert unreachable.client_code == 1014
    assert error_code(unreachable.error) == "relay_upstream_unavailable"
    refused = make_bridge().dial_failed("HTTP 401", status=401)
    assert refused.client_code == 1011
    assert error_code(refused.error) == "relay_upstream_auth_refused"


def test_shutdown_closes_the_client_with_1012_and_the_upstream_with_1001() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    ending = bridge.shutdown()
    assert (ending.client_code, ending.upstream_code) == (1012, 1001)
    assert error_code(ending.error) == "relay_shutting_down"


def test_opening_twice_is_a_bug_in_the_shell() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    with pytest.raises(BridgeError):
        bridge.upstream_opened()


def test_close_codes_that_describe_rather_than_close_are_never_sendable() -> None:
    for code in (1004, 1005, 1006, 1015, 999, 2999, 5000):
        assert not sendable(code)
    for code in (1000, 1001, 1009, 1011, 1013, 1014, 3000, 4999):
        assert sendable(code)


def test_long_reasons_are_clipped_to_fit_a_close_frame() -> None:
    reason = "é" * 100
    clipped = clip_reason(reason)
    assert len(clipped.encode()) <= 123
    assert reason.startswith(clipped)


def test_nothing_goes_upstream_when_the_pair_ended_before_the_dial_finished() -> None:
    """Regression (found by the properties): a queue overflow during the dial, then the
    dial completing, flushed the queued messages without session.update."""
    bridge = make_bridge(queue_messages=1)
    bridge.client_message("a")
    assert isinstance(bridge.client_message("b"), Ending)
    bridge.upstream_opened()
    assert flush_all(bridge) == []


def test_a_stalled_client_ends_with_1008_and_the_upstream_closed_normally() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    ending = bridge.client_too_slow(10)
    assert (ending.client_code, ending.upstream_code) == (1008, 1000)
    assert error_code(ending.error) == "relay_client_too_slow"


def test_a_stalled_upstream_ends_with_1014_and_no_close_frame() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    flush_all(bridge)
    ending = bridge.upstream_too_slow(10)
    assert (ending.client_code, ending.upstream_code) == (1014, None)
    assert error_code(ending.error) == "relay_upstream_stalled"


def test_traffic_and_finished_responses_are_counted_for_usage() -> None:
    bridge = make_bridge()
    bridge.client_message('{"type":"a"}')
    bridge.upstream_opened()
    flush_all(bridge)
    bridge.client_message(b"\x00\x01")
    bridge.upstream_message('{"type":"response.output_audio.delta","delta":"AAAA"}')
    done = '{"type":"response.done","response":{"usage":{"total_tokens":7}}}'
    bridge.upstream_message(done)
    bridge.upstream_message('{ "type": "response.done", "response": {"usage": null}}')
    t = bridge.traffic
    assert (t.client_messages, t.client_bytes) == (2, len('{"type":"a"}') + 2)
    assert t.upstream_messages == 3
    assert [d["response"]["usage"] for d in bridge.responses_done] == [{"total_tokens": 7}, None]


APPEND = '{"type":"input_audio_buffer.append","audio":"AAAA"}'
DELTA = '{"type":"response.output_audio.delta","delta":"AAAA"}'


def open_bridge(policy: Policy | None = None, **limits: int) -> Bridge:
    values = {"queue_messages": 8, "queue_bytes": 1000, "max_message_bytes": 500}
    values.update(limits)
    bridge = Bridge(
        session_update=SESSION_UPDATE, limits=Limits(**values), secret=SECRET, policy=policy
    )
    bridge.upstream_opened()
    flush_all(bridge)
    return bridge


def test_audio_takes_the_short_path_only_where_the_general_one_would_pass_it_unchanged() -> None:
    bridge = open_bridge(Policy())
    assert bridge.client_message(APPEND) is APPEND
    assert bridge.upstream_message(DELTA) is DELTA
    assert (bridge.traffic.client_messages, bridge.traffic.upstream_messages) == (1, 1)
    # Still every other rule: the size limit, the policy's lists, the key's redaction.
    too_big = open_bridge(Policy(), max_message_bytes=len(APPEND) - 1).client_message(APPEND)
    assert isinstance(too_big, Ending) and too_big.cause is Cause.MESSAGE_TOO_BIG
    strict = open_bridge(
        Policy(
            client_events_denied=frozenset({"input_audio_buffer.append"}),
            upstream_events_denied=frozenset({"response.output_audio.delta"}),
        )
    )
    refused = strict.client_message(APPEND)
    assert isinstance(refused, Reply) and error_code(refused.text) == "relay_event_not_allowed"
    assert strict.upstream_message(DELTA) is None
    leaking = DELTA.replace('"delta":', f'"note":"{SECRET}","delta":')
    assert SECRET not in bridge.upstream_message(leaking)  # type: ignore[operator]
    # And only once the upstream is open: before, audio waits its turn in the queue.
    waiting = Bridge(session_update=SESSION_UPDATE, limits=Limits(8, 1000, 500), secret=SECRET)
    assert waiting.client_message(APPEND) is None
    waiting.upstream_opened()
    assert flush_all(waiting) == [SESSION_UPDATE, APPEND]
