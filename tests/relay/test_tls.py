"""relay.wire.tls: the relay's own TLS to a wss:// upstream, and the WebSocket over it.

The far end is Trio's own TLS server stream over loopback TCP, with a certificate from a
throwaway CA (trustme), so each test sees real records, real certificate checks and, where
it needs to, the raw bytes under the records.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed

from relay.wire.frames import FrameReader, frame
from relay.wire.tls import TLSSocketStream
from relay.wire.websocket import PART, WebSocket

TIMEOUT = 10
CA = trustme.CA()


def server_context(host: str = "127.0.0.1") -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    CA.issue_cert(host).configure_cert(context)
    return context


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    CA.configure_trust(context)
    return context


async def trickle(listener: trio.SocketListener, to_port: int, chunk: int) -> None:
    """Forward one connection to ``to_port`` both ways, ``chunk`` bytes at a time with a
    pause between: records arrive split across reads."""
    inbound = await listener.accept()
    outbound = await trio.open_tcp_stream("127.0.0.1", to_port)

    async def copy(src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while data := await src.receive_some(65536):
            for i in range(0, len(data), chunk):
                await dst.send_all(data[i : i + chunk])
                await trio.sleep(0.0005)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(copy, inbound, outbound)
            nursery.start_soon(copy, outbound, inbound)
    except* (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        inbound.socket.close()
        outbound.socket.close()


@asynccontextmanager
async def tls_pair(
    context: ssl.SSLContext | None = None, *, handshake: bool = True, trickled: int = 0
) -> AsyncIterator[tuple[TLSSocketStream, trio.SSLStream[trio.SocketStream]]]:
    """Our TLS client stream and Trio's TLS server stream, connected over loopback (through
    a proxy that forwards ``trickled`` bytes at a time, if set)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener, trio.open_nursery() as nursery:
        accepted: list[trio.SSLStream[trio.SocketStream]] = []
        proxies: list[trio.SocketListener] = []
        if trickled:
            proxies.append((await trio.open_tcp_listeners(0, host="127.0.0.1"))[0])
            nursery.start_soon(trickle, proxies[0], port, trickled)
            port = proxies[0].socket.getsockname()[1]

        async def accept() -> None:
            server = trio.SSLStream(
                await listener.accept(), context or server_context(), server_side=True
            )
            accepted.append(server)
            try:
                await server.do_handshake()
            except trio.BrokenResourceError:
                pass

        nursery.start_soon(accept)
        ours = TLSSocketStream(
            await trio.open_tcp_stream("127.0.0.1", port), client_context(), "127.0.0.1"
        )
        try:
            if handshake:
                await ours.do_handshake()
            await trio.testing.wait_all_tasks_blocked()
            yield ours, accepted[0]
        finally:
            ours.transport.socket.close()
            for server in accepted:
                server.transport_stream.socket.close()
            for proxy in proxies:
                proxy.socket.close()
            nursery.cancel_scope.cancel()


async def read_both_ways(ws: WebSocket, ours: TLSSocketStream, n: int) -> list[str | bytes]:
    """``n`` messages: the first half as a task reads them (get_message), the rest as the
    pump does (poll, waiting for the socket whenever it has nothing)."""
    got = [await ws.get_message() for _ in range(n // 2)]
    assert ws.hold_reading()
    while len(got) < n:
        polled = ws.poll()
        if polled is None:
            ws.release_reading()
            await trio.lowlevel.wait_readable(ours.transport.socket)
            assert ws.hold_reading()
            continue
        got.append(polled)  # type: ignore[arg-type]
    ws.release_reading()
    return got


async def test_bytes_cross_both_ways_and_receive_some_keeps_what_it_did_not_return() -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_pair() as (ours, theirs):
            await ours.send_all(b"hello " * 5000)  # 30 KB: two records
            got = b""
            while len(got) < 30000:
                got += await theirs.receive_some(65536)
            assert got == b"hello " * 5000
            await theirs.send_all(b"abcdefghij")
            assert await ours.receive_some(4) == b"abcd"
            assert ours.take_buffered() == b"efghij"  # what the WebSocket takes over with
            await theirs.send_all(b"x" * 40000)  # three records
            plain = b""
            while len(plain) < 40000:  # decrypt: every whole record of what was read
                plain += ours.decrypt(await ours.transport.receive_some(65536))
            assert plain == b"x" * 40000


async def test_a_server_with_someone_elses_certificate_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_pair(server_context("example.org"), handshake=False) as (ours, _):
            with pytest.raises(ssl.SSLCertVerificationError):
                await ours.do_handshake()


async def test_a_server_leaving_in_the_handshake_is_a_broken_connection() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    with trio.fail_after(TIMEOUT):
        async with listener, trio.open_nursery() as nursery:

            async def leave() -> None:
                await (await listener.accept()).aclose()

            nursery.start_soon(leave)
            ours = TLSSocketStream(
                await trio.open_tcp_stream("127.0.0.1", port), client_context(), "127.0.0.1"
            )
            with pytest.raises((trio.BrokenResourceError, OSError)):
                await ours.do_handshake()
            await ours.aclose()


async def test_a_websocket_over_tls_reads_writes_and_pumps_records_in_order() -> None:
    """get_message and poll decrypt what they read, send_message and send_now encrypt what
    they write, and a write left part-way is finished before any later record."""
    messages = [f'{{"type":"m","n":{i},"pad":"{"p" * (i * 997 % 20000)}"}}' for i in range(60)]
    with trio.fail_after(TIMEOUT):
        async with tls_pair() as (ours, theirs):
            ws = WebSocket(ours, client=True, max_message_bytes=1 << 20)
            assert ws.pumpable and ws.fileno() >= 0
            ours.transport.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # parts
            reader = FrameReader(masked=True, max_message_bytes=1 << 20)
            received: list[str] = []

            async def read_theirs() -> None:
                while len(received) < len(messages):
                    reader.feed(await theirs.receive_some(65536))
                    while (event := reader.next()) is not None:
                        received.append(event)  # type: ignore[arg-type]

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_theirs)
                parts = 0
                for i, message in enumerate(messages):
                    if i % 2:
                        await ws.send_message(message)
                        continue
                    sent = ws.send_now(message)
                    if sent is PART:
                        parts += 1
                        await ws.finish_send()
                    elif sent is False:
                        await ws.send_message(message)
            assert received == messages

            async def send_theirs() -> None:
                for message in messages:  # and back, unmasked
                    await theirs.send_all(frame(1, message.encode(), mask=False))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_theirs)
                got = await read_both_ways(ws, ours, len(messages))
            assert got == messages
            assert parts  # the small send buffer left writes part-way, and they were finished


async def test_records_split_across_reads_are_put_together_by_both_ways_of_reading() -> None:
    messages = [f'{{"type":"m","n":{i},"pad":"{"p" * (i * 331 % 3000)}"}}' for i in range(40)]
    with trio.fail_after(TIMEOUT):
        async with tls_pair(trickled=700) as (ours, theirs):
            ws = WebSocket(ours, client=True, max_message_bytes=1 << 20)
            for message in messages:
                await theirs.send_all(frame(1, message.encode(), mask=False))
            assert await read_both_ways(ws, ours, len(messages)) == messages


async def test_a_forged_record_loses_the_connection_and_only_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_pair() as (ours, theirs):
            ws = WebSocket(ours, client=True, max_message_bytes=1 << 20)
            await theirs.send_all(frame(1, b'{"type":"genuine"}', mask=False))
            assert await ws.get_message() == '{"type":"genuine"}'
            # An application-data record whose authentication tag cannot be right.
            await theirs.transport_stream.send_all(b"\x17\x03\x03\x00\x20" + bytes(32))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
            assert closed.value.reason.code == 1006


async def test_a_tls_write_cut_before_its_first_byte_still_breaks_the_connection() -> None:
    """Its records were made, so the ones after them would not decrypt: unlike a plain
    socket's, such a write cannot be dropped whole and the connection go on."""
    with trio.fail_after(TIMEOUT):
        async with tls_pair() as (ours, _):
            ws = WebSocket(ours, client=True, max_message_bytes=1 << 20)
            raw = ours.transport.socket
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            for _ in range(1000):  # the peer does not read: fill the socket to the brim
                try:
                    raw._sock.send(b"\0" * 65536)  # type: ignore[attr-defined]
                except BlockingIOError:
                    try:
                        raw._sock.send(b"\0")  # type: ignore[attr-defined]
                    except BlockingIOError:
                        break
            with trio.CancelScope() as cut:
                cut.cancel()  # the write is cut at its first wait, before any byte left
                await ws.send_message('{"type":"x"}')
            assert cut.cancelled_caught
            assert ws.broken
