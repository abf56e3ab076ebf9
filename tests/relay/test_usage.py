"""The usage and limits store, on both backends: counters, leases, the cap across instances.

Redis tests start a private ``redis-server`` on a free loopback port (no system
service is used) and skip when the binary is missing.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.usage.store import (
    UsageDelta,
    UsageRow,
    UsageStore,
    open_store,
    usage_from_response_done,
)

from .redis_server import RedisServer, free_port

DAY = "2026-11-24"
#: Every I/O test finishes well within this (they take tens of milliseconds).
TEST_TIMEOUT = 20
#: Each example opens two stores; a quarter of the profile's examples keeps this file fast.
PROPERTY_EXAMPLES = max(25, settings.default.max_examples // 4)


class FakeClock:
    """A wall clock the test moves by hand, for lease expiry."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@asynccontextmanager
async def opened(url: str, clock: Callable[[], float] = time.time) -> AsyncIterator[UsageStore]:
    store = await open_store(url, clock=clock)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


# --- counters ---------------------------------------------------------------------------------


async def test_concurrent_adds_from_two_instances_sum_exactly(store_url: str) -> None:
    delta = UsageDelta(
        sessions=1, connected_seconds=0.5, client_messages=3, client_bytes=1000,
        upstream_messages=7, upstream_bytes=20_000, input_text_tokens=11,
        input_audio_tokens=13, input_cached_tokens=5, output_text_tokens=17,
        output_audio_tokens=19,
    )  # fmt: skip
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as a, opened(store_url) as b:
            async with trio.open_nursery() as nursery:
                for i in range(200):
                    nursery.start_soon((a, b)[i % 2].add, "alice", DAY, delta)
            (row,) = await a.rows()
            assert await b.tokens("alice", DAY) == 200 * (11 + 13 + 17 + 19)
    expected = {name: 200 * value for name, value in asdict(delta).items()}
    assert asdict(row) == {"day": DAY, "user": "alice", **expected}
    assert row.total_tokens == 200 * 60


async def test_counters_survive_closing_and_reopening_the_store(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            await store.add("alice", DAY, UsageDelta(sessions=1, output_audio_tokens=40))
            await store.add("bob", DAY, UsageDelta(connected_seconds=2.25))
            before = await store.rows()
        async with opened(store_url) as reopened:
            assert await reopened.rows() == before
            await reopened.add("alice", DAY, UsageDelta(sessions=1, output_audio_tokens=2))
            assert await reopened.tokens("alice", DAY) == 42
            assert (await reopened.rows(user="alice"))[0].sessions == 2


async def test_redis_counters_survive_a_server_restart(own_redis_server: RedisServer) -> None:
    own_redis_server.start()
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(own_redis_server.url) as store:
            await store.add("alice", DAY, UsageDelta(sessions=1, input_text_tokens=5))
            own_redis_server.stop(save=True)
            own_redis_server.start(own_redis_server.port)
            # The same client reconnects, and the day's counters were saved.
            assert await store.tokens("alice", DAY) == 5
            await store.add("alice", DAY, UsageDelta(sessions=1))
            (row,) = await store.rows()
    assert (row.sessions, row.input_text_tokens) == (2, 5)


async def test_a_zero_delta_still_records_the_user_day(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            await store.add("alice", DAY, UsageDelta())
            assert await store.rows() == [UsageRow(day=DAY, user="alice")]
            assert await store.tokens("alice", DAY) == 0
            assert await store.tokens("nobody", DAY) == 0


async def test_rows_filter_by_day_and_user_and_sort_by_day_then_user(store_url: str) -> None:
    days = ["2026-11-25", "2026-11-23", DAY]
    users = ["carol", "alice", "bob:with:colons"]
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            for day in days:
                for user in users:
                    await store.add(user, day, UsageDelta(sessions=1))
            every = await store.rows()
            assert [(r.day, r.user) for r in every] == sorted((d, u) for d in days for u in users)
            assert [r.user for r in await store.rows(day=DAY)] == sorted(users)
            assert [r.day for r in await store.rows(user="carol")] == sorted(days)
            assert await store.rows(day=DAY, user="alice") == [UsageRow(day=DAY, user="alice", sessions=1)]
            assert await store.rows(day="2001-01-01") == []
            assert await store.rows(user="nobody") == []


async def test_tokens_count_text_and_audio_both_ways_but_not_cached(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            await store.add("alice", DAY, UsageDelta(
                input_text_tokens=1, input_audio_tokens=10, input_cached_tokens=1000,
                output_text_tokens=100, output_audio_tokens=10_000, client_bytes=99,
            ))  # fmt: skip
            await store.add("alice", "2026-11-25", UsageDelta(input_text_tokens=7))
            assert await store.tokens("alice", DAY) == 10_111
            (row,) = await store.rows(day=DAY)
            assert row.total_tokens == 10_111


# --- concurrency slots ------------------------------------------------------------------------


async def attempt_slots(
    stores: list[UsageStore], user: str, attempts: int, *, limit: int, tag: str
) -> list[str]:
    """``attempts`` concurrent acquisitions through each store; the session ids that got a slot."""
    granted: list[str] = []
    go = trio.Event()

    async def attempt(store: UsageStore, session_id: str) -> None:
        await go.wait()
        if await store.acquire_slot(user, session_id, limit=limit, lease_seconds=60):
            granted.append(session_id)

    async with trio.open_nursery() as nursery:
        for s, store in enumerate(stores):
            for i in range(attempts):
                nursery.start_soon(attempt, store, f"{tag}-{s}-{i}")
        go.set()
    return granted


@pytest.mark.parametrize("limit", [1, 3])
async def test_two_instances_never_let_a_user_exceed_the_cap(store_url: str, limit: int) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as a, opened(store_url) as b:
            granted = await attempt_slots([a, b], "alice", 50, limit=limit, tag="first")
            assert len(granted) == limit
            # Another user's cap is their own.
            assert len(await attempt_slots([a, b], "bob", 5, limit=limit, tag="bob")) == limit
            # Releasing one slot lets exactly one more session in, through either instance.
            await b.release_slot("alice", granted[0])
            again = await attempt_slots([a, b], "alice", 20, limit=limit, tag="second")
            assert len(again) == 1
            # Releasing them all frees the cap entirely.
            for session_id in granted[1:] + again:
                await a.release_slot("alice", session_id)
            assert len(await attempt_slots([b, a], "alice", 20, limit=limit, tag="third")) == limit


async def test_two_processes_on_one_sqlite_file_never_exceed_the_cap(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'usage.db'}"
    script = textwrap.dedent(
        f"""
        import trio
        from relay.usage.store import open_store

        async def main():
            store = await open_store({url!r})
            granted = []
            async def attempt(i):
                if await store.acquire_slot("alice", f"{{pid}}-{{i}}", limit=3, lease_seconds=60):
                    granted.append(i)
            async with trio.open_nursery() as nursery:
                for i in range(40):
                    nursery.start_soon(attempt, i)
            await store.aclose()
            print(len(granted))

        import os
        pid = os.getpid()
        trio.run(main)
        """
    )
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(url):  # create the file and schema first
            pass
        counts: list[int] = []

        async def run() -> None:
            done = await trio.run_process([sys.executable, "-c", script], capture_stdout=True)
            counts.append(int(done.stdout))

        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(run)
    assert sum(counts) == 3


async def test_expired_leases_free_their_slots(store_url: str) -> None:
    clock = FakeClock()
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url, clock) as a, opened(store_url, clock) as b:
            assert await a.acquire_slot("alice", "s1", limit=2, lease_seconds=30)
            assert await b.acquire_slot("alice", "s2", limit=2, lease_seconds=30)
            assert not await a.acquire_slot("alice", "s3", limit=2, lease_seconds=30)
            clock.advance(29.9)
            assert not await b.acquire_slot("alice", "s3", limit=2, lease_seconds=30)
            clock.advance(0.1)  # a lease ends exactly at its expiry
            assert await b.acquire_slot("alice", "s3", limit=2, lease_seconds=30)
            assert await a.acquire_slot("alice", "s4", limit=2, lease_seconds=30)
            assert not await a.acquire_slot("alice", "s5", limit=2, lease_seconds=30)


async def test_renewing_keeps_a_lease_alive_and_an_expired_lease_stays_gone(store_url: str) -> None:
    clock = FakeClock()
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url, clock) as a, opened(store_url, clock) as b:
            assert await a.acquire_slot("alice", "kept", limit=2, lease_seconds=60)
            assert await b.acquire_slot("alice", "lapsed", limit=2, lease_seconds=60)
            for _ in range(5):  # renewed every 20 s for 100 s
                clock.advance(20)
                await b.renew_slot("alice", "kept", lease_seconds=60)
            # "lapsed" expired at 60 s: renewing it now does not bring it back.
            await a.renew_slot("alice", "lapsed", lease_seconds=60)
            assert await b.acquire_slot("alice", "new", limit=2, lease_seconds=60)
            assert not await a.acquire_slot("alice", "lapsed", limit=2, lease_seconds=60)


async def test_a_session_acquiring_again_keeps_its_one_slot(store_url: str) -> None:
    clock = FakeClock()
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url, clock) as store:
            assert await store.acquire_slot("alice", "s1", limit=2, lease_seconds=10)
            clock.advance(9)
            assert await store.acquire_slot("alice", "s1", limit=2, lease_seconds=10)  # renewed
            clock.advance(9)
            assert await store.acquire_slot("alice", "s2", limit=2, lease_seconds=10)
            assert await store.acquire_slot("alice", "s1", limit=2, lease_seconds=10)
            assert not await store.acquire_slot("alice", "s3", limit=2, lease_seconds=10)


async def test_releasing_a_slot_not_held_is_harmless(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            await store.release_slot("alice", "never-held")
            await store.renew_slot("alice", "never-held", lease_seconds=60)
            assert await store.acquire_slot("alice", "s1", limit=1, lease_seconds=60)
            await store.release_slot("alice", "s1")
            await store.release_slot("alice", "s1")
            assert await store.acquire_slot("alice", "s2", limit=1, lease_seconds=60)


async def test_a_key_is_claimed_once_across_instances(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as a, opened(store_url) as b:
            wins: list[bool] = []

            async def claim(store: UsageStore) -> None:
                wins.append(await store.claim_once("token-1", ttl_seconds=60))

            async with trio.open_nursery() as nursery:
                for store in (a, b, a, b):
                    nursery.start_soon(claim, store)
            assert sorted(wins) == [False, False, False, True]
            assert await b.claim_once("token-2", ttl_seconds=60)  # another key is its own


async def test_a_claim_lapses_with_its_ttl() -> None:
    clock = FakeClock()
    with trio.fail_after(TEST_TIMEOUT):
        async with opened("sqlite:///:memory:", clock) as store:
            assert await store.claim_once("token", ttl_seconds=60)
            clock.advance(59.9)
            assert not await store.claim_once("token", ttl_seconds=60)
            clock.advance(0.1)
            assert await store.claim_once("token", ttl_seconds=60)


async def test_slot_arguments_are_checked(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(store_url) as store:
            with pytest.raises(ValueError, match="limit"):
                await store.acquire_slot("alice", "s1", limit=0, lease_seconds=60)
            with pytest.raises(ValueError, match="lease_seconds"):
                await store.renew_slot("alice", "s1", lease_seconds=0)


# Steps of the lease property: (instance, action, session, seconds).
lease_steps = st.lists(
    st.tuples(
        st.integers(0, 1),
        st.sampled_from(["acquire", "renew", "release", "advance"]),
        st.integers(0, 5),
        st.sampled_from([0.0, 1.0, 10.0, 29.5, 30.0, 45.0]),
    ),
    max_size=40,
)


def check_leases_against_a_model(
    url: str, limit: int, steps: list[tuple[int, str, int, float]]
) -> None:
    """Two instances on ``url`` answer every step exactly as a one-dict model of the leases does."""
    lease = 30.0
    clock = FakeClock()
    model: dict[str, float] = {}  # session id -> expiry

    async def main() -> None:
        with trio.fail_after(TEST_TIMEOUT):
            async with opened(url, clock) as a, opened(url, clock) as b:
                for instance, action, session, seconds in steps:
                    store, sid, now = (a, b)[instance], f"s{session}", clock()
                    if action == "advance":
                        clock.advance(seconds)
                    elif action == "acquire":
                        for held in [k for k, expiry in model.items() if expiry <= now]:
                            del model[held]
                        expected = sid in model or len(model) < limit
                        if expected:
                            model[sid] = now + lease
                        got = await store.acquire_slot(
                            "alice", sid, limit=limit, lease_seconds=lease
                        )
                        assert got == expected, (action, sid, now, model)
                        assert len(model) <= limit
                    elif action == "renew":
                        if model.get(sid, now) > now:
                            model[sid] = now + lease
                        await store.renew_slot("alice", sid, lease_seconds=lease)
                    else:
                        model.pop(sid, None)
                        await store.release_slot("alice", sid)

    trio.run(main)


@settings(max_examples=PROPERTY_EXAMPLES)
@given(limit=st.integers(1, 3), steps=lease_steps)
def test_leases_behave_like_the_model_on_sqlite(
    tmp_path_factory: pytest.TempPathFactory, limit: int, steps: list[tuple[int, str, int, float]]
) -> None:
    url = f"sqlite:///{tmp_path_factory.mktemp('leases') / 'usage.db'}"
    check_leases_against_a_model(url, limit, steps)


@settings(max_examples=PROPERTY_EXAMPLES)
@given(limit=st.integers(1, 3), steps=lease_steps)
def test_leases_behave_like_the_model_on_redis(
    redis_server: RedisServer, limit: int, steps: list[tuple[int, str, int, float]]
) -> None:
    assert redis_server.command("FLUSHALL") == b"+OK"
    check_leases_against_a_model(redis_server.url, limit, steps)


async def test_every_redis_key_is_prefixed_and_expires(redis_server: RedisServer) -> None:
    assert redis_server.command("FLUSHALL") == b"+OK"
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(redis_server.url) as store:
            await store.add("alice", DAY, UsageDelta(sessions=1))
            assert await store.acquire_slot("alice", "s1", limit=1, lease_seconds=60)
    day_keys = ["relay:usage:2026-11-24:alice", "relay:usage-users:2026-11-24", "relay:usage-days"]
    assert redis_server.command("DBSIZE") == b":4"  # those and relay:slots:alice
    for key in day_keys:
        assert 30 * 86400 < int(redis_server.command("TTL", key)[1:]) <= 40 * 86400, key
    # A lease set outlives its longest lease by a minute.
    assert 60 < int(redis_server.command("TTL", "relay:slots:alice")[1:]) <= 120


# --- opening and closing ----------------------------------------------------------------------


async def test_a_closed_store_refuses_use_and_closing_twice_is_harmless(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        store = await open_store(store_url)
        await store.aclose()
        await store.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await store.add("alice", DAY, UsageDelta(sessions=1))


async def test_a_store_opened_inside_a_timeout_can_be_closed_outside_it(store_url: str) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        with trio.move_on_after(TEST_TIMEOUT):
            store = await open_store(store_url)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.add, "alice", DAY, UsageDelta(sessions=1))
        assert (await store.rows())[0].sessions == 1
        await store.aclose()


async def test_sqlite_paths_are_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(f"sqlite:///{tmp_path}/data/usage.db") as absolute:
            await absolute.add("alice", DAY, UsageDelta(sessions=1))
        async with opened("sqlite:///data/usage.db") as relative:
            assert [r.user for r in await relative.rows()] == ["alice"]


async def test_a_sqlite_file_deleted_under_the_store_is_noticed_logged_and_made_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Without this, every later record went into the unlinked file, unseen by `relay usage`
    and by the other instances sharing the leases, with no log line."""
    path = tmp_path / "usage.db"
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(f"sqlite:///{path}") as store, opened(f"sqlite:///{path}") as other:
            await store.add("alice", DAY, UsageDelta(sessions=1))
            path.unlink()
            assert await store.check() is None  # noticed, and open again: ready
            assert "was deleted while the relay ran" in caplog.text
            await store.add("bob", DAY, UsageDelta(sessions=1))
            assert path.exists()
            assert await other.acquire_slot("bob", "s1", limit=1, lease_seconds=60)
            # The instance sharing the file follows it too: the lease is seen by both.
            assert not await store.acquire_slot("bob", "s2", limit=1, lease_seconds=60)
            assert [r.user for r in await store.rows()] == ["bob"]
        async with opened(f"sqlite:///{path}") as later:
            assert [r.user for r in await later.rows()] == ["bob"]


async def test_a_sqlite_file_replaced_under_the_store_is_followed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "usage.db"
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(f"sqlite:///{tmp_path / 'backup.db'}") as backup:
            await backup.add("restored", DAY, UsageDelta(sessions=7))
        async with opened(f"sqlite:///{path}") as store:
            await store.add("alice", DAY, UsageDelta(sessions=1))
            os.replace(tmp_path / "backup.db", path)  # a backup restored in place
            await store.add("alice", DAY, UsageDelta(sessions=1))
            assert "was replaced while the relay ran" in caplog.text
            rows = {r.user: r.sessions for r in await store.rows()}
            assert rows == {"restored": 7, "alice": 1}


async def test_a_sqlite_file_that_cannot_be_made_again_fails_readiness_until_it_can(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "usage.db"
    with trio.fail_after(TEST_TIMEOUT):
        async with opened(f"sqlite:///{path}") as store:
            for name in os.listdir(folder):
                (folder / name).unlink()
            folder.rmdir()  # nowhere to make the file again
            problem = await store.check()
            assert problem is not None and "deleted and cannot be opened again" in problem
            with pytest.raises(OSError, match="cannot be opened again"):
                await store.add("alice", DAY, UsageDelta(sessions=1))
            assert caplog.text.count("cannot be opened again") == 1  # said once, not per call
            folder.mkdir()
            assert await store.check() is None
            await store.add("alice", DAY, UsageDelta(sessions=1))
            assert [r.user for r in await store.rows()] == ["alice"]
            assert "is open again" in caplog.text


async def test_readiness_fails_while_the_usage_file_cannot_be_opened_again(tmp_path: Path) -> None:
    import httpx

    from .harness import running_relay

    folder = tmp_path / "data"
    folder.mkdir()
    with trio.fail_after(TEST_TIMEOUT):
        async with running_relay(store=f"sqlite:///{folder / 'usage.db'}") as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/readyz")).status_code == 200
                for name in os.listdir(folder):
                    (folder / name).unlink()
                folder.rmdir()
                ready = await http.get("/readyz")
                assert ready.status_code == 503
                assert ready.json()["status"] == "store unavailable"
                assert "cannot be opened again" in ready.json()["detail"]
                folder.mkdir()
                assert (await http.get("/readyz")).status_code == 200


async def test_an_in_memory_sqlite_store_is_private_to_its_instance() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        async with opened("sqlite:///:memory:") as a, opened("sqlite:///:memory:") as b:
            await a.add("alice", DAY, UsageDelta(sessions=1))
            assert len(await a.rows()) == 1
            assert await b.rows() == []


async def test_an_unreachable_redis_is_a_connection_error() -> None:
    pytest.importorskip("coredis")
    with trio.fail_after(TEST_TIMEOUT):
        with pytest.raises(ConnectionError, match=r"RELAY_STORE.*127\.0\.0\.1"):
            await open_store(f"redis://127.0.0.1:{free_port()}/0")
    gc.collect()  # anything left unclosed warns here, not in a later test


@pytest.mark.parametrize(
    "url",
    [
        "",
        "relay-usage.db",
        "postgres://localhost/relay",
        "sqlite:relay.db",
        "sqlite://relay.db",
        "sqlite:///",
        "redis://",
        "redis:///0",
        "redis://localhost:port/0",
        "redis://localhost:6379/zero",
        "redis://localhost:6379/0?ssl=true",
        "redis:localhost",
    ],
)
async def test_a_bad_url_is_a_value_error_naming_the_setting_and_the_forms(url: str) -> None:
    with pytest.raises(ValueError, match="RELAY_STORE") as caught:
        await open_store(url)
    assert "sqlite:///PATH" in str(caught.value)
    assert "redis://HOST" in str(caught.value)


async def test_a_bad_url_error_does_not_show_the_password() -> None:
    with pytest.raises(ValueError) as caught:
        await open_store("redis://:hunter2@localhost:6379/zero")
    assert "hunter2" not in str(caught.value)


# --- usage from response.done ----------------------------------------------------------------


def response_done(usage: object) -> dict[str, object]:
    return {
        "type": "response.done",
        "event_id": "event_123",
        "response": {
            "object": "realtime.response",
            "id": "resp_123",
            "status": "completed",
            "status_details": None,
            "output": [],
            "conversation_id": "conv_123",
            "usage": usage,
            "metadata": None,
        },
    }


def test_usage_from_a_ga_response_done() -> None:
    usage = {
        "total_tokens": 127, "input_tokens": 120, "output_tokens": 7,
        "input_token_details": {
            "text_tokens": 120, "audio_tokens": 0, "image_tokens": 0, "cached_tokens": 64,
            "cached_tokens_details": {"text_tokens": 64, "audio_tokens": 0, "image_tokens": 0},
        },
        "output_token_details": {"text_tokens": 7, "audio_tokens": 0},
    }  # fmt: skip
    delta = usage_from_response_done(response_done(usage))
    assert delta == UsageDelta(input_text_tokens=120, input_cached_tokens=64, output_text_tokens=7)
    assert UsageRow(day=DAY, user="alice", **asdict(delta)).total_tokens == usage["total_tokens"]


def test_usage_from_an_audio_response_done() -> None:
    usage = {
        "total_tokens": 355, "input_tokens": 211, "output_tokens": 144,
        "input_token_details": {"text_tokens": 195, "audio_tokens": 16, "cached_tokens": 192},
        "output_token_details": {"text_tokens": 31, "audio_tokens": 113},
    }  # fmt: skip
    assert usage_from_response_done(response_done(usage)) == UsageDelta(
        input_text_tokens=195, input_audio_tokens=16, input_cached_tokens=192,
        output_text_tokens=31, output_audio_tokens=113,
    )  # fmt: skip


@pytest.mark.parametrize(
    "event",
    [
        response_done(None),
        response_done({}),
        {"type": "response.done"},
        {"type": "response.done", "response": None},
        {"type": "response.done", "response": {"usage": "lots"}},
    ],
)
def test_usage_from_a_response_done_without_usage_is_zero(event: dict[str, object]) -> None:
    assert usage_from_response_done(event) == UsageDelta()


def test_usage_missing_or_malformed_fields_count_as_zero() -> None:
    usage = {
        "input_token_details": {"text_tokens": None, "audio_tokens": 5, "cached_tokens": "x"},
        "output_token_details": {"text_tokens": True, "audio_tokens": -3},
    }
    assert usage_from_response_done(response_done(usage)) == UsageDelta(input_audio_tokens=5)


def test_usage_without_a_breakdown_is_charged_as_text() -> None:
    usage = {"input_tokens": 20, "output_tokens": 10, "input_token_details": None}
    delta = usage_from_response_done(response_done(usage))
    assert delta == UsageDelta(input_text_tokens=20, output_text_tokens=10)



#: Run in a fresh interpreter (forking the test process itself did not reproduce the race):
#: rounds of three processes forked together, each opening the same new SQLite file.
_OPEN_AT_ONCE = """
import os, sys, tempfile, trio
from relay.usage.store import open_store

def child(url):
    async def main():
        store = await open_store(url)
        await store.aclose()
    try:
        trio.run(main)
        os._exit(0)
    except BaseException as exc:
        print(repr(exc), file=sys.stderr)
        os._exit(1)

failures = 0
for attempt in range(40):
    url = "sqlite:///" + tempfile.mkdtemp(dir=sys.argv[1]) + "/usage.db"
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            child(url)
        children.append(pid)
    for pid in children:
        failures += os.waitpid(pid, 0)[1] != 0
print(failures)
"""


def test_relays_opening_one_new_sqlite_file_at_the_same_instant_all_start(tmp_path: Path) -> None:
    """`relay serve --workers` starts its workers together on one file; SQLite answers a
    journal-mode switch under contention with "database is locked" at once, unless retried."""
    done = subprocess.run(
        [sys.executable, "-c", _OPEN_AT_ONCE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert done.stdout.strip() == "0", done.stderr[-2000:]
