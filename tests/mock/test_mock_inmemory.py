"""The whole server (shell included) over in-memory streams under Trio's MockClock.

No sockets here, so ``autojump_clock`` is safe: timing faults and pacing are checked
in virtual time and the tests take no real time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream

from mockrealtime import Faults, MockConfig, MockServer

from .helpers import user_text

AUTH = [(b"authorization", b"Bearer sk-test")]
VIRTUAL_TIMEOUT = 600  # seconds of MockClock time: a deadlock fails instead of hanging


@asynccontextmanager
async def session(
    server: MockServer, *, headers: list[tuple[bytes, bytes]] | None = None
) -> AsyncIterator[WebSocketConnection]:
    async with trio.open_nursery() as nursery:
        client_stream = server.memory_stream(nursery)
        ws = await wrap_client_stream(
            nursery,
            client_stream,
            "127.0.0.1",
            "/v1/realtime?model=gpt-realtime",
            extra_headers=AUTH + (headers or []),
        )
        try:
            yield ws
        finally:
            await ws.aclose()
            await trio.aclose_forcefully(client_stream)


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def test_handshake_delay_postpones_the_101(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(faults=Faults(handshake_delay=30.0)))
        start = trio.current_time()
        async with session(server) as ws:
            assert trio.current_time() - start == pytest.approx(30.0)
            assert (await next_event(ws))["type"] == "session.created"


async def test_send_delay_spaces_out_every_server_event(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(pace=0, faults=Faults(send_delay=2.0)))
        async with session(server) as ws:
            t0 = trio.current_time()
            await next_event(ws)
            t1 = trio.current_time()
            await ws.send_message(json.dumps(user_text("hi")))
            await next_event(ws)
            await next_event(ws)
            t2 = trio.current_time()
        assert t1 - t0 == pytest.approx(2.0)
        assert t2 - t1 == pytest.approx(4.0)


async def test_stall_never_answers_pings_or_messages(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(faults=Faults(stall=True)))
        async with trio.open_nursery() as nursery:
            client_stream, server_stream = trio.testing.memory_stream_pair()
            nursery.start_soon(server.serve_stream, server_stream)
            ws = await wrap_client_stream(
                nursery,
                client_stream,
                "127.0.0.1",
                "/v1/realtime?model=gpt-realtime",
                extra_headers=AUTH,
            )
            assert (await next_event(ws))["type"] == "session.created"
            await ws.send_message(json.dumps(user_text("anyone?")))
            with trio.move_on_after(60) as scope:
                await ws.ping()
            assert scope.cancelled_caught
            assert server.connections[0].received == []
            nursery.cancel_scope.cancel()


async def test_reply_audio_is_paced_at_pace_times_real_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(pace=2.0))
        async with session(server) as ws:
            await next_event(ws)
            await ws.send_message(json.dumps(user_text("Hello")))
            await ws.send_message(json.dumps({"type": "response.create"}))
            times: list[tuple[str, float]] = []
            while not times or times[-1][0] != "rate_limits.updated":
                times.append(((await next_event(ws))["type"], trio.current_time()))
        audio = [t for kind, t in times if kind == "response.output_audio.delta"]
        assert len(audio) > 5
        gaps = [b - a for a, b in zip(audio, audio[1:], strict=False)]
        # each 100 ms chunk arrives 50 ms after the previous one at pace 2
        assert all(g == pytest.approx(0.05) for g in gaps)


async def test_server_pings_on_the_configured_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(ping_interval=20.0))
        pings: list[float] = []
        three_pings = trio.Event()
        client_stream, server_stream = trio.testing.memory_stream_pair()
        original = client_stream.receive_some

        async def spy(max_bytes: int | None = None) -> bytes:
            data = await original(max_bytes)
            if data[:1] == b"\x89":  # an unmasked PING frame from the server
                pings.append(trio.current_time())
                if len(pings) == 3:
                    three_pings.set()
            return data

        client_stream.receive_some = spy  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_stream)
            start = trio.current_time()
            ws = await wrap_client_stream(
                nursery,
                client_stream,
                "127.0.0.1",
                "/v1/realtime?model=gpt-realtime",
                extra_headers=AUTH,
            )
            await next_event(ws)
            with trio.fail_after(100):
                await three_pings.wait()
            await ws.aclose()
            nursery.cancel_scope.cancel()
        assert [round(p - start) for p in pings] == [20, 40, 60]


async def test_max_session_duration_closes_with_1001(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(max_session_seconds=120.0, ping_interval=None))
        async with session(server) as ws:
            assert (await next_event(ws))["type"] == "session.created"
            start = trio.current_time()
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert trio.current_time() - start == pytest.approx(120.0)
        assert info.value.reason.code == 1001
        assert info.value.reason.reason == "Your session hit the maximum duration of 2 minutes."


async def test_connection_record_closed_is_set_when_the_connection_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig())
        async with session(server) as ws:
            await next_event(ws)
        with trio.fail_after(1):
            await server.connections[0].closed.wait()
        assert server.connections[0].close_code == 1000


async def test_pongs_are_not_held_back_by_a_slow_sender(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig(pace=0, faults=Faults(send_delay=10.0)))
        async with session(server) as ws:
            await next_event(ws)
            await ws.send_message(json.dumps(user_text("hi")))
            await ws.send_message(json.dumps({"type": "response.create"}))  # ~40 slow events queued
            start = trio.current_time()
            await ws.ping()
            assert trio.current_time() - start < 10.0


async def test_close_all_sends_every_live_client_a_close_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        server = MockServer(MockConfig())
        async with session(server) as a, session(server) as b:
            await next_event(a)
            await next_event(b)
            server.close_all(1012, "restarting")
            for ws in (a, b):
                with pytest.raises(ConnectionClosed) as info:
                    await ws.get_message()
                assert (info.value.reason.code, info.value.reason.reason) == (1012, "restarting")


# --- robustness under random faults and client behaviour -------------------------------

_actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("text"),
            st.sampled_from(
                [
                    json.dumps(user_text("hi")),
                    '{"type": "response.create"}',
                    '{"type": "response.cancel"}',
                    "{bad",
                    '{"type": "input_audio_buffer.commit"}',
                ]
            ),
        ),
        st.tuples(st.just("bytes"), st.binary(max_size=4)),
        st.tuples(st.just("ping"), st.none()),
        st.tuples(st.just("wait"), st.floats(0, 2)),
    ),
    max_size=8,
)
_faults = st.builds(
    Faults,
    send_delay=st.sampled_from([0.0, 0.01]),
    drop_after_events=st.none() | st.integers(0, 20),
    close_after_open=st.none() | st.just((4001, "bye")),
    inject_error_after=st.none() | st.integers(1, 3),
    handshake_delay=st.sampled_from([0.0, 1.0]),
)
_endings = st.sampled_from(["close", "drop", "nothing"])


@settings(max_examples=60, deadline=None)
@given(faults=_faults, actions=_actions, ending=_endings, pace=st.sampled_from([0.0, 4.0]))
def test_any_client_and_fault_mix_ends_cleanly_without_server_errors(
    faults: Faults, actions: list[tuple[str, Any]], ending: str, pace: float
) -> None:
    async def scenario() -> None:
        server = MockServer(MockConfig(pace=pace, faults=faults, ping_interval=5.0))
        client_stream, server_stream = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_stream)
            ws = await wrap_client_stream(
                nursery,
                client_stream,
                "127.0.0.1",
                "/v1/realtime?model=gpt-realtime",
                extra_headers=AUTH,
                message_queue_size=1000,
            )
            try:
                for kind, arg in actions:
                    if kind == "wait":
                        await trio.sleep(arg)  # virtual time passing is part of the scenario
                    elif kind == "ping":
                        with trio.move_on_after(1):
                            await ws.ping()
                    else:
                        await ws.send_message(arg)
                if ending == "close":
                    with trio.move_on_after(10):
                        await ws.aclose(4000 + len(actions), "done")
            except ConnectionClosed:
                pass
            finally:
                await trio.aclose_forcefully(client_stream)
            with trio.fail_after(30):
                await server.connections[0].closed.wait()
            record = server.connections[0]
            assert server.errors == []
            assert not record.live
            if faults.close_after_open is None:  # otherwise the client's frame is an echo
                expected = 4000 + len(actions) if ending == "close" else None
                assert record.close_code in (None, expected)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_same_seed_replays_the_same_event_stream_through_the_whole_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def run(seed: int) -> list[dict[str, Any]]:
        server = MockServer(MockConfig(seed=seed, pace=4.0, wall_clock=lambda: 1_700_000_000.0))
        async with session(server) as ws:
            events = [await next_event(ws)]
            await ws.send_message(json.dumps(user_text("Same input")))
            await ws.send_message(json.dumps({"type": "response.create"}))
            while events[-1]["type"] != "rate_limits.updated":
                events.append(await next_event(ws))
        return events

    with trio.fail_after(VIRTUAL_TIMEOUT):
        first, second, other = await run(5), await run(5), await run(6)
    assert first == second
    assert first != other


async def test_a_client_that_never_reads_is_dropped_once_too_much_is_queued(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mockrealtime.server as server_module

    monkeypatch.setattr(server_module, "MAX_QUEUED_EVENTS", 20)
    server = MockServer(MockConfig())
    client_stream, server_stream = trio.testing.lockstep_stream_pair()  # no buffering at all
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve_stream, server_stream)
            ws = await wrap_client_stream(
                nursery,
                client_stream,
                "127.0.0.1",
                "/v1/realtime?model=gpt-realtime",
                extra_headers=AUTH,
                message_queue_size=0,
            )
            with pytest.raises(ConnectionClosed):
                for _ in range(1000):  # bad JSON: one error event each, never read
                    await ws.send_message("{")
            await server.connections[0].closed.wait()
            assert server.connections[0].close_code is None
            assert server.errors == []
            await trio.aclose_forcefully(client_stream)
            nursery.cancel_scope.cancel()
