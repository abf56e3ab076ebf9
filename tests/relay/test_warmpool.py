"""The warm pool's bookkeeping (relay.core.warmpool), driven with plain times."""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.warmpool import (
    BACKOFF_CAP,
    PoolKey,
    PoolLedger,
    backoff,
    client_created,
    fresh_event_id,
)

SETUP = '{"type":"session.update","event_id":"event_relay_setup","session":{"type":"realtime"}}'
MINI = PoolKey("gpt-realtime-mini", SETUP, None)
FULL = PoolKey("gpt-realtime", SETUP, None)
MAX_AGE = 600.0
LEAD = 10.0


def ledger(**sizes: int) -> PoolLedger[str]:
    keys = {MINI: sizes.get("mini", 2), FULL: sizes.get("full", 0)}
    return PoolLedger(keys, max_age=MAX_AGE, lead=LEAD)


def fill(pool: PoolLedger[str], now: float = 0.0) -> list[str]:
    """Dial what the ledger asks for and report every dial ready; the handles made."""
    made = []
    for n, key in enumerate(pool.due(now).dial):
        handle = f"{key.model}#{now}#{n}"
        assert pool.ready(key, handle, now)
        made.append(handle)
    return made


def test_an_empty_pool_asks_for_its_size_once() -> None:
    pool = ledger(mini=3)
    assert pool.due(0.0).dial == [MINI] * 3
    assert pool.due(0.0).dial == []  # the three are under way
    assert pool.take(MINI) is None  # a miss: none is ready yet


def test_a_take_gets_a_ready_session_and_the_refill_is_asked_for() -> None:
    pool = ledger(mini=2)
    first, second = fill(pool)
    assert pool.take(MINI) == first  # the oldest
    assert pool.waiting(MINI) == 1
    assert pool.due(1.0).dial == [MINI]
    assert pool.take(MINI) == second
    assert pool.take(MINI) is None


def test_no_session_is_handed_out_twice() -> None:
    pool = ledger(mini=5)
    made = fill(pool)
    taken = [pool.take(MINI) for _ in range(8)]
    handed = [t for t in taken if t is not None]
    assert sorted(handed) == sorted(made) and len(set(handed)) == len(handed)


def test_a_key_gets_only_its_own_sessions() -> None:
    pool = ledger(mini=1, full=1)
    fill(pool)
    named = PoolKey(MINI.model, MINI.setup, "3f9a")  # the same model, another identifier
    phone = PoolKey(MINI.model, '{"type":"session.update","session":{"x":1}}', None)
    other = PoolKey("gpt-realtime-2", SETUP, None)
    for key in (named, phone, other):
        assert not pool.pooled(key) and pool.take(key) is None
    assert pool.take(FULL).startswith("gpt-realtime#")  # type: ignore[union-attr]
    assert pool.take(MINI).startswith("gpt-realtime-mini#")  # type: ignore[union-attr]


def test_a_session_is_replaced_before_it_ages_out_and_retired_when_it_does() -> None:
    pool = ledger(mini=1)
    (old,) = fill(pool)
    plan = pool.due(100.0)
    assert (plan.dial, plan.retire, plan.wake_at) == ([], [], MAX_AGE - LEAD)
    plan = pool.due(MAX_AGE - LEAD)
    assert plan.dial == [MINI]  # the replacement, a dial's length ahead
    assert plan.wake_at == MAX_AGE
    pool.ready(MINI, "new", MAX_AGE - 9)
    assert pool.waiting(MINI) == 2  # the old one may still be taken meanwhile
    plan = pool.due(MAX_AGE)
    assert plan.retire == [(MINI, old)] and plan.dial == []
    assert pool.take(MINI) == "new"


def test_dial_failures_back_off_and_probe_one_at_a_time() -> None:
    pool = ledger(mini=3)
    assert len(pool.due(0.0).dial) == 3
    for _ in range(3):
        pool.failed(MINI, 0.0)
    plan = pool.due(0.0)
    assert plan.dial == [] and plan.wake_at == backoff(3) == 4.0
    assert pool.due(4.0).dial == [MINI]  # one probe
    assert pool.due(4.0).dial == []
    pool.failed(MINI, 4.5)
    assert pool.due(4.5).wake_at == 4.5 + 8.0
    # It works again: each success brings one more, and a take proves the key good.
    assert pool.due(12.5).dial == [MINI]
    pool.ready(MINI, "a", 12.6)
    assert pool.due(12.6).dial == [MINI]  # still one at a time until a session proves good
    assert pool.take(MINI) == "a"
    assert len(pool.due(12.7).dial) == 2


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff(n) for n in range(8)] == [0, 1, 2, 4, 8, 16, 32, BACKOFF_CAP]
    assert backoff(10_000) == BACKOFF_CAP


def test_a_session_lost_while_waiting_is_replaced_after_a_backoff() -> None:
    pool = ledger(mini=2)
    first, second = fill(pool)
    assert pool.lost(MINI, first, 50.0)
    assert pool.waiting(MINI) == 1
    plan = pool.due(50.0)
    assert plan.dial == [] and plan.wake_at == 51.0  # an upstream that drops sessions: no hot loop
    assert pool.due(51.0).dial == [MINI]
    assert pool.take(MINI) == second
    assert not pool.lost(MINI, second, 52.0)  # taken: not the pool's any more


def test_close_hands_back_every_waiting_session_and_stops_everything() -> None:
    pool = ledger(mini=2, full=1)
    made = fill(pool)
    left = pool.close()
    assert sorted(h for _, h in left) == sorted(made)
    assert pool.take(MINI) is None
    assert pool.due(1000.0).dial == [] and pool.due(1000.0).wake_at == math.inf
    # A dial that was under way comes back after the close: not kept.
    pool2 = ledger(mini=1)
    (key,) = pool2.due(0.0).dial
    pool2.close()
    assert not pool2.ready(key, "late", 1.0)
    assert pool2.waiting(MINI) == 0


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["due", "ready", "failed", "take", "lost"]),
            st.floats(min_value=0, max_value=30),
        ),
        max_size=120,
    )
)
def test_bounded_and_each_session_handed_out_once_whatever_happens(
    steps: list[tuple[str, float]],
) -> None:
    size = 3
    pool: PoolLedger[int] = PoolLedger({MINI: size}, max_age=60.0, lead=5.0)
    now = 0.0
    under_way = 0
    made = 0
    waiting: set[int] = set()
    gone: set[int] = set()
    for action, dt in steps:
        now += dt
        if action == "due":
            plan = pool.due(now)
            under_way += len(plan.dial)
            for _, handle in plan.retire:
                waiting.remove(handle)
                gone.add(handle)
        elif action == "ready" and under_way:
            under_way -= 1
            made += 1
            assert pool.ready(MINI, made, now)
            waiting.add(made)
        elif action == "failed" and under_way:
            under_way -= 1
            pool.failed(MINI, now)
        elif action == "take":
            handle = pool.take(MINI)
            assert (handle is None) == (not waiting)
            if handle is not None:
                assert handle in waiting and handle not in gone
                waiting.remove(handle)
                gone.add(handle)
        elif action == "lost" and waiting:
            handle = min(waiting)
            assert pool.lost(MINI, handle, now)
            waiting.remove(handle)
            gone.add(handle)
        assert pool.waiting(MINI) == len(waiting)
        assert len(waiting) + under_way <= 2 * size


def test_a_pooled_session_created_carries_the_answered_session_under_a_fresh_id() -> None:
    created = {"type": "session.created", "event_id": "event_old", "session": {"voice": "x"}}
    text = client_created(created, {"voice": "marin", "instructions": "relay"})
    event = orjson.loads(text)
    assert event["type"] == "session.created"
    assert event["session"] == {"voice": "marin", "instructions": "relay"}
    assert event["event_id"] != "event_old" and event["event_id"].startswith("event_")
    assert len(fresh_event_id()) == len("event_") + 21
    assert fresh_event_id() != fresh_event_id()
    assert orjson.loads(client_created(created, None))["session"] == {"voice": "x"}


def test_max_age_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PoolLedger({MINI: 1}, max_age=0, lead=1)
