"""What the relay changes in Hypercorn, in one place (hypercorn is pinned for this).

* **permessage-deflate.** Hypercorn 0.18 always accepts it when a client offers
  it, and browsers always offer it; there is no setting (hypercorn issue #307). On
  base64 audio it costs two to nine times the CPU of the message itself and saves
  only the base64 overhead, so the relay declines it unless RELAY_PERMESSAGE_DEFLATE
  is on. The switch is per process, because it patches Hypercorn's handshake class.
* **Pings outliving their connection.** With ``websocket_ping_interval`` set, each
  WebSocket gets a task that sends a ping and then sleeps for the interval before
  looking whether the stream closed, and the connection (its socket included) is
  torn down only when that task ends: up to a whole interval after the close. The
  relay's ping task is cancelled as soon as the stream closes.
* **Handing a WebSocket's socket to the app.** Hypercorn handles every message of
  a WebSocket in pure Python through several layers and a channel to the app's
  task, which costs more than the rest of the relay together. After the upgrade the
  relay asks for the socket instead (:func:`take_over`): Hypercorn writes the 101,
  stops reading, and leaves the connection to the app until it returns. Routing,
  the handshake, denial responses, TLS, lifespan, workers and shutdown stay Hypercorn's.
* **Balanced accepts.** The workers of ``relay serve --workers N`` share one listening
  socket, and each takes its share of the connections (:mod:`relay.wire.balance`): Hypercorn's
  listeners are made :class:`~relay.wire.balance.BalancedListener` (:func:`balance_accepts`).

Every Hypercorn name this touches is in :mod:`relay.wire.internals`. Before it changes
anything, :func:`install` checks them: with one missing, it changes nothing (Hypercorn as it
is: plain ASGI messages, and permessage-deflate whenever a client offers it), says so once,
and :func:`problems` tells the app not to ask for sockets. Balanced accepts are checked the
same way, on their own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from math import inf
from typing import Any

import trio
from hypercorn import events
from hypercorn.protocol import ws_stream
from hypercorn.trio import run as trio_run
from hypercorn.trio import tcp_server
from wsproto.events import Ping

from . import internals
from .balance import Balance, BalancedListener

log = logging.getLogger("relay")

#: The ASGI message an app sends instead of ``websocket.accept`` to take the socket.
TAKE_OVER = "relay.wire.websocket.take_over"

#: The connection whose task spawned the app (Trio copies the context into new tasks).
_connection: ContextVar[_TCPServer | None] = ContextVar("relay_hypercorn_connection", default=None)

_deflate = {"enabled": False}
#: Hypercorn's own methods, kept when :func:`install` replaces them (once per process).
_original: dict[str, Any] = {}


def _accept(
    self: ws_stream.Handshake,
    subprotocol: str | None,
    additional_headers: Iterable[tuple[bytes, bytes]],
) -> Any:
    if not _deflate["enabled"]:
        self.extensions = None  # as if the client had offered no extension
    return _original["accept"](self, subprotocol, additional_headers)


async def _send_pings(self: ws_stream.WSStream) -> None:
    with trio.CancelScope() as self._relay_pings:  # type: ignore[attr-defined]
        while not self.closed:
            await self._send_wsproto_event(Ping())
            await trio.sleep(self.config.websocket_ping_interval)  # type: ignore[arg-type]


def _stop_pings_once_closed(
    method: Callable[..., Awaitable[None]], of: Callable[..., Awaitable[None]]
) -> Callable[..., Awaitable[None]]:
    @functools.wraps(of)  # (its signature, as relay.wire.internals checks it)
    async def wrapped(self: ws_stream.WSStream, event: Any) -> None:
        await method(self, event)
        if self.closed and (pings := getattr(self, "_relay_pings", None)) is not None:
            pings.cancel()

    return wrapped


class _TCPServer(getattr(tcp_server, "TCPServer", object)):  # type: ignore[misc]
    """Hypercorn's connection, able to stop reading and hand its stream to the app."""

    _reading: trio.CancelScope | None = None
    _released: trio.Event | None = None

    _uncounted = False  # no longer among this worker's open connections (relay.wire.balance)

    async def run(self) -> None:
        _connection.set(self)
        try:
            await super().run()
        finally:
            self._uncount()

    def _uncount(self) -> None:
        if _balance is not None and not self._uncounted:
            self._uncounted = True
            _balance.closed()

    async def _read_data(self) -> None:
        while True:
            if self._released is not None:
                await self._released.wait()  # the app owns the socket until its session ends
                break
            with trio.CancelScope() as self._reading:
                try:
                    with trio.fail_after(self.config.read_timeout or inf):
                        data = await self.stream.receive_some(tcp_server.MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
            if self._reading.cancelled_caught:
                continue  # taken over: no byte was read
            await self.protocol.handle(events.RawData(bytes(data)))
            if data == b"":
                break
        await self.protocol.handle(events.Closed())

    def stop_reading(self) -> None:
        self._released = trio.Event()
        if self._reading is not None:
            self._reading.cancel()

    def release(self) -> None:
        self._uncount()  # the session is over: the connection only closes from here
        if self._released is not None:
            self._released.set()


async def _app_send(self: ws_stream.WSStream, message: Any) -> None:
    if message is None or message["type"] != TAKE_OVER:
        await _original["app_send"](self, message)
        return
    server = _connection.get()
    if server is None or self.closed or self.state != ws_stream.ASGIWebsocketState.HANDSHAKE:
        raise RuntimeError("this WebSocket cannot be taken over")
    server.stop_reading()  # before the 101: the client sends nothing before it
    await self._accept({"type": "websocket.accept", "subprotocol": message.get("subprotocol")})
    self.closed = True  # Hypercorn leaves the stream alone from here: no pings, no close
    self.connection = None  # type: ignore[assignment]  # its wsproto state: never used again


async def take_over(
    send: Callable[[Any], Awaitable[None]], subprotocol: str | None
) -> tuple[trio.abc.Stream, Callable[[], None]] | None:
    """Accept the WebSocket and take its stream from Hypercorn, or None where it cannot.

    Returns the stream (the 101 is written) and the function that gives the
    connection back to Hypercorn to close; call it when the session is over.
    None (nothing sent) when not served by :class:`_TCPServer`; accept as usual then.
    """
    server = _connection.get()
    if server is None:
        return None
    await send({"type": TAKE_OVER, "subprotocol": subprotocol})
    return server.stream, server.release


#: This worker's share of the connections, once :func:`balance_accepts` ran (else None).
_balance: Balance | None = None


class _TrioBalancingListeners:
    """The ``trio`` module as Hypercorn's worker sees it once :func:`balance_accepts` ran:
    the same, but that its socket listeners take this worker's share (:data:`_balance`)."""

    def SocketListener(self, socket: trio.socket.SocketType) -> BalancedListener:  # noqa: N802
        assert _balance is not None
        return BalancedListener(socket, _balance)

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def balance_accepts(balance: Balance) -> None:
    """Have this process's Hypercorn accept its share of the connections on a listening
    socket it shares with other workers (once per worker process, before it serves).

    Where a name it relies on is missing, Hypercorn's own listeners accept instead (the
    workers still share the socket, as the kernel wakes them) and a warning says so.
    """
    global _balance
    missing = internals.problems(internals.BALANCE)
    if missing:
        log.warning(
            "Hypercorn's insides moved (%s): workers accept as the kernel wakes them, not"
            " evenly (see relay.wire.balance)",
            "; ".join(missing),
        )
        return
    _balance = balance
    trio_run.trio = _TrioBalancingListeners()  # type: ignore[assignment]


def problems() -> tuple[str, ...]:
    """What keeps the take-over from running with this Hypercorn (empty: nothing)."""
    return internals.problems(internals.TAKEOVER)


def install(*, permessage_deflate: bool) -> None:
    """Apply the changes above, once per process, if every name they touch is where they
    expect it (else none, with a warning: see :func:`problems`); ``permessage_deflate`` says
    whether clients may negotiate it."""
    _deflate["enabled"] = permessage_deflate
    if _original:
        return  # installed already
    if problems():
        _warn_once()
        return
    _original.update(
        accept=ws_stream.Handshake.accept,
        handle=ws_stream.WSStream.handle,
        app_send=ws_stream.WSStream.app_send,
    )
    ws_stream.Handshake.accept = functools.wraps(_original["accept"])(_accept)  # type: ignore[method-assign]
    ws_stream.WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    ws_stream.WSStream.handle = _stop_pings_once_closed(_original["handle"], _original["handle"])  # type: ignore[method-assign]
    ws_stream.WSStream.app_send = _stop_pings_once_closed(_app_send, _original["app_send"])  # type: ignore[method-assign]
    trio_run.TCPServer = _TCPServer  # type: ignore[misc]


_warned: list[bool] = []


def _warn_once() -> None:
    if not _warned:
        _warned.append(True)
        log.warning(
            "Hypercorn's insides moved (%s): WebSockets are served through plain ASGI messages"
            " (slower), and permessage-deflate is negotiated whenever a client offers it",
            "; ".join(problems()),
        )
