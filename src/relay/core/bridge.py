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
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto

from .closecodes import UPSTREAM_AUTH_REFUSED, Code, clip_reason, sendable
from .events import error_event, event_type, finder, parse_event
from .policy import APPEND, DELTA, Policy

Message = str | bytes

#: The reason :mod:`relay.wire.frames` closes with when the upstream's message is over the relay's
#: own limit (RELAY_UPSTREAM_MAX_MESSAGE_BYTES), as opposed to an upstream closing with 1009.
_OWN_SIZE_LIMIT = re.compile(r"message over \d+ bytes")


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
    )

    def __init__(
        self,
        *,
        session_update: str,
        limits: Limits,
        secret: str = "",
        binary_as_audio: bool = True,
        policy: Policy | None = None,
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
        self._queue: deque[Message] = deque()
        self._queued_bytes = 0
        #: Client messages held while the upstream opened (None until it opens), for metrics.
        self.queued_at_open: int | None = None
        self._auth_refusal_reported = False

    # -- client → upstream ------------------------------------------------------

    def client_message(self, data: Message) -> Message | Reply | Ending | None:
        """A message from the client.

        Returns what to send upstream now, a :class:`Reply` for the client, an
        :class:`Ending`, or None when the message was queued (or the pair is over).
        """
        size = len(data)
        traffic = self.traffic
        traffic.client_messages += 1
        traffic.client_bytes += size
        if (
            self.phase is Phase.OPEN
            and self._appends_pass
            and data.__class__ is str
            and size <= self._max_message_bytes
            and data.startswith(APPEND)  # type: ignore[arg-type]
        ):
            return data  # audio: goes upstream as it is
        if size > self._max_message_bytes:
            if self.phase is Phase.CLOSED:
                return None
            return self._end_too_big(size)
        if data.__class__ is bytes:
            if not self._binary_as_audio:
                return Reply(
                    error_event(
                        "relay_binary_not_supported",
                        "This relay takes JSON text events only; binary frames are refused"
                        " (RELAY_BINARY_FRAMES=reject). Send audio as input_audio_buffer.append.",
                    )
                )
            data = _append_event(data)  # type: ignore[arg-type]
        if self._policy is not None:
            # Binary audio too: it goes upstream as an append, so the policy's lists apply.
            data, refusal = self._policy.screen_client(data)  # type: ignore[arg-type]
            if refusal is not None:
                return Reply(refusal) if self.phase is not Phase.CLOSED else None
        if data is None:
            return None
        if self.phase is Phase.OPEN:
            return data
        if self.phase is Phase.CLOSED:
            return None
        return self._enqueue(data)

    def _enqueue(self, data: Message) -> Ending | None:
        limits = self._limits
        if (
            len(self._queue) >= limits.queue_messages
            or self._queued_bytes + len(data) > limits.queue_bytes
        ):
            return self._end(
                Cause.QUEUE_OVERFLOW,
                client=(Code.TRY_AGAIN_LATER, "too many messages before the upstream opened"),
                upstream=Code.NORMAL if self.phase is Phase.FLUSHING else None,
                error=error_event(
                    "relay_queue_overflow",
                    f"The upstream was still connecting and the relay already held"
                    f" {len(self._queue)} messages ({self._queued_bytes} bytes); the limits are"
                    f" {limits.queue_messages} messages and {limits.queue_bytes} bytes."
                    " Wait for session.created before streaming, or raise RELAY_QUEUE_MESSAGES"
                    " / RELAY_QUEUE_BYTES.",
                    kind="server_error",
                ),
            )
        self._queue.append(data)
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

    def upstream_opened(self) -> None:
        """The upstream WebSocket is open: start flushing, session.update first."""
        if self.phase is Phase.CLOSED:
            # The pair ended while the dial finished: nothing may go upstream.
            self._queue.clear()
            self._queued_bytes = 0
            return
        if self.phase is not Phase.CONNECTING:
            raise BridgeError(f"upstream_opened() in phase {self.phase.name}")
        self.phase = Phase.FLUSHING
        self.queued_at_open = len(self._queue)
        self._queue.appendleft(self._session_update)
        self._queued_bytes += len(self._session_update)

    def next_to_flush(self) -> Message | None:
        """The next message to send upstream while FLUSHING; None once the queue is
        empty, and from then on the pair is OPEN (unless it already ended)."""
        if self._queue:
            data = self._queue.popleft()
            self._queued_bytes -= len(data)
            return data
        if self.phase is Phase.FLUSHING:
            self.phase = Phase.OPEN
        return None

    # -- upstream → client ------------------------------------------------------

    def upstream_message(self, data: Message) -> Message | Reply | None:
        """A message from the upstream: what to send the client (None: nothing)."""
        if self.phase is Phase.CLOSED:
            return None
        traffic = self.traffic
        traffic.upstream_messages += 1
        traffic.upstream_bytes += len(data)
        if data.__class__ is str:
            if data.startswith(DELTA) and (  # type: ignore[arg-type]
                self._secret_in is None or not self._secret_in(data)  # type: ignore[arg-type]
            ):
                return data if self._deltas_pass else None  # audio: no error, nothing to redact
            kind = _notable(data)  # type: ignore[arg-type]
            if kind == "response.done":
                done = parse_event(data)
                self.responses_seen += 1
                if done is not None:
                    self.responses_done.append(done)
            elif kind == "error":
                replaced = self._screen_error(data)  # type: ignore[arg-type]
                if replaced is not None:
                    return replaced
            if self._secret_in is not None and self._secret_in(data):  # type: ignore[arg-type]
                data = data.replace(self._secret, "[redacted]")  # type: ignore[union-attr,arg-type]
            if self._policy is not None:
                return self._policy.screen_upstream(data)  # type: ignore[arg-type]
        elif self._secret and self._secret.encode() in data:  # type: ignore[operator]
            return data.replace(self._secret.encode(), b"[redacted]")  # type: ignore[union-attr,arg-type]
        return data

    def _screen_error(self, text: str) -> Reply | None:
        """Replace the upstream's refusal of the relay's key with the relay's own error.

        The upstream's message quotes part of the key and blames the client; the
        client did nothing wrong and must not see any of the key.
        """
        event = parse_event(text)
        error = event.get("error") if event else None
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

    def upstream_closed(self, code: int, reason: str | None) -> Ending | None:
        """The upstream closed (or vanished: 1006) after all its messages were read."""
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
            return self._end(
                Cause.UPSTREAM_LOST,
                client=(Code.INTERNAL_ERROR, "upstream connection lost"),
                upstream=None,
                error=error_event(
                    "relay_upstream_lost",
                    "The connection to the Realtime API ended without a close frame"
                    f" (code {code}). Reconnect to start a new session.",
                    kind="server_error",
                ),
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

    def session_warning(self, seconds_left: float, limit: float) -> Reply:
        """The session will reach its maximum length in ``seconds_left``."""
        return Reply(
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

    def idle_warning(self, seconds_left: float, limit: float) -> Reply:
        """Nothing has passed either way for a while; the cut comes in ``seconds_left``."""
        return Reply(
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

    def draining_notice(self, seconds: float) -> Reply:
        """The relay is restarting: the session has ``seconds`` left to finish."""
        return Reply(
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

    def upstream_unresponsive(self, seconds: float) -> Ending | None:
        """The upstream answered no ping for ``seconds``: take it for dead, drop its socket."""
        return self._end(
            Cause.UPSTREAM_LOST,
            client=(Code.INTERNAL_ERROR, "upstream stopped answering"),
            upstream=None,  # a dead peer cannot finish a close handshake
            error=error_event(
                "relay_upstream_lost",
                f"The Realtime API stopped answering for {seconds:g} s (RELAY_PEER_TIMEOUT)."
                " Reconnect to start a new session.",
                kind="server_error",
            ),
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


def _notable(text: str) -> str | None:
    """The type of an upstream event the bridge must look inside (``error`` and
    ``response.done``), else None; the common case is two prefix checks."""
    if text.startswith('{"type":"'):
        if text.startswith('{"type":"error"'):
            return "error"
        if text.startswith('{"type":"response.done"'):
            return "response.done"
        return None
    kind = event_type(text)
    return kind if kind in ("error", "response.done") else None


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
