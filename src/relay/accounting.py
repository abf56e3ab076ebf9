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
from collections.abc import Callable
from datetime import UTC, datetime

import trio

from .auth import Identity, Refusal
from .bridge import Traffic
from .usage import UsageDelta, UsageRow, UsageStore, usage_from_response_done

#: A session's lease on its concurrency slot lasts this long unless renewed.
LEASE_SECONDS = 60.0
#: Seconds recording an ended session may take; a hung store must not hold up teardown.
FINISH_TIMEOUT = 5.0

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
    ) -> None:
        self.store = store
        self._max_sessions = max_sessions
        self._daily_budget = daily_budget
        self._clock = clock

    def budget_for(self, identity: Identity) -> int:
        """The user's daily token budget: the relay's, tightened by the token's claim (0: none)."""
        budgets = [b for b in (self._daily_budget, identity.budget or 0) if b > 0]
        return min(budgets) if budgets else 0

    async def admit(self, identity: Identity, session_id: str) -> None:
        """Take a concurrency slot for a new session, or raise :class:`Refusal` (HTTP 429)."""
        now = self._clock()
        budget = self.budget_for(identity)
        if budget and await self.store.tokens(identity.user, utc_day(now)) >= budget:
            raise Refusal(
                429,
                "daily_budget_exhausted",
                f"The daily token budget of {budget} is used up; it resets at 00:00 UTC"
                f" (in {seconds_to_midnight(now)} s).",
            )
        if self._max_sessions and not await self.store.acquire_slot(
            identity.user, session_id, limit=self._max_sessions, lease_seconds=LEASE_SECONDS
        ):
            raise Refusal(
                429,
                "too_many_sessions",
                f"{identity.user!r} already has {self._max_sessions} live sessions"
                " (RELAY_MAX_SESSIONS_PER_USER); close one and try again.",
            )

    @property
    def holds_leases(self) -> bool:
        """Whether sessions take concurrency slots (and so must renew their leases)."""
        return bool(self._max_sessions)

    async def keep_lease(self, identity: Identity, session_id: str) -> None:
        """Renew the session's lease until cancelled."""
        while True:
            await trio.sleep(LEASE_SECONDS / 3)
            await self.store.renew_slot(identity.user, session_id, lease_seconds=LEASE_SECONDS)

    async def record_responses(self, identity: Identity, responses: list[dict[str, object]]) -> bool:
        """Add the tokens of finished responses; True if the user's budget is now used up."""
        day = utc_day(self._clock())
        for event in responses:
            await self.store.add(identity.user, day, usage_from_response_done(event))
        budget = self.budget_for(identity)
        return bool(budget) and await self.store.tokens(identity.user, day) >= budget

    async def finish(self, identity: Identity, session_id: str, traffic: Traffic, seconds: float) -> None:
        """Record the session itself and give its slot back (shielded, so it runs while the
        session is being cancelled, and bounded, so a hung store cannot stall teardown)."""
        with trio.move_on_after(FINISH_TIMEOUT, shield=True) as bounded:
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
        if bounded.cancelled_caught:
            log.error(
                "usage store did not answer within %g s: session of %s not recorded"
                " (its concurrency slot frees itself when the lease expires)",
                FINISH_TIMEOUT,
                identity.user,
            )


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
