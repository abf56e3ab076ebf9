"""What the relay keeps of one session besides relaying it: what it cost, its record and its
trace.

A :class:`Call` is made per admitted session. Every batch of ``response.done`` events goes
through :meth:`Call.responses_done`: priced (:mod:`relay.core.pricing`), counted in the
metrics, added to the user's usage (which checks both daily budgets), and, for a recorded
or traced call, closed as turns in the call's log and turned into spans. When the session
ends, :meth:`Call.ended` ends its span and hands its record to the recorder, neither of
which waits. A session that is neither recorded nor traced has no log: its pair times the
voice latency with a bare VoiceClock, as before.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from ..core.bridge import Ending
from ..core.calllog import CallLog, Turn
from ..core.pricing import Tokens, dollars, tokens_of
from ..ops.records import Record, summary_tokens
from ..usage.accounting import Accounting
from ..usage.auth import Identity
from ..usage.store import usage_of

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .app import RelayApp


def _iso(wall: float) -> str:
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


class Call:
    """One session's cost, record and trace (see the module docstring)."""

    __slots__ = (  # (one per live session)
        "_app",
        "identity",
        "session_id",
        "model",
        "started_wall",
        "started",
        "dial_seconds",
        "cost",
        "priced",
        "also_accounted",
        "log",
        "_spools",
        "_span",
    )

    def __init__(
        self,
        app: RelayApp,
        identity: Identity,
        session_id: str,
        model: str,
        *,
        traced: bool = True,
        session: dict[str, Any] | None = None,
    ) -> None:
        """``traced=False``: priced and accounted only, with no record or trace (a WebRTC or
        SIP call, of which the relay sees the events of its sideband only). ``session`` is the
        one the relay asks for, if not its configured one (a Twilio call's, with μ-law audio):
        the record decodes audio by it until the upstream says."""
        self._app = app
        self.identity = identity
        self.session_id = session_id
        self.model = model
        self.started_wall = time.time()
        self.started = trio.current_time()
        self.dial_seconds: float | None = None
        self.cost = 0
        self.priced = model in app.config.prices
        #: Who else the call's usage counts against, with their own limits (a phone call's line).
        self.also_accounted: list[tuple[Accounting, Identity]] = []
        recorder, tracer = (app.recorder, app.tracer) if traced else (None, None)
        self.log: CallLog | None = None
        self._spools = None
        if recorder is not None or tracer is not None:
            self._spools = recorder.spools(session_id) if recorder is not None else None
            self.log = CallLog(
                trio.lowlevel.current_clock().current_time,
                secret=app.config.openai_api_key,
                session=session or app.config.session_object(),
                spools=self._spools,
            )
        self._span: Span | None = None
        if tracer is not None:
            self._span = tracer.session_started(
                session_id=session_id,
                user=identity.user,
                model=model,
                auth=identity.method,
                start_ns=int(self.started_wall * 1e9),
            )

    @property
    def records_client(self) -> bool:
        """Whether the call's log needs the client's events too (only a record does)."""
        return self._app.recorder is not None

    def _to_ns(self, at: float) -> int:
        """Trio time of this run → Unix nanoseconds (for spans)."""
        return int((self.started_wall + (at - self.started)) * 1e9)

    def upstream_opened(self, seconds: float, queued: int) -> None:
        self.dial_seconds = seconds
        self._app.metrics.upstream_opened(seconds, queued)

    async def responses_done(self, events: list[dict[str, Any]]) -> str | None:
        """Price and account finished responses; which daily budget is now used up, if any."""
        prices = self._app.config.prices
        priced: list[tuple[Tokens, int | None]] = []
        for event in events:
            tokens = tokens_of(event)
            priced.append((tokens, prices.cost(self.model, tokens)))
        cost = sum(c or 0 for _, c in priced)
        self.cost += cost
        self._app.metrics.responses_priced(self.model, cost, (t for t, _ in priced))
        if self.log is not None:
            turns = self.log.responses_done(events, priced)
            if self._span is not None and self._app.tracer is not None:
                self._app.tracer.turns(self._span, turns, self._to_ns, self.model)
        accounting = self._app.accounting
        assert accounting is not None
        usage = [usage_of(tokens, c or 0) for tokens, c in priced]
        used_up = await accounting.record_responses(self.identity, usage)
        for other, identity in self.also_accounted:
            used_up = await other.record_responses(identity, usage) or used_up
        return used_up

    def ended(self, ending: Ending | None, *, pumped: bool, responses: int) -> None:
        """The session is over: end its span, hand its record over (neither waits)."""
        now_wall = time.time()
        cause = ending.cause.value if ending else "error"
        turns = self.log.turns if self.log is not None else []
        if self._span is not None and self._app.tracer is not None:
            self._app.tracer.session_ended(
                self._span,
                {
                    "relay.cause": cause,
                    "relay.client_code": ending.client_code if ending else None,
                    "relay.upstream_code": ending.upstream_code if ending else None,
                    "relay.upstream.dial_ms": _ms(self.dial_seconds),
                    "relay.fast_path": pumped,
                    "relay.turns": len(turns),
                    "relay.cost_usd": dollars(self.cost) if self.priced else None,
                    **{f"gen_ai.usage.{k}": v for k, v in summary_tokens(turns).items()},
                },
                failed=cause not in ("client_closed", "upstream_closed", "session_expired"),
            )
        recorder = self._app.recorder
        if recorder is None or self.log is None:
            return
        summary = {
            "session": self.session_id,
            "user": self.identity.user,
            "auth": self.identity.method,
            "model": self.model,
            "started": _iso(self.started_wall),
            "ended": _iso(now_wall),
            "seconds": round(now_wall - self.started_wall, 3),
            "cause": cause,
            "client_code": ending.client_code if ending else None,
            "upstream_code": ending.upstream_code if ending else None,
            "dial_ms": _ms(self.dial_seconds),
            "fast_path": pumped,
            "responses": responses,
            "turns": len(turns),
            "tokens": summary_tokens(turns),
            "cost_usd": dollars(self.cost) if self.priced else None,
            "turn_details": [self._turn_json(turn) for turn in turns],
        }
        recorder.submit(
            Record(
                session_id=self.session_id,
                started_wall=self.started_wall,
                summary=summary,
                transcript=[
                    replace(line, at=line.at - self.started) for line in self.log.transcript()
                ],
                audio=self.log.audio,
                spools=self._spools,
            )
        )

    def _turn_json(self, turn: Turn) -> dict[str, Any]:
        return {
            "at": round(turn.started - self.started, 3),
            "spoken": turn.spoken,
            "latency_ms": _ms(turn.latency),
            "first_audio_ms": _ms(turn.first_audio - turn.started if turn.first_audio else None),
            "response_ms": _ms(turn.done - turn.started if turn.done is not None else None),
            "status": turn.status,
            "tokens": summary_tokens([turn])["total"],
            "cost_usd": dollars(turn.cost) if turn.cost is not None else None,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
