"""Load shedding: an event loop that falls behind refuses new sessions, then closes the newest."""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionRejected

from relay.overload import LoadGuard

from .harness import UpstreamConnection, connect, running_relay, scripted_upstream

TIMEOUT = 20


def test_a_lagging_loop_stops_admitting_and_recovers() -> None:
    guard = LoadGuard(refuse_lag=0.1, shed_lag=0.5)
    assert guard.admitting
    guard.sample(0.5, 0.0, 10)
    assert guard.admitting  # one stall is smoothed away
    for n in range(1, 12):
        guard.sample(0.25, 0.1 * n, 10)
    assert not guard.admitting  # a second of steady lag is not
    for n in range(12, 40):
        guard.sample(0.0, 0.1 * n, 10)
    assert guard.admitting


def test_sustained_heavy_lag_sheds_a_tenth_of_the_sessions_every_two_seconds() -> None:
    guard = LoadGuard(refuse_lag=0.1, shed_lag=0.5, shed_after=2.0)
    shed = [(round(t * 0.1, 1), guard.sample(2.0, t * 0.1, 95)) for t in range(0, 70)]
    cuts = [(t, n) for t, n in shed if n]
    # The smoothed lag passes 0.5 s at the third sample (0.2 s): 2 s later the first cut, then every 2 s.
    assert cuts == [(2.2, 10), (4.2, 10), (6.2, 10)]
    assert guard.sample(0.0, 7.0, 0) == 0


def test_a_zero_lag_limit_turns_the_guard_off() -> None:
    guard = LoadGuard(refuse_lag=0.0, shed_lag=0.5)
    assert all(guard.sample(10.0, t, 100) == 0 for t in range(10))
    assert guard.admitting


async def test_an_overloaded_relay_refuses_new_sessions_with_503_and_readyz_says_so() -> None:
    async def greet(conn: UpstreamConnection) -> None:
        ws = await conn.accept()
        await ws.send_message('{"type":"session.created"}')
        while True:
            await conn.receive()

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(
            upstream_url=up.url, overload_lag=0.1, shed_lag=0.0
        ) as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/readyz")).status_code == 200
                while relay.app.guard.admitting:
                    time.sleep(0.3)  # CPU-bound work hogging the loop, as too much audio would
                    await trio.sleep(0)
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
    async def greet(conn: UpstreamConnection) -> None:
        ws = await conn.accept()
        await ws.send_message('{"type":"session.created"}')
        while True:
            await conn.receive()

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
