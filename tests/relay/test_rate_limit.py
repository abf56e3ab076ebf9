"""A client's inbound rate limit (RELAY_CLIENT_MAX_RATE): a flood is closed with an error event and
4009 at once, a real-time caller (and one sending a recorded file at once) is never touched, and
one abusive client does not cost anyone else their session or their admission."""

from __future__ import annotations

import contextlib

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.core.bridge import Bridge, Cause, Limits, Phase
from relay.core.closecodes import Code
from relay.core.ratelimit import BURST_SECONDS, InboundRate
from relay.wire.frames import OP_TEXT, Close, FrameReader, frame

from .harness import UpstreamConnection, connect, open_session, running_relay, scripted_upstream
from .test_pump import SESSION_UPDATE, pump_running, pumped_pair
from .test_relay_loopback import error_codes

#: 20 ms of 24 kHz PCM16 as the SDKs send it: 1,280 base64 characters in an append.
APPEND = '{"type":"input_audio_buffer.append","audio":"' + "A" * 1280 + '"}'
REAL_TIME = len(APPEND) * 50  # bytes a second of a caller streaming audio
UPGRADE = (
    b"GET /voice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def test_a_real_time_stream_never_reaches_the_limit_and_a_flood_soon_does() -> None:
    rate = InboundRate(10 * REAL_TIME, now=0.0)
    assert all(rate.take(len(APPEND), now=i * 0.02) for i in range(50 * 3600))  # an hour
    rate = InboundRate(10 * REAL_TIME, now=0.0)
    taken = 0
    while rate.take(len(APPEND), now=taken * 1e-5):  # 130 MB/s
        taken += 1
    assert taken * len(APPEND) == pytest.approx(10 * REAL_TIME * BURST_SECONDS, rel=0.02)


def test_a_recorded_file_sent_at_once_passes_within_the_burst() -> None:
    """`relay talk` without --realtime sends a whole WAV as fast as the connection takes it."""
    rate = InboundRate(10 * REAL_TIME, now=0.0)
    minute = 50 * 60  # a minute of audio in 20 ms appends, sent within a second
    assert all(rate.take(len(APPEND), now=i / minute) for i in range(minute))


@given(
    st.lists(st.tuples(st.integers(0, 200_000), st.floats(0, 1.0)), max_size=200),
    st.floats(1_000, 1e7),
)
def test_what_passes_never_exceeds_the_rate_plus_the_burst(
    messages: list[tuple[int, float]], limit: float
) -> None:
    rate = InboundRate(limit, now=0.0)
    now = passed = 0.0
    for size, gap in messages:
        now += gap
        if rate.take(size, now):
            passed += size
        else:
            break  # the session ends at its first message over the limit
    assert passed <= limit * (BURST_SECONDS + now) + 1e-6


def test_the_bridge_ends_a_session_over_its_rate_with_an_error_event_and_4009() -> None:
    bridge = Bridge(session_update=SESSION_UPDATE, limits=Limits(8, 1 << 20, 1 << 20))
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    assert bridge.phase is Phase.OPEN
    ending = bridge.too_fast(700_000)
    assert ending is not None and ending.cause is Cause.TOO_FAST
    assert ending.client_code == Code.TOO_FAST == 4009 and ending.upstream_code == 1000
    assert error_codes([ending.error or ""]) == ["relay_rate_limited"]
    assert "700000 bytes a second" in (ending.error or "")


@pytest.mark.parametrize("pumped", [True, False], ids=["pump", "tasks"])
async def test_a_flooding_client_is_closed_with_4009_by_the_pump_and_by_its_task(
    pumped: bool,
) -> None:
    """The check is in the client's step, which the pump runs as well as the task."""
    async with pump_running() as (pump, _):
        async with pumped_pair(pump if pumped else None, max_rate=100_000) as s:
            await s.client.send('{"type":"a"}')
            assert await s.upstream.next() == '{"type":"a"}'
            burst = [APPEND] * (2 * 100_000 * int(BURST_SECONDS) // len(APPEND))  # twice the burst
            async with trio.open_nursery() as sending:
                started = trio.current_time()
                sending.start_soon(s.client.send, *burst)  # over the burst, as fast as it goes
                relayed = 0
                while (event := await s.upstream.next()) == APPEND:
                    relayed += 1
                assert isinstance(event, Close) and event.code == 1000
                took = trio.current_time() - started
                assert relayed * len(APPEND) <= 100_000 * (BURST_SECONDS + took)
                error = await s.client.next()
                assert error_codes([error]) == ["relay_rate_limited"]  # type: ignore[list-item]
                reason = "sending faster than the relay's rate limit"
                assert await s.client.next() == Close(4009, reason)
                sending.cancel_scope.cancel()  # (the rest of the burst: no one reads it now)
            while not s.ending:
                await trio.testing.wait_all_tasks_blocked()
            assert s.ending[0].cause is Cause.TOO_FAST


async def accept_and_discard(conn: UpstreamConnection) -> None:
    """An upstream that takes everything and echoes only what is not audio."""
    ws = await open_session(conn)
    while True:
        message = await conn.receive()
        if isinstance(message, str) and message.startswith('{"type":"ping"'):
            await ws.send_message(message)


async def test_one_flooding_client_is_closed_within_2_s_and_no_one_else_is_touched() -> None:
    """The scenario behind the limit: a client connected first floods at full speed; before,
    the 8 well-behaved sessions after it were shed one a second and new ones refused, while it
    streamed on for 13.8 s."""
    callers = 4
    with trio.fail_after(30):
        async with (
            scripted_upstream(accept_and_discard) as up,
            running_relay(upstream_url=up.url) as relay,
        ):
            flooded: dict[str, object] = {}
            streaming = trio.Event()
            stop = trio.Event()

            async def flood() -> None:
                """Pre-masked frames written as fast as the socket takes them, read beside."""
                host, port = relay.url.removeprefix("ws://").split(":")
                stream = await trio.open_tcp_stream(host, int(port))
                async with stream:
                    await stream.send_all(UPGRADE)
                    head = b""
                    while b"session.created" not in head:
                        head += await stream.receive_some(65536)
                    await streaming.wait()
                    chunk = frame(OP_TEXT, APPEND.encode(), mask=True) * 50
                    started = trio.current_time()
                    async with trio.open_nursery() as flooding:

                        async def send() -> None:
                            with contextlib.suppress(trio.BrokenResourceError):
                                while True:
                                    await stream.send_all(chunk)

                        flooding.start_soon(send)
                        reader = FrameReader(masked=False, max_message_bytes=1 << 20)
                        messages: list[object] = []
                        with contextlib.suppress(trio.BrokenResourceError):
                            while data := await stream.receive_some(65536):
                                reader.feed(data)
                                while (event := reader.next()) is not None:
                                    messages.append(event)
                                    if isinstance(event, Close):
                                        flooded["seconds"] = trio.current_time() - started
                        flooding.cancel_scope.cancel()  # the relay closed the connection
                    flooded.update(messages=messages)
                    flooded["code"] = messages[-1].code if isinstance(messages[-1], Close) else None
                    flood_over.set()

            async def caller(index: int) -> None:
                async with connect(relay.url + "/voice") as ws:
                    assert orjson.loads(await ws.get_message())["type"] == "session.created"
                    started.add(index)
                    if len(started) == callers:
                        streaming.set()
                    turn = 0
                    while not stop.is_set():  # real time: an append every 20 ms, a ping a second
                        for _ in range(50):
                            await ws.send_message(APPEND)
                            await trio.sleep(0.02)  # pacing a stream, not waiting for anything
                        ping = f'{{"type":"ping","turn":{turn}}}'
                        await ws.send_message(ping)
                        assert await ws.get_message() == ping  # still relayed both ways
                        turn += 1
                        if flood_over.is_set():
                            after.add(index)
                            if len(after) == callers:
                                all_after.set()

            started: set[int] = set()
            after: set[int] = set()  # callers that completed a turn after the flood was closed
            flood_over, all_after = trio.Event(), trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(flood)
                for index in range(callers):
                    nursery.start_soon(caller, index)
                await flood_over.wait()
                async with connect(relay.url + "/voice") as newcomer:  # admitted as ever
                    assert orjson.loads(await newcomer.get_message())["type"] == "session.created"
                await all_after.wait()
                stop.set()
            assert flooded["code"] == 4009
            errors = error_codes(flooded["messages"][:-1])  # type: ignore[index]
            assert errors == ["relay_rate_limited"]
            assert flooded["seconds"] < 2.0, flooded["seconds"]
            # (every caller ran to `stop` without a close: it would have raised ConnectionClosed)
