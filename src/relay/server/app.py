"""The relay as a raw ASGI application: routing, the WebSocket handshake, the session's life
and the app's own (lifespan, drain).

Routes: WebSocket ``/voice`` and ``/v1/realtime`` (the OpenAI path, so SDKs pointed at the
relay work), with ``?model=`` checked against the allow-list, and ``/twilio`` for phone calls
(:mod:`relay.server.phone`); plain HTTP goes to :mod:`relay.server.http`. A WebSocket is
admitted in steps: the worker's own state (draining, overloaded, full), the client's identity
(:mod:`relay.usage.auth`), the session's request (:mod:`relay.server.admission`), the user's
limits (:mod:`relay.usage.accounting`); then its :class:`~relay.server.pair.Pair` runs to its end.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import trio

from ..config import ConfigError, RelayConfig, deprecation_warning, load_config
from ..core.beta import BetaBridge, BetaTranslator, asks_for_beta
from ..core.bridge import SETUP_EVENT_ID, Bridge, Cause, Limits
from ..core.closecodes import Code
from ..core.deadlines import Deadlines
from ..core.events import dumps, error_event
from ..core.ledger import Ledger
from ..core.warmpool import PoolKey, PoolLedger
from ..ops.metrics import RelayMetrics
from ..ops.overload import LoadGuard, Thresholds
from ..ops.records import DRAIN_SECONDS, Recorder
from ..usage.accounting import Accounting
from ..usage.auth import (
    Authenticator,
    Identity,
    Refusal,
    parse_api_keys,
    safety_identifier,
    safety_key,
)
from ..usage.mint import Minter
from ..usage.sip import Callers
from ..usage.store import open_store
from ..usage.webhooks import secret_key
from ..wire import takeover
from ..wire.pump import Pump, prove
from ..wire.upstream import UpstreamDialer
from ..wire.websocket import WebSocket
from . import admission
from .asgi import Receive, Scope, Send, deny, header, offers_deflate
from .call import Call
from .http import handle_http
from .legs import AsgiClient, SocketClient, accept, client_frame_limit
from .loadwatch import watch_load
from .notes import SessionNotes
from .pair import ClientSide, Pair, Takeover
from .phone import TWILIO_PATH, PhoneLine
from .pool import WarmPool
from .resume import RESUME_SUBPROTOCOL, Resumable, ResumeRefused, Resumes, asks_to_resume
from .sideband import Calls

if TYPE_CHECKING:
    from ..ops.tracing import Tracer

WEBSOCKET_PATHS = frozenset({"/voice", "/v1/realtime"})
#: Seconds the usage store may take to admit a session before the handshake gets 503.
STORE_TIMEOUT = 5.0

log = logging.getLogger("relay")


class Admitted(NamedTuple):
    """A WebSocket session admitted, and what it will run with."""

    identity: Identity
    session_id: str
    bridge: Bridge
    model: str
    offered: Any  # the subprotocols the client offered
    deflate_offered: bool


class RelayApp:
    """One relay: its settings, its upstream dialer and the pairs it is running."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        #: Phone calls through Twilio (POST /twilio/voice and /twilio), when configured.
        self.phone = PhoneLine(self) if config.twilio_auth_token else None
        self.websocket_paths = WEBSOCKET_PATHS | ({TWILIO_PATH} if self.phone else set())
        self.dialer = UpstreamDialer(config)
        self.limits = Limits(
            queue_messages=config.queue_messages,
            queue_bytes=config.queue_bytes,
            max_message_bytes=config.max_message_bytes,
        )
        # Its event_id lets the bridge tell an upstream error about it from any other.
        self.session = config.session_object()
        self.session_update = dumps(
            {"type": "session.update", "event_id": SETUP_EVENT_ID, "session": self.session}
        )
        #: How sessions move to a new upstream (None: RELAY_FAILOVER_ATTEMPTS=0, they don't).
        self.takeover = (
            Takeover(
                attempts=config.failover_attempts,
                backoff_seconds=config.failover_backoff,
                rollover_seconds=config.rollover_seconds,
            )
            if config.failover_attempts
            else None
        )
        #: Keys the OpenAI-Safety-Identifier of each session's user (None: none is sent).
        self._safety_key = (
            safety_key(config.openai_api_key) if config.safety_identifier == "hash" else None
        )
        #: Serves the clients that speak the retired beta dialect (RELAY_BETA=translate).
        self.beta = BetaTranslator(config.aliases)
        self.auth = Authenticator(
            api_keys=parse_api_keys(config.api_keys),
            jwt_secret=config.jwt_secret,
            jwt_public_key=config.jwt_public_key,
            allowed_origins=config.allowed_origins,
            anonymous=config.allow_anonymous,
        )
        if not self.auth.configured and not config.allow_anonymous and not config.sip_callers:
            raise ConfigError(
                "no client authentication is configured, so anyone who finds this relay could"
                " spend its OpenAI key. Set RELAY_API_KEYS (see `relay keygen`), RELAY_JWT_SECRET"
                " or RELAY_JWT_PUBLIC_KEY (or, for phones only, RELAY_SIP_CALLERS), or pass"
                " --allow-anonymous (RELAY_ALLOW_ANONYMOUS=true)."
            )
        #: Live pairs, oldest first (load shedding closes the costliest, newest first among equals).
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
        self.started = trio.Event()
        self.minter = Minter(config)
        self.metrics = RelayMetrics()
        #: Moves plain-socket sessions' messages (relay.wire.pump) while the lifespan runs, once
        #: it has proved it works here (RELAY_PUMP); else None, and pairs relay by their tasks.
        self.pump: Pump | None = None
        #: Whether WebSockets are taken over from Hypercorn (relay.wire.takeover): not where a
        #: name it relies on is missing, which takeover.install has said (a warning).
        self.taking_over = not takeover.problems()
        self.metrics.takeover(self.taking_over)
        #: Usage, leases and budgets; set when the lifespan opens the store.
        self.accounting: Accounting | None = None
        #: Call records (RELAY_RECORDS, RELAY_RECORDS_WEBHOOK), written while the lifespan runs.
        self.recorder: Recorder | None = None
        if config.records or config.records_webhook:
            self.recorder = Recorder(
                directory=config.records,
                audio=config.records_audio,
                retention_days=config.records_retention_days,
                webhook=config.records_webhook,
                secret=config.records_webhook_secret,
            )
        #: Spans of sessions and turns (OTEL_EXPORTER_OTLP_ENDPOINT); set when the lifespan starts.
        self.tracer: Tracer | None = None
        #: Sessions waiting for (or able to take) their client's resume, by token; this
        #: process's only (relay.server.resume).
        self.resumes = Resumes()
        #: WebRTC and SIP calls, watched from their sidebands (relay.server.sideband).
        self.calls = Calls(self)
        self.callers = Callers(config.sip_caller_key, config.sip_callers)
        self.webhook_key = (
            secret_key(config.openai_webhook_secret) if config.openai_webhook_secret else None
        )
        #: Upstream sessions set up before clients ask (RELAY_WARM_POOL); runs with the lifespan.
        self.pool = self._warm_pool()

    def _warm_pool(self) -> WarmPool | None:
        """The warm pool of RELAY_WARM_POOL, if any client could take its sessions.

        A pooled session is dialled before its client is known, so it carries the safety
        identifier every client it may serve shares: none (RELAY_SAFETY_IDENTIFIER=off), or
        the anonymous one (anonymous clients share it).
        """
        config = self.config
        sizes = config.warm_pool_sizes
        if not sizes:
            return None
        if self._safety_key is None:
            identifier = None
        elif config.allow_anonymous:
            identifier = self.safety_identifier(Identity(user="anonymous", method="anonymous"))
        else:
            log.warning(
                "RELAY_WARM_POOL is set, but no client could take a pooled session: each"
                " carries one OpenAI-Safety-Identifier, set when it is dialled, and here every"
                " client is a named user with an identifier of its own"
                " (RELAY_SAFETY_IDENTIFIER=hash, no anonymous clients). No pool is kept; set"
                " RELAY_SAFETY_IDENTIFIER=off to pool every client's sessions."
            )
            return None
        keys = {PoolKey(model, self.session_update, identifier): n for model, n in sizes.items()}
        return WarmPool(
            PoolLedger(keys, max_age=config.warm_pool_max_age, lead=config.dial_timeout),
            lambda key: self.dialer.target(key.model, key.identifier),
            self.metrics,
            dial_timeout=config.dial_timeout,
            send_timeout=config.send_timeout,
            close_timeout=config.close_timeout,
            ping_interval=config.ping_interval,
            peer_timeout=config.peer_timeout,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "http":
            await handle_http(self, scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            raise RuntimeError(f"unsupported ASGI scope type {kind!r}")

    # -- WebSocket ----------------------------------------------------------------

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        path = scope["path"]
        if path not in self.websocket_paths:
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
            if path == TWILIO_PATH:
                await self.phone.admitted(scope, receive, send)  # type: ignore[union-attr]
            elif (admitted := await self._admit(scope, receive, send)) is not None:
                # (here rather than in _admit, whose frame would stay for the session's life:
                # every idle session carries the frames it waits in)
                async with self.accounting.held(  # type: ignore[union-attr]
                    admitted.identity, admitted.session_id, admitted.bridge.traffic
                ):
                    await self._session(send, receive, admitted)
        finally:
            self._handshakes -= 1

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> Admitted | None:
        """Authenticate and admit against the user's limits: the session to run, or None (the
        client was refused, or resumed a session that runs already)."""
        offered = scope.get("subprotocols") or ()
        accounting = self.accounting
        if accounting is None:
            await self._deny(send, 503, "the relay is still starting; connect again in a moment")
            return None
        session_id = secrets.token_hex(8)
        try:
            identity = self.auth.authenticate(scope["headers"], offered)
            resume = asks_to_resume(offered)
            if resume is not None:
                if not self.config.resume_seconds:
                    raise ResumeRefused(
                        "relay_resume_off",
                        "This relay does not resume sessions (RELAY_RESUME_SECONDS is 0); start"
                        " a new session.",
                    )
                await self._resume(send, receive, offered, identity, *resume)
                return None
            refusal = admission.refusal(self.config, scope, offered, identity)
            if refusal is not None:  # refused after accept, as the Realtime API does: no session
                code, message, reason = refusal
                client = await accept(send, receive, offered)
                await self._refuse(client, code, message, Code.INVALID_REQUEST, reason)
                return None
            with trio.fail_after(STORE_TIMEOUT):
                await accounting.admit(identity, session_id)
        except ResumeRefused as refused:  # (malformed: refused before any session was found)
            await self._refuse_resume(await accept(send, receive, offered), refused)
            return None
        except Refusal as refused:
            log.info("handshake refused: %s (HTTP %d)", refused.code, refused.status)
            if self.config.browser_refusals == "close" and header(scope, b"origin") is not None:
                # A page cannot read a refused handshake's status; a close code it can read.
                client = await accept(send, receive, offered)
                await self._refuse(
                    client, refused.code, refused.message, 4000 + refused.status, refused.code
                )
            else:
                await self._deny(send, refused.status, refused.message, code=refused.code)
            return None
        except (trio.TooSlowError, OSError) as exc:
            log.error("usage store unavailable at admission: %r", exc)
            await self._deny(send, 503, "the relay's usage store is not answering; try again shortly")
            return None
        model = admission.session_model(self.config, scope)
        settings: dict[str, Any] = {}
        if self.config.beta == "translate" and asks_for_beta(scope["headers"], offered):
            settings["translator"] = self.beta  # the client is served in beta: see core.beta
        bridge = (BetaBridge if settings else Bridge)(
            session_update=self.session_update,
            limits=self.limits,
            secret=self.config.openai_api_key,
            binary_as_audio=self.config.binary_frames == "audio",
            policy=self.config.policy.for_session(model, identity.model),
            observer=SessionNotes(self.metrics, session_id),
            ledger=self.ledger(self.session),
            **settings,
        )
        return Admitted(identity, session_id, bridge, model, offered, offers_deflate(scope))

    async def _resume(
        self, send: Send, receive: Receive, offered: Any, identity: Identity, token: str, count: int
    ) -> None:
        """Give a session waiting for its client (relay.server.resume) the client's new
        connection, and hold that connection until it goes too or the session ends."""
        try:
            session = self.resumes.take(token, identity)
        except ResumeRefused as refused:
            await self._refuse_resume(await accept(send, receive, offered), refused)
            return
        subprotocol = "realtime" if "realtime" in offered else None
        client, release = await self.open_client(send, receive, subprotocol)
        try:
            try:
                connection = await session.resume(client, count)
            except ResumeRefused as refused:
                await self._refuse_resume(client, refused)
                return
            log.info("session resumed", extra={"fields": {"user": identity.user, "from": count}})
            self.metrics.resumed("resumed")
            await connection.done.wait()
        finally:
            if release is not None:
                release()

    async def _refuse_resume(
        self, client: AsgiClient | SocketClient, refused: ResumeRefused
    ) -> None:
        """A resume that cannot be (the WebSocket accepted): told why, closed 4410."""
        log.info("resume refused: %s", refused.code)
        self.metrics.resumed(refused.code)
        await self._refuse(client, refused.code, refused.message, Code.RESUME_REFUSED, refused.code)

    async def _refuse(
        self, client: AsgiClient | SocketClient, code: str, message: str, close: int, reason: str
    ) -> None:
        """Refuse an accepted WebSocket: an ``error`` event saying why, then the close code; the
        client's close reply is read (bounded), so that it gets both."""
        await client.send(error_event(code, message))
        await client.close(close, reason)
        await client.wait_closed(self.config.close_timeout)

    async def _deny(self, send: Send, status: int, message: str, *, code: str | None = None) -> None:
        self.metrics.refused(status)
        await deny(send, status, message, code=code)

    async def _session(self, send: Send, receive: Receive, admitted: Admitted) -> None:
        """Accept the WebSocket and run its pair to its end."""
        identity, session_id, bridge, model, offered, deflate_offered = admitted
        subprotocol = "realtime" if "realtime" in offered else None
        client, release = await self.open_client(
            send, receive, subprotocol, deflate_offered=deflate_offered
        )
        resumable = None
        if self.config.resume_seconds and RESUME_SUBPROTOCOL in offered:
            client = resumable = Resumable(
                client,
                registry=self.resumes,
                identity=identity,
                seconds=self.config.resume_seconds,
                max_bytes=self.config.resume_bytes,
            )
        call = Call(self, identity, session_id, model)  # once accepted: it ends with the pair
        pair = self.new_pair(
            client,
            bridge,
            call,
            max_seconds=admission.tightest(
                self.config.max_session_seconds, identity.max_session_seconds
            ),
        )
        try:
            await self.run_pair(pair, call)
        finally:
            if resumable is not None:
                resumable.ended()
            if release is not None:
                release()  # Hypercorn closes the connection

    async def open_client(
        self,
        send: Send,
        receive: Receive,
        subprotocol: str | None,
        *,
        deflate_offered: bool = False,
    ) -> tuple[AsgiClient | SocketClient, Callable[[], None] | None]:
        """Accept a WebSocket: take its socket from Hypercorn where it can (then the release,
        which gives the connection back for Hypercorn to close), else over ASGI (and None).

        Not where the take-over is off (a Hypercorn name it relies on is missing), nor for a
        client that offered permessage-deflate when RELAY_PERMESSAGE_DEFLATE lets Hypercorn
        accept it: Hypercorn inflates, the relay's own framer does not.
        """
        taken = None
        if self.taking_over and not (self.config.permessage_deflate and deflate_offered):
            taken = await takeover.take_over(send, subprotocol)
        if taken is None:
            offered = (subprotocol,) if subprotocol else ()
            return await accept(send, receive, offered, self.config.send_timeout), None
        stream, release = taken
        ws = WebSocket(
            stream,
            client=False,
            max_message_bytes=client_frame_limit(self.config.max_message_bytes),
            subprotocol=subprotocol,
        )
        ws.send_timeout = self.config.send_timeout
        return SocketClient(ws), release

    def ledger(self, session: dict[str, Any]) -> Ledger | None:
        """What a session starting with ``session`` keeps for a takeover (None: failover off)."""
        if self.takeover is None:
            return None
        return Ledger(session, max_bytes=self.config.replay_bytes)

    def safety_identifier(self, identity: Identity) -> str | None:
        """The OpenAI-Safety-Identifier of ``identity``'s sessions (None: turned off)."""
        key = self._safety_key
        return None if key is None else safety_identifier(key, identity)

    def new_pair(
        self,
        client: ClientSide,
        bridge: Bridge,
        call: Call,
        *,
        max_seconds: float,
        lead: float | None = None,
        on_responses_done: Callable[[list[dict[str, object]]], Awaitable[str | None]] | None = None,
    ) -> Pair:
        """The pair of an admitted session (``call``) that may last ``max_seconds``, warned
        ``lead`` seconds before (RELAY_LIMIT_WARNING_SECONDS unless said); its finished
        responses go to ``on_responses_done``, the call's own unless said. Its upstream comes
        from the warm pool where one waits for it (RELAY_WARM_POOL), else from a dial."""
        identifier = self.safety_identifier(call.identity)
        source = dial = self.dialer.target(call.model, identifier)
        if self.pool is not None:
            source = self.pool.source(PoolKey(call.model, bridge.session_update, identifier), dial)
        return Pair(
            client,
            bridge,
            source,
            dial_timeout=self.config.dial_timeout,
            close_timeout=self.config.close_timeout,
            send_timeout=self.config.send_timeout,
            on_responses_done=on_responses_done or call.responses_done,
            deadlines=Deadlines(
                trio.current_time(),
                max_seconds=max_seconds,
                idle_seconds=self.config.idle_timeout,
                lead=self.config.limit_warning_seconds if lead is None else lead,
            ),
            ping_interval=self.config.ping_interval,
            peer_timeout=self.config.peer_timeout,
            on_voice_latency=self.metrics.voice_latency,
            on_upstream_opened=call.upstream_opened,
            pump=self.pump,
            max_rate=self.config.client_max_rate,
            tap=call.log,
            tap_client=call.records_client,
            takeover=self.takeover if bridge.can_take_over else None,
        )

    async def run_pair(self, pair: Pair, call: Call) -> None:
        """Run a pair to its end as one of this relay's sessions: counted (drain, shedding,
        metrics), logged, and its call ended (record, trace)."""
        bridge, client = pair.bridge, pair.client
        identity, session_id, model = call.identity, call.session_id, call.model
        self.pairs[pair] = None
        if self._no_pairs.is_set():
            self._no_pairs = trio.Event()
        metrics = self.metrics
        metrics.session_started(bridge.traffic)
        started = trio.current_time()
        log.info(
            "session started",
            extra={
                "fields": {
                    "session": session_id,
                    "user": identity.user,
                    "model": model,
                    # Who still speaks the retired dialect, for operators planning its end.
                    "dialect": "beta" if isinstance(bridge, BetaBridge) else "ga",
                }
            },
        )
        ending = None
        try:
            ending = await pair.run()
            if ending.client_code is not None and ending.cause is not Cause.TOO_FAST:
                # (a client over its rate limit gets its close frame, not more of the relay's
                # time: reading it to its close reply would read on whatever it still floods)
                await client.wait_closed(self.config.close_timeout)  # type: ignore[attr-defined]
        finally:
            self.pairs.pop(pair, None)
            if not self.pairs:
                self._no_pairs.set()
            metrics.session_ended(
                bridge.traffic,
                ending.cause if ending else "error",
                ending.client_code if ending else None,
            )
            call.ended(ending, pumped=pair.pumped, responses=bridge.responses_seen)
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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """Open the usage store, start the pump and watch the load for the app's lifetime (the
        lifespan task outlives every session)."""
        async with trio.open_nursery() as nursery:
            if self.guard.enabled or self.config.busy_poll:  # (the pump polls only when idle)
                nursery.start_soon(watch_load, self)
            self.metrics.fast_path = lambda: (
                (pump.running, pump.watching) if (pump := self.pump) is not None else (False, 0)
            )
            recorded = trio.Event()
            if self.recorder is not None:
                nursery.start_soon(self._record, recorded)
            if self.config.otel_endpoint and self.tracer is None:
                nursery.start_soon(self._start_tracing, self.config.otel_endpoint)
            if self.pool is not None:
                nursery.start_soon(self.pool.run)
            self.calls.nursery = nursery  # a call's sideband outlives the request that made it
            try:
                await self._lifespan_events(receive, send, nursery, recorded)
            finally:
                self.pump = None
                self.calls.nursery = None
                nursery.cancel_scope.cancel()

    async def _start_tracing(self, endpoint: str) -> None:
        """Load OpenTelemetry beside start-up rather than before it: its OTLP exporter (with
        protobuf) takes a few hundred ms to import, which readiness need not wait for; sessions
        that start meanwhile are not traced."""

        def load() -> Tracer:
            from ..ops.tracing import Tracer

            return Tracer.to_endpoint(endpoint)

        self.tracer = await trio.to_thread.run_sync(load)

    async def _record(self, done: trio.Event) -> None:
        assert self.recorder is not None
        try:
            await self.recorder.run()
        finally:
            done.set()

    async def _lifespan_events(
        self, receive: Receive, send: Send, nursery: trio.Nursery, recorded: trio.Event
    ) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    failure = await self._start(nursery)
                except Exception as exc:  # never "continuing without lifespan": say it, stop
                    log.exception("start-up failed")
                    failure = f"start-up failed: {exc!r}"
                if failure is not None:
                    await send({"type": "lifespan.startup.failed", "message": failure})
                    return
                await send({"type": "lifespan.startup.complete"})
                self.started.set()
            elif message["type"] == "lifespan.shutdown":
                if self.accounting is not None:
                    await self.accounting.store.aclose()
                if self.recorder is not None:  # what is queued gets a bounded time
                    self.recorder.close()
                    with trio.move_on_after(DRAIN_SECONDS):
                        await recorded.wait()
                if self.tracer is not None:
                    await trio.to_thread.run_sync(self.tracer.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _start(self, nursery: trio.Nursery) -> str | None:
        """Open the store and start the pump (RELAY_PUMP); return why the relay cannot start."""
        try:
            store = await open_store(self.config.store)
        except Exception as exc:  # any failure to open the store fails start-up
            return f"cannot open RELAY_STORE {self.config.store!r}: {exc}"
        self.accounting = Accounting(
            store,
            max_sessions=self.config.max_sessions_per_user,
            daily_budget=self.config.daily_token_budget,
            daily_budget_usd=self.config.daily_budget_usd,
        )
        mode = self.config.pump
        if mode == "off":
            return None
        pump = Pump(busy_poll=self.config.busy_poll)
        await nursery.start(pump.run)
        why = await prove(pump)
        if why is None:
            self.pump = pump
            self.metrics.publish()  # (relay_pump_active from the start, with several workers too)
            return None
        pump.stop()
        if mode == "on":
            return f"RELAY_PUMP=on, but the pump cannot run here: {why}"
        log.warning(
            "the pump is off (%s): sessions are relayed by their own tasks, which costs more"
            " CPU per message; set RELAY_PUMP=off to silence this",
            why,
        )
        return None

    def hurry_drain(self) -> None:
        """Cut the drain's grace time short: close the remaining sessions now."""
        if self._grace is not None:
            self._grace.cancel()

    async def drain(self, grace: float) -> None:
        """Stop taking sessions, give live ones ``grace`` seconds, then close the rest with 1012.

        Readiness turns 503 at once, so a load balancer stops sending clients here;
        every live client is told (``relay_draining``) how long it has. Pairs run on
        unchanged meanwhile, so nothing a client sent is lost. Calls are watched while the
        sessions drain, then handed over: they run on at OpenAI (relay.server.sideband).
        """
        self.draining = True
        log.info(
            "draining: %d live sessions, %d calls, %g s to finish",
            len(self.pairs),
            len(self.calls.live),
            grace,
        )
        if self.pool is not None:
            await self.pool.drain()  # its waiting sessions close 1001 (within the close timeout)
        await self._drain_pairs(grace)
        await self.calls.hand_over()

    async def _drain_pairs(self, grace: float) -> None:
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


def create_app(config: RelayConfig | None = None) -> RelayApp:
    """The relay's ASGI app. With no config, settings come from the environment and
    the relay's log output is set up here, as ``relay serve`` does (again: it replaces
    its own handler): that is what ``hypercorn -k trio 'relay.server.app:create_app()'`` uses.
    Hypercorn's ``-w`` runs several processes, so each line names its ``pid``."""
    if config is None:
        config = load_config(os.environ)
        from ..ops.logs import configure_logging

        fields = {"pid": os.getpid()}
        configure_logging(
            config.log_format, config.log_level, secrets=config.secrets, fields=fields
        )
        if warning := deprecation_warning(config):
            log.warning(warning)  # once per process: each of Hypercorn's workers makes its app
    takeover.install(permessage_deflate=config.permessage_deflate)
    return RelayApp(config)
