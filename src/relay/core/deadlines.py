"""When a session must end: its maximum length and its idle timeout, without I/O.

Both limits warn first: ``lead`` seconds before the cut (at most half the limit,
so a short limit still leaves time to react) the client gets a warning event,
and the cut follows unless, for the idle timeout, traffic resumed meanwhile.
:class:`Deadlines` only does arithmetic on times it is given; the pair's timer
task asks it what is due and sleeps until the time it names.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple


class Due(Enum):
    SESSION_WARNING = "session_warning"
    SESSION_END = "session_end"
    IDLE_WARNING = "idle_warning"
    IDLE_END = "idle_end"


class Step(NamedTuple):
    """What is due now (in order, at most one cut) and when to ask again."""

    due: tuple[Due, ...]
    wake_at: float


class Deadlines:
    """The warn-then-cut schedule of one session; a limit of 0 or None is off."""

    __slots__ = (
        "max_seconds",
        "idle_seconds",
        "_end",
        "_session_warn",
        "_idle_lead",
        "_session_warned",
        "_idle_warned_for",
    )

    def __init__(
        self, start: float, *, max_seconds: float | None, idle_seconds: float | None, lead: float
    ) -> None:
        self.max_seconds = max_seconds or 0.0
        self.idle_seconds = idle_seconds or 0.0
        self._end = start + self.max_seconds if self.max_seconds else math.inf
        self._session_warn = self._end - min(lead, self.max_seconds / 2)
        self._idle_lead = min(lead, self.idle_seconds / 2)
        self._session_warned = False
        self._idle_warned_for: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.max_seconds or self.idle_seconds)

    def step(self, now: float, last_activity: float) -> Step:
        """What is due at ``now``, given the time of the last message either way."""
        idle_end = last_activity + self.idle_seconds if self.idle_seconds else math.inf
        if now >= self._end:
            return Step((Due.SESSION_END,), math.inf)
        if now >= idle_end:
            return Step((Due.IDLE_END,), math.inf)
        due: list[Due] = []
        if not self._session_warned and now >= self._session_warn:
            self._session_warned = True
            due.append(Due.SESSION_WARNING)
        idle_warn = idle_end - self._idle_lead
        if self._idle_warned_for != last_activity and now >= idle_warn:
            self._idle_warned_for = last_activity
            due.append(Due.IDLE_WARNING)
        wake = min(self._end, idle_end)
        if not self._session_warned:
            wake = min(wake, self._session_warn)
        if self._idle_warned_for != last_activity:
            wake = min(wake, idle_warn)
        return Step(tuple(due), wake)

    def seconds_left(self, now: float, last_activity: float, kind: Due) -> float:
        """Seconds until the cut that ``kind`` warns of."""
        if kind is Due.SESSION_WARNING:
            return max(0.0, self._end - now)
        return max(0.0, last_activity + self.idle_seconds - now)
