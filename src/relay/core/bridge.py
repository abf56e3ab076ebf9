"""The bridge between one client and its upstream, as a state machine without I/O.

:class:`Bridge` decides, for every message and every close, what the relay does;
the Trio shell in :mod:`relay.server.pair` only moves bytes and carries the decisions
out. Keeping the decisions here lets the tests drive every ordering of events
without sockets or clocks.

The life of a pair::

    CONNECTING ──upstream_opened()──▶ FLUSHING ──next_to_flush() is None──▶ OPEN
         │                               │                                   │
         └──────── any ending ───────────┴──────────────┬────────────────────┘
                                                        ▼
                                                      CLOSED

While CONNECTING, client messages wait in a bounded queue. FLUSHING sends the
configured ``session.update`` and then that queue, in order, while new client
messages keep joining its tail, so nothing overtakes anything. In OPEN a client
message is returned unchanged and goes straight upstream.

The relay is invisible in the client's event stream (the design's invariant 8): the
client's first event is ``session.created``, and it already shows the relay's session.
So the upstream's ``session.created`` is held until the answer to the relay's own
``session.update`` arrives (the first ``session.updated``, or an ``error`` naming
:data:`SETUP_EVENT_ID`); the client then gets ``session.created`` carrying the session of
that ``session.updated``, which itself is never forwarded. Upstream events between the
two, and everything the relay itself says to the client before it (refusals, notices),
are held in arrival order, bounded like the pre-open queue, and delivered right after.
Events the upstream sends before any ``session.created`` (the Realtime API's refusal of
a connection: an ``error`` and a close) pass as they come. An upstream the relay set up
before the client came (a warm pooled one, :mod:`relay.server.pool`) has had its update
answered already: :meth:`Bridge.upstream_opened` is given the ``session.created`` to deliver,
and the start comes as soon as the pre-open queue is flushed (:meth:`Bridge.start_now`).

**The rules of a step.** :meth:`Bridge.client_message` and :meth:`Bridge.upstream_message`
(with the :mod:`relay.core.policy` screens they call, and the shell's per-message wrappers
around them, ``Pair._client_step`` and ``Pair._upstream_step``) are *steps*: the pair's tasks
run them, and so does the pump (:mod:`relay.wire.pump`), inside Trio's wait for I/O, where no
task is running. So a step:

* runs to its end without waiting: no ``await``, no I/O, no lock, no sleep, no thread;
* uses no task context: no ``trio.current_task()``, no cancel scope, no ``trio.current_time()``
  (the shell reads its clock and passes times in), no contextvars (the context is whichever
  task ran last, or none);
* does not raise: a message the relay refuses gets an answer (a :class:`Reply`, an
  :class:`Ending`), never an exception. An exception is a bug: the pair is closed with 1011 and
  ``relay_internal_error``, the traceback logged, and nothing else is touched (and a
  KeyboardInterrupt or SystemExit ends the run, as anywhere);
* calls nothing that may raise into it: metrics and logging from a step go through a guard
  (``Pair._upstream_step`` and the voice latency histogram);
* is cheap: it runs for every message, up to sixteen in a row per socket per wake-up.
"""

from __future__ import annotations

import base64
import re
import secrets
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

from .closecodes import UPSTREAM_AUTH_REFUSED, Code, clip_reason, sendable
from .events import dumps, error_event, event_type, finder, is_audio_append, parse_event
from .ledger import REPLAY, WATCHED, Ledger
from .policy import DELTA, UNREAD, Policy, Screened

Message = str | bytes

#: The ``event_id`` of the relay's own ``session.update``: an upstream ``error`` naming it
#: refused the relay's session (the relay is misconfigured).
SETUP_EVENT_ID = "event_relay_setup"

#: The reason :mod:`relay.wire.frames` closes with when the upstream's message is over the relay's
#: own limit (RELAY_UPSTREAM_MAX_MESSAGE_BYTES), as opposed to an upstream closing with 1009.
_OWN_SIZE_LIMIT = re.compile(r"message over \d+ bytes")

#: Upstream closes after which a session with a ledger moves to a new upstream (a failover):
#: the upstream went away (1001: restarting, or its session hit the 60-minute cap), failed
#: (1011, 1014), asked to be tried again (1012, 1013), or vanished without a close frame (1006).
FAILOVER_CODES = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
#: The events that echo an item the relay replayed (not the client's to see).
_ECHOES = frozenset(
    {"conversation.item.added", "conversation.item.done", "conversation.item.created"}
)


class Phase(Enum):
    CONNECTING = auto()
    FLUSHING = auto()
    OPEN = auto()
    CLOSED = auto()


class Cause(Enum):
    """Why a pair ended: one value per row of the README's close-code table."""

    CLIENT_CLOSED = "client_closed"
    UPSTREAM_CLOSED = "upstream_closed"
    UPSTREAM_LOST = "upstream_lost"
    UPSTREAM_AUTH_REFUSED = "upstream_auth_refused"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    MESSAGE_TOO_BIG = "message_too_big"
    CLIENT_TOO_SLOW = "client_too_slow"
    UPSTREAM_TOO_SLOW = "upstream_too_slow"
    QUEUE_OVERFLOW = "queue_overflow"
    SHUTDOWN = "shutdown"
    BUDGET_EXHAUSTED = "budget_exhausted"
    SESSION_EXPIRED = "session_expired"
    OVERLOADED = "overloaded"
    IDLE_TIMEOUT = "idle_timeout"
    TOO_FAST = "too_fast"
    INTERNAL_ERROR = "internal_error"


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this event to the client; the session goes on."""

    text: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Send these events to the client, in order (the start of a session: see the module
    docstring); the session goes on."""

    texts: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Amended:
    """Send ``text`` upstream (the client's event as the policy left it), then tell the
    client ``notice`` (an ``error`` event about what was removed)."""

    text: str
    notice: str


@dataclass(frozen=True, slots=True)
class Redial:
    """The upstream is gone (a failover) or going (a rollover), the session is not: dial a new
    upstream, which the bridge then gives the session and conversation before anything else.
    ``texts`` go to the client first: a failed ``response.done`` for each response in flight."""

    texts: tuple[str, ...]
    why: str
    #: A rollover (the relay's own choice), not a failure.
    planned: bool = False


class Observer(Protocol):
    """What the relay's operator hears of one session (the shell logs and counts it)."""

    def screened(self, screened: Screened) -> None:
        """The policy dropped or refused fields of a client's event (:attr:`Screened.fields`)."""

    def setup_refused(self, code: str, message: str) -> None:
        """The upstream refused the relay's own ``session.update``: a configuration error."""

    def takeover(self, kind: str, outcome: str, detail: str) -> None:
        """The session's upstream is being replaced (``kind`` failover or rollover):
        ``outcome`` is started, moved (the new upstream runs the session) or failed."""


@dataclass(frozen=True, slots=True)
class Ending:
    """How to end the pair.

    ``error`` (if any) is sent to the client before its close frame.
    ``client_code`` is None when the client is already gone, ``upstream_code`` is
    None when there is no open upstream to close.
    """

    cause: Cause
    client_code: int | None
    client_reason: str
    upstream_code: int | None
    upstream_reason: str = ""
    error: str | None = None
    #: Sent upstream just before its close frame (e.g. a response.cancel).
    upstream_last: str | None = None


@dataclass(slots=True)
class Traffic:
    """What passed through a pair, for usage accounting (messages as received, before policy)."""

    client_messages: int = 0
    client_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0


class BridgeError(Exception):
    """The shell asked for a transition the bridge cannot make (a bug in the shell)."""


@dataclass(frozen=True, slots=True)
class Limits:
    queue_messages: int
    queue_bytes: int
    max_message_bytes: int


class Bridge:
    """Decides what happens to each message and close of one client/upstream pair.

    ``secret`` is the upstream credential: any upstream message or close reason that
    contains it is redacted before it reaches the client.
    """

    # Slots: the bridge is read for every message of every session, most of them cold in cache.
    __slots__ = (
        "phase",
        "ending",
        "_session_update",
        "_limits",
        "_secret",
        "_secret_in",
        "_binary_as_audio",
        "_policy",
        "_appends_pass",
        "_deltas_pass",
        "_max_message_bytes",
        "traffic",
        "responses_done",
        "responses_seen",
        "_queue",
        "_queued_bytes",
        "queued_at_open",
        "_auth_refusal_reported",
        "_observer",
        "_opening",
        "_created",
        "_answered",
        "_answer",
        "_held",
        "_held_bytes",
        "_ledger",
        "_takeover",
        "_replay",
        "_echoes",
        "_reopening",
        "_reanswered",
        "takeovers",
    )

    def __init__(
        self,
        *,
        session_update: str,
        limits: Limits,
        secret: str = "",
        binary_as_audio: bool = True,
        policy: Policy | None = None,
        observer: Observer | None = None,
        ledger: Ledger | None = None,
    ) -> None:
        self.phase = Phase.CONNECTING
        self.ending: Ending | None = None
        self._session_update = session_update
        self._limits = limits
        self._secret = secret
        self._secret_in = finder(secret) if secret else None
        self._binary_as_audio = binary_as_audio
        self._policy = policy
        # Audio, nearly every message of a session, takes a short path (the policy's answer
        # for it asked once); the answers are the same as the general path's.
        self._appends_pass = policy is None or policy.appends_pass
        self._deltas_pass = policy is None or policy.deltas_pass
        self._max_message_bytes = limits.max_message_bytes
        self.traffic = Traffic()
        #: ``response.done`` events seen since the shell last took them (for usage and budgets).
        self.responses_done: list[dict[str, object]] = []
        #: ``response.done`` events seen in all (for the session's log line).
        self.responses_seen = 0
        #: The pre-open queue: made by the first message queued, dropped once flushed (a deque
        #: is 600 bytes, which an idle session need not carry).
        self._queue: deque[Message] | None = None
        self._queued_bytes = 0
        #: Client messages held while the upstream opened (None until it opens), for metrics.
        self.queued_at_open: int | None = None
        self._auth_refusal_reported = False
        self._observer = observer
        #: Until the client has its session.created (see the module docstring).
        self._opening = True
        self._created: Message | None = None  # the upstream's session.created, held
        self._answered = False  # the answer to the relay's session.update has come
        self._answer: dict[str, object] | None = None  # the session it carried
        #: What waits for session.created: (from upstream, text), in arrival order.
        self._held: list[tuple[bool, Message]] = []
        self._held_bytes = 0
        #: What the session established, for a new upstream to take it over (None: no takeover;
        #: the upstream's end is the session's). See relay.core.ledger.
        self._ledger = ledger
        #: Why the session is moving to a new upstream ("failover", "rollover"), or None.
        self._takeover: str | None = None
        #: The takeover's own messages, flushed first (a deque once there are any: an empty
        #: deque is 600 bytes, and every idle session would carry one).
        self._replay: deque[str] | None = None
        self._echoes: set[str] | None = None  # replayed item ids the client must not see again
        self._reopening = False  # the new upstream has not answered the re-applied session yet
        self._reanswered = False
        #: Upstreams that took the session over (failovers and rollovers done).
        self.takeovers = 0

    @property
    def queued(self) -> int:
        """Client messages waiting in the pre-open queue."""
        return len(self._queue) if self._queue is not None else 0

    # -- client → upstream ------------------------------------------------------

    def client_message(self, data: Message) -> Message | Reply | Amended | Ending | None:
        """A message from the client.

        Returns what to send upstream now, a :class:`Reply` for the client, an
        :class:`Amended` event (upstream, then a notice for the client), an
        :class:`Ending`, or None when the message was queued, refused before the client
        had its ``session.created`` (the refusal waits for it), or the pair is over.
        """
        size = len(data)
        traffic = self.traffic
        traffic.client_messages += 1
        traffic.client_bytes += size
        append = None  # whether it is an audio append, once looked at
        if (
            self.phase is Phase.OPEN
            and self._appends_pass
            and data.__class__ is str
            and size <= self._max_message_bytes
        ):
            if is_audio_append(data):  # type: ignore[arg-type]
                return data  # audio: goes upstream as it is
            append = False
        if size > self._max_message_bytes:
            if self.phase is Phase.CLOSED:
                return None
            return self._end_too_big(size)
        if self.phase is Phase.CLOSED:
            return None
        if data.__class__ is bytes:
            if not self._binary_as_audio:
                return self._say(
                    error_event(
                        "relay_binary_not_supported",
                        "This relay takes JSON text events only; binary frames are refused"
                        " (RELAY_BINARY_FRAMES=reject). Send audio as input_audio_buffer.append.",
                    )
                )
            data = _append_event(data)  # type: ignore[arg-type]
        notice = None
        kind = None
        if self._policy is not None:
            # Binary audio too: it goes upstream as an append, so the policy's lists apply.
            screened = self._policy.screen_client(data, append)  # type: ignore[arg-type]
            if screened.fields and self._observer is not None:
                self._observer.screened(screened)
            if screened.text is None:
                return self._say(screened.reply)  # type: ignore[arg-type]
            data, notice, kind = screened.text, screened.reply, screened.kind
        elif self._ledger is not None:
            kind = event_type(data)
        if kind == "session.update" and self._ledger is not None:
            event = parse_event(data)
            stamped = self._ledger.client_update(event) if event is not None else None
            if stamped is not None:
                data = stamped
        if notice is not None and self._opening:  # (always so while the upstream opens)
            held = self._say(notice)
            if held is not None:
                return held  # the wait for session.created overflowed
            notice = None
        if self.phase is Phase.OPEN:
            return data if notice is None else Amended(data, notice)  # type: ignore[arg-type]
        return self._enqueue(data)

    def _say(self, text: str) -> Reply | Ending | None:
        """An event of the relay's own for the client: now, or once it has session.created."""
        if self.phase is Phase.CLOSED:
            return None
        if not self._opening:
            return Reply(text)
        return self._hold(False, text)

    def _hold(self, upstream: bool, text: Message) -> Ending | None:
        """Keep ``text`` for after session.created, within the pre-open queue's limits."""
        if self._full(len(self._held), self._held_bytes, len(text)):
            return self._overflow(
                "before session.created",
                "The Realtime API had not yet answered the relay's session setup",
                len(self._held),
                self._held_bytes,
            )
        self._held.append((upstream, text))
        self._held_bytes += len(text)
        return None

    def _full(self, count: int, size: int, more: int) -> bool:
        limits = self._limits
        return count >= limits.queue_messages or size + more > limits.queue_bytes

    def _overflow(self, when: str, situation: str, count: int, size: int) -> Ending | None:
        """More waited (in the pre-open queue, or for session.created) than the limits allow."""
        limits = self._limits
        return self._end(
            Cause.QUEUE_OVERFLOW,
            client=(Code.TRY_AGAIN_LATER, f"too many messages {when}"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            error=error_event(
                "relay_queue_overflow",
                f"{situation}, and the relay already held {count} messages ({size} bytes)"
                f" {when}; the limits are {limits.queue_messages} messages and"
                f" {limits.queue_bytes} bytes. Wait for session.created before streaming, or"
                " raise RELAY_QUEUE_MESSAGES / RELAY_QUEUE_BYTES.",
                kind="server_error",
            ),
        )

    def _enqueue(self, data: Message) -> Ending | None:
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        if self._full(len(queue), self._queued_bytes, len(data)):
            return self._overflow(
                "before the upstream opened",
                "The upstream was still connecting",
                len(queue),
                self._queued_bytes,
            )
        queue.append(data)
        self._queued_bytes += len(data)
        return None

    def _end_too_big(self, size: int) -> Ending:
        limit = self._limits.max_message_bytes
        return self._end(
            Cause.MESSAGE_TOO_BIG,
            client=(Code.MESSAGE_TOO_BIG, f"message of {size} bytes exceeds {limit}"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            error=error_event(
                "relay_message_too_big",
                f"A message of {size} bytes exceeds the relay's limit of {limit} bytes"
                " (RELAY_MAX_MESSAGE_BYTES). Split audio into smaller appends.",
            ),
        )

    # -- opening ----------------------------------------------------------------

    @property
    def session_update(self) -> str:
        """The relay's own ``session.update``: what a session it already set up (a pooled one)
        must have had, to serve this bridge."""
        return self._session_update

    def upstream_opened(self, created: str | None = None) -> None:
        """The upstream WebSocket is open: start flushing, session.update first.

        ``created`` is given for an upstream whose session the relay already set up (a warm
        pooled one: its ``session.update`` sent and answered): the ``session.created`` the
        client gets, carrying that answered session. Then nothing is sent for the setup again,
        and the start comes once the queue is flushed (:meth:`start_now`).

        In a takeover (:meth:`begin_rollover`, a :class:`Redial`) the new upstream gets the
        session as it stood and the conversation's replay first, whatever its source had set
        up (``created`` is then not the client's: it has its session).
        """
        if self.phase is Phase.CLOSED:
            # The pair ended while the dial finished: nothing may go upstream.
            self._queue = None
            self._queued_bytes = 0
            return
        if self.phase is not Phase.CONNECTING:
            raise BridgeError(f"upstream_opened() in phase {self.phase.name}")
        self.phase = Phase.FLUSHING
        if self._takeover is not None:
            texts, self._echoes = self._ledger.replay(SETUP_EVENT_ID)  # type: ignore[union-attr]
            self._replay = deque(texts)
            self._reopening = True
            self._reanswered = False
            return
        self.queued_at_open = self.queued
        if created is not None:
            self._created = created
            self._answered = True
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.appendleft(self._session_update)
        self._queued_bytes += len(self._session_update)

    def start_now(self) -> Batch | None:
        """After the flush, the start of a session set up in advance (``session.created``,
        then what waited for it), for the client before anything else; None for a dialled
        upstream (its start comes with the answer to the relay's update) or an ended pair.
        Client messages that came while it flushed were queued and flushed, and the relay's
        own words were held, just as for a dialled upstream before its answer."""
        if not self._opening or self._created is None or not self._answered:
            return None
        if self.phase is Phase.CLOSED:
            return None
        return self._start()

    def next_to_flush(self) -> Message | None:
        """The next message to send upstream while FLUSHING; None once the queue is
        empty, and from then on the pair is OPEN (unless it already ended)."""
        if self._replay:
            return self._replay.popleft()
        if self._queue:
            data = self._queue.popleft()
            self._queued_bytes -= len(data)
            return data
        self._queue = self._replay = None
        if self.phase is Phase.FLUSHING:
            self.phase = Phase.OPEN
        return None

    def requeue(self, data: Message) -> Ending | None:
        """A client message the relay had sent upstream as that upstream went away: it goes to
        the next one, in its place (the client's task, which holds it, has read nothing since)."""
        if self.phase is not Phase.CONNECTING:
            return None  # the pair is over
        if self._ledger is not None and event_type(data) == "session.update":
            event = parse_event(data)  # (noted, and stamped, as it first came through)
            self._ledger.requeued(event.get("event_id") if event is not None else None)
        return self._enqueue(data)

    def _queued_updates(self) -> set[str]:
        """The ids of the client's session.updates in the pre-open queue (they all have one:
        the ledger stamps those that came without)."""
        ids = set()
        for text in self._queue or ():
            if text.__class__ is str and '"session.update"' in text:  # (a takeover's rare path)
                event = parse_event(text)  # type: ignore[arg-type]
                if event is not None and event.get("type") == "session.update":
                    ids.add(event.get("event_id"))
        return ids  # type: ignore[return-value]

    # -- moving the session to a new upstream ----------------------------------------

    @property
    def can_take_over(self) -> bool:
        """Whether the session can move to a new upstream (it keeps a ledger)."""
        return self._ledger is not None

    @property
    def taking_over(self) -> bool:
        """Whether the session is between upstreams, or its new one has not yet confirmed it."""
        return self._takeover is not None

    @property
    def between_turns(self) -> bool:
        """Whether a rollover may move the session now: open, nothing in flight."""
        ledger = self._ledger
        return (
            ledger is not None
            and self.phase is Phase.OPEN
            and not self._opening
            and self._takeover is None
            and ledger.between_turns
        )

    def begin_rollover(self) -> bool:
        """Move the session to a fresh upstream ahead of the Realtime API's cap, if it is
        between turns: from now on client messages wait for the new upstream, and the shell
        closes the old one (whose close, and the events before it, come in as usual)."""
        if not self.between_turns:
            return False
        self._takeover = "rollover"
        self.phase = Phase.CONNECTING
        return True

    def _redial(self, why: str) -> Redial | Ending | None:
        """The upstream is gone: the session waits for a new one (see :class:`Redial`)."""
        planned = self._takeover == "rollover" and not self._reopening
        if not planned:  # (a rollover's new upstream lost before it confirmed: a failure too)
            self._takeover = "failover"
        self._reopening = False
        self.phase = Phase.CONNECTING
        self._replay = None
        lost = self._ledger.lost(self._queued_updates())  # type: ignore[union-attr]
        texts = tuple(_failed_response(rid, why) for rid in lost)
        if self._observer is not None:
            kind = "rollover" if planned else "failover"
            self._observer.takeover(kind, "started", why)
        return Redial(texts, why, planned=planned)

    def _may_fail_over(self) -> bool:
        return (
            self._ledger is not None
            and not self._opening
            and self.phase in (Phase.FLUSHING, Phase.OPEN, Phase.CONNECTING)
        )

    def takeover_failed(self, detail: str, *, status: int | None = None) -> Ending | None:
        """No new upstream could be had (the shell's tries are spent): end the session."""
        if self._observer is not None:
            self._observer.takeover(self._takeover or "failover", "failed", detail)
        if status in (401, 403):
            return self.dial_failed(detail, status=status)
        return self._lost(
            "upstream connection lost",
            f"The connection to the Realtime API was lost and the relay could not open a new one"
            f" ({detail}). Reconnect to start a new session.",
        )

    def _reopened(self, data: Message) -> Message | Reply | Ending | None:
        """An upstream event while a new upstream takes the session over: its session.created
        and the answer to the re-applied session are the relay's, not the client's."""
        event = parse_event(data)
        kind = event.get("type") if event is not None else None
        if kind == "session.created":
            return None
        if kind == "session.updated" and not self._reanswered:
            return self._taken_over()
        if kind == "error" and _names_setup(event):  # type: ignore[arg-type]
            error = event["error"]  # type: ignore[index]
            if self._observer is not None:
                self._observer.setup_refused(str(error.get("code")), str(error.get("message")))
            return self._end(
                Cause.UPSTREAM_LOST,
                client=(Code.INTERNAL_ERROR, "upstream refused the restored session"),
                upstream=Code.NORMAL,
                error=error_event(
                    "relay_upstream_lost",
                    "The connection to the Realtime API was lost, and the new one refused the"
                    " session as it stood. Reconnect to start a new session.",
                    kind="server_error",
                ),
            )
        return self._to_client(data)

    def _taken_over(self) -> Reply | None:
        """The new upstream runs the session: tell the client of a failover (a rollover is
        planned and loses nothing, so it goes unannounced)."""
        why, self._takeover = self._takeover, None
        self._reopening = False
        self._reanswered = True
        self.takeovers += 1
        ledger = self._ledger
        if self._observer is not None:
            restored = f"{ledger.items} items restored, {ledger.skipped} not"  # type: ignore[union-attr]
            self._observer.takeover(why or "failover", "moved", restored)
        if why != "failover":
            return None
        restored = f"{ledger.items} conversation items were restored under their ids"  # type: ignore[union-attr]
        if ledger.skipped:  # type: ignore[union-attr]
            restored += (
                f"; {ledger.skipped} could not be (audio without a transcript, or items only the"  # type: ignore[union-attr]
                " server creates)"
            )
        return Reply(
            error_event(
                "relay_upstream_reconnected",
                "The connection to the Realtime API dropped and the relay opened a new one: the"
                f" session is as it was, and {restored}. A response that was under way failed"
                " (its response.done says so); ask again. Audio not yet committed was lost.",
                kind="server_error",
            )
        )

    # -- upstream → client ------------------------------------------------------

    def upstream_message(self, data: Message) -> Message | Reply | Batch | Ending | None:
        """A message from the upstream: what to send the client (None: nothing)."""
        if self.phase is Phase.CLOSED:
            return None
        traffic = self.traffic
        traffic.upstream_messages += 1
        traffic.upstream_bytes += len(data)
        if (
            data.__class__ is str
            and data.startswith(DELTA)  # type: ignore[arg-type]
            and not self._opening
            and (self._secret_in is None or not self._secret_in(data))  # type: ignore[arg-type]
        ):
            return data if self._deltas_pass else None  # audio: no error, nothing to redact
        if self._opening:
            return self._starting(data)
        if self._reopening:
            return self._reopened(data)
        return self._to_client(data)

    def _to_client(self, data: Message) -> Message | Reply | None:
        """What the client sees of an upstream event: accounting, redaction, policy."""
        if data.__class__ is str:
            # Read as a parser reads it (invariant 9): usage counts only a real response.done.
            read = data
            event = parse_event(data)
            kind = event.get("type") if event is not None else None
            if kind == "response.done":
                self.responses_seen += 1
                self.responses_done.append(event)  # type: ignore[arg-type]
            elif kind == "error":
                replaced = self._screen_error(event)  # type: ignore[arg-type]
                if replaced is not None:
                    return replaced
            if self._ledger is not None and kind in WATCHED:
                if self._echoes and kind in _ECHOES and _echo(event, self._echoes, kind):  # type: ignore[arg-type]
                    return None  # the replay's own item, as the new upstream confirms it
                if kind == "error" and _is_takeover_error(event):  # type: ignore[arg-type]
                    return None  # about the relay's replay, or the cap it is moving past
                if self._ledger.upstream_event(kind, event):  # type: ignore[arg-type]
                    data = dumps(event)  # type: ignore[arg-type]
            if self._secret_in is not None and self._secret_in(data):  # type: ignore[arg-type]
                data = data.replace(self._secret, "[redacted]")  # type: ignore[union-attr,arg-type]
            if self._policy is not None:
                return self._policy.screen_upstream(data, kind if data is read else UNREAD)  # type: ignore[arg-type]
        elif self._secret and self._secret.encode() in data:  # type: ignore[operator]
            return data.replace(self._secret.encode(), b"[redacted]")  # type: ignore[union-attr,arg-type]
        return data

    def _starting(self, data: Message) -> Message | Reply | Batch | Ending | None:
        """An upstream event before the client has its session.created (module docstring)."""
        event = parse_event(data)
        kind = event.get("type") if event is not None else None
        if kind == "session.created" and self._created is None:
            self._created = data
        elif kind == "session.updated" and not self._answered:
            self._answered = True  # the answer to the relay's update: never forwarded
            session = event.get("session")  # type: ignore[union-attr]
            self._answer = session if isinstance(session, dict) else None
        elif kind == "error" and not self._answered and _names_setup(event):  # type: ignore[arg-type]
            self._answered = True
            error = event["error"]  # type: ignore[index]
            if self._observer is not None:
                self._observer.setup_refused(str(error.get("code")), str(error.get("message")))
            ending = self._hold(True, data)  # the client gets it, after session.created
            if ending is not None:
                return ending
        elif self._created is None:
            return self._to_client(data)  # no session yet: as it comes
        else:
            ending = self._hold(True, data)
            if ending is not None:
                return ending
        if self._created is None or not self._answered:
            return None
        return self._start()

    def _start(self) -> Batch:
        """session.created (with the relay's session), then everything held, in order."""
        self._opening = False
        created = self._created
        if self._answer is not None:
            event = parse_event(created)  # type: ignore[arg-type]
            if event is not None:
                event["session"] = self._answer
                created = dumps(event)
        texts = []
        for upstream, text in ((True, created), *self._held):
            out = self._to_client(text) if upstream else text  # type: ignore[arg-type]
            if out is not None:
                texts.append(out.text if out.__class__ is Reply else out)  # type: ignore[union-attr]
        self._held.clear()
        self._held_bytes = 0
        self._created = self._answer = None
        return Batch(tuple(texts))  # type: ignore[arg-type]

    def _screen_error(self, event: dict[str, object]) -> Reply | None:
        """Replace the upstream's refusal of the relay's key with the relay's own error.

        The upstream's message quotes part of the key and blames the client; the
        client did nothing wrong and must not see any of the key.
        """
        error = event.get("error")
        if not isinstance(error, dict):
            return None
        message = str(error.get("message") or "").lower()
        if error.get("code") == "invalid_api_key" or (
            error.get("code") is None and "authentication" in message
        ):
            self._auth_refusal_reported = True
            return Reply(_auth_refused_event())
        return None

    # -- endings ----------------------------------------------------------------

    def client_closed(self) -> Ending | None:
        """The client went away (its code carries no meaning behind Hypercorn)."""
        return self._end(
            Cause.CLIENT_CLOSED,
            client=None,
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="client closed",
        )

    def upstream_closed(self, code: int, reason: str | None) -> Redial | Ending | None:
        """The upstream closed (or vanished: 1006) after all its messages were read. With a
        ledger, an unexpected end (:data:`FAILOVER_CODES`), or the end of a rollover, moves the
        session to a new upstream (:class:`Redial`)."""
        if self._may_fail_over() and (self._takeover is not None or code in FAILOVER_CODES):
            return self._redial(f"upstream closed {code}")
        if code == UPSTREAM_AUTH_REFUSED:
            return self._end(
                Cause.UPSTREAM_AUTH_REFUSED,
                client=(Code.INTERNAL_ERROR, "upstream refused the relay's credential"),
                upstream=None,
                error=None if self._auth_refusal_reported else _auth_refused_event(),
            )
        if code == 1005:
            return self._end(Cause.UPSTREAM_CLOSED, client=(Code.NORMAL, ""), upstream=None)
        if code == 1015:
            return self._end(
                Cause.UPSTREAM_UNAVAILABLE,
                client=(Code.BAD_GATEWAY, "TLS failure on the upstream connection"),
                upstream=None,
                error=error_event(
                    "relay_upstream_unavailable",
                    "The TLS connection to the Realtime API failed. Try again later.",
                    kind="server_error",
                ),
            )
        if not sendable(code):
            return self._lost(
                "upstream connection lost",
                "The connection to the Realtime API ended without a close frame"
                f" (code {code}). Reconnect to start a new session.",
            )
        reason = reason or ""
        if code == Code.MESSAGE_TOO_BIG and _OWN_SIZE_LIMIT.fullmatch(reason):
            return self._end(
                Cause.MESSAGE_TOO_BIG,
                client=(code, reason),
                upstream=None,  # relay.wire.websocket has closed it already
                error=error_event(
                    "relay_upstream_message_too_big",
                    f"The Realtime API sent a message larger than this relay accepts ({reason};"
                    " RELAY_UPSTREAM_MAX_MESSAGE_BYTES), so the session was closed. Reconnect"
                    " to start a new one; if it keeps happening, tell the relay's operator.",
                    kind="server_error",
                ),
            )
        if self._secret and self._secret in reason:
            reason = reason.replace(self._secret, "[redacted]")
        return self._end(Cause.UPSTREAM_CLOSED, client=(code, reason), upstream=None)

    def dial_failed(self, detail: str, *, status: int | None = None) -> Ending | None:
        """Opening the upstream failed: unreachable, timed out, or refused with ``status``."""
        if status in (401, 403):
            return self._end(
                Cause.UPSTREAM_AUTH_REFUSED,
                client=(Code.INTERNAL_ERROR, "upstream refused the relay's credential"),
                upstream=None,
                error=_auth_refused_event(),
            )
        return self._end(
            Cause.UPSTREAM_UNAVAILABLE,
            client=(Code.BAD_GATEWAY, "upstream unavailable"),
            upstream=None,
            error=error_event(
                "relay_upstream_unavailable",
                f"The relay could not reach the Realtime API ({detail}). Try again shortly.",
                kind="server_error",
            ),
        )

    def client_too_slow(self, seconds: float) -> Ending | None:
        """The client took more than ``seconds`` to accept one message."""
        return self._end(
            Cause.CLIENT_TOO_SLOW,
            client=(Code.POLICY_VIOLATION, "client too slow to read"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="client too slow",
            error=error_event(
                "relay_client_too_slow",
                f"The relay could not deliver an event to you within {seconds:g} s"
                " (RELAY_SEND_TIMEOUT): read events as they arrive.",
            ),
        )

    def upstream_too_slow(self, seconds: float) -> Ending | None:
        """The upstream took more than ``seconds`` to accept one message."""
        return self._end(
            Cause.UPSTREAM_TOO_SLOW,
            client=(Code.BAD_GATEWAY, "upstream stalled"),
            upstream=None,  # a send was cut mid-frame: no close frame, the socket is dropped
            error=error_event(
                "relay_upstream_stalled",
                f"The Realtime API stopped taking messages for {seconds:g} s. Reconnect to"
                " start a new session.",
                kind="server_error",
            ),
        )

    def budget_exhausted(self, budget: str = "token") -> Ending | None:
        """The user's daily ``budget`` (``token`` or ``spending``) is used up: cancel any
        response, warn, close 4029."""
        return self._end(
            Cause.BUDGET_EXHAUSTED,
            client=(Code.BUDGET_EXHAUSTED, f"daily {budget} budget used up"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="budget exhausted",
            error=error_event(
                "relay_budget_exhausted",
                f"Your daily {budget} budget is used up; the session ends now. It resets at"
                " 00:00 UTC.",
            ),
            upstream_last='{"type":"response.cancel"}',
        )

    def session_warning(self, seconds_left: float, limit: float) -> Reply | Ending | None:
        """The session will reach its maximum length in ``seconds_left``."""
        return self._say(
            error_event(
                "relay_session_ending_soon",
                f"This session ends in {seconds_left:.0f} s: it reaches the relay's limit of"
                f" {limit:g} s per session. Finish the turn, then reconnect for a new session.",
            )
        )

    def session_expired(self, limit: float) -> Ending | None:
        """The session reached its maximum length: close 1001, as the Realtime API does."""
        return self._end(
            Cause.SESSION_EXPIRED,
            client=(Code.GOING_AWAY, f"session hit the maximum duration of {limit:g} s"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="session expired",
            error=error_event(
                "session_expired",
                f"Your session hit the relay's maximum duration of {limit:g} s"
                " (RELAY_MAX_SESSION_SECONDS). Reconnect to start a new session.",
            ),
        )

    def idle_warning(self, seconds_left: float, limit: float) -> Reply | Ending | None:
        """Nothing has passed either way for a while; the cut comes in ``seconds_left``."""
        return self._say(
            error_event(
                "relay_idle_warning",
                f"Nothing has been sent either way for {limit - seconds_left:.0f} s; this session"
                f" closes in {seconds_left:.0f} s unless traffic resumes (RELAY_IDLE_TIMEOUT).",
            )
        )

    def idle_timeout(self, limit: float) -> Ending | None:
        """Nothing passed either way for ``limit`` seconds: close 4008."""
        return self._end(
            Cause.IDLE_TIMEOUT,
            client=(Code.IDLE_TIMEOUT, "idle timeout"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="idle timeout",
            error=error_event(
                "relay_idle_timeout",
                f"Nothing was sent either way for {limit:g} s (RELAY_IDLE_TIMEOUT), so the"
                " session was closed. Reconnect to start a new one.",
            ),
        )

    def draining_notice(self, seconds: float) -> Reply | Ending | None:
        """The relay is restarting: the session has ``seconds`` left to finish."""
        return self._say(
            error_event(
                "relay_draining",
                f"The relay is restarting: finish the current turn; this session will be closed"
                f" (1012) in {seconds:g} s at most. Reconnect to continue with a new session.",
                kind="server_error",
            )
        )

    def shutdown(self) -> Ending | None:
        """The relay is going away and the drain time is over: client 1012, upstream 1001."""
        return self._end(
            Cause.SHUTDOWN,
            client=(Code.SERVICE_RESTART, "relay restarting"),
            upstream=Code.GOING_AWAY if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            error=error_event(
                "relay_shutting_down",
                "The relay is restarting. Reconnect to continue with a new session.",
                kind="server_error",
            ),
        )

    def overloaded(self) -> Ending | None:
        """The relay is too far behind to serve every session: this one is shed (1013)."""
        return self._end(
            Cause.OVERLOADED,
            client=(Code.TRY_AGAIN_LATER, "relay overloaded"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="relay overloaded",
            error=error_event(
                "relay_overloaded",
                "The relay has more live audio than it can forward without delay, and this"
                " session was among those sending or receiving the most. Reconnect shortly"
                " (another instance may take it).",
                kind="server_error",
            ),
        )

    def too_fast(self, rate: float) -> Ending | None:
        """The client sent faster than ``rate`` bytes a second, beyond its burst: close 4009."""
        return self._end(
            Cause.TOO_FAST,
            client=(Code.TOO_FAST, "sending faster than the relay's rate limit"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="client too fast",
            error=error_event(
                "relay_rate_limited",
                f"You sent faster than this relay accepts from one session ({rate:g} bytes a"
                " second, RELAY_CLIENT_MAX_RATE, about ten times real-time audio, after a"
                " burst), so the session was closed. Send audio at the pace it is recorded.",
            ),
        )

    def internal_error(self) -> Ending | None:
        """A bug in the relay ended this pair (the shell logs it): close 1011."""
        return self._end(
            Cause.INTERNAL_ERROR,
            client=(Code.INTERNAL_ERROR, "relay internal error"),
            upstream=Code.NORMAL if self.phase in (Phase.FLUSHING, Phase.OPEN) else None,
            upstream_reason="relay internal error",
            error=error_event(
                "relay_internal_error",
                "The relay hit an internal error in this session and closed it. Reconnect to"
                " start a new session; the relay's operator has the details in its log.",
                kind="server_error",
            ),
        )

    def upstream_unresponsive(self, seconds: float) -> Redial | Ending | None:
        """The upstream answered no ping for ``seconds``: take it for dead, drop its socket
        (and, with a ledger, move the session to a new one)."""
        if self._may_fail_over():
            return self._redial(f"no pong for {seconds:g} s")
        return self._lost(  # (a dead peer cannot finish a close handshake: no close frame)
            "upstream stopped answering",
            f"The Realtime API stopped answering for {seconds:g} s (RELAY_PEER_TIMEOUT)."
            " Reconnect to start a new session.",
        )

    def _lost(self, reason: str, message: str) -> Ending | None:
        """The upstream is gone and the session with it: 1011 and ``relay_upstream_lost``."""
        return self._end(
            Cause.UPSTREAM_LOST,
            client=(Code.INTERNAL_ERROR, reason),
            upstream=None,
            error=error_event("relay_upstream_lost", message, kind="server_error"),
        )

    def _end(
        self,
        cause: Cause,
        *,
        client: tuple[int, str] | None,
        upstream: int | None,
        upstream_reason: str = "",
        error: str | None = None,
        upstream_last: str | None = None,
    ) -> Ending | None:
        if self.phase is Phase.CLOSED:
            return None
        self.phase = Phase.CLOSED
        self.ending = Ending(
            cause=cause,
            client_code=client[0] if client else None,
            client_reason=clip_reason(client[1]) if client else "",
            upstream_code=upstream,
            upstream_reason=upstream_reason,
            error=error,
            upstream_last=upstream_last,
        )
        return self.ending


def _names_setup(event: dict[str, object]) -> bool:
    """Whether an ``error`` event is about the relay's own session.update."""
    error = event.get("error")
    return isinstance(error, dict) and error.get("event_id") == SETUP_EVENT_ID


def _echo(event: dict[str, object], echoes: set[str], kind: str) -> bool:
    """Whether an item event echoes a replayed item (the last echo of it forgets it)."""
    item = event.get("item")
    item_id = item.get("id") if isinstance(item, dict) else None
    if item_id not in echoes:
        return False
    if kind != "conversation.item.added":
        echoes.discard(item_id)  # type: ignore[arg-type]
    return True


def _is_takeover_error(event: dict[str, object]) -> bool:
    """An ``error`` about the relay's replay (an item the new upstream would not take again),
    or the cap a session with a ledger is about to move past (``session_expired``)."""
    error = event.get("error")
    if not isinstance(error, dict):
        return False
    named = error.get("event_id")
    return (isinstance(named, str) and named.startswith(REPLAY)) or (
        error.get("code") == "session_expired"
    )


def _failed_response(response_id: str, why: str) -> str:
    """The ``response.done`` of a response that died with its upstream: ``failed``, as the
    Realtime API reports a response that failed (usage null: nothing is billed through it)."""
    return dumps(
        {
            "type": "response.done",
            "event_id": "event_relay" + secrets.token_hex(8),
            "response": {
                "object": "realtime.response",
                "id": response_id,
                "status": "failed",
                "status_details": {
                    "type": "failed",
                    "error": {
                        "type": "server_error",
                        "code": "relay_upstream_lost",
                        "message": f"The connection to the Realtime API was lost mid-response"
                        f" ({why}); the relay reconnected. Ask again.",
                    },
                },
                "output": [],
                "conversation_id": None,
                "usage": None,
                "metadata": None,
            },
        }
    )


def _append_event(audio: bytes) -> str:
    return (
        '{"type":"input_audio_buffer.append","audio":"'
        + base64.b64encode(audio).decode("ascii")
        + '"}'
    )


def _auth_refused_event() -> str:
    return error_event(
        "relay_upstream_auth_refused",
        "The Realtime API refused the relay's own credential. This is a problem with the"
        " relay's configuration, not with your request; the operator has been told.",
        kind="server_error",
    )
