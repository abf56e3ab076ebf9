"""Load shedding: refuse new sessions, then close some, when the relay cannot keep up.

A relay that takes more audio than its CPU can forward does not fail; it gets
slower for everyone (messages queue in socket buffers) until every caller hears
seconds of delay. Two measures show it coming, sampled every 100 ms and smoothed
over about a second: the share of a core the process wants (an event loop is
one thread: near 100 % it cannot keep up, and backlogs grow; the caller counts the
time it used and, where the OS says, the time it waited for a core), and the event
loop's lag (how late a timer fires: one long stall). :class:`LoadGuard` turns them into
two decisions:

* above a refuse threshold, new sessions are refused (HTTP 503,
  ``relay_overloaded``) and readiness fails, so a load balancer sends callers
  elsewhere;
* above a shed threshold for ``shed_after`` seconds, the sessions that cost the most are
  closed with 1013 (try again later), a tenth at a time every ``SHED_PAUSE``
  seconds until the load recovers. A session's cost is what it moves through the relay
  (:class:`Costs`: bytes a second both ways, each message counting as
  :data:`MESSAGE_COST_BYTES` more, over about half a second), so one client flooding the
  relay goes before the callers it slows down, however long it has been connected. Costs
  are compared in bands: within a factor of two of the median session's, sessions cost the
  same, and among those the newest go first. (Under overload, which of many alike sessions
  got the most through in the last half second is luck, not cost: ranked by it exactly,
  the relay would shed the callers it served best and keep those furthest behind.)

It only does arithmetic on the samples it is given, so it is tested without a loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..core.bridge import Traffic

T = TypeVar("T", bound=Hashable)

#: Weight of each new sample (one every SAMPLE_SECONDS): about a second's memory, so one
#: stall (a GC pause, start-up work) does not turn callers away.
SMOOTHING = 0.1
SAMPLE_SECONDS = 0.1
#: After shedding, wait this long for the load to react before shedding again.
SHED_PAUSE = 1.0
SHED_FRACTION = 0.1
#: What the relay's work on one message is worth in bytes of payload, in a session's cost: a
#: flood of tiny messages costs the relay more than its bytes say.
MESSAGE_COST_BYTES = 1024
#: Weight of each new sample (every SAMPLE_SECONDS) in a session's cost: about half a second.
COST_SMOOTHING = 0.2


@dataclass(frozen=True)
class Thresholds:
    """Limits on the smoothed CPU share (0-1) and loop lag (seconds); 0 turns one off."""

    refuse_cpu: float = 0.0
    refuse_lag: float = 0.0
    shed_cpu: float = 0.0
    shed_lag: float = 0.0
    refuse_behind: float = 0.0
    shed_behind: float = 0.0


def _over(value: float, limit: float) -> bool:
    return limit > 0 and value >= limit


class LoadGuard:
    def __init__(self, thresholds: Thresholds, *, shed_after: float = 1.0) -> None:
        self.thresholds = thresholds
        self.shed_after = shed_after
        self.cpu = 0.0
        self.lag = 0.0
        self.behind = 0.0
        self._high_since: float | None = None
        self._shed_at = -math.inf

    @property
    def enabled(self) -> bool:
        t = self.thresholds
        return any(
            limit > 0
            for limit in (
                t.refuse_cpu, t.refuse_lag, t.shed_cpu, t.shed_lag, t.refuse_behind, t.shed_behind
            )
        )

    @property
    def admitting(self) -> bool:
        """Whether a new session may start now."""
        t = self.thresholds
        return not (
            _over(self.cpu, t.refuse_cpu)
            or _over(self.lag, t.refuse_lag)
            or _over(self.behind, t.refuse_behind)
        )

    @property
    def high(self) -> bool:
        """Whether the load was over a shed threshold at the last sample: shedding follows
        ``shed_after`` seconds on unless it drops (so what each session costs is worth
        sampling from now on, and not before: it is work on every session)."""
        return self._high_since is not None

    def sample(
        self, *, cpu: float, lag: float, now: float, sessions: int, behind: float = 0.0
    ) -> int:
        """Record one sample; return how many sessions to close now.

        ``behind`` is the share of the sessions whose input, from either side, is piling up
        unread (the relay cannot keep up though the other side does not hold it back): CPU demand
        cannot rise above a whole core, so near it only the backlog says how far behind
        the relay is, and only its clearing says it has shed enough.
        """
        self.cpu = SMOOTHING * cpu + (1 - SMOOTHING) * self.cpu
        self.lag = SMOOTHING * lag + (1 - SMOOTHING) * self.lag
        self.behind = SMOOTHING * behind + (1 - SMOOTHING) * self.behind
        t = self.thresholds
        if not (
            _over(self.cpu, t.shed_cpu)
            or _over(self.lag, t.shed_lag)
            or _over(self.behind, t.shed_behind)
        ):
            self._high_since = None
            return 0
        if self._high_since is None:
            self._high_since = now
        if now - self._high_since < self.shed_after or now - self._shed_at < SHED_PAUSE:
            return 0
        self._shed_at = now
        return max(1, math.ceil(sessions * SHED_FRACTION)) if sessions else 0


def traffic_cost(traffic: Traffic) -> int:
    """What a session has moved through the relay so far, in cost units (bytes)."""
    return (
        traffic.client_bytes
        + traffic.upstream_bytes
        + MESSAGE_COST_BYTES * (traffic.client_messages + traffic.upstream_messages)
    )


class Costs(Generic[T]):
    """What each session costs the relay now: cost units a second (:func:`traffic_cost`),
    smoothed over about half a second of samples."""

    def __init__(self) -> None:
        self._seen: dict[T, tuple[int, float]] = {}  # session: (units at the last sample, cost)

    def sample(self, sessions: Iterable[tuple[T, int]], seconds: float) -> None:
        """Each live session with its units so far, ``seconds`` after the last sample; a
        session not listed is forgotten."""
        seen = self._seen
        fresh: dict[T, tuple[int, float]] = {}
        for session, units in sessions:
            last = seen.get(session)
            if last is None:  # first seen: its rate is known from the next sample on
                fresh[session] = (units, 0.0)
            else:
                rate = (units - last[0]) / seconds
                fresh[session] = (units, COST_SMOOTHING * rate + (1 - COST_SMOOTHING) * last[1])
        self._seen = fresh

    def clear(self) -> None:
        self._seen = {}

    def __call__(self, session: T) -> float:
        """The session's cost (0 until two samples have seen it)."""
        entry = self._seen.get(session)
        return entry[1] if entry is not None else 0.0


def costliest_to_shed(
    sessions: Iterable[T], count: int, ending: Callable[[T], bool], cost: Callable[[T], float]
) -> list[T]:
    """The ``count`` sessions (given oldest first) that cost the most and are not already
    ending; among those that cost the same (:func:`cost_band`), the newest.

    A session being closed stays live until its client answers the close, which under
    overload takes a while; picking it again would shed nothing.
    """
    if count <= 0:
        return []
    live = [session for session in sessions if not ending(session)]
    costs = [cost(session) for session in live]
    paying = sorted(c for c in costs if c > 0)
    typical = paying[len(paying) // 2] if paying else 0.0
    ranked = sorted(range(len(live)), key=lambda i: (cost_band(costs[i], typical), i), reverse=True)
    return [live[i] for i in ranked[:count]]


def cost_band(cost: float, typical: float) -> int:
    """Which band ``cost`` falls in around the ``typical`` (median) cost: 0 within a factor of
    two of it, one band more (or less) for each factor of four above (or below) that; costing
    nothing, below every band."""
    if cost <= 0:
        return -(2**31)
    return round(math.log(cost / typical, 4))
