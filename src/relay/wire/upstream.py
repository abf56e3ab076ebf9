"""Dialing the Realtime API (or anything that speaks it, such as mockrealtime).

The relay's credential goes either in an ``Authorization: Bearer`` header (the
default, as server SDKs do) or in the ``openai-insecure-api-key.<key>``
subprotocol next to ``realtime`` (as browsers must). It is never part of the URL.

Dialing is split in two so that no resource is left open: :meth:`connect` returns the TCP
(or TLS) stream, which is closed whatever happens, and :meth:`handshake` runs the WebSocket
handshake over it (:func:`relay.wire.websocket.connect`).

A pair asks an :class:`UpstreamSource` for its upstream, already open: a target dials
(:class:`Dialed`), the warm pool (:mod:`relay.server.pool`) hands over a session it set up
before the client came, else dials.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urlsplit

import trio

from ..config import RelayConfig
from .tls import TLSSocketStream
from .websocket import WebSocket, connect


class Upstream(Protocol):
    """How a pair reaches its upstream (a socket dialer in production, memory in tests)."""

    async def connect(self) -> trio.abc.Stream:
        """A connected byte stream; raises OSError or trio.BrokenResourceError."""
        ...

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        """The WebSocket over ``stream``.

        Raises ``trio_websocket.ConnectionRejected`` when refused, OSError or
        trio.BrokenResourceError when the answer is no handshake or the connection drops.
        """
        ...


@dataclass(slots=True)
class Opened:
    """An open upstream: its WebSocket and the stream under it, which the pair now owns and
    closes whatever happens. ``created`` is set for a session the relay already set up (a
    pooled one, its ``session.update`` answered): the ``session.created`` the client gets
    (see :meth:`relay.core.bridge.Bridge.upstream_opened`)."""

    stream: trio.abc.Stream
    websocket: WebSocket
    created: str | None = None
    #: Trio time the upstream session began, where that was before this open (a pooled one):
    #: the Realtime API's 60-minute cap runs from then, not from the hand-over.
    since: float | None = None


class UpstreamSource(Protocol):
    """Where a pair gets its upstream from: a dialer, or the warm pool."""

    async def open(self) -> Opened:
        """The upstream, open; raises as :meth:`Upstream.connect` and
        :meth:`Upstream.handshake` do. Cancelled, it leaves nothing open."""
        ...


class Dialed:
    """An :class:`UpstreamSource` that dials each time: ``connect``, then ``handshake``."""

    __slots__ = ()

    async def open(self: Upstream) -> Opened:  # type: ignore[misc]
        stream = await self.connect()
        try:
            return Opened(stream, await self.handshake(stream))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise


@dataclass(frozen=True, slots=True)  # (one per live session)
class UpstreamTarget(Dialed):
    """One upstream session's address and credentials. Built per client."""

    host: str
    port: int
    resource: str
    ssl_context: ssl.SSLContext | None
    subprotocols: tuple[str, ...] | None
    headers: tuple[tuple[bytes, bytes], ...]
    max_message_bytes: int

    async def connect(self) -> trio.abc.Stream:
        """A TCP connection, with the TLS handshake done if the upstream is ``wss://``
        (the relay's own TLS, so that the pump can relay the leg: see relay.wire.tls)."""
        stream = await trio.open_tcp_stream(self.host, self.port)
        if self.ssl_context is None:
            return stream
        tls = TLSSocketStream(stream, self.ssl_context, server_hostname=self.host)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        default_port = 443 if self.ssl_context is not None else 80
        host = self.host if self.port == default_port else f"{self.host}:{self.port}"
        return await connect(
            stream,
            host,
            self.resource,
            subprotocols=self.subprotocols,
            headers=self.headers,
            max_message_bytes=self.max_message_bytes,
        )


def os_reason(exc: OSError) -> str:
    """ "connection refused" rather than trio's "all attempts to connect … failed"."""
    cause = exc.__cause__
    causes = cause.exceptions if isinstance(cause, BaseExceptionGroup) else (cause,)
    for inner in (exc, *causes):
        if isinstance(inner, OSError) and inner.errno and inner.errno > 0:
            return os.strerror(inner.errno).lower()
        if isinstance(inner, OSError) and inner.strerror:
            return inner.strerror.lower()
    return str(exc) or type(exc).__name__


async def probe(target: UpstreamTarget, timeout: float) -> BaseException | None:
    """Open and close a connection to the upstream (TCP, and TLS with its certificate checked
    for ``wss://``) within ``timeout``: None if it opened, else what stopped it."""
    try:
        with trio.fail_after(timeout):
            await trio.aclose_forcefully(await target.connect())
    except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        return exc
    return None


class UpstreamDialer:
    """Makes :class:`UpstreamTarget` objects from the relay's settings; one per app."""

    def __init__(self, config: RelayConfig) -> None:
        self._config = config
        url = urlsplit(config.upstream_url)
        self._secure = url.scheme == "wss"
        self._host = url.hostname or ""
        self._port = url.port or (443 if self._secure else 80)
        self._path = url.path or "/"
        # One context per app: building it loads the CA store, which takes milliseconds.
        self._ssl_context = ssl.create_default_context() if self._secure else None
        key = config.openai_api_key
        if config.upstream_auth == "header":
            self._headers: tuple[tuple[bytes, bytes], ...] = (
                (b"authorization", b"Bearer " + key.encode()),
            )
            self._subprotocols: tuple[str, ...] | None = None
        else:
            self._headers = ()
            self._subprotocols = ("realtime", "openai-insecure-api-key." + key)

    def target(self, model: str, safety_identifier: str | None = None) -> UpstreamTarget:
        """Where one session goes: ``model``, and the client's ``OpenAI-Safety-Identifier``
        (see :func:`relay.usage.auth.safety_identifier`) if it has one."""
        headers = self._headers
        if safety_identifier is not None:
            headers = (*headers, (b"openai-safety-identifier", safety_identifier.encode()))
        return self._target(f"model={quote(model, safe='')}", headers)

    def sideband(self, call_id: str) -> UpstreamTarget:
        """The sideband of a WebRTC or SIP call: the same endpoint, ``?call_id=``."""
        return self._target(f"call_id={quote(call_id, safe='')}", self._headers)

    def _target(self, query: str, headers: tuple[tuple[bytes, bytes], ...]) -> UpstreamTarget:
        return UpstreamTarget(
            host=self._host,
            port=self._port,
            resource=f"{self._path}?{query}",
            ssl_context=self._ssl_context,
            subprotocols=self._subprotocols,
            headers=headers,
            max_message_bytes=self._config.upstream_max_message_bytes,
        )
