"""The warm pool's Trio shell (relay.server.pool) against a fake Realtime API in memory, on
Trio's MockClock: filling, taking, ageing, failing, backing off and draining."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import orjson
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from relay.core.bridge import SETUP_EVENT_ID
from relay.core.warmpool import PoolKey, PoolLedger
from relay.ops.metrics import RelayMetrics
from relay.server.pool import WarmPool
from relay.wire.upstream import Dialed, Opened, UpstreamTarget
from relay.wire.websocket import WebSocket

from .memory import DeafStream

SETUP = orjson.dumps(
    {"type": "session.update", "event_id": SETUP_EVENT_ID, "session": {"instructions": "relay"}}
).decode()
KEY = PoolKey("gpt-realtime", SETUP, None)
MINI = PoolKey("gpt-realtime-mini", SETUP, None)
MAX_AGE = 600.0
DIAL_TIMEOUT = 10.0
PING_INTERVAL = 35.0  # (not a divisor of MAX_AGE: a ping under way when a session ages out
# would be cut mid-write on a memory stream, and the close frame with it)
PEER_TIMEOUT = 45.0


@dataclass
class Conn:
    """One session at the fake upstream."""

    n: int
    model: str
    ws: WebSocketConnection | None = None
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    closed: trio.Event = field(default_factory=trio.Event)
    #: Set (with ``close_with``) to have the fake close this session.
    close_now: trio.Event = field(default_factory=trio.Event)
    close_with: tuple[int, str] = (1000, "")

    def close(self, code: int, reason: str) -> None:
        """Have the fake close this session with ``code`` (from its own task)."""
        self.close_with = (code, reason)
        self.close_now.set()


class FakeRealtime:
    """The Realtime API's opening, in memory: ``session.created``, then the answer to the
    relay's ``session.update``; then it records what it reads until closed."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self.conns: list[Conn] = []
        self.dialled_at: list[float] = []
        self.unreachable = False
        self.refuse_setup = False
        self.deaf_after: float | None = None
        self._heard = trio.Event()

    def conn_of(self, opened: Opened) -> Conn:
        """The session at the fake that ``opened`` (a pooled one) is."""
        return self.conns[int(sessions_of(opened).removeprefix("sess_"))]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds, looking again whenever a session reads a message."""
        while not condition():
            await self._heard.wait()

    def heard(self, conn: Conn, message: str | bytes) -> None:
        conn.received.append(message)
        self._heard.set()
        self._heard = trio.Event()

    def target(self, key: PoolKey) -> _Target:
        return _Target(self, key.model)

    async def serve(self, stream: trio.abc.Stream, conn: Conn) -> None:
        try:
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, stream)  # type: ignore[arg-type]
                ws = conn.ws = await request.accept()
                opening = self._event("session.created", conn, {"instructions": "default"})
                await ws.send_message(opening)
                self.heard(conn, await ws.get_message())
                setup = orjson.loads(conn.received[0])
                if self.refuse_setup:
                    await ws.send_message(orjson.dumps({"type": "error", "error": {
                        "code": "unknown_parameter", "event_id": setup["event_id"]}}).decode())
                else:
                    await ws.send_message(self._event("session.updated", conn, setup["session"]))
                nursery.start_soon(self._read, conn, ws)
                await conn.close_now.wait()
                await ws.aclose(*conn.close_with)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            if conn.ws is not None and conn.ws.closed is not None:
                conn.close_code = conn.ws.closed.code
            conn.closed.set()
            await trio.aclose_forcefully(stream)

    async def _read(self, conn: Conn, ws: WebSocketConnection) -> None:
        while True:
            self.heard(conn, await ws.get_message())

    @staticmethod
    def _event(kind: str, conn: Conn, session: dict[str, object]) -> str:
        event = {"type": kind, "event_id": f"event_up_{conn.n}_{kind}",
                 "session": {"id": f"sess_{conn.n}", **session}}
        return orjson.dumps(event).decode()


@dataclass
class _Target(Dialed):
    fake: FakeRealtime
    model: str

    async def connect(self) -> trio.abc.Stream:
        fake = self.fake
        fake.dialled_at.append(trio.current_time())
        if fake.unreachable:
            raise OSError(111, "Connection refused")
        relay_end, server_end = trio.testing.memory_stream_pair()
        if fake.deaf_after is not None:
            server_end = DeafStream(server_end, trio.current_time() + fake.deaf_after)  # type: ignore[assignment]
        conn = Conn(len(fake.conns), self.model)
        fake.conns.append(conn)
        fake._nursery.start_soon(fake.serve, server_end, conn)
        return relay_end

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        return await UpstreamTarget(
            host="upstream.test", port=80, resource=f"/v1/realtime?model={self.model}",
            ssl_context=None, subprotocols=None, headers=(), max_message_bytes=1 << 20,
        ).handshake(stream)


class Watched(RelayMetrics):
    """Metrics that wake a waiting test whenever the pool's size changes."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}
        self._change = trio.Event()

    def pool_size(self, model: str, waiting: int) -> None:
        super().pool_size(model, waiting)
        self.sizes[model] = waiting
        self._change.set()
        self._change = trio.Event()

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._change.wait()

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@dataclass
class World:
    pool: WarmPool
    fake: FakeRealtime
    metrics: Watched
    run: trio.Event  # set once pool.run() has returned


@asynccontextmanager
async def world(sizes: dict[PoolKey, int], **fakery: object) -> AsyncIterator[World]:
    """The pool and the fake, for a test that ends within an hour of virtual time (a test
    waiting for what never comes fails then, rather than jump the clock for ever)."""
    with trio.fail_after(3600):
        async with _world(sizes, **fakery) as w:
            yield w


@asynccontextmanager
async def _world(sizes: dict[PoolKey, int], **fakery: object) -> AsyncIterator[World]:
    async with trio.open_nursery() as nursery:
        fake = FakeRealtime(nursery)
        for name, value in fakery.items():
            setattr(fake, name, value)
        metrics = Watched()
        pool = WarmPool(
            PoolLedger(sizes, max_age=MAX_AGE, lead=DIAL_TIMEOUT),
            fake.target,
            metrics,
            dial_timeout=DIAL_TIMEOUT,
            send_timeout=5.0,
            close_timeout=2.0,
            ping_interval=PING_INTERVAL,
            peer_timeout=PEER_TIMEOUT,
        )
        ran = trio.Event()

        async def run() -> None:
            await pool.run()
            ran.set()

        nursery.start_soon(run)
        yield World(pool, fake, metrics, ran)
        nursery.cancel_scope.cancel()


async def takes_the_replacement(w: World) -> None:
    """A take now gets the second session the fake opened (the first one's replacement)."""
    opened = await w.pool.take(KEY)
    assert opened is not None and w.fake.conn_of(opened).n == 1
    await trio.aclose_forcefully(opened.stream)


def sessions_of(opened: Opened) -> str:
    return orjson.loads(opened.created)["session"]["id"]  # type: ignore[arg-type]


async def test_the_pool_fills_hands_a_set_up_session_over_and_refills(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 2}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 2)
        assert [c.received for c in w.fake.conns] == [[SETUP], [SETUP]]  # set up, nothing else
        await trio.sleep(30)  # (virtual time: the sessions wait)
        before = trio.current_time()
        opened = await w.pool.take(KEY)
        assert opened is not None and trio.current_time() == before  # no dial, no wait
        assert opened.since == 0.0  # its upstream session is 30 s old: the cap counts from then
        conn = w.fake.conn_of(opened)
        created = orjson.loads(opened.created)  # type: ignore[arg-type]
        assert created["session"] == {"id": f"sess_{conn.n}", "instructions": "relay"}  # answered
        assert not created["event_id"].startswith("event_up_")  # a fresh id, no upstream's
        # The taker owns it now: what it sends reaches that upstream session.
        await opened.websocket.send_message('{"type":"response.create"}')
        await w.fake.until(lambda: len(conn.received) == 2)
        assert conn.received == [SETUP, '{"type":"response.create"}']
        await w.metrics.until(lambda: w.metrics.sizes["gpt-realtime"] == 2)  # refilled
        assert len(w.fake.conns) == 3
        assert w.metrics.value("relay_warm_pool_hits_total", model="gpt-realtime") == 1
        await opened.websocket.aclose()
        await trio.aclose_forcefully(opened.stream)


async def test_an_empty_pool_is_a_miss_and_the_session_dials(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}, unreachable=True) as w:
        assert await w.pool.take(KEY) is None
        assert w.metrics.value(
            "relay_warm_pool_misses_total", model="gpt-realtime", reason="empty") == 1
        w.fake.unreachable = False
        dial = w.fake.target(KEY)
        opened = await w.pool.source(KEY, dial).open()
        assert opened.created is None  # dialled: the pair sets the session up itself
        await trio.aclose_forcefully(opened.stream)


async def test_many_clients_at_once_never_share_a_session(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 5}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 5)
        got: list[tuple[int, Opened]] = []

        async def client(n: int) -> None:
            opened = await w.pool.source(KEY, w.fake.target(KEY)).open()
            if opened.created is None:  # dialled: set up as a pair does, its update first
                await opened.websocket.send_message(SETUP)
            await opened.websocket.send_message(f"client {n}")
            got.append((n, opened))

        async with trio.open_nursery() as clients:
            for n in range(40):
                clients.start_soon(client, n)
        assert len(got) == 40
        assert len({id(o.websocket) for _, o in got}) == 40
        pooled = [o for _, o in got if o.created is not None]
        assert len(pooled) == 5 and len({sessions_of(o) for o in pooled}) == 5
        # At the fake: every client's message reached one session of its own.
        heard = [f"client {n}" for n in range(40)]
        await w.fake.until(
            lambda: sorted(m for c in w.fake.conns for m in c.received[1:]) == sorted(heard)
        )
        for conn in w.fake.conns:
            assert conn.received[0] == SETUP and len(conn.received) <= 2
        for n, opened in got:
            readers = [c for c in w.fake.conns if f"client {n}" in c.received]
            assert len(readers) == 1
            if opened.created is not None:
                assert readers == [w.fake.conn_of(opened)]
        for _, opened in got:
            await trio.aclose_forcefully(opened.stream)


async def test_a_session_goes_only_to_its_own_model_and_setup(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1, MINI: 1}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime-mini") == 1
                              and w.metrics.sizes.get("gpt-realtime") == 1)
        other_setup = PoolKey(KEY.model, '{"type":"session.update","session":{}}', None)
        named = PoolKey(KEY.model, KEY.setup, "c0ffee")
        dial = w.fake.target(KEY)
        assert w.pool.source(other_setup, dial) is dial
        assert w.pool.source(named, dial) is dial
        assert w.metrics.value(
            "relay_warm_pool_misses_total", model="gpt-realtime", reason="identified") == 1
        mini = await w.pool.take(MINI)
        assert mini is not None and w.fake.conn_of(mini).model == "gpt-realtime-mini"
        await trio.aclose_forcefully(mini.stream)


async def test_a_session_is_replaced_before_it_ages_and_closed_when_it_does(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 1)
        first = w.fake.conns[0]
        with trio.fail_after(MAX_AGE + 1):
            await first.closed.wait()
        assert first.close_code == 1000
        assert [round(t) for t in w.fake.dialled_at] == [0, MAX_AGE - DIAL_TIMEOUT]
        assert w.metrics.sizes["gpt-realtime"] == 1  # the replacement waits: no dip
        assert w.metrics.value(
            "relay_warm_pool_recycled_total", model="gpt-realtime", reason="age") == 1
        await takes_the_replacement(w)


async def test_a_session_that_fails_while_waiting_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 1)
        first = w.fake.conns[0]
        first.close(1011, "server error")
        await w.metrics.until(lambda: len(w.fake.conns) == 2 and w.metrics.sizes[KEY.model] == 1)
        assert w.metrics.value(
            "relay_warm_pool_recycled_total", model="gpt-realtime", reason="failed") == 1
        await takes_the_replacement(w)


async def test_a_session_that_stops_answering_pings_is_replaced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}, deaf_after=30.0) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 1)
        w.fake.deaf_after = None  # only the first goes deaf
        await w.metrics.until(lambda: len(w.fake.conns) == 2 and w.metrics.sizes[KEY.model] == 1)
        # The first ping went unanswered for the peer timeout; then a backoff of 1 s.
        assert round(w.fake.dialled_at[1]) == PING_INTERVAL + PEER_TIMEOUT + 1
        assert w.metrics.value(
            "relay_warm_pool_recycled_total", model="gpt-realtime", reason="failed") == 1


async def test_failing_dials_back_off_instead_of_looping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 2}, unreachable=True) as w:
        await trio.sleep(100)  # (virtual time: let the pool try for 100 s)
        assert w.fake.dialled_at == [0, 0, 2, 6, 14, 30, 62]
        assert w.metrics.value("relay_warm_pool_dial_failures_total", model="gpt-realtime") == 7
        w.fake.unreachable = False
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 2)
        assert w.fake.dialled_at[7:] == [122, 122]  # the next probe, then the second at once


async def test_a_refused_setup_is_not_pooled(autojump_clock: trio.testing.MockClock) -> None:
    async with world({KEY: 1}, refuse_setup=True) as w:
        await trio.sleep(2.5)  # (virtual time: the first attempt and the retry a second later)
        assert len(w.fake.conns) == 2
        assert all(c.closed.is_set() for c in w.fake.conns)
        assert await w.pool.take(KEY) is None


async def test_drain_closes_every_waiting_session_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 2, MINI: 1}) as w:
        await w.metrics.until(lambda: sum(w.metrics.sizes.values()) == 3)
        with trio.fail_after(5):
            await w.pool.drain()
            await w.run.wait()
        assert [c.close_code for c in w.fake.conns] == [1001, 1001, 1001]
        assert w.metrics.sizes == {"gpt-realtime": 0, "gpt-realtime-mini": 0}
        assert await w.pool.take(KEY) is None
        assert w.metrics.value(
            "relay_warm_pool_misses_total", model="gpt-realtime", reason="empty") == 0


async def test_a_dial_under_way_at_drain_is_closed_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}) as w:
        await trio.testing.wait_all_tasks_blocked()
        assert len(w.fake.conns) == 1  # dialled, not yet set up
        await w.pool.drain()
        await w.run.wait()
        with trio.fail_after(5):
            await w.fake.conns[0].closed.wait()
        assert w.fake.conns[0].close_code in (1001, None)  # a close frame, or cut mid-dial
        assert w.metrics.sizes.get("gpt-realtime", 0) == 0


async def test_metrics_show_size_hits_misses_and_recycling(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with world({KEY: 1}) as w:
        await w.metrics.until(lambda: w.metrics.sizes.get("gpt-realtime") == 1)
        opened = await w.pool.take(KEY)
        assert opened is not None
        assert await w.pool.take(KEY) is None  # the refill is still dialling
        body = w.metrics.render()[0].decode()
        for line in (
            'relay_warm_pool_hits_total{model="gpt-realtime"} 1.0',
            'relay_warm_pool_misses_total{model="gpt-realtime",reason="empty"} 1.0',
            'relay_warm_pool_sessions{model="gpt-realtime"} 0.0',
        ):
            assert line in body
        await w.metrics.until(lambda: w.metrics.sizes["gpt-realtime"] == 1)
        body = w.metrics.render()[0].decode()
        assert 'relay_warm_pool_sessions{model="gpt-realtime"} 1.0' in body
        await trio.aclose_forcefully(opened.stream)
        assert not math.isnan(w.metrics.value("relay_warm_pool_sessions", model="gpt-realtime"))
