"""The worker's load watcher: samples CPU demand and event-loop lag ten times a second, tells
the pump whether it may poll, and sheds the sessions that cost the most when the guard
(:mod:`relay.ops.overload`) says the worker is overloaded."""

from __future__ import annotations

import logging
import random
import time
from typing import TYPE_CHECKING

import trio

from ..ops.overload import SAMPLE_SECONDS, Costs, costliest_to_shed, traffic_cost

if TYPE_CHECKING:
    from .app import RelayApp
    from .pair import Pair

#: Unread bytes from one side that make a session count as behind: ten 20 ms audio events.
BEHIND_BYTES = 64 * 1024
#: CPU demand (share of a core) from which the load watcher looks at the backlogs (it costs
#: a system call per session looked at) and the pump stops polling (Pump.set_busy).
BUSY = 0.5
#: Sessions whose backlogs one sample looks at, chosen at random: the share behind is
#: estimated from them (about ±6 % for one sample, smoothed over ten), not counted over
#: thousands of sessions ten times a second.
BEHIND_SAMPLE = 64

log = logging.getLogger("relay")


def cpu_demand_seconds() -> float:
    """CPU seconds the process has used, plus (on Linux) the seconds its event-loop thread
    spent runnable but waiting for a core.

    On a machine shared with other busy processes a relay that cannot keep up may use only
    half a core, starved rather than busy; what it *wanted* is what says it is overloaded.
    """
    used = time.process_time()
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            waited = int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return used  # not Linux (or no scheduler statistics): use alone
    return used + waited


def cpu_demand(app: RelayApp) -> float:
    """CPU seconds the worker has used or waited for, less the time its pump polled."""
    return cpu_demand_seconds() - (app.pump.polled if app.pump is not None else 0.0)


def _ending(pair: Pair) -> bool:
    return pair.bridge.ending is not None


async def watch_load(app: RelayApp) -> None:
    """Sample the event loop's lag and the worker's CPU demand: let the pump poll only while
    the worker is not busy, and shed the sessions that cost the most when the guard says so
    (what each costs is sampled only while the guard is over a shed threshold: shedding
    comes a second after that, and a busy worker well within its limits pays nothing for it)."""
    await app.started.wait()  # start-up work is not load
    guard = app.guard
    costs: Costs[Pair] = Costs()
    async with trio.open_nursery() as shedding:
        cpu_before, before = cpu_demand(app), trio.current_time()
        while True:
            asked = before + SAMPLE_SECONDS
            await trio.sleep_until(asked)
            cpu_now, now = cpu_demand(app), trio.current_time()
            live = [pair for pair in app.pairs if pair.bridge.ending is None]
            cpu = max(0.0, cpu_now - cpu_before) / (now - before)
            behind = 0.0
            busy = max(cpu, guard.cpu) >= BUSY
            if app.pump is not None:
                app.pump.set_busy(busy)
            if live and busy and guard.enabled:
                looked_at = random.sample(live, min(len(live), BEHIND_SAMPLE))
                behind = sum(pair.behind(BEHIND_BYTES) for pair in looked_at) / len(looked_at)
            if live and busy and guard.high:  # shedding may follow: ten samples before it does
                units = ((pair, traffic_cost(pair.bridge.traffic)) for pair in live)
                costs.sample(units, now - before)
            else:
                costs.clear()
            shed = guard.sample(cpu=cpu, lag=now - asked, now=now, sessions=len(live), behind=behind)
            cpu_before, before = cpu_now, now
            if shed:
                costliest = costliest_to_shed(app.pairs, shed, _ending, costs)
                log.warning(
                    "overloaded (%.0f%% of a core, loop lag %.0f ms, %.0f%% of sessions"
                    " behind): closing the %d costliest of %d sessions (%s)",
                    guard.cpu * 100,
                    guard.lag * 1000,
                    guard.behind * 100,
                    len(costliest),
                    len(live),
                    ", ".join(f"{costs(pair) / 1000:.0f} kB/s" for pair in costliest[:5]),
                )
                for pair in costliest:
                    shedding.start_soon(pair.shed)
