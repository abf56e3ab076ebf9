"""The warm pool's bookkeeping, without I/O: which upstream sessions wait, for whom, and
what to dial, retire or wait for next.

A pooled session is an upstream the relay opened before any client asked, with its own
``session.update`` sent and answered, so a client that takes one gets ``session.created``
at once (:mod:`relay.server.pool` is the Trio shell that dials, watches and hands them
over). What such a session can serve is fixed when it is dialled: its model (the URL), the
relay's session (its update) and the ``OpenAI-Safety-Identifier`` (a header of the dial).
That triple is its :class:`PoolKey`, and a session goes only to a client whose own key is
equal; the policy screens each client's events in its bridge, not in the upstream, so it
needs no place in the key.

:class:`PoolLedger` is fed what happened (a dial came back ready or failed, a pooled
session failed, a client took one) with the time, and :meth:`PoolLedger.due` says what to
do now. Its rules:

* **Bounded.** At most ``size`` sessions per key wait, plus the replacements dialled for
  those about to age out (so at most twice ``size`` while they overlap).
* **Never stale.** A session retires when it has waited ``max_age`` (far inside the
  Realtime API's 60-minute cap); its replacement is dialled ``lead`` (the dial timeout)
  before, so the pool does not dip.
* **Never a hot loop.** A dial that fails, or a session that fails while it waits, delays
  the key's next dial: 1 s, then twice as long after each failure in a row, at most
  :data:`BACKOFF_CAP`; while a key is failing, one dial at a time probes it. The count
  starts again when a session of the key proves good (a client takes it, or it ages out
  unharmed).
* **One client per session.** :meth:`PoolLedger.take` removes what it returns, so no
  two takes return the same session. It returns the oldest: the others stay fresher.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .events import dumps

#: The delay after a key's first failure in a row, doubled after each one that follows.
BACKOFF_FIRST = 1.0
#: The longest delay between two dials of a failing key.
BACKOFF_CAP = 60.0

_ALPHANUMERIC = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

Handle = TypeVar("Handle")


@dataclass(frozen=True, slots=True)
class PoolKey:
    """What a pooled session can serve: its ``model``, the relay's ``session.update`` it was
    set up with (``setup``), and the safety ``identifier`` it was dialled with (None: none)."""

    model: str
    setup: str
    identifier: str | None


def backoff(failures: int) -> float:
    """Seconds before the next dial of a key that failed ``failures`` times in a row."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** min(failures - 1, 32))


@dataclass(slots=True)
class Plan(Generic[Handle]):
    """What :meth:`PoolLedger.due` asks for: a dial per entry of ``dial`` (each to be
    reported back once, :meth:`PoolLedger.ready` or :meth:`PoolLedger.failed`), the sessions
    in ``retire`` closed (they are out of the ledger), and ``due`` asked again by ``wake_at``
    or as soon as anything is reported."""

    dial: list[PoolKey] = field(default_factory=list)
    retire: list[tuple[PoolKey, Handle]] = field(default_factory=list)
    wake_at: float = math.inf


@dataclass(slots=True)
class _Shelf(Generic[Handle]):
    """One key's sessions (oldest first, with the time each became ready) and its dials."""

    size: int
    waiting: deque[tuple[float, Handle]] = field(default_factory=deque)
    dialing: int = 0
    failures: int = 0
    not_before: float = -math.inf


class PoolLedger(Generic[Handle]):
    """The pool's state; ``Handle`` is whatever the shell holds a pooled session by."""

    def __init__(self, sizes: Mapping[PoolKey, int], *, max_age: float, lead: float) -> None:
        if max_age <= 0:
            raise ValueError("max_age must be positive")
        self._shelves: dict[PoolKey, _Shelf[Handle]] = {
            key: _Shelf(size) for key, size in sizes.items() if size > 0
        }
        self._max_age = max_age
        # A replacement is dialled this long before a session ages out (never so early that
        # a session would count as old from the start).
        self._lead = min(lead, max_age / 2)
        self.closed = False

    @property
    def keys(self) -> tuple[PoolKey, ...]:
        """The keys the pool keeps sessions for."""
        return tuple(self._shelves)

    def pooled(self, key: PoolKey) -> bool:
        """Whether the pool keeps sessions for ``key``."""
        return key in self._shelves

    def waiting(self, key: PoolKey) -> int:
        """Sessions of ``key`` ready to be taken now."""
        shelf = self._shelves.get(key)
        return len(shelf.waiting) if shelf is not None else 0

    def take(self, key: PoolKey) -> Handle | None:
        """The oldest session waiting for ``key``, now out of the pool; None if none waits."""
        shelf = self._shelves.get(key)
        if shelf is None or not shelf.waiting or self.closed:
            return None
        shelf.failures = 0  # the key's sessions work: a client has one
        return shelf.waiting.popleft()[1]

    def ready(self, key: PoolKey, handle: Handle, now: float) -> bool:
        """A dial :meth:`due` asked for came back with a session, set up and answered: it
        waits from ``now``. False once the pool is closed: the shell closes it instead."""
        shelf = self._shelves[key]
        shelf.dialing -= 1
        if self.closed:
            return False
        shelf.waiting.append((now, handle))
        return True

    def failed(self, key: PoolKey, now: float) -> None:
        """A dial :meth:`due` asked for did not give a ready session."""
        shelf = self._shelves[key]
        shelf.dialing -= 1
        self._failure(shelf, now)

    def lost(self, key: PoolKey, handle: Handle, now: float) -> bool:
        """A waiting session failed (closed, or no answer to a ping): out of the pool, and a
        failure of its key. False if it was not waiting (taken, retired: nothing to do)."""
        shelf = self._shelves[key]
        for entry in shelf.waiting:
            if entry[1] is handle:
                shelf.waiting.remove(entry)
                self._failure(shelf, now)
                return True
        return False

    def _failure(self, shelf: _Shelf[Handle], now: float) -> None:
        shelf.failures += 1
        shelf.not_before = now + backoff(shelf.failures)

    def due(self, now: float) -> Plan[Handle]:
        """What to do at ``now``: sessions to retire, dials to start, when to look again."""
        plan: Plan[Handle] = Plan()
        if self.closed:
            return plan
        max_age, lead = self._max_age, self._lead
        for key, shelf in self._shelves.items():
            waiting = shelf.waiting
            while waiting and waiting[0][0] + max_age <= now:
                plan.retire.append((key, waiting.popleft()[1]))
                shelf.failures = 0  # it lasted its time unharmed
            # Sessions still young at the end of a dial: those that need no replacement yet.
            lasting = 0
            for born, _ in waiting:
                ages_out = born + max_age
                if ages_out - lead > now:
                    lasting += 1
                    plan.wake_at = min(plan.wake_at, ages_out - lead)
                else:
                    plan.wake_at = min(plan.wake_at, ages_out)
            wanted = shelf.size - lasting - shelf.dialing
            if shelf.failures:
                wanted = min(wanted, 1 - shelf.dialing)  # one probe at a time
            if wanted <= 0:
                continue
            if now < shelf.not_before:
                plan.wake_at = min(plan.wake_at, shelf.not_before)
                continue
            shelf.dialing += wanted
            plan.dial.extend([key] * wanted)
        return plan

    def close(self) -> list[tuple[PoolKey, Handle]]:
        """Stop: no more dials or takes; every waiting session, for the shell to close."""
        self.closed = True
        left = [(key, h) for key, shelf in self._shelves.items() for _, h in shelf.waiting]
        for shelf in self._shelves.values():
            shelf.waiting.clear()
        return left


def fresh_event_id() -> str:
    """An event id in the Realtime API's form (``event_`` and 21 letters and digits)."""
    return "event_" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(21))


def client_created(created: Mapping[str, Any], session: Mapping[str, Any] | None) -> str:
    """The ``session.created`` a client gets from a pooled session: the upstream's own,
    carrying the session as the relay's update left it (the answer's), under a fresh event
    id (the upstream's went to the relay, minutes ago; no client has seen it)."""
    event = dict(created)
    event["event_id"] = fresh_event_id()
    if session is not None:
        event["session"] = session
    return dumps(event)
