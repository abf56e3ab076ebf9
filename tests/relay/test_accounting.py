"""Usage accounting, concurrency caps and the daily budget, through the relay in front of mockrealtime."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import coredis.exceptions
import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionRejected

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.core.pricing import dollars, tokens_of
from relay.usage.accounting import Accounting
from relay.usage.auth import Identity, Refusal, hash_key
from relay.usage.store import UsageDelta, usage_from_response_done

from .harness import TEST_KEY, RunningRelay, connect, running_relay
from .test_relay_loopback import error_codes, receive_until_closed

TIMEOUT = 15
ALICE = "rk_alice_0123456789"
BEARER = [(b"authorization", f"Bearer {ALICE}".encode())]
TEXT_TURN = [
    orjson.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}}).decode(),
    '{"type":"response.create"}',
]


@asynccontextmanager
async def relays(store: str, count: int = 1, **settings: object) -> AsyncIterator[list[RunningRelay]]:
    """``count`` relay instances sharing one store, in front of one mockrealtime."""
    async with relays_and_mock(store, count, **settings) as (instances, _mock):
        yield instances


@asynccontextmanager
async def relays_and_mock(
    store: str, count: int = 1, **settings: object
) -> AsyncIterator[tuple[list[RunningRelay], MockServer]]:
    """:func:`relays`, and the mockrealtime behind them (which records what it received)."""
    values: dict[str, object] = {
        "allow_anonymous": False,
        "api_keys": (f"alice:{hash_key(ALICE)}",),
        "store": store,
        **settings,
    }
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}), pace=0))
        values["upstream_url"] = mock.url
        async with running_relay(**values) as first:
            if count == 1:
                yield [first], mock
            else:
                async with running_relay(**values) as second:
                    yield [first, second], mock
        nursery.cancel_scope.cancel()


async def text_turn(relay: RunningRelay) -> list[dict]:
    async with connect(relay.url + "/voice", extra_headers=BEARER) as ws:
        for message in TEXT_TURN:
            await ws.send_message(message)
        events = []
        while not events or events[-1]["type"] != "response.done":
            events.append(orjson.loads(await ws.get_message()))
    return events


async def rows(relay: RunningRelay) -> list[dict]:
    assert relay.app.accounting is not None
    from relay.usage.accounting import usage_json

    return [usage_json(r) for r in await relay.app.accounting.store.rows(user="alice")]


async def wait_for_sessions(relay: RunningRelay, count: int) -> list[dict]:
    with trio.fail_after(5):
        while True:
            found = await rows(relay)
            if found and found[0]["sessions"] >= count:
                return found
            await trio.sleep(0.01)


async def test_a_session_is_accounted_and_the_counters_survive_a_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'usage.db'}"
    with trio.fail_after(TIMEOUT):
        async with relays(store) as (relay,):
            events = await text_turn(relay)
            found = await wait_for_sessions(relay, 1)
        usage = events[-1]["response"]["usage"]
        (row,) = found
        assert row["sessions"] == 1 and row["connected_seconds"] > 0
        assert row["client_messages"] == 2
        assert row["upstream_messages"] >= len(events)  # + rate_limits.updated after response.done
        assert row["total_tokens"] == usage["total_tokens"]
        assert row["output_audio_tokens"] == usage["output_token_details"]["audio_tokens"]
        async with relays(store) as (restarted,):  # a new process on the same file
            assert await rows(restarted) == found
    table = subprocess.run(
        [sys.executable, "-m", "relay", "usage", "--store", store, "--user", "alice"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout.splitlines()
    assert table[0].split()[:3] == ["day", "user", "sessions"]
    assert table[1].split()[1:3] == ["alice", "1"]
    assert table[0].split()[-4:] == ["total", "tokens", "cost", "$"]
    # The default model (gpt-realtime-2.1) has a built-in price: the turn cost what it says.
    cost = relay.app.config.prices.cost(relay.app.config.model, tokens_of(events[-1]))
    assert cost is not None and cost > 0
    assert table[1].split()[-2:] == [str(row["total_tokens"]), f"{dollars(cost):.6f}"]
    as_json = subprocess.run(
        [sys.executable, "-m", "relay", "usage", "--store", store, "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout
    assert orjson.loads(as_json)["rows"] == found


async def test_two_instances_never_let_a_user_exceed_the_session_cap(store_url: str) -> None:
    """Many simultaneous attempts, spread over two relays sharing one store (SQLite file or Redis)."""
    cap, attempts = 3, 24
    opened: list[object] = []
    refused: list[int] = []
    with trio.fail_after(TIMEOUT):
        async with relays(store_url, count=2, max_sessions_per_user=cap) as (a, b):
            release = trio.Event()
            all_in = trio.Event()

            async def attempt(relay: RunningRelay) -> None:
                try:
                    async with connect(relay.url + "/voice", extra_headers=BEARER) as ws:
                        await ws.get_message()
                        opened.append(ws)
                        if len(opened) + len(refused) == attempts:
                            all_in.set()
                        await release.wait()
                except ConnectionRejected as exc:
                    refused.append(exc.status_code)
                    assert orjson.loads(exc.body)["code"] == "too_many_sessions"
                    if len(opened) + len(refused) == attempts:
                        all_in.set()

            async with trio.open_nursery() as nursery:
                for n in range(attempts):
                    nursery.start_soon(attempt, (a, b)[n % 2])
                await all_in.wait()
                assert (len(opened), refused) == (cap, [429] * (attempts - cap))
                release.set()
            # The slots are free again once those sessions ended.
            await wait_for_sessions(a, cap)
            await text_turn(b)


async def cut_by_budget(relay: RunningRelay, mock: MockServer) -> tuple[list[str | bytes], str]:
    """A text turn whose response uses up alice's budget: what she got, and the close reason."""
    async with connect(relay.url + "/voice", extra_headers=BEARER) as ws:
        for message in TEXT_TURN:
            await ws.send_message(message)
        messages, code, reason = await receive_until_closed(ws)
    kinds = [orjson.loads(m)["type"] for m in messages]
    assert "response.done" in kinds  # the turn that crossed the budget is delivered
    assert error_codes(messages)[-1] == "relay_budget_exhausted" and code == 4029
    (upstream,) = mock.connections
    await upstream.closed.wait()
    # Upstream, any response still running is cancelled, and then the session closed.
    assert upstream.received[-1] == '{"type":"response.cancel"}'
    assert (upstream.close_code, upstream.close_reason) == (1000, "budget exhausted")
    return messages, reason


async def test_the_budget_ends_a_session_mid_way_and_then_refuses_new_ones(store_url: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with relays_and_mock(store_url, daily_token_budget=10) as ((relay,), mock):
            await cut_by_budget(relay, mock)
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice", extra_headers=BEARER):
                    pass
            assert refused.value.status_code == 429
            assert orjson.loads(refused.value.body)["code"] == "daily_budget_exhausted"
            assert len(mock.connections) == 1  # nothing was dialled for the refused session


async def test_a_tokens_budget_claim_below_the_relays_budget_cuts_the_session_first() -> None:
    from .test_auth_loopback import SECRET, signed

    token = signed({"budget": 10})  # user bob
    bearer = [(b"authorization", f"Bearer {token}".encode())]
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", jwt_secret=SECRET, daily_token_budget=100_000) as (relay,):
            async with connect(relay.url + "/voice", extra_headers=bearer) as ws:
                for message in TEXT_TURN:
                    await ws.send_message(message)
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages)[-1] == "relay_budget_exhausted" and code == 4029
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice", extra_headers=bearer):
                    pass
            assert refused.value.status_code == 429
            assert "daily token budget of 10 is used up" in orjson.loads(refused.value.body)["error"]
            # Another user of the same relay still has the relay's (larger) budget.
            assert (await text_turn(relay))[-1]["type"] == "response.done"


async def test_the_admin_endpoint_needs_the_admin_token() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", admin_token="admin-secret-token") as (relay,):
            await text_turn(relay)
            await wait_for_sessions(relay, 1)
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/admin/usage")).status_code == 401
                wrong = await http.get("/admin/usage", headers={"authorization": "Bearer nope"})
                assert wrong.status_code == 401
                ok = await http.get("/admin/usage?user=alice", headers={"authorization": "Bearer admin-secret-token"})
            assert ok.status_code == 200
            (row,) = ok.json()["rows"]
            assert row["user"] == "alice" and row["sessions"] == 1 and row["total_tokens"] > 0
        async with relays("sqlite:///:memory:") as (closed,):
            async with httpx.AsyncClient(base_url=closed.http_url) as http:
                assert (await http.get("/admin/usage")).status_code == 404


class HungStore:
    """A store whose writes never return, like a Redis that stopped answering."""

    async def add(self, *args: object) -> None:
        await trio.sleep_forever()

    async def release_slot(self, *args: object) -> None:
        await trio.sleep_forever()


async def test_a_hung_store_cannot_hold_up_a_sessions_teardown(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.core.bridge import Traffic
    from relay.usage.accounting import FINISH_TIMEOUT, Accounting
    from relay.usage.auth import Identity

    accounting = Accounting(HungStore(), max_sessions=2, daily_budget=0)  # type: ignore[arg-type]
    started = trio.current_time()
    with trio.CancelScope() as scope:
        scope.cancel()  # the session is being cancelled, as at shutdown: finish still runs, bounded
        await accounting.finish(Identity("alice", "api_key"), "s1", Traffic(), 1.0)
    assert trio.current_time() - started == pytest.approx(FINISH_TIMEOUT)
    assert "session of alice not recorded" in caplog.text


def redis_down() -> Exception:
    """What coredis raises for every call while Redis is down (a RedisError, not an OSError)."""
    return coredis.exceptions.ConnectionError("Unable to establish a connection to 127.0.0.1:6379")


class LeaseStore:
    """Leases and token counters in memory, on Trio's clock, so lease expiry runs under MockClock.

    ``failing`` names operations that fail as they do with Redis down, while ``failures``
    lasts (each failure counts one down).
    """

    def __init__(self, *, failing: frozenset[str] = frozenset(), failures: int = 0) -> None:
        self.slots: dict[str, dict[str, float]] = {}
        self.tokens_used: dict[str, int] = {}
        self.failing = failing
        self.failures = failures

    def _maybe_fail(self, operation: str) -> None:
        if operation in self.failing and self.failures > 0:
            self.failures -= 1
            raise redis_down()

    async def acquire_slot(self, user: str, session_id: str, *, limit: int, lease_seconds: float) -> bool:
        self._maybe_fail("acquire_slot")
        now = trio.current_time()
        live = {s: t for s, t in self.slots.get(user, {}).items() if t > now}
        if session_id not in live and len(live) >= limit:
            self.slots[user] = live
            return False
        live[session_id] = now + lease_seconds
        self.slots[user] = live
        return True

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        self._maybe_fail("renew_slot")
        leases = self.slots.get(user, {})
        if leases.get(session_id, -1.0) > trio.current_time():
            leases[session_id] = trio.current_time() + lease_seconds

    async def add(self, user: str, day: str, delta: object) -> None:
        self._maybe_fail("add")
        from relay.usage.store import TOKEN_COUNTERS

        self.tokens_used[user] = self.tokens_used.get(user, 0) + sum(getattr(delta, n) for n in TOKEN_COUNTERS)

    async def tokens(self, user: str, day: str) -> int:
        self._maybe_fail("tokens")
        return self.tokens_used.get(user, 0)


ALICE_ID = Identity("alice", "api_key")
LEASE = 3.0


async def test_a_session_that_outlives_its_lease_still_holds_its_slot(autojump_clock: trio.testing.MockClock) -> None:
    accounting = Accounting(LeaseStore(), max_sessions=1, daily_budget=0, lease_seconds=LEASE)  # type: ignore[arg-type]
    await accounting.admit(ALICE_ID, "s1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accounting.keep_lease, ALICE_ID, "s1")
        await trio.sleep(10 * LEASE)  # the first lease ran out long ago; renewals kept it
        with pytest.raises(Refusal) as refused:
            await accounting.admit(ALICE_ID, "s2")
        assert refused.value.code == "too_many_sessions"
        nursery.cancel_scope.cancel()
    # Once renewals stop (the session ended without releasing), the lease lapses and frees the slot.
    await trio.sleep(LEASE)
    await accounting.admit(ALICE_ID, "s2")


async def test_a_failed_lease_renewal_is_logged_and_retried_and_the_slot_kept(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = LeaseStore(failing=frozenset({"renew_slot"}), failures=1)
    accounting = Accounting(store, max_sessions=1, daily_budget=0, lease_seconds=LEASE)  # type: ignore[arg-type]
    await accounting.admit(ALICE_ID, "s1")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accounting.keep_lease, ALICE_ID, "s1")  # would end the nursery if it raised
        await trio.sleep(10 * LEASE)
        with pytest.raises(Refusal):
            await accounting.admit(ALICE_ID, "s2")
        nursery.cancel_scope.cancel()
    assert store.failures == 0
    (record,) = [r for r in caplog.records if "renew" in r.getMessage()]
    assert "ConnectionError" in record.getMessage() and "retrying" in record.getMessage()
    assert record.fields == {"session": "s1", "user": "alice"}


async def test_a_store_failure_while_recording_a_response_is_logged_and_not_fatal(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    done = usage_from_response_done(
        {"type": "response.done", "response": {"usage": {"input_tokens": 5, "output_tokens": 7}}}
    )
    store = LeaseStore(failing=frozenset({"add"}), failures=1)
    accounting = Accounting(store, max_sessions=0, daily_budget=10)  # type: ignore[arg-type]
    assert await accounting.record_responses(ALICE_ID, [done]) is None  # not counted, not fatal
    assert "usage store failed to record 1 finished responses (ConnectionError" in caplog.text
    assert await accounting.record_responses(ALICE_ID, [done]) == "token"  # back: 12 >= 10


async def test_a_hung_store_cannot_hold_up_the_upstreams_events(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.usage.accounting import STORE_TIMEOUT

    accounting = Accounting(HungStore(), max_sessions=0, daily_budget=10)  # type: ignore[arg-type]
    started = trio.current_time()
    with trio.fail_after(2 * STORE_TIMEOUT):
        assert await accounting.record_responses(ALICE_ID, [UsageDelta()]) is None
    assert trio.current_time() - started == pytest.approx(STORE_TIMEOUT)
    assert "no answer within" in caplog.text


class SlowStore:
    """Records each add once ``release`` is set; ``entered`` says an add is under way."""

    def __init__(self) -> None:
        self.entered = trio.Event()
        self.release = trio.Event()
        self.recorded: list[UsageDelta] = []

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        self.entered.set()
        await self.release.wait()
        self.recorded.append(delta)


async def test_tokens_being_recorded_as_the_session_ends_are_recorded_still(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The client leaves just after a response.done: the pair is cancelled while its tokens
    go to the store (a Redis write, which a cancel would cut). They are recorded all the same."""
    done = usage_from_response_done(
        {"type": "response.done", "response": {"usage": {"input_tokens": 5, "output_tokens": 7}}}
    )
    store = SlowStore()
    accounting = Accounting(store, max_sessions=0, daily_budget=0)  # type: ignore[arg-type]
    with trio.CancelScope() as session:
        async with trio.open_nursery() as pair:
            pair.start_soon(accounting.record_responses, ALICE_ID, [done])
            await store.entered.wait()
            session.cancel()  # the session ends meanwhile
            store.release.set()
    assert store.recorded == [done]


class DownStore:
    """Wraps a store; from ``down()`` on, every call fails as it does with Redis down.

    (A real redis-server killed mid-test would do, but coredis leaks a stream per failed reconnect,
    which the test run reports as unclosed resources.)
    """

    def __init__(self, store: object) -> None:
        self._store = store
        self.is_down = False

    def down(self) -> None:
        self.is_down = True

    def __getattr__(self, name: str) -> object:
        method = getattr(self._store, name)

        async def call(*args: object, **kwargs: object) -> object:
            if self.is_down:
                raise redis_down()
            return await method(*args, **kwargs)

        return call


async def test_a_live_session_goes_on_when_its_usage_store_goes_down(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", max_sessions_per_user=2, daily_token_budget=100_000) as (relay,):
            assert relay.app.accounting is not None
            store = relay.app.accounting.store = DownStore(relay.app.accounting.store)  # type: ignore[assignment]
            async with connect(relay.url + "/voice", extra_headers=BEARER) as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
                store.down()
                for _turn in range(2):  # recording each response.done fails; the session goes on
                    for message in TEXT_TURN:
                        await ws.send_message(message)
                    while orjson.loads(await ws.get_message())["type"] != "response.done":
                        pass
                assert ws.closed is None
    assert "usage store failed to record 1 finished responses (ConnectionError" in caplog.text


async def test_a_handshake_gets_503_while_the_usage_store_is_down() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", max_sessions_per_user=2) as (relay,):
            assert relay.app.accounting is not None
            store = relay.app.accounting.store = DownStore(relay.app.accounting.store)  # type: ignore[assignment]
            store.down()
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice", extra_headers=BEARER):
                    pass
    assert refused.value.status_code == 503
    assert "usage store is not answering" in orjson.loads(refused.value.body)["error"]
