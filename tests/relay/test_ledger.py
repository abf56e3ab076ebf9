"""The ledger keeps what a new upstream needs to take a session over (sans-IO, no sockets)."""

from __future__ import annotations

from typing import Any

import orjson

from relay.core.bridge import SETUP_EVENT_ID, Bridge, Limits, Redial, Reply
from relay.core.ledger import Ledger

SESSION = {"type": "realtime", "instructions": "x", "audio": {"output": {"voice": "marin"}}}


def feed(ledger: Ledger, *events: dict[str, Any]) -> None:
    for event in events:
        ledger.upstream_event(event["type"], event)


def done(item: dict[str, Any], previous: str | None = None) -> dict[str, Any]:
    return {"type": "conversation.item.done", "previous_item_id": previous, "item": item}


def replayed(ledger: Ledger) -> list[dict[str, Any]]:
    texts, _ = ledger.replay(SETUP_EVENT_ID)
    return [orjson.loads(t) for t in texts]


def test_an_accepted_client_update_merges_key_by_key_and_a_refused_one_does_not() -> None:
    ledger = Ledger(SESSION, max_bytes=10_000)
    accepted = {"type": "session.update", "session": {"audio": {"output": {"speed": 1.2}}}}
    refused = {"type": "session.update", "event_id": "mine", "session": {"instructions": "no"}}
    ledger.client_update(accepted)
    ledger.client_update(refused)
    feed(
        ledger,
        {"type": "session.updated", "session": {}},
        {"type": "error", "error": {"code": "invalid_value", "event_id": "mine"}},
    )
    session = replayed(ledger)[0]
    assert session["event_id"] == SETUP_EVENT_ID
    assert session["session"]["audio"]["output"] == {"voice": "marin", "speed": 1.2}
    assert session["session"]["instructions"] == "x"


def test_an_update_without_an_event_id_is_named_and_its_error_shows_none() -> None:
    ledger = Ledger(SESSION, max_bytes=10_000)
    event = {"type": "session.update", "session": {"instructions": "bad"}}
    stamped = ledger.client_update(event)
    assert stamped is not None
    named = orjson.loads(stamped)["event_id"]
    error = {"type": "error", "error": {"code": "invalid_value", "event_id": named}}
    assert ledger.upstream_event("error", error) is True
    assert error["error"]["event_id"] is None  # as the client would have seen it
    assert replayed(ledger)[0]["session"]["instructions"] == "x"


def test_updates_a_lost_upstream_had_and_never_answered_are_sent_again_after_the_replay() -> None:
    """The client waits for their session.updated, and the new upstream answers them (each
    answer accepts its update, oldest first). One still in the queue goes from the queue, and
    one that comes back unsent (requeued) too: neither is in the replay."""
    ledger = Ledger(SESSION, max_bytes=10_000)
    for n, speed in enumerate((1.1, 1.2, 1.3, 1.4)):
        session = {"audio": {"output": {"speed": speed}}}
        ledger.client_update({"type": "session.update", "event_id": f"u{n}", "session": session})
    feed(ledger, {"type": "session.updated", "session": {}})  # u0 accepted
    ledger.lost({"u3"})  # u3 waits in the queue; u1 and u2 were sent
    ledger.requeued("u2")  # u2 came back unsent: it goes from the queue
    sent = replayed(ledger)
    assert [m["event_id"] for m in sent if m["type"] == "session.update"] == [SETUP_EVENT_ID, "u1"]
    assert sent[0]["session"]["audio"]["output"]["speed"] == 1.1
    assert sent[-1]["session"] == {"audio": {"output": {"speed": 1.2}}}
    feed(ledger, *[{"type": "session.updated", "session": {}}] * 3)  # u1, then u2 and u3
    assert replayed(ledger)[0]["session"]["audio"]["output"]["speed"] == 1.4
    assert [m["type"] for m in replayed(ledger)] == ["session.update"]  # nothing pending now


def test_audio_turns_replay_as_their_transcripts_in_their_place() -> None:
    ledger = Ledger(SESSION, max_bytes=10_000)
    user = {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
    reply = {"id": "a1", "type": "message", "role": "assistant",
             "content": [{"type": "output_audio", "transcript": "Hello!"}]}
    untranscribed = {"id": "u2", "type": "message", "role": "user",
                     "content": [{"type": "input_audio", "transcript": None}]}
    call = {"id": "f1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    feed(
        ledger,
        done(user),
        done(reply, "u1"),
        {"type": "conversation.item.input_audio_transcription.completed", "item_id": "u1", "transcript": "Hi"},
        done(untranscribed, "a1"),
        done(call, "u2"),
    )
    items = [m["item"] for m in replayed(ledger)[1:]]
    assert [i["id"] for i in items] == ["u1", "a1", "f1"]  # u2 has no transcript: not replayed
    assert items[0]["content"] == [{"type": "input_text", "text": "Hi"}]
    assert items[1]["content"] == [{"type": "output_text", "text": "Hello!"}]
    assert items[2] == call
    assert ledger.skipped == 1


def test_the_oldest_items_go_first_past_the_bound() -> None:
    ledger = Ledger(SESSION, max_bytes=400)
    for n in range(20):
        text = {"id": f"i{n}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x" * 40}]}
        feed(ledger, done(text, f"i{n - 1}" if n else None))
        assert ledger.size <= 400
    ids = [m["item"]["id"] for m in replayed(ledger)[1:]]
    assert ids == [f"i{n}" for n in range(20 - len(ids), 20)]
    assert ledger.forgotten == 20 - len(ids)


def test_a_lost_upstream_fails_the_response_in_flight_and_hides_the_replays_echoes() -> None:
    setup = orjson.dumps({"type": "session.update", "event_id": SETUP_EVENT_ID, "session": SESSION}).decode()
    bridge = Bridge(session_update=setup, limits=Limits(8, 1 << 20, 1 << 20), ledger=Ledger(SESSION, max_bytes=10_000))
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    bridge.upstream_message('{"type":"session.created","session":{}}')
    bridge.upstream_message('{"type":"session.updated","session":{}}')
    item = {"id": "u1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
    bridge.upstream_message(orjson.dumps(done(item)).decode())
    bridge.upstream_message('{"type":"response.created","response":{"id":"r1"}}')
    redial = bridge.upstream_closed(1006, None)
    assert isinstance(redial, Redial)
    (failed,) = [orjson.loads(t) for t in redial.texts]
    assert failed["response"]["id"] == "r1" and failed["response"]["status"] == "failed"
    assert bridge.client_message('{"type":"response.create"}') is None  # waits for the new one
    bridge.upstream_opened()
    flushed = []
    while (data := bridge.next_to_flush()) is not None:
        flushed.append(orjson.loads(data))
    assert [m["type"] for m in flushed] == ["session.update", "conversation.item.create", "response.create"]
    assert flushed[1]["item"]["id"] == "u1"
    assert bridge.upstream_message('{"type":"session.created","session":{}}') is None
    echo = {"type": "conversation.item.added", "previous_item_id": None, "item": item}
    assert bridge.upstream_message(orjson.dumps(echo).decode()) is None
    notice = bridge.upstream_message('{"type":"session.updated","session":{}}')
    assert isinstance(notice, Reply) and "relay_upstream_reconnected" in notice.text
    assert bridge.upstream_message(orjson.dumps(done(item)).decode()) is None  # the last echo
    assert bridge.upstream_message('{"type":"response.created","response":{"id":"r2"}}') is not None


def test_without_a_ledger_the_upstreams_end_is_the_sessions() -> None:
    bridge = Bridge(session_update="{}", limits=Limits(8, 1 << 20, 1 << 20))
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    bridge.upstream_message('{"type":"session.created"}')
    bridge.upstream_message('{"type":"session.updated"}')
    ending = bridge.upstream_closed(1006, None)
    assert not isinstance(ending, Redial) and ending is not None and ending.client_code == 1011
