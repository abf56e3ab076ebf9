"""A session outlives its upstream: failover and rollover, end to end in front of mockrealtime.

The fake's connections record what each received (``server.connections[i].received``), so the
replay is checked where it lands: the new upstream gets the session as it stood, then the
conversation under the same item ids, before anything else of the client's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import WebSocketConnection

from mockrealtime import Faults, MockConfig, MockServer, serve_mock_realtime
from relay.core.bridge import SETUP_EVENT_ID

from .harness import TEST_KEY, RunningRelay, connect, running_relay
from .test_metrics import scrape
from .test_relay_loopback import receive_until_closed

TIMEOUT = 20
TEXT_SESSION = {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}}


@asynccontextmanager
async def relay_and_mock(
    faults: Faults | None = None, **settings: object
) -> AsyncIterator[tuple[RunningRelay, MockServer]]:
    config = MockConfig(api_keys=frozenset({TEST_KEY}), faults=faults or Faults(), pace=0)
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, config)
        async with running_relay(upstream_url=mock.url, **settings) as relay:
            yield relay, mock
        nursery.cancel_scope.cancel()


def user_text(item_id: str, text: str) -> str:
    item = {"id": item_id, "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    return orjson.dumps({"type": "conversation.item.create", "item": item}).decode()


async def ask(ws: WebSocketConnection, item_id: str, text: str) -> None:
    """A user turn: the item, then ``response.create``."""
    await ws.send_message(user_text(item_id, text))
    await ws.send_message('{"type":"response.create"}')


async def until(ws: WebSocketConnection, kind: str, seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Read events into ``seen`` until one of type ``kind`` (returned)."""
    while True:
        event = orjson.loads(await ws.get_message())
        seen.append(event)
        if event["type"] == kind:
            return event


def sent(record: Any) -> list[dict[str, Any]]:
    return [orjson.loads(m) for m in record.received]


async def test_a_killed_upstream_is_replaced_and_the_conversation_replayed_under_the_same_ids() -> None:
    """Turn 1 completes; the fake dies in the middle of turn 2's response. The client gets that
    response as failed and the relay's notice; its turn 3 is answered by a new upstream, which
    first got the session as it stood and turns 1 and 2 (the user's items and the assistant's
    finished reply) under their own ids."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(kill_mid_response=2)) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await ws.send_message(orjson.dumps(TEXT_SESSION).decode())
                await until(ws, "session.updated", seen)
                await ask(ws, "item_user_one", "Hello there")
                first = await until(ws, "response.done", seen)
                assistant_one = first["response"]["output"][0]["id"]
                await ask(ws, "item_user_two", "And again")
                created = await until(ws, "response.created", seen)
                failed = await until(ws, "response.done", seen)
                notice = await until(ws, "error", seen)
                await ask(ws, "item_user_three", "Still there?")
                third = await until(ws, "response.done", seen)
            moved = scrape(relay.app.metrics)
    # The operator hears of it too (and the log says so, at warning level when it starts).
    takeovers = {
        labels: value for (name, labels), value in moved.items()
        if name == "relay_upstream_takeovers_total"
    }
    assert takeovers == {(("kind", "failover"), ("outcome", "moved")): 1.0}
    assert failed["response"]["id"] == created["response"]["id"]
    assert failed["response"]["status"] == "failed"
    assert failed["response"]["status_details"]["error"]["code"] == "relay_upstream_lost"
    assert notice["error"]["code"] == "relay_upstream_reconnected"
    assert third["response"]["status"] == "completed"
    assert len(mock.connections) == 2
    new = sent(mock.connections[1])
    # The session as it stood: the relay's, with the client's accepted update merged in.
    assert new[0]["type"] == "session.update" and new[0]["event_id"] == SETUP_EVENT_ID
    assert new[0]["session"]["output_modalities"] == ["text"]
    assert new[0]["session"]["instructions"] == relay.app.session["instructions"]
    replayed = [m["item"] for m in new if m["type"] == "conversation.item.create"]
    assert [i["id"] for i in replayed] == [
        "item_user_one",
        assistant_one,
        "item_user_two",
        "item_user_three",  # (the client's own, after the replay)
    ]
    assert replayed[1]["role"] == "assistant" and replayed[1]["content"][0]["type"] == "output_text"
    assert replayed[1]["content"][0]["text"] == first["response"]["output"][0]["content"][0]["text"]
    # The client never saw the new upstream's session events or the replay's echoes.
    kinds = [e["type"] for e in seen]
    assert kinds.count("session.created") == 1
    assert kinds.count("session.updated") == 1  # the answer to its own update only
    echoed = [e["item"]["id"] for e in seen if e["type"] == "conversation.item.added"]
    assert echoed.count("item_user_one") == 1 and echoed.count("item_user_two") == 1


async def test_an_upstream_that_stops_answering_pings_is_replaced_and_the_session_goes_on() -> None:
    """The first upstream hangs after turn 1: TCP stays up, but it reads and sends nothing (no
    pong). The relay's next ping goes unanswered for the peer timeout, so the session moves to a
    new upstream, which gets the conversation; the client's next turn is answered there."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(
            Faults(deaf_after_response=1), ping_interval=0.25, peer_timeout=1.0, send_timeout=0.5
        ) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await ask(ws, "item_user_one", "Hello there")
                first = await until(ws, "response.done", seen)
                notice = await until(ws, "error", seen)
                await ask(ws, "item_user_two", "Still there?")
                second = await until(ws, "response.done", seen)
            moved = scrape(relay.app.metrics)
    assert notice["error"]["code"] == "relay_upstream_reconnected"
    assert second["response"]["status"] == "completed"
    assert len(mock.connections) == 2
    new = sent(mock.connections[1])
    replayed = [m["item"]["id"] for m in new if m["type"] == "conversation.item.create"]
    assert replayed == ["item_user_one", first["response"]["output"][0]["id"], "item_user_two"]
    takeovers = {
        labels: value for (name, labels), value in moved.items()
        if name == "relay_upstream_takeovers_total"
    }
    assert takeovers == {(("kind", "failover"), ("outcome", "moved")): 1.0}


async def test_a_quiet_session_whose_upstream_answers_pings_keeps_its_upstream() -> None:
    """The other side of the test above: pongs alone keep an upstream alive. The client sends
    nothing for three peer timeouts (time must pass for this: the sleep is what is tested);
    its upstream is pinged, answers, and is neither replaced nor closed."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(ping_interval=0.25, peer_timeout=1.0, send_timeout=0.5) as (
            relay,
            mock,
        ):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await trio.sleep(3.0)
                await ask(ws, "item_user_one", "Still there?")
                done = await until(ws, "response.done", seen)
            moved = scrape(relay.app.metrics)
    assert done["response"]["status"] == "completed"
    assert [e["type"] for e in seen].count("error") == 0
    assert len(mock.connections) == 1
    assert not any(name == "relay_upstream_takeovers_total" for name, _ in moved)


async def test_without_failover_the_session_ends_with_its_upstream() -> None:
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(kill_mid_response=1), failover_attempts=0) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await ask(ws, "item_user_one", "Hello there")
                error = await until(ws, "error", seen)
                _, code, _ = await receive_until_closed(ws)
    assert error["error"]["code"] == "relay_upstream_lost"
    assert code == 1011
    assert len(mock.connections) == 1


async def test_an_upstream_that_cannot_be_replaced_ends_the_session_with_1011() -> None:
    """Every new dial is refused: after RELAY_FAILOVER_ATTEMPTS tries the client is told."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(
            Faults(kill_mid_response=1), failover_attempts=2, failover_backoff=0.01
        ) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await ws.send_message(user_text("item_user_one", "Hello there"))
                mock.faults = Faults(refuse_status=503)  # for the dials that follow
                await ws.send_message('{"type":"response.create"}')
                error = await until(ws, "error", seen)
                _, code, _ = await receive_until_closed(ws)
    assert error["error"]["code"] == "relay_upstream_lost"
    assert "could not open a new one" in error["error"]["message"]
    assert code == 1011
    assert mock.handshakes == 3  # the first, then two tries


async def test_a_failover_takes_a_warm_pooled_session_and_replays_into_it() -> None:
    """With RELAY_WARM_POOL the new upstream comes from the pool: it already has the relay's
    session, and gets the session as it stood and the replay all the same."""
    seen: list[dict[str, Any]] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(kill_mid_response=1), warm_pool=("2",)) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await until(ws, "session.created", seen)
                await ask(ws, "item_user_one", "Hello there")
                failed = await until(ws, "response.done", seen)
                await until(ws, "error", seen)
                await ask(ws, "item_user_two", "Again")
                answered = await until(ws, "response.done", seen)
            hits = relay.app.metrics.registry.get_sample_value(
                "relay_warm_pool_hits_total", {"model": relay.app.config.model}
            )
    assert failed["response"]["status"] == "failed"
    assert answered["response"]["status"] == "completed"
    (taken,) = [c for c in mock.connections if any("event_relay_replay" in str(m) for m in c.received)]
    got = sent(taken)
    setups = [n for n, m in enumerate(got) if m.get("event_id") == SETUP_EVENT_ID]
    assert len(setups) == 2  # the pool's own, then the takeover's session as it stood
    replayed = [m["item"]["id"] for m in got if m["type"] == "conversation.item.create"]
    assert replayed == ["item_user_one", "item_user_two"]
    assert hits == 2  # the first session and its takeover both came from the pool
    assert [e["type"] for e in seen].count("session.created") == 1
