"""What the relay changes in Hypercorn, in one place (hypercorn is pinned for this).

Hypercorn 0.18 always accepts permessage-deflate when a client offers it, and
browsers always offer it; there is no setting (hypercorn issue #307). On base64
audio it costs two to nine times the CPU of the message itself and saves only
the base64 overhead, so the relay declines it unless RELAY_PERMESSAGE_DEFLATE is
on. The switch is per process, because it patches Hypercorn's handshake class.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from hypercorn.protocol import ws_stream

_original_accept = ws_stream.Handshake.accept
_deflate = {"enabled": False}


def _accept(
    self: ws_stream.Handshake,
    subprotocol: str | None,
    additional_headers: Iterable[tuple[bytes, bytes]],
) -> Any:
    if not _deflate["enabled"]:
        self.extensions = None  # as if the client had offered no extension
    return _original_accept(self, subprotocol, additional_headers)


def set_permessage_deflate(enabled: bool) -> None:
    """Whether client connections in this process may negotiate permessage-deflate."""
    _deflate["enabled"] = enabled
    ws_stream.Handshake.accept = _accept  # type: ignore[method-assign]
