"""Harness for the relay's tests over real loopback sockets.

``ScriptedUpstream`` is a tiny WebSocket server standing in for the Realtime API
where a test needs exact control of the upstream (when it accepts, what it sends,
how it closes). Tests that need the protocol itself use mockrealtime.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    serve_websocket,
    wrap_client_stream,
)

from relay.config import RelayConfig, load_config
from relay.server.app import RelayApp, create_app
from relay.server.serve import serve

from ..leaks import check_client_sees_no_upstream_key

TEST_KEY = "sk-test-upstream-secret-0123456789"

#: The relay's own event ids (``event_relay`` and 16 random hex digits).
_RELAY_EVENT_ID = re.compile(r"event_relay[0-9a-f]{16}")


def without_relay_ids(text: str) -> str:
    """``text`` with the relay's random event ids blanked: a test that looks for four
    characters of a key (``6789``) must not find them in a random id (1 run in ~5,000)."""
    return _RELAY_EVENT_ID.sub("event_relay…", text)

Handler = Callable[["UpstreamConnection"], Awaitable[None]]


@dataclass
class UpstreamConnection:
    """One connection the scripted upstream accepted."""

    request: WebSocketRequest
    ws: WebSocketConnection | None = None
    received: list[str | bytes] = field(default_factory=list)

    async def accept(self) -> WebSocketConnection:
        offered = self.request.proposed_subprotocols
        self.ws = await self.request.accept(subprotocol="realtime" if "realtime" in offered else None)
        return self.ws

    async def receive(self) -> str | bytes:
        assert self.ws is not None
        message = await self.ws.get_message()
        self.received.append(message)
        return message


async def open_session(conn: UpstreamConnection) -> WebSocketConnection:
    """Open a session as the Realtime API does: accept, send ``session.created``, answer the
    relay's own ``session.update`` (its first message) with ``session.updated``. The client
    then gets ``{"type":"session.created"}`` as it was sent."""
    ws = await conn.accept()
    await ws.send_message('{"type":"session.created"}')
    await conn.receive()
    await ws.send_message('{"type":"session.updated"}')
    return ws


async def greet(conn: UpstreamConnection) -> None:
    """The simplest upstream script: open a session, read until the relay leaves."""
    await open_session(conn)
    while True:
        await conn.receive()


@dataclass
class ScriptedUpstream:
    url: str
    connections: list[UpstreamConnection]
    arrived: trio.MemorySendChannel[UpstreamConnection]
    arrivals: trio.MemoryReceiveChannel[UpstreamConnection]


@asynccontextmanager
async def scripted_upstream(handler: Handler) -> AsyncIterator[ScriptedUpstream]:
    """Serve ``handler`` for each upstream connection on a loopback port."""
    send, receive = trio.open_memory_channel[UpstreamConnection](100)
    connections: list[UpstreamConnection] = []

    async def on_request(request: WebSocketRequest) -> None:
        conn = UpstreamConnection(request)
        connections.append(conn)
        send.send_nowait(conn)
        try:
            await handler(conn)
        except* ConnectionClosed:
            pass  # the relay closed this connection; the test checks how

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, on_request, "127.0.0.1", 0, None)
        yield ScriptedUpstream(
            f"ws://127.0.0.1:{server.port}/v1/realtime", connections, send, receive
        )
        nursery.cancel_scope.cancel()


@dataclass
class RunningRelay:
    url: str  # ws://127.0.0.1:PORT
    http_url: str
    app: RelayApp


def pump_from_environment() -> dict[str, str]:
    """RELAY_PUMP of the test run, if set: CI runs the loopback and end-to-end tests once more
    with RELAY_PUMP=off, so that the path without the pump is tested as well."""
    return {name: value for name, value in os.environ.items() if name == "RELAY_PUMP"}


@asynccontextmanager
async def running_relay(**settings: object) -> AsyncIterator[RunningRelay]:
    """A relay under Hypercorn on a loopback port."""
    values = {
        "openai_api_key": TEST_KEY,
        "port": 0,
        "dial_timeout": 5.0,
        "close_timeout": 2.0,
        "allow_anonymous": True,
        "store": "sqlite:///:memory:",
        # The tests' clients share the relay's process and event loop, so their own work
        # would read as relay load; the load guard has its own tests.
        "overload_cpu": 0.0,
        "overload_lag": 0.0,
        "shed_cpu": 0.0,
        "shed_lag": 0.0,
    }
    values.update(settings)
    config: RelayConfig = load_config(pump_from_environment(), values)
    app = create_app(config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(serve, config, shutdown_trigger=stop.wait, app=app)
        )
        assert config.pump != "off" or app.pump is None  # (the CI run without the pump)
        yield RunningRelay(binds[0].replace("http", "ws", 1), binds[0], app)
        stop.set()


@dataclass
class SilentUpstream:
    """A TCP listener that takes connections and never answers the WebSocket handshake."""

    url: str
    connected: trio.Event
    peer_closed: trio.Event


@asynccontextmanager
async def silent_upstream() -> AsyncIterator[SilentUpstream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    state = SilentUpstream(f"ws://127.0.0.1:{port}/v1/realtime", trio.Event(), trio.Event())

    async def hold(stream: trio.SocketStream) -> None:
        state.connected.set()
        while await stream.receive_some(65536):
            pass  # read the handshake, answer nothing
        state.peer_closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hold, listeners)
        yield state
        nursery.cancel_scope.cancel()


def closed_port_url() -> str:
    """A ws:// URL on a loopback port nobody listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"ws://127.0.0.1:{port}/v1/realtime"


def _check_every_frame(ws: WebSocketConnection) -> None:
    """Make ``ws.get_message`` fail the test on a message or close reason with the upstream key."""
    get_message = ws.get_message

    async def checked_get_message() -> str | bytes:
        try:
            message = await get_message()
        except ConnectionClosed as closed:
            check_client_sees_no_upstream_key("the close reason", closed.reason.reason)
            raise
        check_client_sees_no_upstream_key("a message", message)
        return message

    ws.get_message = checked_get_message  # type: ignore[method-assign]


@asynccontextmanager
async def connect(
    url: str,
    *,
    subprotocols: list[str] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A test client that owns its socket and closes it on every path.

    (trio-websocket's ``open_websocket_url`` leaves the socket open after a
    refused handshake or a server-initiated close.) Errors come out unwrapped.
    Every message and the close reason are checked for the upstream key: a test
    fails if its client received it, whatever the test itself asserts.
    """
    parts = urlsplit(url)
    assert parts.hostname and parts.port
    resource = parts.path + (f"?{parts.query}" if parts.query else "")
    stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    if parts.scheme == "wss":
        assert ssl_context is not None, "a wss:// test needs the test CA's ssl_context"
        stream = trio.SSLStream(stream, ssl_context, server_hostname=parts.hostname)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                f"{parts.hostname}:{parts.port}",
                resource,
                subprotocols=subprotocols,
                extra_headers=extra_headers,
            )
            _check_every_frame(ws)
            try:
                yield ws
            finally:
                with trio.move_on_after(5, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
                if ws.closed is not None:
                    check_client_sees_no_upstream_key("the close reason", ws.closed.reason)
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        await trio.aclose_forcefully(stream)
