"""relay.wire.websocket: one connection over a Trio stream, and the client handshake.

Peers are trio-websocket (an independent implementation) where the test is about
interworking, and a raw peer writing and reading frames by hand where the test is
about exact bytes (close replies, protocol errors, what a broken write leaves).
Everything runs over in-memory streams (or a socketpair, for the raw-socket path)
in virtual time (each test takes the autojump clock), and each wait is bounded by a
virtual-time deadline, so a hang is a prompt failure rather than a stuck run.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import outcome
import pytest
import trio
import trio.testing
from trio.testing import MockClock, lockstep_stream_pair, memory_stream_pair, wait_all_tasks_blocked
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
    wrap_server_stream,
)

from relay.wire.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    Event,
    FrameReader,
    Ping,
    close_payload,
    frame,
)
from relay.wire.websocket import HandshakeFailed, WebSocket, accept_key, connect

MAX = 1 << 20
#: Virtual seconds any one step may take; far beyond what a working step needs.
LIMIT = 60.0


# -- peers -----------------------------------------------------------------------------------------


class RawPeer:
    """The other end, by hand: frames in and out exactly as written."""

    def __init__(self, stream: trio.abc.Stream, *, ours_is_client: bool) -> None:
        self.stream = stream
        self.mask = not ours_is_client  # the peer masks when it is the client
        self.reader = FrameReader(masked=ours_is_client, max_message_bytes=MAX)

    async def read(self) -> Event | None:
        """Our next frame, or None at EOF."""
        while (event := self.reader.next()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.reader.feed(data)
        return event

    async def send(self, op: int, payload: bytes) -> None:
        await self.stream.send_all(frame(op, payload, mask=self.mask))


def raw_pair(*, client: bool = False, max_message_bytes: int = MAX) -> tuple[WebSocket, RawPeer]:
    ours, theirs = memory_stream_pair()
    ws = WebSocket(ours, client=client, max_message_bytes=max_message_bytes)
    return ws, RawPeer(theirs, ours_is_client=client)


async def read_head(stream: trio.abc.Stream) -> tuple[bytes, dict[bytes, bytes]]:
    """An HTTP request head: its first line and headers (names lower-cased)."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        assert data, "the connection ended inside the request head"
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    assert rest == b""
    first, *lines = head.split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return first, headers


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    got = bytearray()
    while data := await stream.receive_some(65536):
        got += data
    return bytes(got)


@dataclass
class TrioServer:
    request: WebSocketRequest
    conn: WebSocketConnection


@asynccontextmanager
async def against_trio_server(
    subprotocols: tuple[str, ...] | None = None, chosen: str | None = None
) -> AsyncIterator[tuple[WebSocket, TrioServer]]:
    """Our client (connect) against a trio-websocket server, over memory streams."""
    ours, theirs = memory_stream_pair()
    async with trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[TrioServer](1)

        async def serve() -> None:
            request = await wrap_server_stream(nursery, theirs)
            await send.send(TrioServer(request, await request.accept(subprotocol=chosen)))

        nursery.start_soon(serve)
        with trio.fail_after(LIMIT):
            ws = await connect(
                ours,
                "relay.test",
                "/v1/realtime?model=m",
                subprotocols=subprotocols,
                headers=((b"X-Trace", b"t-1"),),
                max_message_bytes=MAX,
            )
            server = await receive.receive()
        yield ws, server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def against_trio_client() -> AsyncIterator[tuple[WebSocket, WebSocketConnection]]:
    """Our server side (the handshake done here by hand) against a trio-websocket client."""
    ours, theirs = memory_stream_pair()
    async with trio.open_nursery() as nursery:
        send, receive = trio.open_memory_channel[WebSocketConnection](1)

        async def dial() -> None:
            await send.send(await wrap_client_stream(nursery, theirs, "relay.test", "/"))  # type: ignore[arg-type]

        nursery.start_soon(dial)
        with trio.fail_after(LIMIT):
            _, headers = await read_head(ours)
            await ours.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept_key(headers[b"sec-websocket-key"]) + b"\r\n\r\n"
            )
            peer = await receive.receive()
        yield WebSocket(ours, client=False, max_message_bytes=MAX), peer
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def with_trio_peer(role: str) -> AsyncIterator[tuple[WebSocket, WebSocketConnection]]:
    if role == "client":
        async with against_trio_server() as (ws, server):
            yield ws, server.conn
    else:
        async with against_trio_client() as pair:
            yield pair


class Background:
    """A call run in its own task, its outcome kept (so a nursery never wraps it in a group)."""

    def __init__(self, nursery: trio.Nursery, call: Callable[[], Awaitable[object]]) -> None:
        self.result: outcome.Outcome | None = None
        self.done = trio.Event()

        async def run() -> None:
            self.result = await outcome.acapture(call)
            self.done.set()

        nursery.start_soon(run)

    async def finished(self) -> outcome.Outcome:
        with trio.fail_after(LIMIT):
            await self.done.wait()
        assert self.result is not None
        return self.result


async def closed_reason(call: Awaitable[object]) -> tuple[int, str | None]:
    with pytest.raises(ConnectionClosed) as caught:
        await call
    return caught.value.reason.code, caught.value.reason.reason


# -- messages --------------------------------------------------------------------------------------

MESSAGES: list[str | bytes] = [
    "first",
    b"\x00\x01binary",
    "",
    b"",
    "ünïcødé 😀" * 5000,
    b"x" * 70_000,
    "last",
]


@pytest.mark.parametrize("role", ["client", "server"])
async def test_text_and_binary_messages_flow_both_ways_in_order_with_trio_websocket(
    role: str, autojump_clock: MockClock
) -> None:
    async with with_trio_peer(role) as (ws, peer), trio.open_nursery() as nursery:
        with trio.fail_after(LIMIT):

            async def send_ours() -> None:
                for message in MESSAGES:
                    await ws.send_message(message)

            nursery.start_soon(send_ours)
            assert [await peer.get_message() for _ in MESSAGES] == MESSAGES
            for message in reversed(MESSAGES):
                await peer.send_message(message)
            assert [await ws.get_message() for _ in MESSAGES] == list(reversed(MESSAGES))


async def test_messages_flow_both_ways_over_a_socket(autojump_clock: MockClock) -> None:
    a, b = trio.socket.socketpair()
    ws = WebSocket(trio.SocketStream(a), client=False, max_message_bytes=MAX)
    peer = RawPeer(trio.SocketStream(b), ours_is_client=False)
    big = b"\x5a" * 1_000_000  # more than the socket buffers hold: both paths must wait
    with a, b:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(LIMIT):
                nursery.start_soon(ws.send_message, big)
                nursery.start_soon(peer.send, OP_BINARY, big)
                assert await ws.get_message() == big
                assert await peer.read() == big
                for i in range(40):  # more than CHECKPOINT_EVERY reads that find data at once
                    await peer.send(OP_TEXT, f"m{i}".encode())
                assert [await ws.get_message() for _ in range(40)] == [f"m{i}" for i in range(40)]
                await ws.send_message("back")
                assert await peer.read() == "back"


async def test_frames_that_came_with_the_handshake_are_read_first(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = memory_stream_pair()

    async def server() -> None:
        _, headers = await read_head(theirs)
        await theirs.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: "
            + accept_key(headers[b"sec-websocket-key"])
            + b"\r\n\r\n"
            + frame(OP_TEXT, b"early", mask=False)
            + frame(OP_BINARY, b"bird", mask=False)[:3]
        )
        await theirs.send_all(frame(OP_BINARY, b"bird", mask=False)[3:])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.fail_after(LIMIT):
            ws = await connect(ours, "h", "/", subprotocols=None, headers=(), max_message_bytes=MAX)
            assert await ws.get_message() == "early"
            assert await ws.get_message() == b"bird"


# -- pings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["client", "server"])
async def test_a_ping_from_the_peer_is_answered_while_get_message_waits(
    role: str, autojump_clock: MockClock
) -> None:
    async with with_trio_peer(role) as (ws, peer), trio.open_nursery() as nursery:
        reading = Background(nursery, ws.get_message)
        with trio.fail_after(LIMIT):
            await peer.ping(b"are you there")  # returns only once our pong arrives
        assert not reading.done.is_set()
        await peer.send_message("after the ping")
        assert (await reading.finished()).unwrap() == "after the ping"


async def test_ping_returns_when_its_own_pong_arrives(autojump_clock: MockClock) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        Background(nursery, ws.get_message)  # the reader notes pongs
        pinging = Background(nursery, ws.ping)
        with trio.fail_after(LIMIT):
            ping = await peer.read()
        assert isinstance(ping, Ping)
        await peer.send(OP_PONG, b"not " + ping.payload)  # an unsolicited pong
        await wait_all_tasks_blocked()
        assert not pinging.done.is_set()
        await peer.send(OP_PONG, ping.payload)
        (await pinging.finished()).unwrap()
        nursery.cancel_scope.cancel()


async def test_ping_against_trio_websocket_returns(autojump_clock: MockClock) -> None:
    async with against_trio_server() as (ws, _), trio.open_nursery() as nursery:
        Background(nursery, ws.get_message)
        with trio.fail_after(LIMIT):
            await ws.ping()
        nursery.cancel_scope.cancel()


async def test_ping_raises_connection_closed_when_the_connection_drops_first(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        reading = Background(nursery, ws.get_message)
        pinging = Background(nursery, ws.ping)
        with trio.fail_after(LIMIT):
            assert isinstance(await peer.read(), Ping)
        await peer.stream.aclose()
        with pytest.raises(ConnectionClosed) as caught:
            (await pinging.finished()).unwrap()
        assert caught.value.reason.code == 1006
        with pytest.raises(ConnectionClosed):
            (await reading.finished()).unwrap()


async def test_ping_raises_connection_closed_when_the_peer_closes_first(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        Background(nursery, ws.get_message)
        pinging = Background(nursery, ws.ping)
        with trio.fail_after(LIMIT):
            assert isinstance(await peer.read(), Ping)
        await peer.send(OP_CLOSE, close_payload(4002, "going"))
        with pytest.raises(ConnectionClosed) as caught:
            (await pinging.finished()).unwrap()
        assert (caught.value.reason.code, caught.value.reason.reason) == (4002, "going")


# -- closing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("client", [False, True])
async def test_a_peer_close_is_answered_with_its_code_and_get_message_raises_it(
    client: bool, autojump_clock: MockClock
) -> None:
    ws, peer = raw_pair(client=client)
    await peer.send(OP_CLOSE, close_payload(4001, "bye ✓"))
    with trio.fail_after(LIMIT):
        assert await closed_reason(ws.get_message()) == (4001, "bye ✓")
        assert await peer.read() == Close(4001, "bye ✓")
    assert ws.closed is not None and ws.closed.code == 4001
    assert await closed_reason(ws.get_message()) == (4001, "bye ✓")
    with pytest.raises(ConnectionClosed):
        await ws.send_message("too late")


async def test_a_close_without_a_code_is_answered_with_an_empty_close(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    await peer.send(OP_CLOSE, b"")
    with trio.fail_after(LIMIT):
        assert await closed_reason(ws.get_message()) == (1005, None)
        assert await peer.read() == Close(1005, "")


async def test_a_trio_websocket_peer_closing_gets_its_reply(autojump_clock: MockClock) -> None:
    async with against_trio_server() as (ws, server), trio.open_nursery() as nursery:
        reading = Background(nursery, ws.get_message)
        with trio.fail_after(LIMIT):
            await server.conn.aclose(4003, "done here")  # waits for our reply
        with pytest.raises(ConnectionClosed) as caught:
            (await reading.finished()).unwrap()
        assert (caught.value.reason.code, caught.value.reason.reason) == (4003, "done here")


async def test_aclose_sends_close_waits_for_the_reply_then_closes_the_stream(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        closing = Background(nursery, lambda: ws.aclose(4000, "finished"))
        with trio.fail_after(LIMIT):
            assert await peer.read() == Close(4000, "finished")
        await wait_all_tasks_blocked()
        assert not closing.done.is_set()  # still waiting for the reply
        await peer.send(OP_CLOSE, close_payload(4000, "finished"))
        (await closing.finished()).unwrap()
    assert await peer.read() is None  # EOF: the stream is closed
    assert ws.closed is not None and ws.closed.code == 4000
    with pytest.raises(ConnectionClosed):
        await ws.send_message("after close")


async def test_aclose_discards_messages_that_arrive_before_the_reply(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        closing = Background(nursery, ws.aclose)
        with trio.fail_after(LIMIT):
            assert await peer.read() == Close(1000, "")
        await peer.send(OP_TEXT, b"in flight")
        await peer.send(OP_PING, b"in flight")
        await peer.send(OP_CLOSE, close_payload(1000, ""))
        (await closing.finished()).unwrap()
    assert await peer.read() is None  # no pong after our close, then EOF


async def test_aclose_while_another_task_reads_hands_it_connection_closed(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        reading = Background(nursery, ws.get_message)
        await wait_all_tasks_blocked()
        closing = Background(nursery, ws.aclose)
        with trio.fail_after(LIMIT):
            assert await peer.read() == Close(1000, "")
        await peer.send(OP_CLOSE, close_payload(1000, "ok"))
        (await closing.finished()).unwrap()
        with pytest.raises(ConnectionClosed) as caught:  # not BusyResourceError
            (await reading.finished()).unwrap()
        assert caught.value.reason.code == 1000
    assert await peer.read() is None


async def test_get_message_during_aclose_waits_for_the_reply_and_raises_connection_closed(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        closing = Background(nursery, ws.aclose)
        with trio.fail_after(LIMIT):
            assert await peer.read() == Close(1000, "")
        reading = Background(nursery, ws.get_message)  # aclose is the reader now
        await wait_all_tasks_blocked()
        assert not reading.done.is_set()
        await peer.send(OP_CLOSE, close_payload(1000, ""))
        (await closing.finished()).unwrap()
        with pytest.raises(ConnectionClosed):  # not BusyResourceError
            (await reading.finished()).unwrap()


async def test_aclose_finishes_when_the_reading_task_leaves_with_a_message_before_the_reply(
    autojump_clock: MockClock,
) -> None:
    ws, peer = raw_pair()
    async with trio.open_nursery() as nursery:
        reading = Background(nursery, ws.get_message)  # reads one message, then stops
        await wait_all_tasks_blocked()
        closing = Background(nursery, ws.aclose)
        with trio.fail_after(LIMIT):
            assert await peer.read() == Close(1000, "")
        await peer.send(OP_TEXT, b"sent before the peer saw our close")
        await peer.send(OP_CLOSE, close_payload(1000, ""))
        assert (await reading.finished()).unwrap() == "sent before the peer saw our close"
        (await closing.finished()).unwrap()  # TooSlowError: nobody reads the reply


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(frame(OP_TEXT, b"x", mask=False), 1002, id="unmasked-from-a-client"),
        pytest.param(bytes((0xC1, 0x81)) + b"\0\0\0\0x", 1002, id="reserved-bit"),
        pytest.param(frame(0x3, b"x", mask=True), 1002, id="unknown-opcode"),
        pytest.param(frame(OP_PING, b"p" * 126, mask=True), 1002, id="big-ping"),
        pytest.param(frame(OP_TEXT, b"\xff\xfe", mask=True), 1007, id="bad-utf8"),
        pytest.param(frame(OP_CLOSE, b"\x03\xed", mask=True), 1002, id="close-1005-on-the-wire"),
        pytest.param(bytes((0x82, 0xFE)) + (2000).to_bytes(2, "big"), 1009, id="too-big"),
    ],
)
async def test_a_peer_breaking_the_protocol_gets_a_close_with_the_code_for_it(
    wire: bytes, code: int, autojump_clock: MockClock
) -> None:
    ws, peer = raw_pair(max_message_bytes=1000)
    await peer.stream.send_all(wire)
    with trio.fail_after(LIMIT):
        assert (await closed_reason(ws.get_message()))[0] == code
        reply = await peer.read()
    assert isinstance(reply, Close) and reply.code == code
    assert await closed_reason(ws.get_message()) == (code, reply.reason)


async def test_a_dropped_connection_reads_as_1006(autojump_clock: MockClock) -> None:
    ws, peer = raw_pair()
    await peer.stream.aclose()
    with trio.fail_after(LIMIT):
        assert await closed_reason(ws.get_message()) == (1006, None)


# -- send timeout, broken writes -------------------------------------------------------------------


async def test_a_peer_that_stops_reading_times_a_send_out_and_breaks_the_connection(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = lockstep_stream_pair()
    ws = WebSocket(ours, client=False, max_message_bytes=MAX)
    ws.send_timeout = 5.0
    payload = b"audio" * 1000
    async with trio.open_nursery() as nursery:
        peeked = Background(nursery, lambda: theirs.receive_some(10))  # then it stops reading
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await ws.send_message(payload)
        assert trio.current_time() - start == pytest.approx(5.0)
        head = (await peeked.finished()).unwrap()
    assert ws.broken
    with trio.fail_after(1):  # no close handshake on a broken connection
        await ws.aclose()
    # The peer gets the rest of the cut frame, then EOF: no close frame after the half frame.
    assert head + await read_to_eof(theirs) == frame(OP_BINARY, payload, mask=False)
    with pytest.raises(ConnectionClosed):
        await ws.send_message("after")


async def test_without_a_send_timeout_a_slow_reader_is_waited_for(
    autojump_clock: MockClock,
) -> None:
    ours, theirs = lockstep_stream_pair()
    ws = WebSocket(ours, client=False, max_message_bytes=MAX)
    peer = RawPeer(theirs, ours_is_client=False)
    async with trio.open_nursery() as nursery:
        sending = Background(nursery, lambda: ws.send_message("patience"))
        await trio.sleep(1000)
        assert await peer.read() == "patience"
        (await sending.finished()).unwrap()
    assert not ws.broken


async def test_a_send_cut_part_way_on_a_socket_breaks_the_connection(
    autojump_clock: MockClock,
) -> None:
    a, b = trio.socket.socketpair()
    ws = WebSocket(trio.SocketStream(a), client=False, max_message_bytes=MAX)
    ws.send_timeout = 3.0
    payload = b"\x01" * 4_000_000  # far more than the socket buffers hold
    with a, b:
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await ws.send_message(payload)
        assert trio.current_time() - start == pytest.approx(3.0)
        assert ws.broken
        with trio.fail_after(1):
            await ws.aclose()
        got = await read_to_eof(trio.SocketStream(b))
    whole = frame(OP_BINARY, payload, mask=False)
    assert 0 < len(got) < len(whole)
    assert got == whole[: len(got)]  # the cut frame and nothing after it


async def test_a_send_timed_out_before_a_byte_left_does_not_break_a_socket_connection(
    autojump_clock: MockClock,
) -> None:
    a, b = socket.socketpair()
    with a, b:
        await _timed_out_before_a_byte_left(a, b)


async def _timed_out_before_a_byte_left(a: socket.socket, b: socket.socket) -> None:
    a.setblocking(False)
    filled = 0
    for size in (65536, 4096, 256, 16, 1):  # fill the socket buffer to the last byte
        while True:
            try:
                filled += a.send(b"\0" * size)
            except BlockingIOError:
                break
    ws = WebSocket(
        trio.SocketStream(trio.socket.from_stdlib_socket(a)), client=False, max_message_bytes=MAX
    )
    ws.send_timeout = 2.0
    with pytest.raises(trio.TooSlowError):
        await ws.send_message("nothing of this was written")
    assert not ws.broken
    theirs = trio.SocketStream(trio.socket.from_stdlib_socket(b))
    drained = 0
    while drained < filled:
        drained += len(await theirs.receive_some(filled - drained))
    peer = RawPeer(theirs, ours_is_client=False)
    with trio.fail_after(LIMIT):
        await ws.send_message("still usable")
        assert await peer.read() == "still usable"


async def test_a_write_queued_behind_a_cut_write_does_not_follow_it_onto_the_wire(
    autojump_clock: MockClock,
) -> None:
    calls = 0

    async def stall_first_write() -> None:  # the first write's bytes are out, then it stalls
        nonlocal calls
        calls += 1
        if calls == 1:
            await trio.sleep_forever()

    out = trio.testing.MemorySendStream(send_all_hook=stall_first_write)
    ws = WebSocket(
        trio.StapledStream(out, trio.testing.MemoryReceiveStream()),
        client=False,
        max_message_bytes=MAX,
    )
    ws.send_timeout = 5.0
    async with trio.open_nursery() as nursery:
        first = Background(nursery, lambda: ws.send_message("cut"))
        await wait_all_tasks_blocked()
        second = Background(nursery, lambda: ws.send_message("queued"))
        with pytest.raises(trio.TooSlowError):
            (await first.finished()).unwrap()
        second_result = await second.finished()
    assert ws.broken
    assert out.get_data_nowait() == frame(OP_TEXT, b"cut", mask=False)  # nothing after the cut
    with pytest.raises(ConnectionClosed):
        second_result.unwrap()


# -- last_heard ------------------------------------------------------------------------------------


async def test_last_heard_moves_when_data_arrives(autojump_clock: MockClock) -> None:
    ws, peer = raw_pair()
    born = trio.current_time()
    assert ws.last_heard == born
    await trio.sleep(10)
    assert ws.last_heard == born  # time alone does not move it
    await peer.send(OP_TEXT, b"hello")
    assert await ws.get_message() == "hello"
    assert ws.last_heard == born + 10
    async with trio.open_nursery() as nursery:
        Background(nursery, ws.get_message)
        await trio.sleep(5)
        await peer.send(OP_PONG, b"")  # a pong counts too
        await wait_all_tasks_blocked()
        assert ws.last_heard == born + 15
        nursery.cancel_scope.cancel()


# -- connect() -------------------------------------------------------------------------------------


async def test_connect_without_subprotocols_talks_to_trio_websocket(
    autojump_clock: MockClock,
) -> None:
    async with against_trio_server() as (ws, server):
        assert ws.subprotocol is None
        assert server.request.path == "/v1/realtime?model=m"
        assert server.request.proposed_subprotocols == ()
        assert (b"x-trace", b"t-1") in server.request.headers
        with trio.fail_after(LIMIT):
            await ws.send_message("hi")
            assert await server.conn.get_message() == "hi"


async def test_connect_with_subprotocols_takes_the_one_the_server_chose(
    autojump_clock: MockClock,
) -> None:
    offered = ("realtime", "openai-insecure-api-key.sk-test")
    async with against_trio_server(offered, chosen="realtime") as (ws, server):
        assert server.request.proposed_subprotocols == offered
        assert ws.subprotocol == "realtime"
        with trio.fail_after(LIMIT):
            await server.conn.send_message(b"\x01")
            assert await ws.get_message() == b"\x01"


Script = Callable[[trio.abc.Stream, bytes], Awaitable[None]]


async def dial_scripted(
    script: Script, subprotocols: tuple[str, ...] | None = None
) -> tuple[WebSocket, bytes, dict[bytes, bytes]]:
    """connect() against a server that reads the request and runs ``script(stream, key)``.

    Returns the WebSocket and the request line and headers the server saw; raises what
    connect raised (not wrapped in an exception group)."""
    ours, theirs = memory_stream_pair()
    seen: list[tuple[bytes, dict[bytes, bytes]]] = []

    async def server() -> None:
        first, headers = await read_head(theirs)
        seen.append((first, headers))
        await script(theirs, headers[b"sec-websocket-key"])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(server)
        with trio.fail_after(LIMIT):
            result = await outcome.acapture(
                connect,
                ours,
                "relay.test:8443",
                "/v1/realtime",
                subprotocols=subprotocols,
                headers=((b"Authorization", b"Bearer t"),),
                max_message_bytes=MAX,
            )
        nursery.cancel_scope.cancel()
    ws = result.unwrap()
    return ws, *seen[0]


def answer(*lines: bytes, body: bytes = b"") -> bytes:
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def switching(key: bytes, *extra: bytes) -> bytes:
    return answer(
        b"HTTP/1.1 101 Switching Protocols",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: " + accept_key(key),
        *extra,
    )


def send_once(build: Callable[[bytes], bytes]) -> Script:
    async def script(stream: trio.abc.Stream, key: bytes) -> None:
        await stream.send_all(build(key))
        await trio.sleep_forever()

    return script


async def test_connect_sends_a_valid_upgrade_request(autojump_clock: MockClock) -> None:
    ws, first, headers = await dial_scripted(send_once(switching), subprotocols=("a", "b"))
    assert first == b"GET /v1/realtime HTTP/1.1"
    assert headers[b"host"] == b"relay.test:8443"
    assert headers[b"upgrade"].lower() == b"websocket"
    assert headers[b"connection"].lower() == b"upgrade"
    assert headers[b"sec-websocket-version"] == b"13"
    assert len(base64.b64decode(headers[b"sec-websocket-key"], validate=True)) == 16
    assert headers[b"sec-websocket-protocol"] == b"a, b"
    assert headers[b"authorization"] == b"Bearer t"
    assert ws.subprotocol is None


async def test_connect_reads_header_names_in_any_case(autojump_clock: MockClock) -> None:
    ws, _, _ = await dial_scripted(
        send_once(
            lambda key: answer(
                b"HTTP/1.1 101 Switching Protocols",
                b"UPGRADE: websocket",
                b"connection: upgrade",
                b"sec-WEBSOCKET-accept:" + accept_key(key),
                b"Sec-Websocket-Protocol:  b ",
            )
        ),
        subprotocols=("a", "b"),
    )
    assert ws.subprotocol == "b"


async def test_a_401_with_a_json_body_is_rejected_with_status_headers_and_body(
    autojump_clock: MockClock,
) -> None:
    body = b'{"error":{"code":"invalid_api_key","message":"nope"}}'

    async def script(stream: trio.abc.Stream, key: bytes) -> None:
        head = answer(
            b"HTTP/1.1 401 Unauthorized",
            b"Content-Type: application/json",
            b"Content-Length: " + str(len(body)).encode(),
        )
        await stream.send_all(head + body[:10])  # the rest of the body comes later
        await trio.sleep(0.1)
        await stream.send_all(body[10:])
        await trio.sleep_forever()

    with pytest.raises(ConnectionRejected) as caught:
        await dial_scripted(script)
    assert caught.value.status_code == 401
    assert caught.value.body == body
    assert (b"content-type", b"application/json") in list(caught.value.headers)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            lambda key: switching(key).replace(accept_key(key), accept_key(b"another key")),
            id="bad-accept",
        ),
        pytest.param(
            lambda key: answer(b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket"),
            id="no-accept",
        ),
        pytest.param(
            lambda key: switching(key, b"Sec-WebSocket-Protocol: c"), id="unoffered-subprotocol"
        ),
        pytest.param(
            lambda key: switching(key, b"Sec-WebSocket-Extensions: permessage-deflate"),
            id="extension",
        ),
        pytest.param(lambda key: b"SSH-2.0-OpenSSH_9.6\r\n\r\n", id="not-http"),
        pytest.param(lambda key: b"\x16\x03\x01\x00\xa5\r\n\r\n", id="binary-garbage"),
        pytest.param(lambda key: answer(b"HTTP/2 101"), id="not-http-1"),
        pytest.param(
            lambda key: answer(b"HTTP/1.1 101 Switching Protocols", b"no colon here"),
            id="bad-header",
        ),
    ],
)
async def test_an_answer_that_is_not_a_websocket_handshake_fails(
    build: Callable[[bytes], bytes], autojump_clock: MockClock
) -> None:
    with pytest.raises(HandshakeFailed):
        await dial_scripted(send_once(build), subprotocols=("a", "b"))


async def test_a_subprotocol_chosen_when_none_was_offered_fails(autojump_clock: MockClock) -> None:
    with pytest.raises(HandshakeFailed):
        await dial_scripted(send_once(lambda key: switching(key, b"Sec-WebSocket-Protocol: a")))


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(lambda key: b"", id="no-answer"),
        pytest.param(lambda key: b"HTTP/1.1 101 Switch", id="half-a-status-line"),
        pytest.param(lambda key: switching(key)[:-2], id="head-without-its-end"),
    ],
)
async def test_eof_during_the_handshake_is_broken_resource(
    partial: Callable[[bytes], bytes], autojump_clock: MockClock
) -> None:
    async def script(stream: trio.abc.Stream, key: bytes) -> None:
        await stream.send_all(partial(key))
        await stream.aclose()

    with pytest.raises(trio.BrokenResourceError):
        await dial_scripted(script)


async def test_unread_counts_what_the_peer_sent_that_no_message_was_made_of() -> None:
    """The load guard's backlog: bytes in the OS's buffer plus a partial frame read so far."""
    left, right = trio.socket.socketpair()
    ws = WebSocket(trio.SocketStream(left), client=True, max_message_bytes=1 << 20)
    peer = trio.SocketStream(right)
    try:
        assert ws.unread() == 0
        whole = frame(OP_TEXT, b"x" * 50_000, mask=False)
        await peer.send_all(whole + whole[:1000])  # one message and the start of the next
        with trio.fail_after(5):
            while ws.unread() < len(whole) + 1000:  # the kernel may still be delivering
                await trio.sleep(0.01)
            assert await ws.get_message() == "x" * 50_000
        assert ws.unread() == 1000  # read in the same recv, now held by the frame reader
    finally:
        await peer.aclose()
        await trio.aclose_forcefully(ws._stream)
