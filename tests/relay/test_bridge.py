"""The bridge's decisions, driven without sockets."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.bridge import (
    SETUP_EVENT_ID,
    Amended,
    Batch,
    Bridge,
    BridgeError,
    Cause,
    Ending,
    Limits,
    Phase,
    Reply,
)
from relay.core.closecodes import clip_reason, sendable
from relay.core.policy import Policy, Screened

from .bridges import CREATED, UPDATED, flush_all, start

SECRET = "sk-secret-key-abcdefghijklmnop"
SESSION_UPDATE = '{"type":"session.update","session":{"type":"realtime"}}'


def make_bridge(**limits: int) -> Bridge:
    values = {"queue_messages": 8, "queue_bytes": 1000, "max_message_bytes": 500}
    values.update(limits)
    return Bridge(session_update=SESSION_UPDATE, limits=Limits(**values), secret=SECRET)




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
    assert bridge.client_message(b"\x00\x01") is None  # the refusal waits for session.created
    assert bridge.phase is Phase.CONNECTING  # the session goes on
    bridge.upstream_opened()
    assert flush_all(bridge) == [SESSION_UPDATE]
    opening = start(bridge)
    assert [orjson.loads(t)["type"] for t in opening] == ["session.created", "error"]
    assert error_code(opening[1]) == "relay_binary_not_supported"
    out = bridge.client_message(b"\x00\x01")  # once started, at once
    assert isinstance(out, Reply) and error_code(out.text) == "relay_binary_not_supported"


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
    start(bridge)
    assert bridge.client_message(APPEND) is APPEND
    assert bridge.upstream_message(DELTA) is DELTA
    assert (bridge.traffic.client_messages, bridge.traffic.upstream_messages) == (1, 3)
    # Still every other rule: the size limit, the policy's lists, the key's redaction.
    too_big = open_bridge(Policy(), max_message_bytes=len(APPEND) - 1).client_message(APPEND)
    assert isinstance(too_big, Ending) and too_big.cause is Cause.MESSAGE_TOO_BIG
    strict = open_bridge(
        Policy(
            client_events_denied=frozenset({"input_audio_buffer.append"}),
            upstream_events_denied=frozenset({"response.output_audio.delta"}),
        )
    )
    start(strict)
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



# -- the relay is invisible in the event stream (invariant 8) ---------------------------


class Notes:
    """An observer that writes down what the operator hears of a session."""

    def __init__(self) -> None:
        self.fields: list[tuple[str | None, tuple[str, ...]]] = []
        self.setup: list[tuple[str, str]] = []
        self.takeovers: list[tuple[str, str]] = []

    def screened(self, screened: Screened) -> None:
        self.fields.append((screened.kind, screened.fields))

    def setup_refused(self, code: str, message: str) -> None:
        self.setup.append((code, message))

    def takeover(self, kind: str, outcome: str, detail: str) -> None:
        self.takeovers.append((kind, outcome))


def opened(policy: Policy | None = None, observer: Notes | None = None, **limits: int) -> Bridge:
    """A bridge whose upstream is open and flushed, before any upstream event."""
    values = {"queue_messages": 8, "queue_bytes": 10_000, "max_message_bytes": 5000}
    values.update(limits)
    bridge = Bridge(
        session_update=SESSION_UPDATE,
        limits=Limits(**values),
        secret=SECRET,
        policy=policy if policy is not None else Policy(),
        observer=observer,
    )
    bridge.upstream_opened()
    flush_all(bridge)
    return bridge


def kinds(texts: tuple[str | bytes, ...]) -> list[str]:
    return [orjson.loads(t)["type"] for t in texts]


def test_session_created_waits_for_the_answer_and_carries_the_relays_session() -> None:
    bridge = opened()
    assert bridge.upstream_message(CREATED) is None
    batch = bridge.upstream_message(
        '{"type":"session.updated","event_id":"event_up2","session":{"instructions":"persona",'
        '"audio":{"output":{"voice":"marin"}}}}'
    )
    assert isinstance(batch, Batch) and len(batch.texts) == 1
    created = orjson.loads(batch.texts[0])
    assert (created["type"], created["event_id"]) == ("session.created", "event_up1")
    assert created["session"] == {"audio": {"output": {"voice": "marin"}}}  # redacted as configured
    # From now on every session.updated answers one of the client's own updates, and passes.
    mine = '{"type":"session.updated","event_id":"e3","session":{"output_modalities":["text"]}}'
    assert bridge.upstream_message(mine) == mine


def test_nothing_of_the_relays_own_comes_before_session_created() -> None:
    strict = Policy(client_events_denied=frozenset({"conversation.item.delete"}))
    bridge = Bridge(session_update=SESSION_UPDATE, limits=Limits(8, 10_000, 5000), policy=strict)
    assert bridge.client_message('{"type":"conversation.item.delete","event_id":"d1"}') is None
    assert bridge.idle_warning(10, 60) is None
    bridge.upstream_opened()
    flush_all(bridge)
    assert bridge.client_message('{"type":"conversation.item.delete","event_id":"d2"}') is None
    opening = start(bridge)
    assert kinds(opening) == ["session.created", "error", "error", "error"]
    assert [orjson.loads(t)["error"]["event_id"] for t in opening[1:]] == ["d1", None, "d2"]
    assert error_code(opening[2]) == "relay_idle_warning"
    out = bridge.client_message('{"type":"conversation.item.delete","event_id":"d3"}')
    assert isinstance(out, Reply)  # now at once


def test_upstream_events_between_session_created_and_the_answer_are_held_in_order() -> None:
    bridge = opened()
    bridge.upstream_message(CREATED)
    early = ['{"type":"rate_limits.updated","n":1}', '{"type":"response.output_audio.delta","delta":"AA"}']
    assert [bridge.upstream_message(e) for e in early] == [None, None]
    batch = bridge.upstream_message(UPDATED)
    assert isinstance(batch, Batch) and list(batch.texts[1:]) == early
    delta = '{"type":"response.output_audio.delta","delta":"BB"}'
    assert bridge.upstream_message(delta) is delta  # past the start: the short path again


def test_holding_is_bounded_like_the_pre_open_queue() -> None:
    bridge = opened(queue_messages=2)
    bridge.upstream_message(CREATED)
    assert bridge.upstream_message('{"type":"a"}') is None
    assert bridge.upstream_message('{"type":"b"}') is None
    ending = bridge.upstream_message('{"type":"c"}')
    assert isinstance(ending, Ending) and ending.cause is Cause.QUEUE_OVERFLOW
    assert (ending.client_code, ending.upstream_code) == (1013, 1000)
    assert error_code(ending.error) == "relay_queue_overflow"
    assert "session.created" in orjson.loads(ending.error)["error"]["message"]


def test_the_relays_update_refused_is_reported_and_the_client_still_gets_session_created_first() -> None:
    notes = Notes()
    bridge = opened(observer=notes)
    bridge.upstream_message(CREATED)
    refusal = orjson.dumps({"type": "error", "event_id": "event_up2", "error": {
        "type": "invalid_request_error", "code": "unknown_parameter", "param": "session.bogus",
        "message": "Unknown parameter: 'session.bogus'.", "event_id": SETUP_EVENT_ID}}).decode()
    batch = bridge.upstream_message(refusal)
    assert isinstance(batch, Batch)
    assert kinds(batch.texts) == ["session.created", "error"]
    assert orjson.loads(batch.texts[0])["session"] == {}  # the upstream's own, redacted
    assert batch.texts[1] == refusal
    assert notes.setup == [("unknown_parameter", "Unknown parameter: 'session.bogus'.")]


def test_an_error_about_something_else_does_not_answer_the_relays_update() -> None:
    bridge = opened()
    bridge.upstream_message(CREATED)
    other = '{"type":"error","error":{"code":"x","message":"m","event_id":"client_1"}}'
    assert bridge.upstream_message(other) is None  # held
    batch = bridge.upstream_message(UPDATED)
    assert isinstance(batch, Batch) and batch.texts[1:] == (other,)


def test_events_before_session_created_pass_as_they_come() -> None:
    """The Realtime API refuses a connection with an error and a close, and no session."""
    bridge = opened()
    error = '{"type":"error","error":{"code":"invalid_model","message":"no"}}'
    assert bridge.upstream_message(error) is error
    ending = bridge.upstream_closed(4000, "invalid_request_error.invalid_model")
    assert ending is not None and (ending.client_code, ending.error) == (4000, None)


def test_an_upstream_that_closes_before_the_answer_closes_as_before() -> None:
    bridge = opened()
    bridge.upstream_message(CREATED)
    ending = bridge.upstream_closed(1011, "server error")
    assert ending is not None and (ending.client_code, ending.client_reason) == (1011, "server error")
    assert bridge.upstream_message(UPDATED) is None  # nothing after the end


def test_a_client_that_never_sends_anything_gets_session_created() -> None:
    bridge = opened()
    assert kinds(start(bridge)) == ["session.created"]
    assert bridge.traffic.client_messages == 0


def test_a_notice_about_a_removed_tool_follows_the_event_it_is_about() -> None:
    notes = Notes()
    tool = {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example/"}
    update = orjson.dumps({"type": "session.update", "session": {"tools": [tool]}}).decode()
    bridge = opened(observer=notes)
    early = bridge.client_message(update)  # before session.created: the event goes, the notice waits
    assert orjson.loads(early) == {"type": "session.update", "session": {"tools": []}}
    opening = start(bridge)
    assert kinds(opening) == ["session.created", "error"]
    assert error_code(opening[1]) == "relay_mcp_server_not_allowed"
    late = bridge.client_message(update)
    assert isinstance(late, Amended) and orjson.loads(late.text)["session"] == {"tools": []}
    assert error_code(late.notice) == "relay_mcp_server_not_allowed"
    assert notes.fields == [("session.update", ("mcp_server",))] * 2


def test_the_operator_hears_of_every_dropped_field() -> None:
    notes = Notes()
    bridge = opened(Policy(locked=frozenset({"instructions", "model"})).for_session("m"), notes)
    start(bridge)
    out = bridge.client_message('{"type":"session.update","session":{"instructions":"x","model":"n"}}')
    assert orjson.loads(out) == {"type": "session.update", "session": {}}
    bridge.client_message('{"type":"session.update","session":{"model":"m"}}')  # no change
    assert notes.fields == [("session.update", ("instructions", "model"))]


# A property over the start: the upstream opens with session.created, sends events, answers
# the relay's update (a session.updated or an error naming it) among them; the client sends
# events, some refused, at any point in between.
UPSTREAM_EVENT = st.sampled_from(
    ['{"type":"rate_limits.updated"}', '{"type":"response.output_audio.delta","delta":"AA"}',
     '{"type":"conversation.item.added"}', '{"type":"error","error":{"code":"x","event_id":null}}']
)
#: After the answer, a session.updated answers one of the client's own updates.
LATER_EVENT = UPSTREAM_EVENT | st.just('{"type":"session.updated","session":{"mine":1}}')
CLIENT_EVENT = st.sampled_from(
    ['{"type":"conversation.item.delete"}', '{"type":"response.cancel"}', "not json"]
)
SETUP_ERROR = orjson.dumps({"type": "error", "error": {"code": "bad", "message": "m", "event_id": SETUP_EVENT_ID}}).decode()


@given(
    before=st.lists(UPSTREAM_EVENT, max_size=4),
    after=st.lists(LATER_EVENT, max_size=4),
    answer=st.sampled_from([UPDATED, SETUP_ERROR]),
    client=st.lists(st.tuples(st.integers(0, 12), CLIENT_EVENT), max_size=6),
)
def test_the_client_sees_the_stream_the_api_would_send(
    before: list[str], after: list[str], answer: str, client: list[tuple[int, str]]
) -> None:
    strict = Policy(client_events_denied=frozenset({"conversation.item.delete"}))
    bridge = opened(strict, queue_messages=64)
    upstream = [CREATED, *before, answer, *after]
    seen: list[str] = []
    sent_up: list[str] = []

    def deliver(out: object) -> None:
        if isinstance(out, Batch):
            seen.extend(out.texts)  # type: ignore[arg-type]
        elif isinstance(out, Reply):
            seen.append(out.text)
        elif out is not None:
            seen.append(out)  # type: ignore[arg-type]

    for i in range(len(upstream) + 1):
        for at, message in client:
            if at == i or (i == len(upstream) and at > i):
                out = bridge.client_message(message)
                if isinstance(out, str):
                    sent_up.append(out)
                else:
                    deliver(out)
        if i < len(upstream):
            deliver(bridge.upstream_message(upstream[i]))
    assert kinds(tuple(seen))[0] == "session.created"
    relay_own = [t for t in seen if orjson.loads(t).get("event_id", "").startswith("event_relay")]
    refused = [m for _, m in client if m != '{"type":"response.cancel"}']
    assert len(relay_own) == len(refused)  # one error per refused event, none lost
    upstream_seen = [t for t in seen[1:] if t not in relay_own]
    expected = [e for e in upstream if e not in (CREATED, UPDATED)]  # the answer is never seen
    assert upstream_seen == expected
    assert sent_up == ['{"type":"response.cancel"}'] * (len(client) - len(refused))


def test_an_upstream_set_up_in_advance_starts_the_client_at_once_without_a_second_update() -> None:
    """A warm pooled upstream: its session.update went and was answered before the client came."""
    strict = Policy(client_events_denied=frozenset({"conversation.item.delete"}))
    bridge = Bridge(session_update=SESSION_UPDATE, limits=Limits(8, 10_000, 5000), policy=strict)
    assert bridge.client_message('{"type":"conversation.item.delete","event_id":"d1"}') is None
    queued = '{"type":"conversation.item.create","item":{"type":"message"}}'
    assert bridge.client_message(queued) is None
    created = (
        '{"type":"session.created","event_id":"event_fresh",'
        '"session":{"instructions":"the relay","audio":{"output":{"voice":"marin"}}}}'
    )
    bridge.upstream_opened(created)
    flushing = '{"type":"conversation.item.delete","event_id":"d2"}'  # comes while it flushes
    assert bridge.next_to_flush() == queued  # no session.update: the relay's was answered already
    assert bridge.client_message(flushing) is None  # the refusal waits for session.created
    assert bridge.next_to_flush() is None
    assert bridge.phase is Phase.OPEN
    batch = bridge.start_now()
    assert isinstance(batch, Batch)
    assert kinds(batch.texts) == ["session.created", "error", "error"]  # then what waited
    first = orjson.loads(batch.texts[0])
    assert first["event_id"] == "event_fresh"
    assert first["session"] == {"audio": {"output": {"voice": "marin"}}}  # redacted as configured
    assert [orjson.loads(t)["error"]["event_id"] for t in batch.texts[1:]] == ["d1", "d2"]
    assert bridge.start_now() is None  # once
    mine = '{"type":"session.updated","event_id":"e9","session":{"output_modalities":["text"]}}'
    assert bridge.upstream_message(mine) == mine  # answers the client's own update: passes
    out = bridge.client_message('{"type":"conversation.item.delete","event_id":"d3"}')
    assert isinstance(out, Reply)  # started: the relay's own words go at once


def test_a_dialled_upstream_does_not_start_before_its_answer() -> None:
    bridge = make_bridge()
    bridge.upstream_opened()
    assert flush_all(bridge) == [SESSION_UPDATE]
    assert bridge.start_now() is None
    assert kinds(start(bridge)) == ["session.created"]


def test_an_upstream_set_up_in_advance_after_the_pair_ended_starts_nothing() -> None:
    bridge = make_bridge()
    bridge.client_closed()
    bridge.upstream_opened('{"type":"session.created","session":{}}')
    assert flush_all(bridge) == []
    assert bridge.start_now() is None
