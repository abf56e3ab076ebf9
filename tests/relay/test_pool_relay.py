"""The warm pool in the whole relay, in front of mockrealtime: a pooled session looks to the
client like a fresh one (invariant 8), goes only to clients it can serve, and drains."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import orjson
import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from mockrealtime.server import ConnectionRecord
from relay.core.bridge import SETUP_EVENT_ID
from relay.usage.auth import Identity, hash_key, safety_identifier, safety_key

from .harness import TEST_KEY, RunningRelay, connect, running_relay

TIMEOUT = 15
MODEL = "gpt-realtime-2.1"
ALICE_KEY = "rk_alice-0123456789abcdefghijklmnop"


class Watch:
    """Wakes a test whenever the relay's pool changes size (its metric is set)."""

    def __init__(self, relay: RunningRelay) -> None:
        self.sizes: dict[str, int] = {}
        if (pool := relay.app.pool) is not None:  # what it has set up so far
            for key in pool.ledger.keys:
                self.sizes[key.model] = pool.ledger.waiting(key)
        self._change = trio.Event()
        metrics = relay.app.metrics
        publish = metrics.pool_size

        def pool_size(model: str, waiting: int) -> None:
            publish(model, waiting)
            self.sizes[model] = waiting
            self._change.set()
            self._change = trio.Event()

        metrics.pool_size = pool_size  # type: ignore[method-assign]

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._change.wait()


@asynccontextmanager
async def pooled_relay(**settings: object) -> AsyncIterator[tuple[RunningRelay, MockServer, Watch]]:
    """mockrealtime, and a relay in front of it keeping a warm pool (RELAY_WARM_POOL)."""
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
        settings.setdefault("warm_pool", ("2",))
        async with running_relay(upstream_url=mock.url, **settings) as relay:
            watch = Watch(relay)
            yield relay, mock, watch
        nursery.cancel_scope.cancel()


def sent_to(mock: MockServer, text: str) -> list[ConnectionRecord]:
    """The fake's connections that received a message containing ``text``."""
    return [c for c in mock.connections if any(text in str(m) for m in c.received)]


def metric(relay: RunningRelay, name: str, **labels: str) -> float:
    return relay.app.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_pooled_session_starts_with_session_created_and_no_relay_session_updated() -> None:
    with trio.fail_after(TIMEOUT):
        async with pooled_relay(voice="cedar") as (relay, mock, watch):
            await watch.until(lambda: watch.sizes.get(MODEL) == 2)
            pooled = list(mock.connections)
            async with connect(relay.url + f"/v1/realtime?model={MODEL}") as ws:
                created = orjson.loads(await ws.get_message())
                assert created["type"] == "session.created"
                # Already the relay's session (its voice), its instructions not shown.
                assert created["session"]["audio"]["output"]["voice"] == "cedar"
                assert "instructions" not in created["session"]
                mine = {"type": "session.update", "event_id": "client_1",
                        "session": {"type": "realtime", "output_modalities": ["text"]}}
                await ws.send_message(orjson.dumps(mine).decode())
                updated = orjson.loads(await ws.get_message())
                # The first session.updated the client sees answers its own update.
                assert updated["type"] == "session.updated"
                assert updated["session"]["output_modalities"] == ["text"]
                await ws.send_message(orjson.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "hello"}]}}).decode())
                await ws.send_message('{"type":"response.create"}')
                kinds = []
                while not kinds or kinds[-1] != "response.done":
                    kinds.append(orjson.loads(await ws.get_message())["type"])
            (used,) = sent_to(mock, "client_1")
            assert used in pooled  # the session was one the pool had set up
            assert created["session"]["id"].startswith("sess_")
            setups = [m for m in used.received if SETUP_EVENT_ID in str(m)]
            # The relay's own update went once, first, before the client came.
            assert len(setups) == 1 and used.received[0] == setups[0]
            assert "session.updated" not in kinds
            assert metric(relay, "relay_warm_pool_hits_total", model=MODEL) == 1


async def test_another_model_or_a_named_user_dials_and_an_anonymous_one_takes_one() -> None:
    alice = f"alice:{hash_key(ALICE_KEY)}"
    with trio.fail_after(TIMEOUT):
        async with pooled_relay(warm_pool=("1",), api_keys=(alice,)) as (relay, mock, watch):
            await watch.until(lambda: watch.sizes.get(MODEL) == 1)
            (pooled,) = mock.connections
            key = safety_key(TEST_KEY)
            anonymous = safety_identifier(key, Identity("anonymous", "anonymous"))
            assert pooled.headers["openai-safety-identifier"] == anonymous
            auth = [(b"authorization", f"Bearer {ALICE_KEY}".encode())]
            async with connect(relay.url + f"/v1/realtime?model={MODEL}", extra_headers=auth) as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
                await ws.send_message('{"type":"input_audio_buffer.clear","event_id":"alice"}')
                await ws.get_message()
            async with connect(relay.url + "/v1/realtime?model=gpt-realtime-2.1-mini") as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
                await ws.send_message('{"type":"input_audio_buffer.clear","event_id":"mini"}')
                await ws.get_message()
            async with connect(relay.url + f"/v1/realtime?model={MODEL}") as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
                await ws.send_message('{"type":"input_audio_buffer.clear","event_id":"anon"}')
                await ws.get_message()
            (by_alice,) = sent_to(mock, '"alice"')
            assert by_alice is not pooled
            alice_id = safety_identifier(key, Identity("alice", "api_key"))
            assert by_alice.headers["openai-safety-identifier"] == alice_id
            (by_mini,) = sent_to(mock, '"mini"')
            assert by_mini is not pooled and "gpt-realtime-2.1-mini" in by_mini.path
            assert sent_to(mock, '"anon"') == [pooled]
            misses = metric(relay, "relay_warm_pool_misses_total", model=MODEL, reason="identified")
            assert misses == 1
            assert metric(relay, "relay_warm_pool_hits_total", model=MODEL) == 1


async def test_with_the_safety_identifier_off_every_user_takes_pooled_sessions() -> None:
    alice = f"alice:{hash_key(ALICE_KEY)}"
    with trio.fail_after(TIMEOUT):
        async with pooled_relay(
            warm_pool=("1",), api_keys=(alice,), allow_anonymous=False, safety_identifier="off"
        ) as (relay, mock, watch):
            await watch.until(lambda: watch.sizes.get(MODEL) == 1)
            (pooled,) = mock.connections
            assert "openai-safety-identifier" not in pooled.headers
            auth = [(b"authorization", f"Bearer {ALICE_KEY}".encode())]
            async with connect(relay.url + f"/v1/realtime?model={MODEL}", extra_headers=auth) as ws:
                assert orjson.loads(await ws.get_message())["type"] == "session.created"
                await ws.send_message('{"type":"input_audio_buffer.clear","event_id":"alice"}')
                await ws.get_message()
            assert sent_to(mock, '"alice"') == [pooled]


async def test_no_pool_is_kept_when_no_client_could_take_its_sessions() -> None:
    alice = f"alice:{hash_key(ALICE_KEY)}"
    with trio.fail_after(TIMEOUT):
        async with pooled_relay(warm_pool=("1",), api_keys=(alice,), allow_anonymous=False) as (
            relay, mock, _,
        ):
            assert relay.app.pool is None
            assert mock.connections == []


async def test_drain_closes_the_pooled_sessions_with_1001() -> None:
    with trio.fail_after(TIMEOUT):
        async with pooled_relay() as (relay, mock, watch):
            await watch.until(lambda: watch.sizes.get(MODEL) == 2)
            await relay.app.drain(0)
            for record in mock.connections:
                await record.closed.wait()
            assert [c.close_code for c in mock.connections] == [1001, 1001]
            assert watch.sizes[MODEL] == 0


async def test_a_beta_client_gets_a_pooled_session_in_beta() -> None:
    """The pool's sessions are GA, as every upstream is; a beta client's start is translated."""
    with trio.fail_after(TIMEOUT):
        async with pooled_relay(voice="cedar") as (relay, mock, watch):
            await watch.until(lambda: watch.sizes.get(MODEL) == 2)
            beta = [(b"openai-beta", b"realtime=v1")]
            async with connect(relay.url + f"/v1/realtime?model={MODEL}", extra_headers=beta) as ws:
                created = orjson.loads(await ws.get_message())
            assert created["type"] == "session.created"
            assert created["session"]["voice"] == "cedar"  # beta's flat session
            assert "audio" not in created["session"]
            assert metric(relay, "relay_warm_pool_hits_total", model=MODEL) == 1
