"""Admission, concurrency leases, usage records and the daily token budget, over a usage store.

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
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime

import trio

from ..core.bridge import Traffic
from .auth import Identity, Refusal
from .store import UsageDelta, UsageRow, UsageStore, usage_from_response_done

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
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
    ) -> None:
        self.store = store
        self._lease_seconds = lease_seconds
        self._max_sessions = max_sessions
        self._daily_budget = daily_budget
        self._clock = clock

    def budget_for(self, identity: Identity) -> int:
        """The user's daily token budget: the relay's, tightened by the token's claim (0: none)."""
        budgets = [b for b in (self._daily_budget, identity.budget or 0) if b > 0]
        return min(budgets) if budgets else 0

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
        budget = self.budget_for(identity)
        if budget and await self.store.tokens(identity.user, utc_day(now)) >= budget:
            return Refusal(
                429,
                "daily_budget_exhausted",
                f"The daily token budget of {budget} is used up; it resets at 00:00 UTC"
                f" (in {seconds_to_midnight(now)} s).",
            )
        return None

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

    @asynccontextmanager
    async def held(
        self, identity: Identity, session_id: str, traffic: Traffic
    ) -> AsyncIterator[None]:
        """While the session runs (the body), renew its lease; then record it (:meth:`finish`).
        A session admitted here is held so, whatever ends it."""
        started = trio.current_time()
        try:
            if self.holds_leases:
                async with trio.open_nursery() as lease:
                    lease.start_soon(self.keep_lease, identity, session_id)
                    yield
                    lease.cancel_scope.cancel()
            else:  # no nursery: every idle session's memory counts
                yield
        finally:
            await self.finish(identity, session_id, traffic, trio.current_time() - started)

    async def record_responses(self, identity: Identity, responses: list[dict[str, object]]) -> bool:
        """Add the tokens of finished responses; True if the user's budget is now used up.

        A store that fails or hangs (bounded by ``STORE_TIMEOUT``) is logged and the
        session goes on: those tokens go unrecorded, and the budget is checked again
        after the next response.
        """
        day = utc_day(self._clock())
        problem = f"no answer within {STORE_TIMEOUT:g} s"
        with trio.move_on_after(STORE_TIMEOUT):
            try:
                for event in responses:
                    await self.store.add(identity.user, day, usage_from_response_done(event))
                budget = self.budget_for(identity)
                return bool(budget) and await self.store.tokens(identity.user, day) >= budget
            except Exception as exc:  # any store failure; a live session must outlast it
                problem = _describe(exc)
        log.error(
            "usage store failed to record %d finished responses (%s): their tokens are not"
            " counted against the daily budget; the session goes on",
            len(responses),
            problem,
            extra={"fields": {"user": identity.user}},
        )
        return False

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
    return {"day": row.day, "user": row.user, **dataclasses.asdict(row), "total_tokens": row.total_tokens}


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
)


def format_table(rows: list[UsageRow]) -> str:
    """The usage rows as an aligned text table (``relay usage``)."""
    if not rows:
        return "no usage recorded"
    cells = [[title for title, _ in _COLUMNS]]
    for row in rows:
        values = usage_json(row)
        cells.append(
            [f"{values[key]:.0f}" if isinstance(values[key], float) else str(values[key]) for _, key in _COLUMNS]
        )
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True)))
        for line in cells
    )
