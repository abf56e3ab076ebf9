"""The usage and limits store: per-user daily counters and concurrency-slot leases.

Every relay instance that shares a store (one SQLite file, or one Redis) sees the
same counters and the same leases, so a per-user cap holds across instances (and the same
claims, so a single-use token is used once whichever instance it reaches). Two
backends implement :class:`UsageStore`:

- SQLite (``sqlite:///PATH``, :mod:`relay.usage.sqlite`): the stdlib driver in a worker thread, one
  connection serialised by a ``CapacityLimiter(1)``, WAL mode. Instances on one
  host share the file; SQLite's file locks make each operation atomic.
- Redis (``redis://HOST:PORT/DB``, :mod:`relay.usage.redis`) through coredis, which runs on trio
  (redis-py's asyncio client does not). Each operation is a single Lua script,
  so it is atomic however many instances share the server.

Leases expire on the store's clock rather than the server's, so instances sharing
a store should keep their clocks in sync (NTP); a skew of a second only moves an
expiry by a second. A session's lease is renewed while it lives and lapses on its
own if its instance dies, so a crash never keeps a slot taken for good.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

from ..core.pricing import Tokens, dollars, tokens_of


@dataclass(frozen=True)
class UsageDelta:
    """What happened in part of a session; every field is added to the user's day."""

    sessions: int = 0
    connected_seconds: float = 0.0
    client_messages: int = 0
    client_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_cached_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0
    #: What the responses cost, in nanodollars (10⁻⁹ USD), by the relay's price table.
    cost_nanodollars: int = 0


#: The counters, in column order; all are integers except connected_seconds.
COUNTERS: Final = tuple(f.name for f in fields(UsageDelta))
FLOAT_COUNTERS: Final = frozenset({"connected_seconds"})
#: The counters a budget is charged with (cached tokens are a subset of input tokens).
TOKEN_COUNTERS: Final = (
    "input_text_tokens",
    "input_audio_tokens",
    "output_text_tokens",
    "output_audio_tokens",
)


@dataclass(frozen=True, kw_only=True)
class UsageRow(UsageDelta):
    """One user's totals for one UTC day."""

    day: str  # "YYYY-MM-DD" (UTC)
    user: str

    @property
    def total_tokens(self) -> int:
        """Input text+audio plus output text+audio: what the daily budget counts."""
        return sum(getattr(self, name) for name in TOKEN_COUNTERS)

    @property
    def cost_usd(self) -> float:
        return dollars(self.cost_nanodollars)


def usage_from_response_done(event: dict[str, Any], cost_nanodollars: int = 0) -> UsageDelta:
    """The tokens of a Realtime ``response.done`` event (zeros when usage is null), and its
    cost when the caller priced it (see :func:`relay.core.pricing.tokens_of`)."""
    return usage_of(tokens_of(event), cost_nanodollars)


def usage_of(tokens: Tokens, cost_nanodollars: int = 0) -> UsageDelta:
    """A response's tokens (and cost) as the counters they are added to."""
    return UsageDelta(
        input_text_tokens=tokens.input_text,
        input_audio_tokens=tokens.input_audio,
        input_cached_tokens=tokens.input_cached,
        output_text_tokens=tokens.output_text,
        output_audio_tokens=tokens.output_audio,
        cost_nanodollars=cost_nanodollars,
    )


class UsageStore(Protocol):
    """Daily usage counters and concurrency leases, shared by every relay instance on the store.

    Operations do I/O and have no timeouts of their own: callers bound them. A
    cancelled ``add`` may or may not have been applied (it is never half applied).
    """

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        """Add ``delta`` to the user's counters for ``day``, atomically."""
        ...

    async def tokens(self, user: str, day: str) -> int:
        """The user's total tokens so far on ``day`` (0 if nothing was recorded)."""
        ...

    async def cost(self, user: str, day: str) -> int:
        """The user's cost so far on ``day``, in nanodollars (0 if nothing was recorded)."""
        ...

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        """The recorded rows, optionally of one day and/or one user, sorted by day then user."""
        ...

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        """Take one of the user's ``limit`` slots for ``lease_seconds``, or return False.

        Expired leases are dropped first. A session that already holds a live
        lease keeps it (renewed) and gets True.
        """
        ...

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        """Push a live lease's expiry to ``lease_seconds`` from now; an expired one stays gone."""
        ...

    async def release_slot(self, user: str, session_id: str) -> None:
        """Give the slot back (nothing happens if it is not held)."""
        ...

    async def claim_once(self, key: str, *, ttl_seconds: float) -> bool:
        """True the first time ``key`` is claimed (for ``ttl_seconds``), False while a claim
        on it lives: a single-use token is used once across every instance on the store."""
        ...

    async def check(self) -> str | None:
        """Why the store cannot record usage now, for readiness (None: it can)."""
        ...

    async def aclose(self) -> None:
        """Close the store; closing twice is harmless, using it afterwards is an error."""
        ...


_ACCEPTED_FORMS: Final = (
    "sqlite:///PATH (a relative path, or sqlite:////absolute/path.db),"
    " sqlite:///:memory: (private, for tests), or redis://HOST[:PORT][/DB]"
)


def _bad_url(url: str, why: str) -> ValueError:
    shown = re.sub(r"//[^/@]*@", "//***@", url)  # never echo a password
    return ValueError(f"RELAY_STORE {shown!r}: {why}; it must be {_ACCEPTED_FORMS}")


def check_slot_args(limit: int | None, lease_seconds: float) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")


async def open_store(url: str, *, clock: Callable[[], float] = time.time) -> UsageStore:
    """Open the store ``url`` names (the ``RELAY_STORE`` setting); ``clock`` times leases.

    A malformed URL raises ValueError naming RELAY_STORE and the accepted forms.
    An SQLite file (its directory and schema too) is created if missing. A Redis store answers
    a PING before this returns, or ConnectionError is raised.
    """
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise _bad_url(url, "an SQLite URL has three slashes before the path")
        path = url.removeprefix("sqlite:///")
        if not path:
            raise _bad_url(url, "the SQLite path is empty")
        from .sqlite import SqliteUsageStore

        return await SqliteUsageStore.open(path, clock=clock)
    if url.startswith("redis:"):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _bad_url(url, str(exc)) from None
        if not url.startswith("redis://") or not parts.hostname:
            raise _bad_url(url, "the Redis host is missing")
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
            raise _bad_url(url, "the Redis database must be a number")
        if parts.query or parts.fragment:
            raise _bad_url(url, "a Redis URL takes no query or fragment")
        where = f"{parts.hostname}:{port or 6379}"
        from .redis import RedisUsageStore  # imports coredis, which only Redis needs

        return await RedisUsageStore.open(url, where=where, clock=clock)
    raise _bad_url(url, "unknown scheme")
