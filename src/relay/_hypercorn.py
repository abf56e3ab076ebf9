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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from hypercorn.protocol import ws_stream
from wsproto.events import Ping

_original_accept = ws_stream.Handshake.accept
_original_handle = ws_stream.WSStream.handle
_original_app_send = ws_stream.WSStream.app_send
_deflate = {"enabled": False}


def _accept(
    self: ws_stream.Handshake,
    subprotocol: str | None,
    additional_headers: Iterable[tuple[bytes, bytes]],
) -> Any:
    if not _deflate["enabled"]:
        self.extensions = None  # as if the client had offered no extension
    return _original_accept(self, subprotocol, additional_headers)


async def _send_pings(self: ws_stream.WSStream) -> None:
    with trio.CancelScope() as self._relay_pings:  # type: ignore[attr-defined]
        while not self.closed:
            await self._send_wsproto_event(Ping())
            await trio.sleep(self.config.websocket_ping_interval)  # type: ignore[arg-type]


def _stop_pings_once_closed(
    method: Callable[..., Awaitable[None]],
) -> Callable[..., Awaitable[None]]:
    async def wrapped(self: ws_stream.WSStream, event: Any) -> None:
        await method(self, event)
        if self.closed and (pings := getattr(self, "_relay_pings", None)) is not None:
            pings.cancel()

    return wrapped


def install(*, permessage_deflate: bool) -> None:
    """Apply the changes above; ``permessage_deflate`` says whether clients may negotiate it."""
    _deflate["enabled"] = permessage_deflate
    ws_stream.Handshake.accept = _accept  # type: ignore[method-assign]
    ws_stream.WSStream._send_pings = _send_pings  # type: ignore[method-assign]
    ws_stream.WSStream.handle = _stop_pings_once_closed(_original_handle)  # type: ignore[method-assign]
    ws_stream.WSStream.app_send = _stop_pings_once_closed(_original_app_send)  # type: ignore[method-assign]
