"""The echo upstream (``mockrealtime echo``): handshake, session events, echo in order."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed

from mockrealtime.cli import build_parser
from mockrealtime.echo import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    EchoServer,
    FrameReader,
    apply_mask,
    frame,
    serve_echo,
)

from .helpers import connect


@contextmanager
def echo_server(
    api_keys: frozenset[str] = frozenset(), ssl_context: ssl.SSLContext | None = None
) -> Iterator[tuple[EchoServer, int]]:
    """The asyncio echo server on a loopback port, in a thread, for the test's duration."""
    ready = threading.Event()
    found: dict[str, object] = {}
    holder: dict[str, object] = {}

    async def run() -> None:
        stop = asyncio.Event()
        holder["loop"], holder["stop"] = asyncio.get_running_loop(), stop

        def started(server: EchoServer, port: int) -> None:
            found["server"], found["port"] = server, port
            ready.set()

        await serve_echo(
            "127.0.0.1", 0, api_keys=api_keys, started=started, stop=stop, ssl_context=ssl_context
        )

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the echo server did not start"
    try:
        yield found["server"], found["port"]  # type: ignore[misc]
    finally:
        loop: asyncio.AbstractEventLoop = holder["loop"]  # type: ignore[assignment]
        loop.call_soon_threadsafe(holder["stop"].set)  # type: ignore[attr-defined]
        thread.join(10)


@asynccontextmanager
async def session(port: int, key: str = "sk-any", **options: object) -> AsyncIterator[object]:
    url = f"ws://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    async with connect(url, extra_headers=headers, **options) as ws:
        yield ws


async def test_handshake_session_events_and_echo_in_order() -> None:
    with echo_server() as (server, port), trio.fail_after(10):
        async with session(port, subprotocols=["realtime"]) as ws:
            assert ws.subprotocol == "realtime"
            created = json.loads(await ws.get_message())
            assert created["type"] == "session.created"
            assert created["session"]["model"] == "gpt-realtime"
            await ws.send_message(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "realtime", "instructions": "hi"},
                    }
                )
            )
            updated = json.loads(await ws.get_message())
            assert updated["type"] == "session.updated"
            assert updated["session"]["instructions"] == "hi"
            assert updated["event_id"] != created["event_id"]
            sent = [  # event_id first: not an append as the SDKs write one, so echoed as it is
                json.dumps(
                    {
                        "event_id": f"e{i}",
                        "type": "input_audio_buffer.append",
                        "audio": "A" * i * 97,
                    }
                )
                for i in range(200)
            ]
            sent.append('{"type":"conversation.item.retrieve","item_id":"x"}')
            sent.append("not json at all, echoed anyway")
            sent.append("x" * 70_000)  # 64-bit length form

            async def send_all() -> None:
                for message in sent:
                    await ws.send_message(message)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_all)
                received = [await ws.get_message() for _ in sent]
            assert received == sent  # unchanged, in order
            await ws.send_message(b"\x00\x01binary")
            assert await ws.get_message() == b"\x00\x01binary"
        assert server.messages == len(sent) + 2


async def test_appends_come_back_as_output_audio_with_the_same_audio_and_event_id() -> None:
    appends = [
        '{"type":"input_audio_buffer.append","event_id":"b7.1","audio":"UklGRg=="}',
        '{"type":"input_audio_buffer.append","audio":"' + "QUJD" * 2000 + '"}',
        '{"type":"input_audio_buffer.append","event_id":"no audio"}',
    ]
    with echo_server() as (_server, port), trio.fail_after(10):
        async with session(port) as ws:
            json.loads(await ws.get_message())  # session.created
            for append in appends:
                await ws.send_message(append)
            played = [await ws.get_message() for _ in appends]
    delta = '{"type":"response.output_audio.delta","event_id":"b7.1","delta":"UklGRg=="}'
    assert played[0] == delta
    assert json.loads(played[1]) == {"type": "response.output_audio.delta", "delta": "QUJD" * 2000}
    assert played[2] == '{"type":"response.output_audio.delta","event_id":"no audio"}'


async def test_a_missing_key_gets_the_mock_error_and_close_3000() -> None:
    with echo_server() as (_server, port), trio.fail_after(10):
        async with session(port, key="") as ws:
            error = json.loads(await ws.get_message())
            assert error["type"] == "error"
            assert "Missing bearer" in error["error"]["message"]
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 3000


async def test_configured_keys_and_unknown_paths() -> None:
    with echo_server(frozenset({"k1"})) as (_server, port), trio.fail_after(10):
        async with session(port, key="k2") as ws:
            error = json.loads(await ws.get_message())
            assert error["error"]["code"] == "invalid_api_key"
        async with session(port, key="k1") as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"GET /v1/other HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
        assert response.startswith(b"HTTP/1.1 404 Not Found")


def test_frames_fragments_ping_and_close_sans_io() -> None:
    """The framer both ways, and the protocol's answers to fragments, pings and close."""
    mask = b"\x01\x02\x03\x04"
    assert apply_mask(apply_mask(b"hello world", mask), mask) == b"hello world"
    reader = FrameReader()
    data = frame(OP_TEXT, b"a" * 300, mask) + frame(OP_BINARY, b"b" * 70_000)
    got = reader.feed(data[:3]) + reader.feed(data[3:1000]) + reader.feed(data[1000:])
    assert got == [(OP_TEXT, True, b"a" * 300), (OP_BINARY, True, b"b" * 70_000)]

    class Transport:
        def __init__(self) -> None:
            self.out = bytearray()
            self.closed = False

        def write(self, data: bytes) -> None:
            self.out += data

        def writelines(self, parts: list[bytes]) -> None:
            for data in parts:
                self.out += data

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

    server = EchoServer()
    proto = server.protocol()
    transport = Transport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.data_received(
        b"GET /v1/realtime?model=gpt-realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer k\r\n\r\n"
    )
    head, _, rest = bytes(transport.out).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    client = FrameReader()
    assert json.loads(client.feed(rest)[0][2])["type"] == "session.created"
    transport.out.clear()
    proto.data_received(
        bytes([0x01, 0x80 | 2])
        + mask
        + apply_mask(b"he", mask)
        + frame(OP_PING, b"p", mask)  # control frames may come between fragments
        + bytes([0x80, 0x80 | 3])
        + mask
        + apply_mask(b"llo", mask)
    )
    assert client.feed(bytes(transport.out)) == [(OP_PONG, True, b"p"), (OP_TEXT, True, b"hello")]
    transport.out.clear()
    proto.data_received(frame(OP_CLOSE, b"\x03\xe8bye", mask))
    assert client.feed(bytes(transport.out)) == [(OP_CLOSE, True, b"\x03\xe8")]
    assert transport.closed


def test_cli_has_an_echo_command() -> None:
    args = build_parser().parse_args(["echo", "--port", "0"])
    assert args.command == "echo" and args.port == 0 and args.api_key == []


async def test_with_a_certificate_it_serves_wss() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with echo_server(ssl_context=server_context) as (_, port), trio.fail_after(10):
        url = f"wss://127.0.0.1:{port}/v1/realtime?model=gpt-realtime"
        headers = [(b"authorization", b"Bearer sk-any")]
        async with connect(url, extra_headers=headers, ssl_context=client_context) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
            await ws.send_message('{"type":"input_audio_buffer.append","audio":"AAAA"}')
            assert await ws.get_message() == '{"type":"response.output_audio.delta","delta":"AAAA"}'
