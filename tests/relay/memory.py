"""An in-memory world for one pair: a scripted client and a scripted upstream over memory streams.

Everything runs under Trio's ``MockClock(autojump_threshold=0)``: delays, timeouts
and slow readers cost no real time, and a scenario replays exactly. The upstream
side is a real trio-websocket server over ``trio.testing.memory_stream_pair``, so
the relay's WebSocket handshake, framing and close handshakes are the real ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from relay.core.bridge import Bridge, Ending, Limits, Message
from relay.core.closecodes import sendable
from relay.core.deadlines import Deadlines
from relay.server.pair import Pair
from relay.wire.upstream import Dialed, Opened, UpstreamTarget
from relay.wire.websocket import WebSocket as RelayWebSocket

from ..leaks import check_client_sees_no_upstream_key

SECRET = "sk-memory-secret-7f3a9c"
SESSION_UPDATE = '{"type":"session.update","session":{"type":"realtime","instructions":"x"}}'
#: How the Realtime API opens a session: session.created, then (the relay's session.update
#: being the first message it reads) the session.updated that answers it.
OPENING = ('{"type":"session.created"}', '{"type":"session.updated"}')
#: What a client gets first from a pooled session (UpstreamScript.pooled).
POOLED_CREATED = '{"type":"session.created","event_id":"event_pooled","session":{"id":"sess_1"}}'
DIAL_TIMEOUT = 5.0
CLOSE_TIMEOUT = 1.0
SEND_TIMEOUT = 3.0


@dataclass(frozen=True)
class ClientScript:
    messages: tuple[Message, ...] = ()
    gaps: tuple[float, ...] = ()  # delay before each message
    closes_after: float | None = 0.0  # delay after the last message before closing; None: stays
    read_delay: float = 0.0  # a slow reader takes this long per message
    mute_after: float | None = None  # from then on it answers no ping: a vanished phone


@dataclass(frozen=True)
class UpstreamScript:
    unreachable: bool = False
    open_delay: float = 0.0  # > DIAL_TIMEOUT: never answers in time
    refuse_status: int | None = None
    events: tuple[str, ...] = ()
    gaps: tuple[float, ...] = ()
    ending: str = "stay"  # "stay", "close", "drop"
    close_code: int = 1000
    close_reason: str = ""
    read_delay: float = 0.0
    tight: bool = False  # lockstep streams: a slow reader pushes back on the relay's writes
    deaf_after: float | None = None  # from then on it reads nothing: no pongs, a dead peer
    pooled: bool = False  # a warm pooled session: its opening done before the pair takes it


@dataclass
class ClientRecord:
    received: list[Message] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    closed_at: float | None = None  # when the relay closed the client
    left_at: float | None = None  # when the client closed
    sends_after_close: int = 0
    pings: int = 0


@dataclass
class UpstreamRecord:
    received: list[Message] = field(default_factory=list)
    accepted: bool = False
    sent: list[str] = field(default_factory=list)
    finished_sending_at: float | None = None
    close_code: int | None = None  # the relay's close, as the upstream saw it
    closed_at: float | None = None
    peer_gone: trio.Event = field(default_factory=trio.Event)


class CutAwareStream(trio.abc.Stream):
    """A lockstep stream that behaves like a socket after a write was cut part-way.

    trio's lockstep streams assert that no half-sent data is pending when the next
    send starts; a socket instead carries on (the peer then sees a corrupt frame).
    Here the stream refuses further writes, as a broken connection would.
    """

    def __init__(self, inner: trio.abc.Stream) -> None:
        self._inner = inner
        self._cut = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._cut:
            raise trio.BrokenResourceError("an earlier write was cut part-way")
        try:
            await self._inner.send_all(data)
        except BaseException:
            self._cut = True
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


class DeafStream(trio.abc.Stream):
    """The server's end of a connection whose peer dies at ``deaf_at``: after it, nothing
    the relay sends is read (so no ping is answered), and nothing more is written."""

    def __init__(self, inner: trio.abc.Stream, deaf_at: float) -> None:
        self._inner = inner
        self._deaf_at = deaf_at

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if trio.current_time() >= self._deaf_at:
            await trio.sleep_forever()
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._inner.receive_some(max_bytes)
        if trio.current_time() >= self._deaf_at:
            await trio.sleep_forever()
        return data

    async def aclose(self) -> None:
        await self._inner.aclose()


class MemoryClient:
    """The pair's client side, scripted. Sending after the relay closed it is recorded
    as a fault (Hypercorn raises on it)."""

    def __init__(self, script: ClientScript, record: ClientRecord) -> None:
        self.script = script
        self.record = record
        self._send, self._receive = trio.open_memory_channel[Message](math.inf)
        self._started = self.last_heard = trio.current_time()

    async def drive(self) -> None:
        """Send the scripted messages, then close (unless the relay closed us first)."""
        for gap, message in zip(self.script.gaps, self.script.messages, strict=True):
            await trio.sleep(gap)
            if self.record.close_code is not None:
                return
            self._send.send_nowait(message)
            self.last_heard = trio.current_time()
        if self.script.closes_after is None:
            return
        await trio.sleep(self.script.closes_after)
        if self.record.close_code is None:
            self.record.left_at = trio.current_time()
            self._send.close()

    async def receive(self) -> Message | None:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            return None

    async def send(self, data: Message) -> None:
        if self.record.close_code is not None:
            self.record.sends_after_close += 1
            return
        with trio.fail_after(SEND_TIMEOUT):  # a transport's send timeout, as the relay's sides have
            await trio.sleep(self.script.read_delay)
        self.record.received.append(data)
        # Recorded, not raised: an exception here would unwind the relay's own send.
        check_client_sees_no_upstream_key("a message", data, fail_now=False)

    def unread(self) -> int:
        return 0

    writing = False
    websocket = None  # not a socket: never pumped

    async def keepalive(self) -> None:
        """A ping; the pong comes back at once unless the client has gone mute."""
        self.record.pings += 1
        mute = self.script.mute_after
        if mute is None or trio.current_time() < self._started + mute:
            self.last_heard = trio.current_time()

    async def close(self, code: int, reason: str) -> None:
        assert sendable(code), f"the relay tried to send close code {code}"
        if self.record.close_code is not None:
            self.record.sends_after_close += 1
            return
        check_client_sees_no_upstream_key("the close reason", reason, fail_now=False)
        self.record.close_code = code
        self.record.close_reason = reason
        self.record.closed_at = trio.current_time()


def memory_target(max_message_bytes: int = 1 << 20) -> UpstreamTarget:
    """Where a pair in memory dials (the handshake is the relay's own; no socket behind it)."""
    return UpstreamTarget(
        host="upstream.test",
        port=80,
        resource="/v1/realtime?model=gpt-realtime",
        ssl_context=None,
        subprotocols=None,
        headers=((b"authorization", b"Bearer " + SECRET.encode()),),
        max_message_bytes=max_message_bytes,
    )


class MemoryUpstream(Dialed):
    """The pair's upstream: ``connect`` reaches a scripted server in memory; the
    handshake is the relay's own (:class:`UpstreamTarget`)."""

    def __init__(self, script: UpstreamScript, record: UpstreamRecord, nursery: trio.Nursery) -> None:
        self.script = script
        self.record = record
        self._nursery = nursery
        self._target = memory_target()

    async def connect(self) -> trio.abc.Stream:
        if self.script.unreachable:
            raise OSError(111, "Connection refused")
        if self.script.tight:
            relay_end, server_end = map(CutAwareStream, trio.testing.lockstep_stream_pair())
        else:
            relay_end, server_end = trio.testing.memory_stream_pair()
        if self.script.deaf_after is not None:
            server_end = DeafStream(server_end, trio.current_time() + self.script.deaf_after)
        self._nursery.start_soon(self._serve, server_end)
        return relay_end

    async def handshake(self, stream: trio.abc.Stream) -> RelayWebSocket:
        return await self._target.handshake(stream)

    async def open(self) -> Opened:
        """Dialled; for a ``pooled`` script, as the warm pool hands a session over: its
        ``session.update`` answered already, the client's ``session.created`` ready."""
        opened = await super().open()
        if self.script.pooled:
            opened.created = POOLED_CREATED
        return opened

    async def _serve(self, stream: trio.abc.Stream) -> None:
        script, record = self.script, self.record
        try:
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, stream)  # type: ignore[arg-type]
                await trio.sleep(script.open_delay)
                if script.refuse_status is not None:
                    await request.reject(script.refuse_status, body=b'{"error":"no"}')
                    return
                ws = await request.accept()
                record.accepted = True
                nursery.start_soon(self._read, ws)
                await self._write(ws, stream)
        except* (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the relay went away; the records say how
        finally:
            record.peer_gone.set()
            await trio.aclose_forcefully(stream)

    async def _read(self, ws: WebSocketConnection) -> None:
        try:
            while True:
                self.record.received.append(await ws.get_message())
                await trio.sleep(self.script.read_delay)  # a slow consumer
        except ConnectionClosed:
            self._note_close(ws)

    def _note_close(self, ws: WebSocketConnection) -> None:
        """Record the relay's close code (the first side to see the close records it)."""
        if self.record.close_code is None and ws.closed is not None:
            self.record.close_code = ws.closed.code
            self.record.closed_at = trio.current_time()

    async def _write(self, ws: WebSocketConnection, stream: trio.abc.Stream) -> None:
        script, record = self.script, self.record
        for gap, event in zip(script.gaps, script.events, strict=True):
            await trio.sleep(gap)
            try:
                await ws.send_message(event)
            except ConnectionClosed:
                self._note_close(ws)
                return  # the reader still takes what the relay sent before its close
            record.sent.append(event)
        record.finished_sending_at = trio.current_time()
        if script.ending == "close":
            await ws.aclose(script.close_code, script.close_reason or None)
        elif script.ending == "drop":
            await stream.aclose()
        else:
            await trio.sleep_forever()


@dataclass
class Outcome:
    ending: Ending
    client: ClientRecord
    upstream: UpstreamRecord
    log: list[str]
    ended_at: float
    bridge: Bridge


def limits() -> Limits:
    return Limits(queue_messages=8, queue_bytes=6000, max_message_bytes=2000)


async def run_pair(
    client_script: ClientScript,
    upstream_script: UpstreamScript,
    *,
    max_seconds: float = 0.0,
    idle_seconds: float = 0.0,
    warning_lead: float = 0.0,
    ping_interval: float = 0.0,
    peer_timeout: float = 0.0,
) -> Outcome:
    """Run one pair to its end in memory; everything it started is gone when this returns.

    Time 0 of the scripts is when the pair starts; the limits (0: off) start then too.
    """
    client_record, upstream_record = ClientRecord(), UpstreamRecord()
    log: list[str] = []
    bridge = _LoggedBridge(session_update=SESSION_UPDATE, limits=limits(), secret=SECRET)
    bridge.log = log
    async with trio.open_nursery() as world:
        client = MemoryClient(client_script, client_record)
        upstream = MemoryUpstream(upstream_script, upstream_record, world)
        pair = Pair(
            client,
            bridge,
            upstream,
            dial_timeout=DIAL_TIMEOUT,
            close_timeout=CLOSE_TIMEOUT,
            send_timeout=SEND_TIMEOUT,
            deadlines=Deadlines(
                trio.current_time(), max_seconds=max_seconds, idle_seconds=idle_seconds, lead=warning_lead
            ),
            ping_interval=ping_interval,
            peer_timeout=peer_timeout,
        )
        world.start_soon(client.drive)
        ending = await pair.run()
        ended_at = trio.current_time()
        # The upstream's side notices the relay is gone by itself: wait for it, bounded.
        with trio.move_on_after(CLOSE_TIMEOUT + 1):
            if upstream_record.accepted or upstream_script.refuse_status is not None:
                await upstream_record.peer_gone.wait()
        world.cancel_scope.cancel()
    return Outcome(ending, client_record, upstream_record, log, ended_at, bridge)


class _LoggedBridge(Bridge):
    """A bridge that notes when the pair told it the upstream opened or the client closed."""

    __slots__ = ("log",)

    def upstream_opened(self, created: str | None = None) -> None:
        self.log.append("upstream_opened")
        super().upstream_opened(created)

    def client_closed(self) -> Ending | None:
        self.log.append("client_closed")
        return super().client_closed()
