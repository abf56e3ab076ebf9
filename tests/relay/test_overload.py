"""Load shedding: an event loop that falls behind refuses new sessions, then closes the sessions
that cost the most."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import orjson
import pytest
import trio
import trio.lowlevel
from trio_websocket import ConnectionRejected

from relay.core.bridge import Traffic
from relay.ops.overload import (
    MESSAGE_COST_BYTES,
    Costs,
    LoadGuard,
    Thresholds,
    cost_band,
    costliest_to_shed,
    traffic_cost,
)

from .harness import connect, greet, running_relay, scripted_upstream

TIMEOUT = 20


def test_a_busy_or_lagging_relay_stops_admitting_and_recovers() -> None:
    guard = LoadGuard(Thresholds(refuse_cpu=0.85, refuse_lag=0.1))
    assert guard.admitting
    guard.sample(cpu=1.0, lag=0.5, now=0.0, sessions=10)
    assert guard.admitting  # one stall is smoothed away
    for n in range(1, 20):
        guard.sample(cpu=1.0, lag=0.0, now=0.1 * n, sessions=10)
    assert not guard.admitting and guard.lag < 0.1  # two seconds flat out is not
    for n in range(20, 60):
        guard.sample(cpu=0.5, lag=0.0, now=0.1 * n, sessions=10)
    assert guard.admitting
    for n in range(60, 72):
        guard.sample(cpu=0.2, lag=0.25, now=0.1 * n, sessions=10)
    assert not guard.admitting  # a loop stalled for a second, whatever the CPU says


def test_sustained_overload_sheds_a_tenth_of_the_sessions_every_second() -> None:
    guard = LoadGuard(Thresholds(shed_cpu=0.5), shed_after=1.0)
    shed = [(round(t * 0.1, 1), guard.sample(cpu=1.0, lag=0.0, now=t * 0.1, sessions=95)) for t in range(40)]
    cuts = [(t, n) for t, n in shed if n]
    # The smoothed share passes 0.5 at the seventh sample (0.6 s): 1 s later the first cut, then
    # every second.
    assert cuts == [(1.6, 10), (2.6, 10), (3.6, 10)]
    assert guard.sample(cpu=1.0, lag=0.0, now=7.0, sessions=0) == 0


def test_the_guard_is_high_from_its_first_sample_over_a_shed_threshold_to_one_under() -> None:
    """What each session costs is sampled only while the guard is high (a second before it
    sheds), not on every busy sample."""
    guard = LoadGuard(Thresholds(shed_cpu=0.5, refuse_cpu=0.3), shed_after=1.0)
    highs = []
    for t in range(9):
        guard.sample(cpu=1.0, lag=0.0, now=t * 0.1, sessions=9)
        highs.append(guard.high)
    # Refusing from the fourth sample (smoothed 0.34), high only from the seventh (0.52).
    assert highs == [False] * 6 + [True] * 3
    assert not guard.admitting
    for t in range(9, 30):
        guard.sample(cpu=0.0, lag=0.0, now=t * 0.1, sessions=9)
        if guard.cpu < 0.5:
            break
    assert not guard.high


def test_shedding_picks_the_newest_of_equally_costly_sessions_not_already_closing() -> None:
    """Under overload a shed session may take seconds to finish closing; the next round
    must close others, not pick the same ones again. Costing the same, the newest go first
    (as they did before costs were measured)."""
    sessions = list(range(10))  # oldest first

    def same(_: int) -> float:
        return 1.0

    closing = {8, 9}
    assert costliest_to_shed(sessions, 3, closing.__contains__, same) == [7, 6, 5]
    assert costliest_to_shed(sessions, 0, closing.__contains__, same) == []
    assert sorted(costliest_to_shed(sessions, 20, closing.__contains__, same)) == list(range(8))


def test_shedding_picks_the_costliest_sessions_however_old() -> None:
    """One client flooding the relay, connected first, goes before the callers it slows down."""
    sessions = ["flooder", "a", "b", "c", "d"]  # oldest first
    cost = {"flooder": 350e6, "a": 66e3, "b": 70e3, "c": 66e3, "d": 0.0}.__getitem__
    assert costliest_to_shed(sessions, 1, lambda _: False, cost) == ["flooder"]
    # b's 6 % more than a and c is no cost of its own (next test): the newest of the three
    assert costliest_to_shed(sessions, 2, lambda _: False, cost) == ["flooder", "c"]
    assert costliest_to_shed(sessions, 1, {"flooder"}.__contains__, cost) == ["c"]


def test_sessions_within_a_factor_of_two_of_the_median_cost_count_as_alike_newest_first() -> None:
    """Under overload, which of many alike callers got the most through in the last half
    second is luck: ranked by it exactly, the relay would shed the callers it served best and
    keep those furthest behind. Costs are compared in bands around the median instead: a
    session four times dearer goes first, a text-only one (far cheaper) and an idle one last."""
    sessions = ["heavy", "audio1", "text", "audio2", "audio3", "idle"]  # oldest first
    cost = {
        "heavy": 300e3,
        "audio1": 75e3,
        "text": 5e3,
        "audio2": 60e3,
        "audio3": 42e3,
        "idle": 0.0,
    }.__getitem__
    order = costliest_to_shed(sessions, 6, lambda _: False, cost)
    assert order == ["heavy", "audio3", "audio2", "audio1", "text", "idle"]
    assert cost_band(75e3, 60e3) == cost_band(42e3, 60e3) == 0
    assert cost_band(300e3, 60e3) == 1 and cost_band(5e3, 60e3) == -2
    assert cost_band(0.0, 60e3) < cost_band(1.0, 60e3)


def test_a_sessions_cost_is_its_bytes_and_messages_a_second_over_a_short_window() -> None:
    assert traffic_cost(Traffic(2, 100, 3, 1000)) == 1100 + 5 * MESSAGE_COST_BYTES
    costs: Costs[str] = Costs()
    totals = {"steady": 0, "burst": 0}
    for n in range(30):  # three seconds of samples, 0.1 s apart
        totals["steady"] += 6_600  # 66 kB/s
        totals["burst"] += 1_000_000 if n < 5 else 0  # 10 MB/s for half a second, then quiet
        costs.sample(totals.items(), 0.1)
        if n == 5:
            assert costs("burst") > 10 * costs("steady")
    assert costs("steady") == pytest.approx(66_000, rel=0.01)
    assert costs("burst") < costs("steady") / 2  # its burst has passed out of the window
    costs.sample([("steady", totals["steady"])], 0.1)  # one session ended
    assert costs("burst") == 0.0 and costs("steady") > 0
    costs.clear()
    assert costs("steady") == 0.0


def test_a_backlog_alone_refuses_then_sheds_though_the_cpu_looks_fine() -> None:
    """CPU demand cannot rise above a whole core; the share of sessions behind can."""
    guard = LoadGuard(Thresholds(shed_cpu=0.97, refuse_behind=0.1, shed_behind=0.25))
    cuts = [
        guard.sample(cpu=0.9, lag=0.0, now=t * 0.1, sessions=100, behind=0.6) for t in range(30)
    ]
    assert not guard.admitting
    assert [t for t, n in enumerate(cuts) if n] == [15, 25]  # smoothed past 0.25 at 0.5 s, +1 s
    for t in range(30, 80):  # the backlog clears: shedding stops, admission resumes
        assert guard.sample(cpu=0.9, lag=0.0, now=t * 0.1, sessions=80, behind=0.0) == 0 or t < 40
    assert guard.admitting


def test_limits_of_zero_turn_the_guard_off() -> None:
    guard = LoadGuard(Thresholds())
    assert not guard.enabled
    assert all(guard.sample(cpu=1.0, lag=10.0, now=t, sessions=100) == 0 for t in range(10))
    assert guard.admitting


async def test_an_overloaded_relay_refuses_new_sessions_with_503_and_readyz_says_so() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(
            upstream_url=up.url, overload_cpu=0.85, overload_lag=0.1
        ) as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/readyz")).status_code == 200
                while relay.app.guard.admitting:
                    busy_until = time.perf_counter() + 0.05
                    while time.perf_counter() < busy_until:
                        pass  # CPU-bound work in the relay's process, as too much audio would be
                    await trio.lowlevel.checkpoint()
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(relay.url + "/voice"):
                        pass
                assert refused.value.status_code == 503
                assert orjson.loads(refused.value.body)["code"] == "relay_overloaded"
                assert (await http.get("/readyz")).json()["status"] == "overloaded"
                while not relay.app.guard.admitting:  # the lag decays once the loop is free
                    await trio.sleep(0.05)
                async with connect(relay.url + "/voice") as ws:
                    assert await ws.get_message() == '{"type":"session.created"}'


async def test_a_relay_at_its_session_cap_refuses_with_503_until_one_ends() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(upstream_url=up.url, max_sessions=2) as relay:
            async with connect(relay.url + "/voice") as first, connect(relay.url + "/voice") as second:
                for ws in (first, second):
                    assert await ws.get_message() == '{"type":"session.created"}'
                with pytest.raises(ConnectionRejected) as refused:
                    async with connect(relay.url + "/voice"):
                        pass
                assert refused.value.status_code == 503
                assert orjson.loads(refused.value.body)["code"] == "relay_full"
                await first.aclose()
                while len(relay.app.pairs) > 1:
                    await trio.sleep(0.01)
                async with connect(relay.url + "/voice") as third:
                    assert await third.get_message() == '{"type":"session.created"}'


def test_cpu_demand_is_time_used_plus_time_spent_waiting_for_a_core(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A relay starved by its neighbours uses little CPU but wants a lot: that is overload."""
    from relay.server import loadwatch

    stat = tmp_path / "schedstat"
    stat.write_text("7000000000 2500000000 42\n")  # ran 7 s, waited 2.5 s runnable, 42 slices
    real_open = open
    monkeypatch.setattr(loadwatch.time, "process_time", lambda: 1.25)
    schedstat = "/proc/thread-self/schedstat"
    monkeypatch.setattr(
        "builtins.open",
        lambda path, *a, **k: real_open(stat if path == schedstat else path, *a, **k),
    )
    assert loadwatch.cpu_demand_seconds() == pytest.approx(1.25 + 2.5)
    stat.unlink()  # no scheduler statistics (not Linux): the time used alone
    assert loadwatch.cpu_demand_seconds() == pytest.approx(1.25)


def test_the_time_the_pump_polled_between_messages_is_not_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Polling instead of sleeping burns CPU that is really idle: counted, a quiet relay that
    polls would look busy and shed sessions."""
    from relay.config import load_config
    from relay.server import loadwatch
    from relay.server.app import RelayApp
    from relay.wire.pump import Pump

    app = RelayApp(load_config({"OPENAI_API_KEY": "sk-x", "RELAY_ALLOW_ANONYMOUS": "1"}))
    monkeypatch.setattr(loadwatch, "cpu_demand_seconds", lambda: 5.0)
    assert loadwatch.cpu_demand(app) == 5.0  # no pump yet
    app.pump = Pump(busy_poll=1e-4)
    monkeypatch.setattr(Pump, "polled", 1.5)
    assert loadwatch.cpu_demand(app) == pytest.approx(3.5)


async def test_a_busy_worker_stops_polling_and_polls_again_once_idle_even_with_the_guard_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With every load limit off the watcher still runs, to tell the pump when the worker is
    busy: polling then would take a core others need."""
    from relay.server import loadwatch

    rate = {"now": 0.9}  # share of a core the fake worker wants
    clock = {"at": time.monotonic(), "used": 0.0}

    def demand() -> float:
        now = time.monotonic()
        clock["used"] += (now - clock["at"]) * rate["now"]
        clock["at"] = now
        return clock["used"]

    monkeypatch.setattr(loadwatch, "cpu_demand_seconds", demand)
    with trio.fail_after(TIMEOUT):
        async with running_relay(overload_behind=0.0, shed_behind=0.0) as relay_:
            assert not relay_.app.guard.enabled
            pump = relay_.app.pump
            assert pump is not None and pump.busy_poll > 0
            while not pump.busy:
                await trio.sleep(0.05)
            rate["now"] = 0.05
            while pump.busy:
                await trio.sleep(0.05)
