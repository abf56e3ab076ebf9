"""The bridge's invariants hold when a session moves to a new upstream (failover, rollover).

Each example runs one pair in virtual time (``MockClock``, autojump) against the whole of
mockrealtime over in-memory streams: every dial reaches a fresh connection of the same fake, so
what each upstream connection received is on record (``server.connections[i].received``).
A scripted client sends text turns (its own item ids, then ``response.create``) with drawn
gaps; the fake is killed at drawn times (a drop without a close frame), or the session is rolled
over at a shortened cap. The properties:

* **order and completeness**: the client's messages reach the upstreams in order and at most
  once; one is missing only if it went to an upstream that was then lost (in flight at the
  drop); in a rollover, none is missing;
* **the replay**: each new upstream gets the session as it stood first, then the items the
  earlier ones confirmed (and the ledger still holds), in order and under their own ids, before
  any client message;
* **no leak**: the client sees one ``session.created``, a ``session.updated`` only for its
  own update, no echo of a replayed item, and a failed ``response.done`` for each response lost;
* **bounded memory**: the ledger never holds more than its byte bound.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

from mockrealtime import MockConfig, MockServer
from relay.core.bridge import SETUP_EVENT_ID, Bridge, Cause, Limits
from relay.core.ledger import Ledger
from relay.server.pair import Pair, Takeover
from relay.wire.upstream import Dialed
from relay.wire.websocket import WebSocket

from .memory import (
    CLOSE_TIMEOUT,
    DIAL_TIMEOUT,
    SECRET,
    SEND_TIMEOUT,
    ClientRecord,
    ClientScript,
    MemoryClient,
    memory_target,
)

SESSION = {"type": "realtime", "instructions": "Be brief.", "output_modalities": ["audio"]}
CLIENT_UPDATE = {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}}


class FakeUpstream(Dialed):
    """Dials reach fresh connections of one in-memory mockrealtime."""

    def __init__(self, server: MockServer, nursery: trio.Nursery) -> None:
        self.server = server
        self._nursery = nursery
        self._target = memory_target(1 << 22)

    async def connect(self) -> trio.abc.Stream:
        return self.server.memory_stream(self._nursery)

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        return await self._target.handshake(stream)


def turn(n: int, respond: bool) -> list[str]:
    item = {"id": f"mine{n}", "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": f"turn {n}"}]}
    messages = [orjson.dumps({"type": "conversation.item.create", "item": item}).decode()]
    if respond:
        messages.append('{"type":"response.create"}')
    return messages


def run(main: Callable[[], Any]) -> Any:
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def session(
    messages: list[str],
    gaps: list[float],
    *,
    kills: tuple[float, ...] = (),
    rollover: float = 0.0,
    replay_bytes: int = 1 << 20,
) -> tuple[Any, ClientRecord, MockServer, Ledger]:
    """Run one pair to its end: the client sends ``messages`` after ``gaps``, waits, leaves."""
    record = ClientRecord()
    ledger = Ledger(SESSION, max_bytes=replay_bytes)
    setup = orjson.dumps({"type": "session.update", "event_id": SETUP_EVENT_ID, "session": SESSION}).decode()
    bridge = Bridge(
        session_update=setup,
        limits=Limits(64, 1 << 20, 1 << 20),
        secret=SECRET,
        ledger=ledger,
    )
    server = MockServer(MockConfig(pace=0, ping_interval=None))
    async with trio.open_nursery() as world:
        client = MemoryClient(ClientScript(tuple(messages), tuple(gaps), closes_after=30.0), record)
        pair = Pair(
            client,
            bridge,
            FakeUpstream(server, world),
            dial_timeout=DIAL_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            send_timeout=SEND_TIMEOUT,
            takeover=Takeover(attempts=3, backoff_seconds=0.1, rollover_seconds=rollover),
        )

        async def kill() -> None:
            for at in kills:
                await trio.sleep_until(at)
                live = [c for c in server.connections if c.live]
                if live:
                    live[-1].drop()

        world.start_soon(client.drive)
        world.start_soon(kill)
        ending = await pair.run()
        world.cancel_scope.cancel()
    return ending, record, server, ledger


def upstream_messages(server: MockServer) -> list[list[dict[str, Any]]]:
    return [[orjson.loads(m) for m in c.received] for c in server.connections]


def client_part(received: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What of one connection's messages was the client's (not the setup, not the replay)."""
    return [
        m for m in received
        if m.get("event_id") != SETUP_EVENT_ID and not str(m.get("event_id", "")).startswith("event_relay_replay")
    ]


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    rest = iter(whole)
    return all(any(m == w for w in rest) for m in part)


def is_replay(message: dict[str, Any]) -> bool:
    return str(message.get("event_id", "")).startswith("event_relay_replay")


def check(ending: Any, record: ClientRecord, server: MockServer, messages: list[str], *, lossless: bool) -> None:
    assert ending.cause is Cause.CLIENT_CLOSED, ending
    sent = [orjson.loads(m) for m in messages]
    per_connection = upstream_messages(server)
    arrived = [m for received in per_connection for m in client_part(received)]
    # Order, at most once (the relay's stamp on the client's update aside).
    for m in arrived:
        m.pop("event_id", None) if str(m.get("event_id", "")).startswith("event_relay_su") else None
    assert is_subsequence(arrived, sent), "reordered or duplicated"
    if lossless:
        assert arrived == sent
    # The replay: each new connection gets the session, then the confirmed items, first.
    confirmed: list[str] = []
    for n, received in enumerate(per_connection):
        if n:
            assert received[0]["event_id"] == SETUP_EVENT_ID
            assert received[0]["session"]["instructions"] == SESSION["instructions"]
            replay = [is_replay(m) for m in received[1:]]
            assert replay == sorted(replay, reverse=True), "a client message before the replay"
            replayed = [m["item"]["id"] for m in received[1:] if is_replay(m)]
            mine = [i for i in replayed if i.startswith("mine")]
            assert mine == [i for i in confirmed if i in mine]  # in order
            assert set(mine) <= set(confirmed)
        for m in client_part(received):
            if m["type"] == "conversation.item.create":
                confirmed.append(m["item"]["id"])
    # No leak.
    events = [orjson.loads(m) for m in record.received]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.created"
    assert kinds.count("session.created") == 1
    assert kinds.count("session.updated") == sum(1 for m in sent if m["type"] == "session.update")
    added = [e["item"]["id"] for e in events if e["type"] == "conversation.item.added"]
    assert len(added) == len(set(added)), "a replayed item's echo reached the client"
    # Every response the client saw start ended, completed or (lost with its upstream) failed.
    created = [e["response"]["id"] for e in events if e["type"] == "response.created"]
    done = {e["response"]["id"]: e["response"]["status"] for e in events if e["type"] == "response.done"}
    assert set(created) == set(done)
    if lossless:
        assert set(done.values()) <= {"completed"}


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[str], list[float]]:
    turns = draw(st.integers(1, 8))
    messages = [orjson.dumps(CLIENT_UPDATE).decode()]
    for n in range(turns):
        messages += turn(n, draw(st.booleans()))
    gaps = [draw(st.sampled_from([0.0, 0.01, 0.5, 2.0, 5.0])) for _ in messages]
    return messages, gaps


#: The client's update goes out at the moment its upstream dies, unanswered: it is sent again
#: to the new upstream, whose answer the client gets (once dropped, with its answer never come).
_UPDATE_IN_FLIGHT = (
    [orjson.dumps(CLIENT_UPDATE).decode(), *turn(0, False), *turn(1, True)],
    [5.0, 0.0, 0.0, 0.0],
)


@given(conversation=conversations(), kills=st.lists(st.floats(0.0, 30.0), max_size=2).map(sorted))
@example(conversation=_UPDATE_IN_FLIGHT, kills=[5.0])
def test_a_killed_upstream_loses_nothing_but_what_was_in_flight(
    conversation: tuple[list[str], list[float]], kills: list[float]
) -> None:
    messages, gaps = conversation
    ending, record, server, ledger = run(lambda: session(messages, gaps, kills=tuple(kills)))
    check(ending, record, server, messages, lossless=False)
    assert len(server.connections) >= 1
    failed = [orjson.loads(m) for m in record.received if '"status":"failed"' in m]
    assert all(e["type"] == "response.done" for e in failed)


@given(conversation=conversations(), rollover=st.sampled_from([1.0, 3.0, 7.0]))
def test_a_rollover_at_a_shortened_cap_loses_and_reorders_nothing(
    conversation: tuple[list[str], list[float]], rollover: float
) -> None:
    messages, gaps = conversation
    ending, record, server, _ = run(lambda: session(messages, gaps, rollover=rollover))
    check(ending, record, server, messages, lossless=True)
    assert len(server.connections) >= 2  # (the client stays 30 s: the cap comes round)
    notices = [m for m in record.received if "relay_upstream_reconnected" in m]
    assert notices == []  # a rollover is not announced


@given(conversation=conversations(), bound=st.sampled_from([300, 600, 1200]))
def test_the_ledger_stays_within_its_bound_and_replays_the_newest_items(
    conversation: tuple[list[str], list[float]], bound: int
) -> None:
    messages, gaps = conversation
    ending, record, server, ledger = run(
        lambda: session(messages, gaps, kills=(25.0,), replay_bytes=bound)
    )
    assert ledger.size <= bound
    if len(server.connections) == 2:
        first, second = upstream_messages(server)
        replayed = [m["item"]["id"] for m in second if is_replay(m) and m["item"]["id"].startswith("mine")]
        mine = [m["item"]["id"] for m in first if m["type"] == "conversation.item.create"]
        assert set(replayed) <= set(mine)
        # The newest are kept: what was replayed of the client's is a tail of its items.
        kept = [i for i in mine if i in replayed]
        assert kept == mine[len(mine) - len(kept):]
