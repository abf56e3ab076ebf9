"""Dialing the Realtime API (or anything that speaks it, such as mockrealtime).

The relay's credential goes either in an ``Authorization: Bearer`` header (the
default, as server SDKs do) or in the ``openai-insecure-api-key.<key>``
subprotocol next to ``realtime`` (as browsers must). It is never part of the URL.
"""

from __future__ import annotations

import ssl
from contextlib import AbstractAsyncContextManager
from urllib.parse import quote

from trio_websocket import WebSocketConnection, open_websocket_url

from .config import RelayConfig

#: Upstream messages trio-websocket may hold while the client is slow to take them.
#: Small, so a stalled client quickly stalls the upstream read (TCP backpressure),
#: yet large enough that a short hiccup does not stop the reader answering pings.
UPSTREAM_QUEUE_MESSAGES = 4

#: Read size on the upstream socket: one 20 ms audio delta (about 6.5 KB) per read.
RECEIVE_BUFFER_BYTES = 64 * 1024


class UpstreamDialer:
    """Opens upstream connections with the relay's settings; one per app."""

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        self._ssl_context = (
            ssl.create_default_context() if config.upstream_url.startswith("wss:") else None
        )

    def url_for(self, model: str) -> str:
        return f"{self._config.upstream_url}?model={quote(model, safe='')}"

    def open(self, model: str) -> AbstractAsyncContextManager[WebSocketConnection]:
        """An async context manager for one upstream connection.

        Raises ``HandshakeError`` (``ConnectionTimeout`` after the dial timeout,
        ``ConnectionRejected`` on an HTTP refusal) if it cannot open.
        """
        config = self._config
        key = config.openai_api_key
        headers: list[tuple[bytes, bytes]] = []
        subprotocols: list[str] | None = None
        if config.upstream_auth == "header":
            headers.append((b"authorization", b"Bearer " + key.encode()))
        else:
            subprotocols = ["realtime", "openai-insecure-api-key." + key]
        return open_websocket_url(
            self.url_for(model),
            self._ssl_context,
            subprotocols=subprotocols,
            extra_headers=headers,
            message_queue_size=UPSTREAM_QUEUE_MESSAGES,
            max_message_size=config.upstream_max_message_bytes,
            receive_buffer_size=RECEIVE_BUFFER_BYTES,
            connect_timeout=config.dial_timeout,
            disconnect_timeout=config.close_timeout,
        )
