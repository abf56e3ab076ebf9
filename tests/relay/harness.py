"""Harness for the relay's tests over real loopback sockets.

``ScriptedUpstream`` is a tiny WebSocket server standing in for the Realtime API
where a test needs exact control of the upstream (when it accepts, what it sends,
how it closes). Tests that need the protocol itself use mockrealtime.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from relay.config import RelayConfig, load_config
from relay.server import serve

TEST_KEY = "sk-test-upstream-secret-0123456789"

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
        except ConnectionClosed:
            pass  # the relay closed this connection; the test checks how

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, on_request, "127.0.0.1", 0, None)
        yield ScriptedUpstream(
            f"ws://127.0.0.1:{server.port}/v1/realtime", connections, send, receive
        )
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running_relay(**settings: object) -> AsyncIterator[str]:
    """A relay under Hypercorn on a loopback port; yields its ws:// base URL."""
    values = {"openai_api_key": TEST_KEY, "port": 0, "dial_timeout": 5.0, "close_timeout": 2.0}
    values.update(settings)
    config: RelayConfig = load_config({}, values)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(lambda task_status: serve(config, shutdown_trigger=stop.wait, task_status=task_status))
        yield binds[0].replace("http://", "ws://")
        stop.set()
