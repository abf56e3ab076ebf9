"""Prometheus metrics of the relay, rendered for ``GET /metrics``.

The relay forwards tens of thousands of messages a second, so the hot path
never touches a Prometheus object. The bridge already counts every message and
byte on its pair (:class:`relay.core.bridge.Traffic`, plain ints); this module adds
them to the Prometheus counters in batches (:meth:`RelayMetrics.publish`): the
whole relay's total since the last batch, four ``inc`` calls whatever the number
of sessions. A session's :class:`Traffic` is registered when it starts and, when
it ends, is folded into the ended total and dropped from the live set in the same
synchronous step, so a batch sees it either live or ended, never both and never
neither: the counters only grow.

Every scrape publishes first, so one process's ``/metrics`` is exact. With several
worker processes on one port (``relay serve --workers N``) a scrape reaches one
worker at random, so the metrics live in prometheus-client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, set up by :func:`relay.server.workers.serve_workers`) and
any worker renders the sum of all. A scrape cannot reach into the other workers
to publish their live sessions, so in that mode each worker also publishes once a
second from a background task: the traffic of the other workers' running sessions
is then at most a second old, and everything else (sessions started and ended,
refusals, histograms) is exact. The mode is prometheus-client's choice, made when
it is first imported, from the environment; one :class:`RelayMetrics` per process
then, as every metric of a process shares its files.

Everything here must be called from the thread that runs the event loop (the
relay is one Trio thread per process), which is also where ``render`` runs.
No metric carries a per-user label.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from enum import Enum

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from ..core.bridge import Cause, Traffic
from ..core.calllog import VoiceClock  # noqa: F401 (timing of voice turns; re-exported)
from ..core.closecodes import UPSTREAM_AUTH_REFUSED, Code
from ..core.policy import FIELD_PATHS, MCP_FIELD
from ..core.pricing import Tokens, dollars

CLIENT_TO_UPSTREAM = "client_to_upstream"
UPSTREAM_TO_CLIENT = "upstream_to_client"

#: Messages queued before the upstream opened (RELAY_QUEUE_MESSAGES defaults to 256).
QUEUE_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Connect plus WebSocket handshake to the Realtime API, seconds.
DIAL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
#: End of the user's speech to the first audio of the reply, seconds.
VOICE_BUCKETS = (0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
#: Seconds between a worker's batches of traffic in multiprocess mode.
PUBLISH_SECONDS = 1.0

_CAUSES = frozenset(cause.value for cause in Cause)
#: Why a call may be refused, as labels (anything else is "other").
CALL_REFUSALS = frozenset(
    {
        "missing_credentials",
        "invalid_credentials",
        "token_expired",
        "origin_not_allowed",
        "too_many_sessions",
        "daily_budget_exhausted",
        "invalid_model",
        "unknown_caller",
        "relay_store_unavailable",
        "relay_draining",
    }
)
#: Client close codes worth a label of their own; anything else is "other".
_CODES = frozenset(int(code) for code in Code) | {UPSTREAM_AUTH_REFUSED}
#: Client fields the policy acts on, each a label of its own.
_POLICY_FIELDS = frozenset({*FIELD_PATHS, MCP_FIELD})
_TOKEN_LABELS = (("input", "text"), ("input", "audio"), ("output", "text"), ("output", "audio"))
_TRAFFIC_FIELDS = ("client_messages", "client_bytes", "upstream_messages", "upstream_bytes")

log = logging.getLogger("relay")


def multiprocess_mode() -> bool:
    """Whether prometheus-client keeps this process's metrics in PROMETHEUS_MULTIPROC_DIR."""
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def cause_label(cause: Cause | str) -> str:
    """A bounded label for why a session ended: a :class:`Cause` value, else ``other``."""
    value = cause.value if isinstance(cause, Enum) else cause
    return value if value in _CAUSES else "other"


def code_label(code: int | None) -> str:
    """A bounded label for the client close code: ``none`` when the client was already gone."""
    if code is None:
        return "none"
    return str(code) if code in _CODES else "other"


def status_label(status: int) -> str:
    """A bounded label for an HTTP refusal status."""
    return str(status) if 400 <= status <= 599 else "other"


class RelayMetrics:
    """The relay's metrics, in a registry of their own (tests build many apps per process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_mode()
        #: What a scrape renders: this registry, or every worker's files in multiprocess mode.
        self._rendered = self.registry
        if self.multiprocess:
            self._rendered = CollectorRegistry()
            MultiProcessCollector(self._rendered)
        #: Traffic of the sessions that have ended, folded in once each.
        self.ended_traffic = Traffic()
        self._live: dict[int, Traffic] = {}
        #: The traffic already added to the counters below.
        self._published = Traffic()
        self._publishing_in: trio.lowlevel.TrioToken | None = None
        self._started = Counter(
            "relay_sessions_started", "Sessions accepted.", registry=self.registry
        )
        self._ended = Counter(
            "relay_sessions_ended",
            "Sessions ended, by cause and the close code sent to the client (none: client gone).",
            ["cause", "client_code"],
            registry=self.registry,
        )
        self._active = Gauge(
            "relay_sessions_active",
            "Sessions running now.",
            registry=self.registry,
            multiprocess_mode="livesum",  # summed over the workers alive
        )
        messages = Counter(
            "relay_messages",
            "WebSocket messages received by the relay, by direction (before policy).",
            ["direction"],
            registry=self.registry,
        )
        size = Counter(
            "relay_bytes",
            "Payload bytes (characters for text frames) received by the relay, by direction.",
            ["direction"],
            registry=self.registry,
        )
        #: The counter each field of :class:`Traffic` goes to, in ``_TRAFFIC_FIELDS`` order.
        self._traffic_counters = (
            messages.labels(CLIENT_TO_UPSTREAM),
            size.labels(CLIENT_TO_UPSTREAM),
            messages.labels(UPSTREAM_TO_CLIENT),
            size.labels(UPSTREAM_TO_CLIENT),
        )
        self._queued = Histogram(
            "relay_preopen_queue_messages",
            "Client messages queued while the upstream was opening, once per session.",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self._dial = Histogram(
            "relay_upstream_dial_seconds",
            "Time to open the upstream WebSocket (connect and handshake).",
            buckets=DIAL_BUCKETS,
            registry=self.registry,
        )
        self._voice = Histogram(
            "relay_voice_latency_seconds",
            "From input_audio_buffer.speech_stopped to the reply's first"
            " response.output_audio.delta, as seen by the relay.",
            buckets=VOICE_BUCKETS,
            registry=self.registry,
        )
        self._takeovers = Counter(
            "relay_upstream_takeovers",
            "Sessions moved to a new upstream, by kind (failover: the upstream dropped;"
            " rollover: ahead of the Realtime API's session cap) and outcome (moved, or failed:"
            " no new upstream took the session, which ended).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self._resumes = Counter(
            "relay_resumes",
            "Clients that came back with a resume token, by outcome (resumed, or the refusal's"
            " code).",
            ["outcome"],
            registry=self.registry,
        )
        self._policy = Counter(
            "relay_policy_fields",
            "Fields of clients' session.update / response.create events the policy dropped"
            " (locked, or a value not allowed; mcp_server: an MCP tool removed) or refused the"
            " event for (on_locked = refuse), by field.",
            ["field", "action"],
            registry=self.registry,
        )
        self._refused = Counter(
            "relay_handshake_refusals",
            "WebSocket handshakes refused with an HTTP status.",
            ["status"],
            registry=self.registry,
        )
        self._cost = Counter(
            "relay_cost_dollars",
            "What the sessions' responses cost by the relay's price table, in US dollars, by"
            " model (per user and day: relay usage or GET /admin/usage).",
            ["model"],
            registry=self.registry,
        )
        self._tokens = Counter(
            "relay_tokens",
            "Tokens of the sessions' responses, by direction (input, output) and kind (text,"
            " audio).",
            ["direction", "kind"],
            registry=self.registry,
        )
        self._pump_legs = Gauge(
            "relay_pump_legs",
            "Session directions relayed by the pump, the fast path (two per pumped session).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        # (livemin: with several workers, 0 if any live one runs without it)
        self._pump_active = Gauge(
            "relay_pump_active",
            "1 while the pump relays plain-socket sessions (RELAY_PUMP), 0 where they relay"
            " through their own tasks (off, or the pump could not run: see the log).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self._takeover_active = Gauge(
            "relay_takeover_active",
            "1 while WebSockets are taken over from Hypercorn, 0 where they go through plain"
            " ASGI messages (Hypercorn's insides moved: see the log).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        #: Where ``publish`` reads the fast path's state: (pump running, legs it watches).
        self.fast_path: Callable[[], tuple[bool, int]] | None = None
        self._calls_started = Counter(
            "relay_calls_started",
            "WebRTC and SIP calls admitted (the relay watches them from a sideband).",
            ["transport"],
            registry=self.registry,
        )
        self._calls_ended = Counter(
            "relay_calls_ended",
            "Calls the relay stopped watching, by transport and why.",
            ["transport", "cause"],
            registry=self.registry,
        )
        self._calls_active = Gauge(
            "relay_calls_active",
            "Calls watched now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._calls_refused = Counter(
            "relay_calls_refused",
            "Calls refused (WebRTC: the HTTP answer) or declined (SIP), by transport and why.",
            ["transport", "reason"],
            registry=self.registry,
        )
        self._call_corrections = Counter(
            "relay_call_corrections",
            "Session updates the sideband sent to put a call's session back within the policy.",
            registry=self.registry,
        )

        self._pool_size = Gauge(
            "relay_warm_pool_sessions",
            "Upstream sessions set up and waiting in the warm pool (RELAY_WARM_POOL), by model.",
            ["model"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self._pool_hits = Counter(
            "relay_warm_pool_hits",
            "Sessions that took a waiting upstream from the warm pool, by model.",
            ["model"],
            registry=self.registry,
        )
        self._pool_misses = Counter(
            "relay_warm_pool_misses",
            "Sessions of a pooled model that dialled instead, by model and why: empty (none"
            " waited) or identified (a named user, while pooled sessions carry the anonymous"
            " safety identifier).",
            ["model", "reason"],
            registry=self.registry,
        )
        self._pool_recycled = Counter(
            "relay_warm_pool_recycled",
            "Waiting sessions closed and replaced, by model and why: age"
            " (RELAY_WARM_POOL_MAX_AGE) or failed (closed, silent, or not clean while waiting).",
            ["model", "reason"],
            registry=self.registry,
        )
        self._pool_dial_failures = Counter(
            "relay_warm_pool_dial_failures",
            "Warm pool dials that gave no ready session (each delays the next: backoff).",
            ["model"],
            registry=self.registry,
        )

    def live_traffic(self) -> Iterable[Traffic]:
        """The counters of the sessions running now."""
        return self._live.values()

    def session_started(self, traffic: Traffic) -> None:
        """A session was accepted; its bridge's counters are published from now on."""
        self._started.inc()
        self._active.inc()
        self._live[id(traffic)] = traffic
        if self.multiprocess:
            self._publish_periodically()

    def session_ended(self, traffic: Traffic, cause: Cause | str, client_code: int | None) -> None:
        """A session ended: move its traffic from live to the totals, count how it ended.

        Call it once per session.
        """
        if self._live.pop(id(traffic), None) is not None:
            self._active.dec()
        ended = self.ended_traffic
        ended.client_messages += traffic.client_messages
        ended.client_bytes += traffic.client_bytes
        ended.upstream_messages += traffic.upstream_messages
        ended.upstream_bytes += traffic.upstream_bytes
        self._ended.labels(cause_label(cause), code_label(client_code)).inc()

    def publish(self) -> None:
        """Add the traffic forwarded since the last call to the message and byte counters."""
        total = Traffic(*(getattr(self.ended_traffic, name) for name in _TRAFFIC_FIELDS))
        for traffic in self._live.values():
            total.client_messages += traffic.client_messages
            total.client_bytes += traffic.client_bytes
            total.upstream_messages += traffic.upstream_messages
            total.upstream_bytes += traffic.upstream_bytes
        published = self._published
        for name, counter in zip(_TRAFFIC_FIELDS, self._traffic_counters, strict=True):
            if added := getattr(total, name) - getattr(published, name):
                counter.inc(added)
        self._published = total
        if self.fast_path is not None:
            running, legs = self.fast_path()
            self._pump_active.set(1 if running else 0)
            self._pump_legs.set(legs)

    def _publish_periodically(self) -> None:
        """Start publishing every PUBLISH_SECONDS for the rest of this Trio run, once per run.

        A system task, so that every way of serving the app gets it (``relay serve
        --workers``, or Hypercorn's own ``-w`` with PROMETHEUS_MULTIPROC_DIR set), and
        it publishes a last time when the run ends, after the last session.
        """
        token = trio.lowlevel.current_trio_token()
        if self._publishing_in is token:
            return
        self._publishing_in = token

        async def publish_every_second() -> None:
            try:
                while True:
                    await trio.sleep(PUBLISH_SECONDS)
                    self._publish_logged()
            finally:
                self._publish_logged()

        trio.lowlevel.spawn_system_task(publish_every_second, name="relay metrics publisher")

    def _publish_logged(self) -> None:
        # A system task's exception would end the whole process; a full disk must not.
        try:
            self.publish()
        except OSError as exc:
            log.warning("cannot write the metrics to PROMETHEUS_MULTIPROC_DIR: %s", exc)

    def upstream_opened(self, seconds: float, queued: int) -> None:
        """A session's upstream WebSocket opened after ``seconds``, with ``queued`` client
        messages waiting for it (recorded then, not when the session ends)."""
        self._dial.observe(seconds)
        self._queued.observe(queued)

    def voice_latency(self, seconds: float) -> None:
        """A spoken turn was answered: see :class:`VoiceClock`."""
        self._voice.observe(seconds)

    def upstream_replaced(self, kind: str, outcome: str) -> None:
        """A session's upstream was replaced (``kind`` failover or rollover): ``outcome`` moved
        or failed."""
        self._takeovers.labels(kind, outcome).inc()

    def resumed(self, outcome: str) -> None:
        """A client came back with a resume token: ``outcome`` is resumed or a refusal's code."""
        self._resumes.labels(outcome).inc()

    def policy_acted(self, field: str, action: str) -> None:
        """The policy dropped (``action`` "dropped") or refused an event for ("refused") a
        client's ``field``."""
        self._policy.labels(field if field in _POLICY_FIELDS else "other", action).inc()

    def responses_priced(self, model: str, nanodollars: int, tokens: Iterable[Tokens]) -> None:
        """Responses of a session on ``model`` finished: their tokens and what they cost.

        ``model`` is one of the relay's models (RELAY_MODELS), so the label stays bounded.
        """
        if nanodollars:
            self._cost.labels(model).inc(dollars(nanodollars))
        totals = [0, 0, 0, 0]
        for t in tokens:
            totals[0] += t.input_text
            totals[1] += t.input_audio
            totals[2] += t.output_text
            totals[3] += t.output_audio
        for (direction, kind), total in zip(_TOKEN_LABELS, totals, strict=True):
            if total:
                self._tokens.labels(direction, kind).inc(total)

    def call_started(self, transport: str) -> None:
        """A call was admitted and its sideband is being opened."""
        self._calls_started.labels(transport).inc()
        self._calls_active.inc()

    def call_ended(self, transport: str, cause: str, corrections: int) -> None:
        """The relay stopped watching a call (``cause``: relay.server.sideband.CallEnd)."""
        self._calls_active.dec()
        self._calls_ended.labels(transport, cause).inc()
        if corrections:
            self._call_corrections.inc(corrections)

    def call_refused(self, transport: str, reason: str) -> None:
        """A call was refused or declined; ``reason`` is a refusal code (others: ``other``)."""
        label = reason if reason in CALL_REFUSALS else "other"
        self._calls_refused.labels(transport, label).inc()

    def pool_size(self, model: str, waiting: int) -> None:
        """The warm pool holds ``waiting`` ready sessions of ``model`` (one of RELAY_WARM_POOL's
        models: the label stays bounded)."""
        self._pool_size.labels(model).set(waiting)

    def pool_hit(self, model: str) -> None:
        self._pool_hits.labels(model).inc()

    def pool_missed(self, model: str, reason: str) -> None:
        self._pool_misses.labels(model, reason).inc()

    def pool_recycled(self, model: str, reason: str) -> None:
        self._pool_recycled.labels(model, reason).inc()

    def pool_dial_failed(self, model: str) -> None:
        self._pool_dial_failures.labels(model).inc()

    def takeover(self, active: bool) -> None:
        """Whether WebSockets are taken over from Hypercorn in this process (set once)."""
        self._takeover_active.set(int(active))

    def refused(self, status: int) -> None:
        """A WebSocket handshake was answered with this HTTP status instead of 101."""
        self._refused.labels(status_label(status)).inc()

    def render(self, accept_header: bytes | None = None) -> tuple[bytes, bytes]:
        """The body and Content-Type of ``GET /metrics`` (OpenMetrics if the scraper asks)."""
        self.publish()
        encoder, content_type = choose_encoder((accept_header or b"").decode("latin-1"))
        return encoder(self._rendered), content_type.encode("latin-1")

