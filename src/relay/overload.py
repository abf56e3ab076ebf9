"""Load shedding: refuse new sessions, then close some, when the event loop falls behind.

A relay that takes more audio than its CPU can forward does not fail; it gets
slower for everyone, until every caller hears seconds of delay. The event loop's
lag (how late a timer fires) measures that directly: each live session adds work
to every loop turn. :class:`LoadGuard` turns lag samples into two decisions:

* above ``refuse_lag`` (smoothed), new sessions are refused (HTTP 503,
  ``relay_overloaded``) so a load balancer sends them elsewhere;
* above ``shed_lag`` for ``shed_after`` seconds, the newest sessions are closed
  with 1013 (try again later), a tenth at a time, until the lag recovers; the
  oldest conversations are the ones kept.

It only does arithmetic on the samples it is given, so it is tested without a loop.
"""

from __future__ import annotations

import math

#: Weight of each new sample in the smoothed lag (samples every SAMPLE_SECONDS): about a
#: second's memory, so one stall (a GC pause, start-up work) does not turn callers away.
SMOOTHING = 0.1
SAMPLE_SECONDS = 0.1
#: After shedding, wait this long for the lag to react before shedding again.
SHED_PAUSE = 2.0
SHED_FRACTION = 0.1


class LoadGuard:
    def __init__(self, *, refuse_lag: float, shed_lag: float, shed_after: float = 2.0) -> None:
        self.refuse_lag = refuse_lag
        self.shed_lag = shed_lag
        self.shed_after = shed_after
        self.lag = 0.0
        self._high_since: float | None = None
        self._shed_at = -math.inf

    @property
    def enabled(self) -> bool:
        return self.refuse_lag > 0

    @property
    def admitting(self) -> bool:
        """Whether a new session may start now."""
        return not self.enabled or self.lag < self.refuse_lag

    def sample(self, lag: float, now: float, sessions: int) -> int:
        """Record one lag sample; return how many of the newest sessions to close now."""
        self.lag = SMOOTHING * lag + (1 - SMOOTHING) * self.lag
        if not self.enabled or self.shed_lag <= 0 or self.lag < self.shed_lag:
            self._high_since = None
            return 0
        if self._high_since is None:
            self._high_since = now
        if now - self._high_since < self.shed_after or now - self._shed_at < SHED_PAUSE:
            return 0
        self._shed_at = now
        return max(1, math.ceil(sessions * SHED_FRACTION)) if sessions else 0
