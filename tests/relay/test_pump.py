"""relay.wire.pump: pairs whose legs are plain sockets are relayed by the pump, and nothing
about a session changes for it: order, backpressure, control frames, ends and errors.

Each test runs a real :class:`~relay.server.pair.Pair` over TCP loopback sockets (the pump
only takes plain sockets) with a :class:`~relay.wire.pump.Pump` of its own. The far ends
are raw peers that write and read frames by hand, so a test controls exactly which
bytes arrive together in one read (a burst, a message with the peer's end, a ping
between messages). Every wait is bounded, so a hang fails the test.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import orjson
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.core.bridge import Bridge, Cause, Ending, Limits, Message
from relay.core.policy import Policy
from relay.server.legs import SocketClient
from relay.server.pair import Pair
from relay.wire import pump as pump_module
from relay.wire.frames import (
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    Close,
    Event,
    FrameReader,
    Ping,
    Pong,
    frame,
)
from relay.wire.pump import BUDGET, GROW_START, PollWindow, Pump
from relay.wire.upstream import Dialed
from relay.wire.websocket import WebSocket

SESSION_UPDATE = '{"type":"session.update","session":{}}'
MAX = 1 << 20
TIMEOUT = 10


async def tcp_pair(buffers: int = 0) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """Two ends of one TCP connection over loopback; ``buffers``: small kernel buffers from
    the near end to the far one (set before connecting: a window shrunk later stalls TCP)."""
    listener = trio.socket.socket()
    if buffers:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffers)  # the far end's
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    near = trio.socket.socket()
    if buffers:
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffers)
    await near.connect(listener.getsockname())
    far, _ = await listener.accept()
    listener.close()
    return near, far


class RawPeer:
    """The far end of one of the relay's sockets: frames written and read by hand (masked
    when it plays the client), so a test decides what arrives in one read."""

    def __init__(self, sock: trio.socket.SocketType, *, client: bool) -> None:
        self.sock = sock
        self.client = client
        self.stream = trio.SocketStream(sock)
        self.reader = FrameReader(masked=not client, max_message_bytes=MAX)

    def frames(self, *events: str | Ping) -> bytes:
        return b"".join(
            frame(OP_PING, e.payload, mask=self.client)
            if isinstance(e, Ping)
            else frame(OP_TEXT, e.encode(), mask=self.client)
            for e in events
        )

    async def send(self, *events: str | Ping) -> None:
        """All of ``events`` in one write."""
        await self.stream.send_all(self.frames(*events))

    async def next(self) -> Event:
        while (event := self.reader.next()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the relay closed the connection")
            self.reader.feed(data)
        return event

    async def messages(self, n: int) -> list[Event]:
        return [await self.next() for _ in range(n)]


class Socketed(Dialed):
    """An upstream target over a prepared TCP pair: the relay's end becomes its WebSocket
    (no HTTP handshake: the pump is what is under test)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self._sock = sock

    async def connect(self) -> trio.abc.Stream:
        return trio.SocketStream(self._sock)

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        return WebSocket(stream, client=True, max_message_bytes=MAX)


@dataclass
class Running:
    pair: Pair
    client: RawPeer
    upstream: RawPeer
    ending: list[Ending]
    pump: Pump


async def run_pump(pump: Pump, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    with trio.CancelScope() as scope:
        task_status.started(scope)
        await pump.run()


@asynccontextmanager
async def pumped_pair(
    pump: Pump | None, bridge: Bridge | None = None, *, snd_buf: int = 0, **options: object
) -> AsyncIterator[Running]:
    """A pair between two raw peers, relayed by ``pump`` (None: by the pair's own tasks)."""
    client_near, client_far = await tcp_pair(snd_buf)  # small: the client's leg fills up
    upstream_near, upstream_far = await tcp_pair()
    bridge = bridge or Bridge(
        session_update=SESSION_UPDATE, limits=Limits(64, 1 << 20, MAX), secret="sk-never"
    )
    client_ws = WebSocket(trio.SocketStream(client_near), client=False, max_message_bytes=MAX)
    pair = Pair(
        SocketClient(client_ws),
        bridge,
        Socketed(upstream_near),  # type: ignore[arg-type]
        dial_timeout=TIMEOUT,
        close_timeout=1.0,
        pump=pump,
        **options,  # type: ignore[arg-type]
    )
    ending: list[Ending] = []
    client = RawPeer(client_far, client=True)
    upstream = RawPeer(upstream_far, client=False)
    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:

                async def run() -> None:
                    ending.append(await pair.run())

                nursery.start_soon(run)
                assert await upstream.next() == SESSION_UPDATE
                yield Running(pair, client, upstream, ending, pump)  # type: ignore[arg-type]
                nursery.cancel_scope.cancel()  # the test is over: end the pair if it has not ended
    finally:
        for sock in (client_near, client_far, upstream_far):  # the app closes the client's
            sock.close()


@asynccontextmanager
async def pump_running(busy_poll: float = 0.0) -> AsyncIterator[tuple[Pump, trio.CancelScope]]:
    """A pump serving until the block ends (or its scope is cancelled)."""
    pump = Pump(busy_poll)
    async with trio.open_nursery() as nursery:
        scope = await nursery.start(run_pump, pump)
        await trio.lowlevel.checkpoint()  # the pump has started
        assert pump.running, f"the pump cannot run with this Trio: {pump.unavailable}"
        yield pump, scope
        scope.cancel()


async def test_bursts_over_the_budget_arrive_whole_and_in_order_both_ways() -> None:
    n = 5 * BUDGET + 3
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            up = [f'{{"type":"input_audio_buffer.append","audio":"{i:06d}"}}' for i in range(n)]
            await s.client.send(*up)
            assert await s.upstream.messages(n) == up
            assert s.pump.watching == 2  # both legs are the pump's, not the tasks'
            down = [f'{{"type":"response.output_audio.delta","delta":"{i:06d}"}}' for i in range(n)]
            await s.upstream.send(*down)
            assert await s.client.messages(n) == down
            await s.client.stream.send_all(frame(0x8, b"\x03\xe8", mask=True))  # close 1000
            assert await s.client.next() == Close(1000, "")  # answered
            passed_on = await s.upstream.next()
            assert isinstance(passed_on, Close) and passed_on.code == 1000
        assert s.pump.watching == 0  # the pair forgot its legs as it ended


async def test_the_start_of_a_session_is_held_and_released_in_order_on_pumped_legs() -> None:
    """The bridge's start (relay.core.bridge: session.created waits for the answer to the
    relay's update) holds on the pump's path too: what the pump's step holds comes out, in
    arrival order, when the answer arrives, and the pump goes on relaying after it."""
    strict = Policy(client_events_denied=frozenset({"conversation.item.delete"}))
    bridge = Bridge(session_update=SESSION_UPDATE, limits=Limits(64, 1 << 20, MAX), policy=strict)
    async with pump_running() as (pump, _):
        async with pumped_pair(pump, bridge) as s:
            await s.client.send('{"type":"conversation.item.delete","event_id":"early"}',
                                '{"type":"response.cancel"}')
            assert await s.upstream.next() == '{"type":"response.cancel"}'  # the first was refused
            created = '{"type":"session.created","session":{"voice":"alloy"}}'
            event = '{"type":"rate_limits.updated"}'
            await s.upstream.send(created, event, '{"type":"session.updated","session":{"voice":"marin"}}')
            first, refusal, then = await s.client.messages(3)
            assert orjson.loads(first) == {"type": "session.created", "session": {"voice": "marin"}}
            assert orjson.loads(refusal)["error"]["event_id"] == "early"
            assert then == event
            assert s.pump.watching == 2
            delta = '{"type":"response.output_audio.delta","delta":"AAAA"}'
            await s.upstream.send(delta)
            assert await s.client.next() == delta


async def test_a_pumped_read_moves_last_heard_to_when_its_bytes_were_seen() -> None:
    """The pump stamps a socket's last_heard (what reaps silent peers) from the round in
    which its epoll saw the bytes, not from when the leg was lent."""
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            client_ws = s.pair.client.websocket  # type: ignore[attr-defined]
            upstream_ws = s.pair._upstream
            assert upstream_ws is not None
            sent_at = trio.current_time()
            assert client_ws.last_heard < sent_at and upstream_ws.last_heard < sent_at
            await s.client.send('{"type":"input_audio_buffer.append","audio":"AAAA"}')
            await s.upstream.next()
            assert sent_at <= client_ws.last_heard <= trio.current_time()
            assert upstream_ws.last_heard < sent_at  # nothing came from it
            sent_at = trio.current_time()
            await s.upstream.send('{"type":"response.output_audio.delta","delta":"AAAA"}')
            await s.client.next()
            assert sent_at <= upstream_ws.last_heard <= trio.current_time()
            assert s.pump.watching == 2  # both reads were the pump's


async def test_upstream_text_goes_on_in_the_frame_it_came_in_only_when_that_is_canonical() -> None:
    """Text the bridge passes on unchanged is written to the client as the very frame the
    upstream sent, when that frame is what the relay would have built; otherwise (a length
    written in more bytes than needed, a fragmented message, text the bridge changed) the
    client gets a frame built afresh."""
    async with pump_running() as (pump, _), pumped_pair(pump) as s:
        await s.client.send('{"type":"a"}')
        assert await s.upstream.next() == '{"type":"a"}'
        small, large = (
            frame(OP_TEXT, f'{{"type":"x","d":"{"A" * k}"}}'.encode(), mask=False)
            for k in (300, 70_000)
        )
        padded = bytes([0x81, 126]) + (12).to_bytes(2, "big") + b'{"type":"y"}'  # 12 in 16 bits
        parts = bytes([0x01, 8]) + b'{"type":' + bytes([0x80 | OP_CONTINUATION, 4]) + b'"z"}'
        changed = frame(OP_TEXT, b'{"type":"w","k":"sk-never"}', mask=False)  # the key: redacted
        # in one write, so all but the large one arrive in the read's own bytes
        sent = small + padded + parts + changed + small + large
        expected = small + b"".join(
            frame(OP_TEXT, body, mask=False)
            for body in (b'{"type":"y"}', b'{"type":"z"}', b'{"type":"w","k":"[redacted]"}')
        ) + small + large
        await s.upstream.stream.send_all(sent)
        got = b""
        while len(got) < len(expected):
            got += await s.client.stream.receive_some(1 << 20)
        assert got == expected


async def test_a_client_that_stops_reading_gets_everything_in_order_once_it_reads() -> None:
    """The client's socket fills: the pump writes what fits and hands the rest of the
    write to the pair's task, which waits for room; nothing is lost, cut or reordered."""
    n = 40
    body = "A" * 20_000
    async with pump_running() as (pump, _):
        async with pumped_pair(pump, snd_buf=4096) as s:
            down = [f'{{"type":"x","n":{i},"delta":"{body}"}}' for i in range(n)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(s.upstream.send, *down)  # 800 KB, far more than buffers hold
                await trio.testing.wait_all_tasks_blocked()  # the client reads nothing meanwhile
                assert s.pair.client.writing  # a write is waiting for room
                assert await s.client.messages(n) == down


async def test_a_message_and_the_upstreams_end_in_one_read_are_both_seen() -> None:
    """An end that arrives with data raises its edge before the data is read: the pump must
    not take the short read for an empty socket and miss the end."""
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            await s.client.send('{"type":"input_audio_buffer.append","audio":"x"}')
            await s.upstream.next()  # the leg is the pump's now
            await s.upstream.stream.send_all(s.upstream.frames('{"type":"last"}'))
            s.upstream.sock.shutdown(socket.SHUT_WR)
            assert await s.client.next() == '{"type":"last"}'
            error = await s.client.next()
            assert isinstance(error, str) and "relay_upstream_lost" in error
            close = await s.client.next()
            assert isinstance(close, Close) and close.code == 1011


async def test_a_ping_between_messages_is_answered_and_the_stream_goes_on() -> None:
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            await s.upstream.send('{"type":"a"}', Ping(b"p1"), '{"type":"b"}')
            assert await s.upstream.next() == Pong(b"p1")
            assert await s.client.messages(2) == ['{"type":"a"}', '{"type":"b"}']
            await s.client.send('{"type":"c"}', Ping(b"p2"), '{"type":"d"}')
            assert await s.client.next() == Pong(b"p2")
            assert await s.upstream.messages(2) == ['{"type":"c"}', '{"type":"d"}']


async def test_a_protocol_error_after_good_messages_closes_the_client_with_1002() -> None:
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            good = s.client.frames('{"type":"a"}', '{"type":"b"}')
            unmasked = frame(OP_TEXT, b'{"type":"c"}', mask=False)  # clients must mask
            await s.client.stream.send_all(good + unmasked)
            assert await s.upstream.messages(2) == ['{"type":"a"}', '{"type":"b"}']
            close = await s.client.next()
            assert isinstance(close, Close) and close.code == 1002
            assert isinstance(await s.upstream.next(), Close)  # the upstream is closed too


async def test_a_stopped_pump_gives_its_legs_back_and_the_session_goes_on() -> None:
    async with pump_running() as (pump, scope):
        async with pumped_pair(pump) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'
            await trio.testing.wait_all_tasks_blocked()
            assert s.pump.watching == 2
            scope.cancel()  # the pump stops with both legs lent to it
            await trio.testing.wait_all_tasks_blocked()
            assert s.pump.watching == 0
            await s.client.send('{"type":"b"}')
            assert await s.upstream.next() == '{"type":"b"}'
            await s.upstream.send('{"type":"c"}')
            assert await s.client.next() == '{"type":"c"}'


class BrokenBridge(Bridge):
    """A bridge whose step fails on one message, raising ``raising``."""

    raising: BaseException = RuntimeError("a bug in a step")

    def client_message(self, data: Message) -> Message | None:  # type: ignore[override]
        if data == '{"type":"boom"}':
            raise self.raising
        return super().client_message(data)  # type: ignore[return-value]


class Weird(BaseException):
    """Neither an Exception nor one Trio or Python gives meaning to."""


def broken_bridge(raising: BaseException) -> BrokenBridge:
    bridge = BrokenBridge(
        session_update=SESSION_UPDATE, limits=Limits(64, 1 << 20, MAX), secret="sk-never"
    )
    bridge.raising = raising
    return bridge


@pytest.mark.parametrize("pumped", [True, False], ids=["pump", "tasks"])
@pytest.mark.parametrize(
    "raising", [RuntimeError("a bug in a step"), Weird("odd")], ids=["Exception", "BaseException"]
)
async def test_a_step_that_raises_closes_its_own_pair_with_1011_and_the_pump_serves_on(
    pumped: bool, raising: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """Behaviour changed on purpose: the error used to escape the pair (its nursery raised);
    now the client is told (an error event, 1011), the upstream closed 1000, the bug logged,
    and nothing else is touched."""
    async with pump_running() as (pump, _):
        async with pumped_pair(pump if pumped else None, broken_bridge(raising)) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'
            await trio.testing.wait_all_tasks_blocked()  # (pumped: the leg is parked with it)
            await s.client.send('{"type":"boom"}')
            error = await s.client.next()
            assert isinstance(error, str) and '"code":"relay_internal_error"' in error
            assert await s.client.next() == Close(1011, "relay internal error")
            closed = await s.upstream.next()
            assert isinstance(closed, Close) and closed.code == 1000
            while not s.ending:
                await trio.testing.wait_all_tasks_blocked()
            assert s.ending[0].cause is Cause.INTERNAL_ERROR
        assert "a bug ended a session" in caplog.text
        async with pumped_pair(pump) as other:  # the pump task is still alive and serving
            await other.client.send('{"type":"x"}')
            assert await other.upstream.next() == '{"type":"x"}'
            await trio.testing.wait_all_tasks_blocked()
            assert pump.watching == 2


@pytest.mark.parametrize("pumped", [True, False], ids=["pump", "tasks"])
async def test_a_keyboard_interrupt_in_a_step_is_raised_in_its_task_not_in_trios_loop(
    pumped: bool,
) -> None:
    """KeyboardInterrupt must end the run, as Trio delivers it: in a task, up through the
    nurseries. Raised out of the pump's get_events it would be a TrioInternalError instead."""
    async with pump_running() as (pump, _):
        with pytest.raises(BaseExceptionGroup) as raised:
            bridge = broken_bridge(KeyboardInterrupt())
            async with pumped_pair(pump if pumped else None, bridge) as s:
                await s.client.send('{"type":"a"}')
                assert await s.upstream.next() == '{"type":"a"}'
                await trio.testing.wait_all_tasks_blocked()
                await s.client.send('{"type":"boom"}')
                await trio.sleep_forever()
        assert raised.group_contains(KeyboardInterrupt, depth=None)
        assert pump.running  # the run (and its pump) goes on for whoever catches it


@pytest.mark.parametrize("pumped", [True, False], ids=["pump", "tasks"])
async def test_a_metric_that_raises_inside_a_step_does_not_end_the_session(
    pumped: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """voice_latency is called from the upstream step, inside the pump: a broken metrics
    backend must cost a figure, not the caller's session."""

    def broken_metric(seconds: float) -> None:
        raise ValueError("prometheus is unhappy")

    async with pump_running() as (pump, _):
        async with pumped_pair(pump if pumped else None, on_voice_latency=broken_metric) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'
            turn = [
                '{"type":"input_audio_buffer.speech_stopped"}',
                '{"type":"response.created"}',
                '{"type":"response.output_audio.delta","delta":"AAAA"}',
                '{"type":"response.output_audio.delta","delta":"BBBB"}',
            ]
            await s.upstream.send(*turn)
            assert await s.client.messages(len(turn)) == turn
            await s.client.send('{"type":"b"}')
            assert await s.upstream.next() == '{"type":"b"}'
            assert not s.ending
            assert "timing a voice turn failed" in caplog.text


@contextmanager
def watchdog(every: float) -> Iterator[None]:
    """Wake Trio from another thread every ``every`` seconds: a loop that would otherwise
    wait forever (a timer the pump failed to honour) goes on, and the test sees how late."""
    token = trio.lowlevel.current_trio_token()
    done = threading.Event()

    def poke() -> None:
        while not done.wait(every):
            token.run_sync_soon(lambda: None)

    thread = threading.Thread(target=poke, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@pytest.mark.parametrize("busy_poll", [0.0, 0.05], ids=["sleeping", "polling"])
async def test_timers_trios_own_sockets_and_handed_back_work_are_served_while_the_pump_waits(
    busy_poll: float,
) -> None:
    """The pump waits in Trio's place, sleeping or polling: a timer must still fire on time,
    a socket only Trio watches must still wake its task, and a task handed work must run,
    with no other traffic to wake the loop."""
    with watchdog(every=3.0):
        async with pump_running(busy_poll) as (pump, _), pumped_pair(pump) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'  # the legs are the pump's
            started = time.monotonic()
            await trio.sleep(0.05)
            assert time.monotonic() - started < 1.0
            ours, theirs = socket.socketpair()
            with ours, theirs:
                ours_trio = trio.socket.from_stdlib_socket(ours)
                threading.Timer(0.05, theirs.send, args=(b"x",)).start()  # while the pump waits
                started = time.monotonic()
                assert await ours_trio.recv(1) == b"x"
                assert time.monotonic() - started < 1.0
            started = time.monotonic()  # a ping alone: the pump hands it to the task at once
            await s.upstream.send(Ping(b"p"))
            assert await s.upstream.next() == Pong(b"p")
            assert time.monotonic() - started < 1.0
            await s.upstream.send('{"type":"b"}')  # and the pump still relays
            assert await s.client.next() == '{"type":"b"}'


async def test_two_pumps_in_one_run_share_the_wait_and_both_relay() -> None:
    async with pump_running() as (first, first_scope), pump_running() as (second, _):
        async with pumped_pair(first) as a, pumped_pair(second) as b:
            for i in range(3):
                for s in (a, b):
                    await s.client.send(f'{{"type":"up{i}"}}')
                    await s.upstream.send(f'{{"type":"down{i}"}}')
                    assert await s.upstream.next() == f'{{"type":"up{i}"}}'
                    assert await s.client.next() == f'{{"type":"down{i}"}}'
            assert first.watching == second.watching == 2
            first_scope.cancel()  # one stops; the other serves on
            await trio.testing.wait_all_tasks_blocked()
            assert not first.running and second.running
            await b.client.send('{"type":"c"}')
            assert await b.upstream.next() == '{"type":"c"}'
            await a.client.send('{"type":"d"}')  # through its tasks now
            assert await a.upstream.next() == '{"type":"d"}'
    async with pump_running() as (third, _):  # the last one left: a new one starts afresh
        async with pumped_pair(third) as c:
            await c.client.send('{"type":"e"}')
            assert await c.upstream.next() == '{"type":"e"}'


async def test_a_failing_pump_gives_its_legs_back_and_sessions_go_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with pump_running() as (pump, _):
        async with pumped_pair(pump) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'
            await trio.testing.wait_all_tasks_blocked()
            assert pump.watching == 2

            def broken(self: object, timeout: float) -> bool:
                raise OSError("the pump's epoll went away")

            monkeypatch.setattr(pump_module._Driver, "_serve_until", broken)
            await trio.lowlevel.checkpoint()  # the run loop waits for I/O once
            assert not pump.running and pump.watching == 0
            assert "the pump failed" in caplog.text
            await s.client.send('{"type":"b"}')
            assert await s.upstream.next() == '{"type":"b"}'
            await s.upstream.send('{"type":"c"}')
            assert await s.client.next() == '{"type":"c"}'


def test_the_poll_window_grows_while_polling_would_catch_the_next_event_and_shrinks_after() -> (
    None
):
    window = PollWindow(limit=100e-6)
    assert window.now == 0.0  # sleeps at once until it has seen a short idle spell
    window.idled(30e-6)
    assert window.now == GROW_START
    window.idled(30e-6)  # longer than the window, within the limit: a longer poll pays
    assert window.now == 2 * GROW_START
    window.idled(35e-6)
    window.idled(50e-6)
    assert window.now == 8 * GROW_START
    window.idled(60e-6)  # caught by the poll: stays
    assert window.now == 8 * GROW_START
    window.idled(90e-6)
    assert window.now == 100e-6  # capped at the limit
    window.idled(5e-3)  # messages ms apart: polling is wasted, halve it
    assert window.now == 50e-6
    for _ in range(3):
        window.idled(5e-3)
    assert window.now == 0.0  # below the first window: stop polling altogether


@given(
    st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=60),
    st.sampled_from([0.0, 5e-6, 1e-4, 1e-3]),
)
def test_the_poll_window_stays_within_its_limit_and_off_when_the_limit_is_zero(
    spells: list[float], limit: float
) -> None:
    window = PollWindow(limit)
    for spell in spells:
        window.idled(spell)
        assert 0.0 <= window.now <= limit
        assert window.now == 0.0 or window.now >= min(GROW_START, limit)


@pytest.mark.parametrize("busy_poll", [0.0, 0.05], ids=["sleeping", "polling"])
async def test_a_polling_pump_relays_and_counts_the_time_it_polled_as_idle(
    busy_poll: float,
) -> None:
    """Between messages that come quickly the pump polls instead of sleeping (the window has
    grown), and says how long, so that the load guard does not take it for work."""
    async with pump_running(busy_poll) as (pump, _), pumped_pair(pump) as s:
        for i in range(40):
            await s.client.send(f'{{"type":"up{i}"}}')
            assert await s.upstream.next() == f'{{"type":"up{i}"}}'
            await s.upstream.send(f'{{"type":"down{i}"}}')
            assert await s.client.next() == f'{{"type":"down{i}"}}'
        assert (pump.polled > 0) == (busy_poll > 0)
        if busy_poll:
            assert 0 < pump_module._DRIVER.get().window.now <= busy_poll  # type: ignore[union-attr]
        pump.set_busy(True)  # a busy worker sleeps at once
        polled = pump.polled
        for i in range(20):
            await s.client.send(f'{{"type":"busy{i}"}}')
            assert await s.upstream.next() == f'{{"type":"busy{i}"}}'
        assert pump.polled == polled


# -- the driver in Trio's place: its contract with Trio's run loop ---------------------------


class FakeIO:
    """Trio's I/O manager as the driver sees it, with no event of Trio's own to report (the
    driver is driven by hand here, so Trio's real wait is left alone)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()

    def get_events(self, timeout: float) -> list[tuple[int, int]]:
        return []

    def process_events(self, events: object) -> None:
        pass


@contextmanager
def driver_by_hand(
    step: Callable[[Message], object] | None = None,
) -> Iterator[tuple[pump_module._Driver, socket.socket, socket.socket]]:
    """A driver over a fake runner, with one lent leg: what is written to the first socket is
    relayed (through ``step``, by default unchanged) to the second."""
    runner = SimpleNamespace(
        io_manager=FakeIO(), runq=deque(), clock=trio.lowlevel.current_clock(), is_guest=False
    )
    driver = pump_module._Driver(runner)
    near_in, far_in = socket.socketpair()
    near_out, far_out = socket.socketpair()
    bridge = Bridge(session_update=SESSION_UPDATE, limits=Limits(64, 1 << 20, MAX))
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    src, dst = (
        WebSocket(
            trio.SocketStream(trio.socket.from_stdlib_socket(s)),
            client=False,
            max_message_bytes=MAX,
        )
        for s in (near_in, near_out)
    )
    leg = pump_module.Leg(src, dst, step or bridge.client_message, bridge)
    driver.watch(leg)
    assert src.hold_reading()
    leg.task = object()  # lent: served by the driver (nothing here needs handing back)
    try:
        yield driver, far_in, far_out
    finally:
        driver.unwatch(leg.fd, leg)
        driver.detach(None)  # type: ignore[arg-type]
        runner.io_manager._epoll.close()
        for sock in (near_in, far_in, near_out, far_out):
            sock.close()


async def test_get_events_is_truthy_when_the_pump_moved_data_and_falsey_only_when_idle() -> None:
    """Trio's contract: falsey iff the timeout expired with nothing done. A round in which only
    the pump relayed must not read as idle (wait_all_tasks_blocked, the autojump clock)."""
    with driver_by_hand() as (driver, far_in, far_out):
        assert not driver.get_events(0)
        far_in.sendall(frame(OP_TEXT, b'{"type":"a"}', mask=True))
        events = driver.get_events(0)
        assert events and list(events) == []  # truthy, and no event for Trio to process
        reader = FrameReader(masked=False, max_message_bytes=MAX)
        reader.feed(far_out.recv(65536))
        assert reader.next() == '{"type":"a"}'
        assert not driver.get_events(0)


async def test_a_flood_on_one_socket_does_not_keep_the_driver_past_trios_timeout() -> None:
    """While a pumped socket always has more, the driver must still go back to Trio when
    Trio's timeout is up (its timers), not when the flood ends."""
    message = frame(OP_TEXT, b'{"type":"x","audio":"' + b"A" * 1000 + b'"}', mask=True)

    def slow(data: Message) -> None:  # a step slower than the writer: the socket never empties
        busy_until = time.perf_counter() + 200e-6
        while time.perf_counter() < busy_until:
            pass

    with driver_by_hand(step=slow) as (driver, far_in, _):
        # Another process, so that it writes while this one works: for up to FLOOD_SECONDS.
        writer = subprocess.Popen(  # noqa: ASYNC220 (started at once; nothing to await)
            [sys.executable, "-c", FLOOD, str(far_in.fileno()), message.hex()],
            pass_fds=(far_in.fileno(),),
            stdout=subprocess.PIPE,
        )
        try:
            assert writer.stdout is not None and writer.stdout.readline() == b"flooding\n"
            started = time.monotonic()
            driver.get_events(0.05)
            took = time.monotonic() - started
            flooding = writer.poll() is None
        finally:
            writer.kill()
            writer.wait()
            writer.stdout.close()
        assert flooding, "the flood ended before the driver returned: nothing was shown"
        assert took < FLOOD_SECONDS / 2, f"the driver held Trio's loop {took:.2f} s, past 0.05 s"


FLOOD_SECONDS = 5.0
#: The flooding process: writes the message to the socket (a blocking one) for FLOOD_SECONDS.
FLOOD = f"""
import os, sys, time
fd, chunk = int(sys.argv[1]), bytes.fromhex(sys.argv[2]) * 64
end = time.monotonic() + {FLOOD_SECONDS}
os.write(fd, chunk)
print("flooding", flush=True)
while time.monotonic() < end:
    os.write(fd, chunk)
"""
