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
* above a shed threshold for ``shed_after`` seconds, the newest sessions are
  closed with 1013 (try again later), a tenth at a time every ``SHED_PAUSE``
  seconds until the load recovers; the oldest conversations are the ones kept.

It only does arithmetic on the samples it is given, so it is tested without a loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

#: Weight of each new sample (one every SAMPLE_SECONDS): about a second's memory, so one
#: stall (a GC pause, start-up work) does not turn callers away.
SMOOTHING = 0.1
SAMPLE_SECONDS = 0.1
#: After shedding, wait this long for the load to react before shedding again.
SHED_PAUSE = 1.0
SHED_FRACTION = 0.1


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

    def sample(
        self, *, cpu: float, lag: float, now: float, sessions: int, behind: float = 0.0
    ) -> int:
        """Record one sample; return how many of the newest sessions to close now.

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


def newest_to_shed(sessions: Iterable[T], count: int, ending: Callable[[T], bool]) -> list[T]:
    """The ``count`` newest of ``sessions`` (oldest first) that are not already ending.

    A session being closed stays live until its client answers the close, which under
    overload takes a while; picking it again would shed nothing.
    """
    if count <= 0:
        return []
    live = [session for session in sessions if not ending(session)]
    return live[-count:]
