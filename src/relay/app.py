"""The relay as a raw ASGI application: routing, HTTP endpoints and the WebSocket handshake.

Raw ASGI rather than a framework: the hot path is one ``receive``/``send`` pair
per message, and the handshake needs the ASGI denial-response extension and
exact control of subprotocol selection, both simpler without a layer between.

Routes:

* WebSocket ``/voice`` and ``/v1/realtime`` (the OpenAI path, so SDKs pointed at
  the relay work), with ``?model=`` checked against the allow-list;
* ``GET /healthz`` (alive), ``GET /readyz`` (taking sessions; ``?upstream=1`` also checks
  the upstream is reachable), ``GET /metrics`` (Prometheus);
* ``GET /`` and ``/static/…`` serve the demo page;
* a plain HTTP request on a WebSocket path gets 400, any other path 404.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import orjson
import trio
from trio_websocket import ConnectionClosed

from . import _hypercorn
from .accounting import Accounting, usage_json
from .auth import Authenticator, Identity, Refusal, parse_api_keys
from .bridge import Bridge, Limits, Message
from .closecodes import Code
from .config import ConfigError, RelayConfig, load_config
from .deadlines import Deadlines
from .events import dumps, error_event
from .metrics import RelayMetrics
from .mint import MAX_BODY_BYTES as MAX_MINT_BODY
from .mint import Minter
from .overload import SAMPLE_SECONDS, LoadGuard, Thresholds, newest_to_shed
from .pair import Pair
from .upstream import UpstreamDialer
from .usage import open_store
from .pump import Pump
from .websocket import WebSocket

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

WEBSOCKET_PATHS = frozenset({"/voice", "/v1/realtime"})
#: Seconds the usage store may take to admit a session before the handshake gets 503.
STORE_TIMEOUT = 5.0
#: Seconds ``/readyz?upstream=1`` gives the upstream to accept a TCP (and TLS) connection.
READY_UPSTREAM_TIMEOUT = 2.0
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"
#: Unread bytes from one side that make a session count as behind: ten 20 ms audio events.
BEHIND_BYTES = 64 * 1024
#: CPU demand (share of a core) from which the load watcher looks at the backlogs (it costs
#: a system call per session looked at) and the pump stops polling (Pump.set_busy).
BUSY = 0.5
#: Sessions whose backlogs one sample looks at, chosen at random: the share behind is
#: estimated from them (about ±6 % for one sample, smoothed over ten), not counted over
#: thousands of sessions ten times a second.
BEHIND_SAMPLE = 64

log = logging.getLogger("relay")


#: What Hypercorn's socket writes raise when the client's connection is going away. Busy:
#: Hypercorn half-closes the socket (send_eof) without its send lock when the client hangs up,
#: so a write racing that raises BusyResourceError.
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError)


class AsgiClient:
    """The client's WebSocket over ASGI, as :class:`relay.pair.ClientSide`."""

    __slots__ = ("_receive", "_send", "_send_timeout")

    websocket = None  # Hypercorn reads and writes the socket

    def __init__(self, receive: Receive, send: Send, send_timeout: float = math.inf) -> None:
        self._receive = receive
        self._send = send
        self._send_timeout = send_timeout

    async def receive(self) -> Message | None:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                return text if text is not None else (message.get("bytes") or b"")
            if kind == "websocket.disconnect":
                return None

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
    """The client's WebSocket once the relay owns its socket, as :class:`relay.pair.ClientSide`."""

    __slots__ = ("websocket",)

    def __init__(self, ws: WebSocket) -> None:
        self.websocket = ws

    async def receive(self) -> Message | None:
        try:
            return await self.websocket.get_message()
        except ConnectionClosed:
            return None

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


class RelayApp:
    """One relay: its settings, its upstream dialer and the pairs it is running."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self.dialer = UpstreamDialer(config)
        self.limits = Limits(
            queue_messages=config.queue_messages,
            queue_bytes=config.queue_bytes,
            max_message_bytes=config.max_message_bytes,
        )
        self.session_update = dumps({"type": "session.update", "session": config.session_object()})
        self.auth = Authenticator(
            api_keys=parse_api_keys(config.api_keys),
            jwt_secret=config.jwt_secret,
            jwt_public_key=config.jwt_public_key,
            allowed_origins=config.allowed_origins,
            anonymous=config.allow_anonymous,
        )
        if not self.auth.configured and not config.allow_anonymous:
            raise ConfigError(
                "no client authentication is configured, so anyone who finds this relay could"
                " spend its OpenAI key. Set RELAY_API_KEYS (see `relay keygen`), RELAY_JWT_SECRET"
                " or RELAY_JWT_PUBLIC_KEY, or pass --allow-anonymous (RELAY_ALLOW_ANONYMOUS=true)."
            )
        #: Live pairs, oldest first (load shedding closes the newest).
        self.pairs: dict[Pair, None] = {}
        self.guard = LoadGuard(
            Thresholds(
                refuse_cpu=config.overload_cpu,
                refuse_lag=config.overload_lag,
                shed_cpu=config.shed_cpu,
                shed_lag=config.shed_lag,
                refuse_behind=config.overload_behind,
                shed_behind=config.shed_behind,
            )
        )
        #: WebSocket connections past the load checks and not yet over (for RELAY_MAX_SESSIONS).
        self._handshakes = 0
        self.draining = False
        #: Set whenever the last live pair ends (the drain waits on it).
        self._no_pairs = trio.Event()
        self._grace: trio.CancelScope | None = None
        self._started = trio.Event()
        self.minter = Minter(config)
        self.metrics = RelayMetrics()
        #: Moves plain-socket sessions' messages (relay.pump) while the lifespan runs.
        self.pump: Pump | None = None
        #: Usage, leases and budgets; set when the lifespan opens the store.
        self.accounting: Accounting | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    # -- HTTP ---------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/healthz":
            await _respond(send, 200, {"status": "ok"})
        elif path == "/readyz":
            await self._readyz(scope, send)
        elif path == "/metrics":
            body, content_type = self.metrics.render(_header(scope, b"accept"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", content_type),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
        elif path == "/v1/realtime/client_secrets" and scope["method"] == "POST":
            await self._mint(scope, receive, send)
        elif path == "/admin/usage":
            await self._admin_usage(scope, send)
        elif path == "/" or path.startswith("/static/"):
            await _static(send, "index.html" if path == "/" else path[len("/static/"):])
        elif path in WEBSOCKET_PATHS:
            await _respond(
                send,
                400,
                {
                    "error": f"{path} is a WebSocket endpoint: connect with a WebSocket client"
                    " (Upgrade: websocket), not a plain HTTP request."
                },
            )
        else:
            await _respond(send, 404, {"error": f"no such endpoint: {path}"})

    async def _mint(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/realtime/client_secrets`` for an authenticated relay client."""
        try:
            identity = self.auth.authenticate(scope["headers"], ())
        except Refusal as refused:
            await _respond(send, refused.status, {"error": {"code": refused.code, "message": refused.message}})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_MINT_BODY:
                await _respond(send, 413, {"error": {"code": "too_large", "message": "body over 64 KiB"}})
                return
            if not message.get("more_body"):
                break
        status, answer = await self.minter.mint(identity, body, self.accounting)
        log.info("client key minted for %s: HTTP %d", identity.user, status)
        await _respond(send, status, answer)

    async def _readyz(self, scope: Scope, send: Send) -> None:
        """Ready means: started, not draining, and (with ``?upstream=1``) the upstream reachable."""
        if self.draining:
            await _respond(send, 503, {"status": "draining", "sessions": len(self.pairs)})
            return
        if self.accounting is None:
            await _respond(send, 503, {"status": "starting"})
            return
        if not self.guard.admitting:
            await _respond(
                send,
                503,
                {"status": "overloaded", "cpu": round(self.guard.cpu, 2), "lag": round(self.guard.lag, 3)},
            )
            return
        if _query_param(scope, "upstream") in ("1", "true"):
            try:
                with trio.fail_after(READY_UPSTREAM_TIMEOUT):
                    await trio.aclose_forcefully(await self.dialer.target(self.config.model).connect())
            except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                detail = "timed out" if isinstance(exc, trio.TooSlowError) else exc.__class__.__name__
                await _respond(send, 503, {"status": "upstream unreachable", "detail": detail})
                return
        await _respond(send, 200, {"status": "ready", "sessions": len(self.pairs)})

    async def _admin_usage(self, scope: Scope, send: Send) -> None:
        """``GET /admin/usage?day=&user=``: the usage table as JSON, for the admin token only."""
        token = self.config.admin_token
        if not token:
            await _respond(send, 404, {"error": "the admin endpoint is off; set RELAY_ADMIN_TOKEN"})
            return
        offered = _header(scope, b"authorization") or b""
        if not hmac.compare_digest(offered, b"Bearer " + token.encode()):
            await _respond(send, 401, {"error": "send Authorization: Bearer <RELAY_ADMIN_TOKEN>"})
            return
        if self.accounting is None:
            await _respond(send, 503, {"error": "the relay is still starting"})
            return
        rows = await self.accounting.store.rows(
            day=_query_param(scope, "day"), user=_query_param(scope, "user")
        )
        await _respond(send, 200, {"rows": [usage_json(row) for row in rows]})

    # -- WebSocket ----------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        path = scope["path"]
        if path not in WEBSOCKET_PATHS:
            await self._deny(send, 404, f"no WebSocket endpoint at {path}; use /voice or /v1/realtime")
            return
        if self.draining:
            await self._deny(send, 503, "the relay is shutting down; connect again in a moment")
            return
        if not self.guard.admitting:
            await self._deny(
                send, 503, "the relay is overloaded; connect again shortly", code="relay_overloaded"
            )
            return
        if self.config.max_sessions and self._handshakes >= self.config.max_sessions:
            await self._deny(
                send,
                503,
                f"the relay is at its limit of {self.config.max_sessions} sessions"
                " (RELAY_MAX_SESSIONS); connect again shortly",
                code="relay_full",
            )
            return
        self._handshakes += 1
        try:
            await self._admitted(scope, receive, send)
        finally:
            self._handshakes -= 1

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate, admit against the user's limits, then run the session."""
        offered = scope.get("subprotocols") or ()
        accounting = self.accounting
        if accounting is None:
            await self._deny(send, 503, "the relay is still starting; connect again in a moment")
            return
        session_id = secrets.token_hex(8)
        try:
            identity = self.auth.authenticate(scope["headers"], offered)
            refusal = self._refusal(scope, offered, identity)
            if refusal is not None:  # refused after accept, as the Realtime API does: no session
                client = await _accept(send, receive, offered)
                code, message, reason = refusal
                await client.send(error_event(code, message))
                await client.close(Code.INVALID_REQUEST, reason)
                await client.wait_closed(self.config.close_timeout)
                return
            with trio.fail_after(STORE_TIMEOUT):
                await accounting.admit(identity, session_id)
        except Refusal as refused:
            log.info("handshake refused: %s (HTTP %d)", refused.code, refused.status)
            if self.config.browser_refusals == "close" and _header(scope, b"origin") is not None:
                # A page cannot read a refused handshake's status; a close code it can read.
                client = await _accept(send, receive, offered)
                await client.send(error_event(refused.code, refused.message))
                await client.close(4000 + refused.status, refused.code)
                await client.wait_closed(self.config.close_timeout)
            else:
                await self._deny(send, refused.status, refused.message, code=refused.code)
            return
        except (trio.TooSlowError, OSError) as exc:
            log.error("usage store unavailable at admission: %r", exc)
            await self._deny(send, 503, "the relay's usage store is not answering; try again shortly")
            return
        started = trio.current_time()
        bridge = Bridge(
            session_update=self.session_update,
            limits=self.limits,
            secret=self.config.openai_api_key,
            binary_as_audio=self.config.binary_frames == "audio",
            policy=self.config.policy.for_session(
                _query_param(scope, "model") or self.config.model, identity.model
            ),
        )
        try:
            if accounting.holds_leases:
                async with trio.open_nursery() as lease:
                    lease.start_soon(accounting.keep_lease, identity, session_id)
                    await self._session(scope, receive, send, offered, identity, session_id, bridge, accounting)
                    lease.cancel_scope.cancel()
            else:  # no nursery: every idle session's memory counts
                await self._session(scope, receive, send, offered, identity, session_id, bridge, accounting)
        finally:
            await accounting.finish(identity, session_id, bridge.traffic, trio.current_time() - started)

    async def _deny(self, send: Send, status: int, message: str, *, code: str | None = None) -> None:
        self.metrics.refused(status)
        await _deny(send, status, message, code=code)

    async def _session(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        offered: Any,
        identity: Identity,
        session_id: str,
        bridge: Bridge,
        accounting: Accounting,
    ) -> None:
        """Accept the WebSocket and run its pair to its end."""
        subprotocol = "realtime" if "realtime" in offered else None
        taken = await _hypercorn.take_over(send, subprotocol)
        client: AsgiClient | SocketClient
        if taken is None:
            client = await _accept(send, receive, offered, self.config.send_timeout)
            release = None
        else:
            stream, release = taken
            ws = WebSocket(
                stream,
                client=False,
                max_message_bytes=client_frame_limit(self.config.max_message_bytes),
                subprotocol=subprotocol,
            )
            ws.send_timeout = self.config.send_timeout
            client = SocketClient(ws)
        model = _query_param(scope, "model") or self.config.model
        pair = Pair(
            client,
            bridge,
            self.dialer.target(model),
            dial_timeout=self.config.dial_timeout,
            close_timeout=self.config.close_timeout,
            send_timeout=self.config.send_timeout,
            on_responses_done=partial(accounting.record_responses, identity),
            deadlines=Deadlines(
                trio.current_time(),
                max_seconds=_tightest(self.config.max_session_seconds, identity.max_session_seconds),
                idle_seconds=self.config.idle_timeout,
                lead=self.config.limit_warning_seconds,
            ),
            ping_interval=self.config.ping_interval,
            peer_timeout=self.config.peer_timeout,
            on_voice_latency=self.metrics.voice_latency,
            on_upstream_opened=self.metrics.upstream_opened,
            pump=self.pump,
        )
        self.pairs[pair] = None
        if self._no_pairs.is_set():
            self._no_pairs = trio.Event()
        metrics = self.metrics
        metrics.session_started(bridge.traffic)
        started = trio.current_time()
        log.info(
            "session started",
            extra={"fields": {"session": session_id, "user": identity.user, "model": model}},
        )
        ending = None
        try:
            ending = await pair.run()
            if ending.client_code is not None:
                await client.wait_closed(self.config.close_timeout)
        finally:
            if release is not None:
                release()  # Hypercorn closes the connection
            self.pairs.pop(pair, None)
            if not self.pairs:
                self._no_pairs.set()
            metrics.session_ended(
                bridge.traffic,
                ending.cause if ending else "error",
                ending.client_code if ending else None,
            )
            traffic = bridge.traffic
            log.info(
                "session ended",
                extra={
                    "fields": {
                        "session": session_id,
                        "user": identity.user,
                        "seconds": round(trio.current_time() - started, 3),
                        "cause": ending.cause.value if ending else "error",
                        "client_code": ending.client_code if ending else None,
                        "upstream_code": ending.upstream_code if ending else None,
                        "client_messages": traffic.client_messages,
                        "client_bytes": traffic.client_bytes,
                        "upstream_messages": traffic.upstream_messages,
                        "upstream_bytes": traffic.upstream_bytes,
                        "responses": bridge.responses_seen,
                    }
                },
            )

    def _refusal(self, scope: Scope, offered: Any, identity: Identity) -> tuple[str, str, str] | None:
        """Why this connection cannot start (error code, message, close reason), if so."""
        beta_header = any(
            name == b"openai-beta" and b"realtime=v1" in value for name, value in scope["headers"]
        )
        if beta_header or BETA_SUBPROTOCOL in offered:
            return (
                "beta_api_shape_disabled",
                "This relay speaks the GA Realtime API; the beta dialect (OpenAI-Beta:"
                " realtime=v1) has been retired. Drop the beta header/subprotocol and use"
                " GA event names.",
                "invalid_request_error.beta_api_shape_disabled",
            )
        model = _query_param(scope, "model")
        if model is not None and model not in self.config.allowed_models:
            allowed = ", ".join(sorted(self.config.allowed_models))
            return (
                "invalid_model",
                f"Model {model!r} is not available through this relay. Allowed: {allowed}.",
                "invalid_request_error.invalid_model",
            )
        if identity.model is not None and (model or self.config.model) != identity.model:
            return (
                "invalid_model",
                f"Your token allows only the model {identity.model!r}; connect with"
                f" ?model={identity.model}.",
                "invalid_request_error.invalid_model",
            )
        return None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the usage store and watch the load for the app's lifetime (the lifespan task
        outlives every session)."""
        async with trio.open_nursery() as nursery:
            if self.guard.enabled or self.config.busy_poll:  # (the pump polls only when idle)
                nursery.start_soon(self._watch_load)
            self.pump = Pump(busy_poll=self.config.busy_poll)
            nursery.start_soon(self.pump.run)
            try:
                await self._lifespan_events(receive, send)
            finally:
                self.pump = None
                nursery.cancel_scope.cancel()

    def _cpu_demand(self) -> float:
        """CPU seconds the worker has used or waited for, less the time its pump polled."""
        return cpu_demand_seconds() - (self.pump.polled if self.pump is not None else 0.0)

    async def _watch_load(self) -> None:
        """Sample the event loop's lag and the worker's CPU demand: let the pump poll only while
        the worker is not busy, and shed the newest sessions when the guard says so."""
        await self._started.wait()  # start-up work is not load
        async with trio.open_nursery() as shedding:
            cpu_before, before = self._cpu_demand(), trio.current_time()
            while True:
                asked = before + SAMPLE_SECONDS
                await trio.sleep_until(asked)
                cpu_now, now = self._cpu_demand(), trio.current_time()
                live = [pair for pair in self.pairs if pair.bridge.ending is None]
                cpu = max(0.0, cpu_now - cpu_before) / (now - before)
                behind = 0.0
                busy = max(cpu, self.guard.cpu) >= BUSY
                if self.pump is not None:
                    self.pump.set_busy(busy)
                if live and busy and self.guard.enabled:
                    looked_at = random.sample(live, min(len(live), BEHIND_SAMPLE))
                    behind = sum(pair.behind(BEHIND_BYTES) for pair in looked_at) / len(looked_at)
                shed = self.guard.sample(
                    cpu=cpu, lag=now - asked, now=now, sessions=len(live), behind=behind
                )
                cpu_before, before = cpu_now, now
                if shed:
                    newest = newest_to_shed(self.pairs, shed, _ending)
                    log.warning(
                        "overloaded (%.0f%% of a core, loop lag %.0f ms, %.0f%% of sessions"
                        " behind): closing the %d newest of %d sessions",
                        self.guard.cpu * 100,
                        self.guard.lag * 1000,
                        self.guard.behind * 100,
                        len(newest),
                        len(live),
                    )
                    for pair in newest:
                        shedding.start_soon(pair.shed)

    async def _lifespan_events(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    store = await open_store(self.config.store)
                except Exception as exc:  # any failure to open the store fails start-up
                    message_text = f"cannot open RELAY_STORE {self.config.store!r}: {exc}"
                    await send({"type": "lifespan.startup.failed", "message": message_text})
                    return
                self.accounting = Accounting(
                    store,
                    max_sessions=self.config.max_sessions_per_user,
                    daily_budget=self.config.daily_token_budget,
                )
                await send({"type": "lifespan.startup.complete"})
                self._started.set()
            elif message["type"] == "lifespan.shutdown":
                if self.accounting is not None:
                    await self.accounting.store.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def hurry_drain(self) -> None:
        """Cut the drain's grace time short: close the remaining sessions now."""
        if self._grace is not None:
            self._grace.cancel()

    async def drain(self, grace: float) -> None:
        """Stop taking sessions, give live ones ``grace`` seconds, then close the rest with 1012.

        Readiness turns 503 at once, so a load balancer stops sending clients here;
        every live client is told (``relay_draining``) how long it has. Pairs run on
        unchanged meanwhile, so nothing a client sent is lost.
        """
        self.draining = True
        log.info("draining: %d live sessions, %g s to finish", len(self.pairs), grace)
        async with trio.open_nursery() as nursery:
            for pair in list(self.pairs):
                nursery.start_soon(pair.notify, pair.bridge.draining_notice(grace))
        with trio.move_on_after(grace) as self._grace:
            while self.pairs:
                await self._no_pairs.wait()
        while self.pairs:  # also any session admitted while the drain began
            async with trio.open_nursery() as nursery:
                for pair in list(self.pairs):
                    nursery.start_soon(pair.shutdown)
            if self.pairs:
                await self._no_pairs.wait()


async def _accept(
    send: Send, receive: Receive, offered: Any, send_timeout: float = math.inf
) -> AsgiClient:
    """Complete the handshake, selecting ``realtime`` if offered (never a token-bearing one)."""
    await send({"type": "websocket.accept", "subprotocol": "realtime" if "realtime" in offered else None})
    return AsgiClient(receive, send, send_timeout)


def create_app(config: RelayConfig | None = None) -> RelayApp:
    """The relay's ASGI app. With no config, settings come from the environment and
    the relay's log output is set up here, as ``relay serve`` does (again: it replaces
    its own handler): that is what ``hypercorn -k trio 'relay.app:create_app()'`` uses.
    Hypercorn's ``-w`` runs several processes, so each line names its ``pid``."""
    if config is None:
        config = load_config(os.environ)
        from .logs import configure_logging

        secrets = (config.openai_api_key, config.jwt_secret, config.admin_token)
        fields = {"pid": os.getpid()}
        configure_logging(config.log_format, config.log_level, secrets=secrets, fields=fields)
    _hypercorn.install(permessage_deflate=config.permessage_deflate)
    return RelayApp(config)


def _ending(pair: Pair) -> bool:
    return pair.bridge.ending is not None


def cpu_demand_seconds() -> float:
    """CPU seconds the process has used, plus (on Linux) the seconds its event-loop thread
    spent runnable but waiting for a core.

    On a machine shared with other busy processes a relay that cannot keep up may use only
    half a core, starved rather than busy; what it *wanted* is what says it is overloaded.
    """
    used = time.process_time()
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            waited = int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return used  # not Linux (or no scheduler statistics): use alone
    return used + waited


def _tightest(*limits: float | None) -> float:
    """The smallest of the limits that are set (0 or None: not set); 0 if none is."""
    return min((limit for limit in limits if limit), default=0.0)


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


def _query_param(scope: Scope, name: str) -> str | None:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(name)
    return values[0] if values else None




def _json_response_start(status: int, body: bytes) -> dict[str, Any]:
    return {
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }


async def _respond(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = orjson.dumps(payload) + b"\n"
    await send({"type": "http.response.start", **_json_response_start(status, body)})
    await send({"type": "http.response.body", "body": body})


STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".wav": b"audio/wav",
}


async def _static(send: Send, name: str) -> None:
    """Serve a file of the demo page from the package (no directory walking)."""
    path = STATIC_DIR / name
    if "/" in name or name.startswith(".") or path.suffix not in CONTENT_TYPES or not path.is_file():
        await _respond(send, 404, {"error": f"no such file: {name}"})
        return
    body = path.read_bytes()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", CONTENT_TYPES[path.suffix]),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-cache"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _deny(send: Send, status: int, message: str, *, code: str | None = None) -> None:
    """Refuse a WebSocket handshake with an HTTP status and a JSON body."""
    body = orjson.dumps({"error": message, "code": code} if code else {"error": message}) + b"\n"
    start = _json_response_start(status, body)
    if status == 401:
        start["headers"].append((b"www-authenticate", b'Bearer realm="relay"'))
    await send({"type": "websocket.http.response.start", **start})
    await send({"type": "websocket.http.response.body", "body": body})
