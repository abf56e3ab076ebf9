"""Session length and idle timeout: a warning event first, then the cut, on the virtual clock."""

from __future__ import annotations

import math

import orjson
import pytest
import trio
import trio.testing

from relay.core.bridge import Cause
from relay.core.deadlines import Deadlines, Due

from .memory import OPENING, ClientScript, Outcome, UpstreamScript, run_pair

#: An upstream that opens the session as the Realtime API does, then says nothing.
OPENS = UpstreamScript(events=OPENING, gaps=(0.0, 0.0))


def run(client: ClientScript, upstream: UpstreamScript, **limits: float) -> tuple[Outcome, float]:
    """Run one pair in memory; the outcome and the virtual time it started at."""

    async def main() -> tuple[Outcome, float]:
        return await run_pair(client, upstream, **limits), 0.0

    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(main, clock=clock)


def errors(received: list) -> list[str]:
    return [e["error"]["code"] for e in map(orjson.loads, received) if e["type"] == "error"]


# -- the schedule, as arithmetic ---------------------------------------------------


def test_the_session_limit_warns_lead_seconds_before_the_cut() -> None:
    d = Deadlines(100.0, max_seconds=60, idle_seconds=0, lead=10)
    assert d.step(100.0, 100.0) == ((), 150.0)
    assert d.step(150.0, 149.0).due == (Due.SESSION_WARNING,)
    assert d.seconds_left(150.0, 149.0, Due.SESSION_WARNING) == 10.0
    assert d.step(155.0, 154.0) == ((), 160.0)  # warned once only
    assert d.step(160.0, 159.0).due == (Due.SESSION_END,)


def test_traffic_postpones_the_idle_warning_and_the_cut() -> None:
    d = Deadlines(0.0, max_seconds=0, idle_seconds=60, lead=10)
    assert d.step(0.0, 0.0).wake_at == 50.0
    assert d.step(50.0, 30.0) == ((), 80.0)  # a message at 30: warn at 80 instead
    step = d.step(80.0, 30.0)
    assert step.due == (Due.IDLE_WARNING,) and step.wake_at == 90.0
    assert d.step(85.0, 84.0) == ((), 134.0)  # traffic after the warning: no cut at 90
    assert d.step(134.0, 84.0).due == (Due.IDLE_WARNING,)  # and a new warning later
    assert d.step(144.0, 84.0).due == (Due.IDLE_END,)


def test_a_short_limit_warns_at_half_time() -> None:
    d = Deadlines(0.0, max_seconds=8, idle_seconds=4, lead=30)
    assert d.step(0.0, 0.0).wake_at == 2.0
    assert d.step(2.0, 0.0).due == (Due.IDLE_WARNING,)
    assert d.step(4.0, 3.9).due == (Due.SESSION_WARNING,)


def test_limits_of_zero_are_off() -> None:
    d = Deadlines(0.0, max_seconds=0, idle_seconds=None, lead=30)
    assert not d.active
    assert d.step(1e9, 0.0) == ((), math.inf)


# -- through a pair ------------------------------------------------------------------


def test_an_idle_pair_is_warned_then_closed_4008_and_the_upstream_closed_1000() -> None:
    quiet_client = ClientScript(closes_after=None)
    outcome, start = run(quiet_client, OPENS, idle_seconds=60, warning_lead=10)
    assert outcome.ending.cause is Cause.IDLE_TIMEOUT
    assert errors(outcome.client.received) == ["relay_idle_warning", "relay_idle_timeout"]
    warning = orjson.loads(outcome.client.received[1])["error"]["message"]
    assert "closes in 10 s" in warning
    assert outcome.client.close_code == 4008
    assert outcome.client.closed_at == pytest.approx(start + 60)
    assert outcome.upstream.close_code == 1000


def test_traffic_either_way_keeps_a_pair_alive() -> None:
    client = ClientScript(
        messages=('{"type":"input_audio_buffer.clear"}',) * 3, gaps=(40.0, 40.0, 40.0), closes_after=None
    )
    upstream = UpstreamScript(
        events=(*OPENING, *('{"type":"rate_limits.updated"}',) * 2), gaps=(0.0, 0.0, 150.0, 40.0)
    )
    outcome, start = run(client, upstream, idle_seconds=60, warning_lead=10)
    # Client messages at 40, 80, 120; upstream events at 150 and 190; then quiet: warned at 240.
    assert outcome.client.closed_at == pytest.approx(start + 190 + 60)
    assert errors(outcome.client.received) == ["relay_idle_warning", "relay_idle_timeout"]
    assert len(outcome.upstream.received) == 1 + 3  # session.update, then every client message


def test_a_session_at_its_maximum_length_is_warned_then_closed_1001() -> None:
    appends = tuple(f'{{"type":"input_audio_buffer.append","audio":"{n:04d}"}}' for n in range(12))
    client = ClientScript(messages=appends, gaps=(10.0,) * 12, closes_after=None)
    outcome, start = run(client, OPENS, max_seconds=100, warning_lead=30)
    assert outcome.ending.cause is Cause.SESSION_EXPIRED
    assert errors(outcome.client.received) == ["relay_session_ending_soon", "session_expired"]
    assert outcome.client.close_code == 1001
    assert outcome.client.closed_at == pytest.approx(start + 100)
    # Every message sent before the cut (at 10, 20, … 90; the one at 100 races it) went upstream in order.
    assert list(outcome.upstream.received[1:10]) == list(appends[:9])
    assert outcome.upstream.close_code == 1000
