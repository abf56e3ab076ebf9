"""SIGINT and SIGTERM over a relay process's whole life, so that a stop signal always ends in a
drain and exit status 0, never in death by the signal's default action (status 143).

A relay listens for stop signals with Trio (:func:`relay.server.serve.serve`), but only while
Trio runs: before it (imports, settings, forking workers) and after it (interpreter exit) the
default action would kill the process. And signals come in pairs more often than not: sent to
a whole process group, SIGTERM reaches ``uv run`` too, which passes it on, so the relay gets it
twice within milliseconds; an idle relay's drain is over before the second arrives. So
:func:`catch_early` notes stop signals from the start of ``relay serve`` on; the relay acts on
the ones it noted as soon as it listens itself (:func:`take_early`), and ignores any that
come after its drain; once it is done serving, it ignores them (:func:`ignore`): the
interpreter puts back the default action as it exits, and a signal that arrived then, passed
on late by a launcher on a busy machine, would still kill it.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

#: The signals that stop a relay (drain, then exit 0).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_noted: list[int] = []
#: In a worker of ``relay serve --workers``: the stop signal its parent passed on (0: none yet),
#: in memory they share (see :func:`follow_parent`).
_parent_stop: Any = None


def _note(signum: int, _frame: FrameType | None) -> None:
    _noted.append(signum)


def catch_early() -> None:
    """Note stop signals from now on instead of dying of them (main thread only)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _note)


def follow_parent(stop: Any) -> None:
    """In a worker: also take the stop signal the parent passed on as noted, from ``stop`` (a
    shared int the parent sets before it signals). A signal sent to a process just forked, before
    it first ran, is lost: Python clears what came before its own after-fork set-up."""
    global _parent_stop
    _parent_stop = stop


def take_early() -> list[int]:
    """The stop signals noted since the last call, oldest first (each taken once)."""
    taken = []
    while _noted:
        taken.append(_noted.pop(0))  # (pop: a signal noted meanwhile is never lost)
    if _parent_stop is not None and _parent_stop.value:
        taken.append(_parent_stop.value)
    return taken


def ignore() -> None:
    """The relay is done serving and exits: stop signals have nothing left to stop."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
