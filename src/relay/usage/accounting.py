"""Admission, concurrency leases, usage records and the daily budgets (tokens and dollars), over
a usage store.

One :class:`Accounting` per relay instance; every instance sharing a store (one
Redis, or one SQLite file) sees the same counters and leases, so the limits hold
across instances. A session holds a lease on one of its user's concurrency
slots; the lease is renewed while the session lives and expires on its own if
the instance dies, so a crash never keeps a slot taken for good.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from datetime import UTC, datetime

import trio

from ..core.bridge import Traffic
from ..core.pricing import dollars, nanodollars
from .auth import Identity, Refusal
from .store import UsageDelta, UsageRow, UsageStore

#: A session's lease on its concurrency slot lasts this long unless renewed.
LEASE_SECONDS = 60.0
#: Seconds recording an ended session may take; a hung store must not hold up teardown.
FINISH_TIMEOUT = 5.0
#: Seconds recording a finished response may take; the upstream's events wait meanwhile.
STORE_TIMEOUT = 5.0

log = logging.getLogger("relay")


def utc_day(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(now: float) -> int:
    return int(86400 - now % 86400) + 1


class Accounting:
    def __init__(
        self,
        store: UsageStore,
        *,
        max_sessions: int,
        daily_budget: int,
        daily_budget_usd: float = 0.0,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self._lease_seconds = lease_seconds
        self._max_sessions = max_sessions
        self._daily_budget = daily_budget
        self._daily_budget_nano = nanodollars(daily_budget_usd)
        self._clock = clock

    def budget_for(self, identity: Identity) -> int:
        """The user's daily token budget: the relay's, tightened by the token's claim (0: none)."""
        return _tightest(self._daily_budget, identity.budget)

    def budget_nano_for(self, identity: Identity) -> int:
        """The user's daily dollar budget in nanodollars: the relay's, tightened by the token's
        ``budget_usd`` claim (0: none)."""
        claim = identity.budget_usd
        return _tightest(self._daily_budget_nano, nanodollars(claim) if claim else None)

    async def _used_up(self, identity: Identity, day: str) -> str | None:
        """Which of the user's budgets for ``day`` is used up (``token``, ``spending``), if any.

        Each counter is read only where its budget applies.
        """
        budget = self.budget_for(identity)
        if budget and await self.store.tokens(identity.user, day) >= budget:
            return "token"
        budget = self.budget_nano_for(identity)
        if budget and await self.store.cost(identity.user, day) >= budget:
            return "spending"
        return None

    async def admit(self, identity: Identity, session_id: str) -> None:
        """Take a concurrency slot for a new session, or raise :class:`Refusal` (HTTP 429).

        A store that fails raises ConnectionError (an OSError, whatever the backend's own
        error is), which the handshake turns into 503.
        """
        with _store_errors_as_connection_error():
            refusal = await self.budget_refusal(identity)
            if refusal is not None:
                raise refusal
            if self._max_sessions and not await self.store.acquire_slot(
                identity.user,
                session_id,
                limit=self._max_sessions,
                lease_seconds=self._lease_seconds,
            ):
                raise Refusal(
                    429,
                    "too_many_sessions",
                    f"{identity.user!r} already has {self._max_sessions} live sessions"
                    " (RELAY_MAX_SESSIONS_PER_USER); close one and try again.",
                )

    async def budget_refusal(self, identity: Identity) -> Refusal | None:
        """The refusal (HTTP 429) owed to a user whose daily budget is used up, else None."""
        now = self._clock()
        used_up = await self._used_up(identity, utc_day(now))
        if used_up is None:
            return None
        budget = (
            f"token budget of {self.budget_for(identity)}"
            if used_up == "token"
            else f"spending budget of ${dollars(self.budget_nano_for(identity)):g}"
        )
        return Refusal(
            429,
            "daily_budget_exhausted",
            f"The daily {budget} is used up; it resets at 00:00 UTC"
            f" (in {seconds_to_midnight(now)} s).",
        )

    @property
    def holds_leases(self) -> bool:
        """Whether sessions take concurrency slots (and so must renew their leases)."""
        return bool(self._max_sessions)

    async def keep_lease(self, identity: Identity, session_id: str) -> None:
        """Renew the session's lease until cancelled.

        A renewal the store fails (or takes a whole interval over) is logged and tried
        again at the next tick: the session goes on, and its lease still has two
        intervals to run. Only a store down for the whole lease lets the slot lapse,
        which frees it rather than locking the user out.
        """
        lease = self._lease_seconds
        interval = lease / 3
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(interval) as bounded:
                try:
                    await self.store.renew_slot(identity.user, session_id, lease_seconds=lease)
                except Exception as exc:  # any store failure; a live session must outlast it
                    log.warning(
                        "usage store failed to renew a concurrency lease (%s); retrying in %g s",
                        _describe(exc),
                        interval,
                        extra={"fields": {"session": session_id, "user": identity.user}},
                    )
            if bounded.cancelled_caught:
                log.warning(
                    "usage store did not renew a concurrency lease within %g s; retrying",
                    interval,
                    extra={"fields": {"session": session_id, "user": identity.user}},
                )

    def held(
        self, identity: Identity, session_id: str, traffic: Traffic
    ) -> AbstractAsyncContextManager[None]:
        """While the session runs (the body), renew its lease; then record it (:meth:`finish`).
        A session admitted here is held so, whatever ends it."""
        if self.holds_leases:
            return self._leased(identity, session_id, traffic)
        return _Recorded(self, identity, session_id, traffic)

    @asynccontextmanager
    async def _leased(
        self, identity: Identity, session_id: str, traffic: Traffic
    ) -> AsyncIterator[None]:
        async with _Recorded(self, identity, session_id, traffic), trio.open_nursery() as lease:
            lease.start_soon(self.keep_lease, identity, session_id)
            yield
            lease.cancel_scope.cancel()

    async def record_responses(self, identity: Identity, responses: list[UsageDelta]) -> str | None:
        """Add the tokens and cost of finished responses; which budget of the user's is now used
        up (``token`` or ``spending``), if any.

        A store that fails or hangs (bounded by ``STORE_TIMEOUT``) is logged and the
        session goes on: those tokens go unrecorded, and the budget is checked again
        after the next response. Shielded, like :meth:`finish`: a session that ends while
        its tokens are being recorded (its client left) still has them recorded.
        """
        day = utc_day(self._clock())
        problem = f"no answer within {STORE_TIMEOUT:g} s"
        with trio.move_on_after(STORE_TIMEOUT, shield=True):
            try:
                for delta in responses:
                    await self.store.add(identity.user, day, delta)
                return await self._used_up(identity, day)
            except Exception as exc:  # any store failure; a live session must outlast it
                problem = _describe(exc)
        log.error(
            "usage store failed to record %d finished responses (%s): their tokens are not"
            " counted against the daily budget; the session goes on",
            len(responses),
            problem,
            extra={"fields": {"user": identity.user}},
        )
        return None

    async def abandon(self, identity: Identity, session_id: str) -> None:
        """Give back the slot of a session that was admitted but never started (a call the
        Realtime API would not create): nothing is recorded. Shielded and bounded like
        :meth:`finish`; a store that fails leaves the slot to expire with its lease."""
        if not self._max_sessions:
            return
        with trio.move_on_after(FINISH_TIMEOUT, shield=True):
            try:
                await self.store.release_slot(identity.user, session_id)
            except Exception as exc:  # the slot frees itself when the lease expires
                log.warning("usage store failed to give a slot back (%s)", _describe(exc))

    async def finish(self, identity: Identity, session_id: str, traffic: Traffic, seconds: float) -> None:
        """Record the session itself and give its slot back (shielded, so it runs while the
        session is being cancelled, and bounded, so a hung store cannot stall teardown).
        A store that fails is logged; the slot then frees itself when its lease expires."""
        problem = f"did not answer within {FINISH_TIMEOUT:g} s"
        with trio.move_on_after(FINISH_TIMEOUT, shield=True):
            try:
                await self.store.add(
                    identity.user,
                    utc_day(self._clock()),
                    UsageDelta(
                        sessions=1,
                        connected_seconds=seconds,
                        client_messages=traffic.client_messages,
                        client_bytes=traffic.client_bytes,
                        upstream_messages=traffic.upstream_messages,
                        upstream_bytes=traffic.upstream_bytes,
                    ),
                )
                if self._max_sessions:
                    await self.store.release_slot(identity.user, session_id)
                return
            except Exception as exc:  # teardown must finish whatever the store does
                problem = f"failed ({_describe(exc)})"
        log.error(
            "usage store %s: session of %s not recorded"
            " (its concurrency slot frees itself when the lease expires)",
            problem,
            identity.user,
            extra={"fields": {"session": session_id, "user": identity.user}},
        )


def _tightest(*budgets: int | None) -> int:
    """The smallest budget that is set (0 or None: not set); 0 if none is."""
    return min((b for b in budgets if b and b > 0), default=0)


def _describe(exc: BaseException) -> str:
    """An exception for a log line: its type and message (store errors name hosts, not URLs)."""
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


@contextmanager
def _store_errors_as_connection_error() -> Iterator[None]:
    """Make any backend's failure (coredis, sqlite3) a ConnectionError, which callers know."""
    try:
        yield
    except (Refusal, OSError, trio.TooSlowError):
        raise
    except Exception as exc:
        raise ConnectionError(f"the usage store failed ({_describe(exc)})") from exc


def usage_json(row: UsageRow) -> dict[str, object]:
    """One usage row as JSON (the admin endpoint and ``relay usage --json``)."""
    return {
        "day": row.day,
        "user": row.user,
        **dataclasses.asdict(row),
        "total_tokens": row.total_tokens,
        "cost_usd": row.cost_usd,
    }


_COLUMNS = (
    ("day", "day"),
    ("user", "user"),
    ("sessions", "sessions"),
    ("seconds", "connected_seconds"),
    ("client msgs", "client_messages"),
    ("client bytes", "client_bytes"),
    ("upstream msgs", "upstream_messages"),
    ("upstream bytes", "upstream_bytes"),
    ("in text", "input_text_tokens"),
    ("in audio", "input_audio_tokens"),
    ("in cached", "input_cached_tokens"),
    ("out text", "output_text_tokens"),
    ("out audio", "output_audio_tokens"),
    ("total tokens", "total_tokens"),
    ("cost $", "cost_usd"),
)


def _cell(key: str, value: object) -> str:
    if key == "cost_usd":
        return f"{value:.6f}"  # to the micro-dollar; the store keeps nanodollars
    return f"{value:.0f}" if isinstance(value, float) else str(value)


def format_table(rows: list[UsageRow]) -> str:
    """The usage rows as an aligned text table (``relay usage``)."""
    if not rows:
        return "no usage recorded"
    cells = [[title for title, _ in _COLUMNS]]
    for row in rows:
        values = usage_json(row)
        cells.append(
            [_cell(key, values[key]) for _, key in _COLUMNS]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )


class _Recorded:
    """:meth:`Accounting.held` where there is no lease to renew: the session is recorded as
    it ends. An object rather than a generator: every idle session carries one."""

    __slots__ = ("_accounting", "_identity", "_session_id", "_traffic", "_started")

    def __init__(
        self, accounting: Accounting, identity: Identity, session_id: str, traffic: Traffic
    ) -> None:
        self._accounting = accounting
        self._identity = identity
        self._session_id = session_id
        self._traffic = traffic
        self._started = 0.0

    async def __aenter__(self) -> None:
        self._started = trio.current_time()

    async def __aexit__(self, *exc_info: object) -> None:
        seconds = trio.current_time() - self._started
        await self._accounting.finish(self._identity, self._session_id, self._traffic, seconds)
