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
import time
from collections.abc import Callable, Iterable
from enum import Enum

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from ..core.bridge import Cause, Traffic
from ..core.closecodes import UPSTREAM_AUTH_REFUSED, Code

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
#: Client close codes worth a label of their own; anything else is "other".
_CODES = frozenset(int(code) for code in Code) | {UPSTREAM_AUTH_REFUSED}
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
        self._refused = Counter(
            "relay_handshake_refusals",
            "WebSocket handshakes refused with an HTTP status.",
            ["status"],
            registry=self.registry,
        )
        # (livemin: with several workers, 0 if any live one runs without it)
        self._pump = Gauge(
            "relay_pump_active",
            "1 while the pump relays plain-socket sessions (RELAY_PUMP), 0 where they relay"
            " through their own tasks (off, or the pump could not run: see the log).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self._takeover = Gauge(
            "relay_takeover_active",
            "1 while WebSockets are taken over from Hypercorn, 0 where they go through plain"
            " ASGI messages (Hypercorn's insides moved: see the log).",
            registry=self.registry,
            multiprocess_mode="livemin",
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

    def fast_paths(self, *, pump: bool, takeover: bool) -> None:
        """Which of the relay's fast paths run in this process now."""
        self._pump.set(int(pump))
        self._takeover.set(int(takeover))

    def refused(self, status: int) -> None:
        """A WebSocket handshake was answered with this HTTP status instead of 101."""
        self._refused.labels(status_label(status)).inc()

    def render(self, accept_header: bytes | None = None) -> tuple[bytes, bytes]:
        """The body and Content-Type of ``GET /metrics`` (OpenMetrics if the scraper asks)."""
        self.publish()
        encoder, content_type = choose_encoder((accept_header or b"").decode("latin-1"))
        return encoder(self._rendered), content_type.encode("latin-1")


_STOPPED = '{"type":"input_audio_buffer.speech_stopped"'
_CREATED = '{"type":"response.created"'
_AUDIO = '{"type":"response.output_audio.delta"'
_DONE = '{"type":"response.done"'


class VoiceClock:
    """Times one pair's voice turns from the upstream's events: speech end to first reply audio.

    Feed it every upstream text message; it returns the latency once per turn.
    Only audio of a response created after the speech stopped counts, so the tail
    of an earlier reply still streaming is not mistaken for the answer; a reply
    that finishes without audio ends the wait. Cheap enough for the hot path: one
    prefix check per message while idle, and the clock is read only on the two
    events that matter. It recognises the Realtime API's own serialisation
    (``type`` first), which is what the API and mockrealtime send.
    """

    __slots__ = ("_clock", "_created", "_stopped_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stopped_at: float | None = None
        self._created = False

    def upstream_event(self, text: str) -> float | None:
        """Seconds since speech stopped if ``text`` is the reply's first audio, else None."""
        if text.startswith(_STOPPED):
            self._stopped_at = self._clock()
            self._created = False
            return None
        stopped_at = self._stopped_at
        if stopped_at is None:
            return None
        if not self._created:
            self._created = text.startswith(_CREATED)
            return None
        if text.startswith(_AUDIO):
            self._stopped_at = None
            return self._clock() - stopped_at
        if text.startswith(_DONE):
            self._stopped_at = None
        return None
