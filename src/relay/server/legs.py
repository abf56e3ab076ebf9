"""The client's leg of a pair, as :class:`relay.server.pair.ClientSide`: over ASGI messages
(any ASGI server), or over the client's own socket once the relay has taken it from Hypercorn."""

from __future__ import annotations

import math
from typing import Any

import trio
from trio_websocket import ConnectionClosed

from ..core.bridge import Message
from ..wire.websocket import WebSocket
from .asgi import Receive, Send

#: What Hypercorn's socket writes raise when the client's connection is going away. Busy:
#: Hypercorn half-closes the socket (send_eof) without its send lock when the client hangs up,
#: so a write racing that raises BusyResourceError.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)


class AsgiClient:
    """The client's WebSocket over ASGI, as :class:`~relay.server.pair.ClientSide`."""

    __slots__ = ("_receive", "_send", "_send_timeout", "_disconnect_code")

    websocket = None  # Hypercorn reads and writes the socket

    def __init__(self, receive: Receive, send: Send, send_timeout: float = math.inf) -> None:
        self._receive = receive
        self._send = send
        self._send_timeout = send_timeout
        self._disconnect_code: int | None = None

    async def receive(self) -> Message | None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                return text if text is not None else (message.get("bytes") or b"")
            if kind == "websocket.disconnect":
                self._disconnect_code = message.get("code")
                return None

    @property
    def dropped(self) -> bool:
        """Whether the connection was lost without a close frame (Hypercorn says 1006)."""
        return self._disconnect_code in (None, 1006)

    async def send(self, data: Message) -> None:
        message = (
            {"type": "websocket.send", "text": data}
            if data.__class__ is str
            else {"type": "websocket.send", "bytes": data}
        )
        try:
            with trio.fail_after(self._send_timeout):
                await self._send(message)
        except _GONE:
            pass  # the client's TCP connection is closing; its disconnect event follows

    async def close(self, code: int, reason: str) -> None:
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except _GONE:
            pass

    async def keepalive(self) -> None:
        pass  # Hypercorn pings (websocket_ping_interval)

    #: Hypercorn's read timeout reaps a silent client.
    last_heard = math.inf

    def unread(self) -> int:
        return 0  # Hypercorn's buffers are out of sight

    writing = False

    async def wait_closed(self, timeout: float) -> None:
        """After our close frame, let the client answer it before the app returns.

        Hypercorn closes the TCP connection when the app returns; if the client is
        still sending then, unread data makes the kernel reset the connection, and
        a client that has not read our error event and close frame yet loses them
        (it sees 1006). Reading until the client's close reply avoids that.
        """
        with trio.move_on_after(timeout):
            while await self.receive() is not None:
                pass


class SocketClient:
    """The client's WebSocket once the relay owns its socket, as :class:`~relay.server.pair.ClientSide`."""

    __slots__ = ("websocket",)

    def __init__(self, ws: WebSocket) -> None:
        self.websocket = ws

    async def receive(self) -> Message | None:
        try:
            return await self.websocket.get_message()
        except ConnectionClosed:
            return None

    @property
    def dropped(self) -> bool:
        """Whether the connection was lost without a close frame (1006)."""
        closed = self.websocket.closed
        return closed is None or closed.code == 1006

    async def send(self, data: Message) -> None:
        try:
            await self.websocket.send_message(data)
        except ConnectionClosed:
            pass  # the client is gone; the read that follows says so

    async def close(self, code: int, reason: str) -> None:
        await self.websocket.send_close(code, reason)

    async def keepalive(self) -> None:
        await self.websocket.send_ping()

    @property
    def last_heard(self) -> float:
        return self.websocket.last_heard

    def unread(self) -> int:
        return self.websocket.unread()

    @property
    def writing(self) -> bool:
        return self.websocket.writing

    async def wait_closed(self, timeout: float) -> None:
        """After our close frame, read until the client's reply (bounded), so it gets
        everything we sent before the connection is closed."""
        with trio.move_on_after(timeout):
            await self.websocket.wait_closed()


def client_frame_limit(max_message_bytes: int) -> int:
    """The hard limit on a client message, above RELAY_MAX_MESSAGE_BYTES so that the
    bridge, not the framing, answers an oversized message (with an error event and 1009)."""
    return max(2 * max_message_bytes, max_message_bytes + 65536)


async def accept(
    send: Send, receive: Receive, offered: Any, send_timeout: float = math.inf
) -> AsgiClient:
    """Complete the handshake, selecting ``realtime`` if offered (never a token-bearing one)."""
    await send({"type": "websocket.accept", "subprotocol": "realtime" if "realtime" in offered else None})
    return AsgiClient(receive, send, send_timeout)
