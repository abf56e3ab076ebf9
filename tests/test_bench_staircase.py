"""The capacity benchmark's staircase: where it steps, and what it reports."""

from collections import Counter

from bench.scenarios import Staircase, StreamResult, Target

TARGET = Target("relay", 1, {})


def run(n: int, held: bool) -> StreamResult:
    return StreamResult(
        target="relay",
        sessions=n,
        connect_failures=0,
        seconds=4.0,
        sent=10,
        received=10,
        lost=0,
        out_of_order=0,
        closed_by_server=Counter(),
        p50_us=1_000,
        p99_us=5_000 if held else 500_000,
        max_us=6_000,
        max_lag_ms=1.0,
        cpu={"relay": float(n)},
    )


def walk(stair: Staircase, outcomes: str) -> list[int]:
    """Feed ``outcomes`` (``+`` held, ``-`` failed); the N tried, in order."""
    tried = []
    for outcome in outcomes:
        tried.append(stair.n)
        stair.record(run(stair.n, outcome == "+"))
    return tried


def test_walks_two_steps_a_run_until_it_first_turns_then_one():
    stair = Staircase(TARGET, 100, 5)
    assert walk(stair, "++-") == [100, 110, 120]
    assert stair.n == 115
    assert stair.settled_from == 2


def test_after_turning_steps_up_only_after_two_runs_in_a_row_hold():
    stair = Staircase(TARGET, 100, 5)
    assert walk(stair, "-++-++") == [100, 90, 95, 95, 90, 90]
    assert stair.n == 95


def test_a_failure_between_two_that_hold_restarts_the_count():
    stair = Staircase(TARGET, 100, 5)
    walk(stair, "-+")  # turned at 95
    assert walk(stair, "+-++") == [95, 95, 90, 90]
    assert stair.n == 95


def test_estimate_is_the_mean_of_the_runs_since_with_the_next_n():
    stair = Staircase(TARGET, 100, 5)
    walk(stair, "-++-")  # tried 100, 90, 95, 95; next 90
    assert stair.estimate(2) == 93  # (95 + 95 + 90) / 3
    assert stair.estimate(0) == 94  # (100 + 90 + 95 + 95 + 90) / 5


def test_a_walk_that_never_turns_is_averaged_from_its_first_run():
    stair = Staircase(TARGET, 100, 5)
    assert walk(stair, "+++") == [100, 110, 120]
    assert stair.settled_from == 0
    assert stair.estimate(stair.settled_from) == 115  # (100 + 110 + 120 + 130) / 4


def test_the_run_that_held_nearest_a_figure_is_kept_for_its_cpu_figures():
    stair = Staircase(TARGET, 100, 5)
    walk(stair, "+-++")  # held at 100, 110 failed, 105 held twice
    assert stair.best_near(108).sessions == 105
    assert stair.best_near(90).sessions == 100
    assert Staircase(TARGET, 100, 5).best_near(100) is None
