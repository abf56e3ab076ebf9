"""The same invariants with real sockets: the relay under Hypercorn, a scripted upstream, loopback.

Fewer examples than the in-memory properties (each one starts two servers and
runs in real time), with delays scaled down to milliseconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from mockrealtime import Faults, MockConfig, serve_mock_realtime
from relay.core.bridge import Cause, Ending

from .harness import UpstreamConnection, closed_port_url, connect, running_relay, scripted_upstream
from .memory import SECRET, ClientScript, UpstreamScript, limits
from .test_properties import (
    acceptable_prefix,
    check_common,
    client_code_for,
    redacted,
    relay_errors,
    scenarios,
)

SCALE = 0.01  # scenario seconds → real seconds
DIAL_TIMEOUT = 0.5
EXAMPLES = max(25, settings.default.max_examples // 4)

CAUSE_BY_ERROR = {
    "relay_upstream_lost": Cause.UPSTREAM_LOST,
    "relay_upstream_auth_refused": Cause.UPSTREAM_AUTH_REFUSED,
    "relay_upstream_unavailable": Cause.UPSTREAM_UNAVAILABLE,
    "relay_message_too_big": Cause.MESSAGE_TOO_BIG,
    "relay_queue_overflow": Cause.QUEUE_OVERFLOW,
    "relay_client_too_slow": Cause.CLIENT_TOO_SLOW,
    "relay_upstream_stalled": Cause.UPSTREAM_TOO_SLOW,
}


@dataclass
class ClientSeen:
    received: list[str | bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str | None = None
    sends_after_close: int = 0


@dataclass
class UpstreamSeen:
    received: list[str | bytes] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    close_code: int | None = None


@dataclass
class LoopbackOutcome:
    ending: Ending
    client: ClientSeen
    upstream: UpstreamSeen
    session_update: str


def scaled(client: ClientScript, upstream: UpstreamScript) -> tuple[ClientScript, UpstreamScript]:
    client = replace(
        client,
        gaps=tuple(g * SCALE for g in client.gaps),
        closes_after=None if client.closes_after is None else client.closes_after * SCALE,
        read_delay=client.read_delay * SCALE,
    )
    upstream = replace(
        upstream,
        open_delay=DIAL_TIMEOUT + 0.3 if upstream.open_delay > 5 else upstream.open_delay * SCALE,
        gaps=tuple(g * SCALE for g in upstream.gaps),
        read_delay=upstream.read_delay * SCALE,
    )
    return client, upstream


async def run_over_loopback(client: ClientScript, upstream: UpstreamScript) -> LoopbackOutcome:
    seen_client, seen_upstream = ClientSeen(), UpstreamSeen()
    upstream_done = trio.Event()  # the upstream has seen the relay's close (or its own end)

    async def serve_script(conn: UpstreamConnection) -> None:
        await trio.sleep(upstream.open_delay)
        if upstream.refuse_status is not None:
            await conn.request.reject(upstream.refuse_status, body=b'{"error":"no"}')
            return
        ws = await conn.accept()

        async def read() -> None:
            try:
                while True:
                    seen_upstream.received.append(await ws.get_message())
                    await trio.sleep(upstream.read_delay)  # a slow consumer
            except ConnectionClosed as exc:
                seen_upstream.close_code = exc.reason.code if exc.reason else None
            finally:
                upstream_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for gap, event in zip(upstream.gaps, upstream.events, strict=True):
                await trio.sleep(gap)
                try:
                    await ws.send_message(event)
                except ConnectionClosed:
                    return  # the reader records how the relay closed
                seen_upstream.sent.append(event)
            if upstream.ending == "close":
                await ws.aclose(upstream.close_code, upstream.close_reason or None)
            elif upstream.ending == "drop":
                await ws._stream.aclose()

    async def drive(ws: object) -> None:
        for gap, message in zip(client.gaps, client.messages, strict=True):
            await trio.sleep(gap)
            await ws.send_message(message)  # type: ignore[attr-defined]
        if client.closes_after is None:
            await trio.sleep_forever()
        await trio.sleep(client.closes_after)

    with trio.fail_after(15):
        async with scripted_upstream(serve_script) as up:
            url = closed_port_url() if upstream.unreachable else up.url
            q = limits()
            async with running_relay(
                upstream_url=url,
                dial_timeout=DIAL_TIMEOUT,
                close_timeout=1.0,
                max_message_bytes=q.max_message_bytes,
                queue_messages=q.queue_messages,
                queue_bytes=q.queue_bytes,
                openai_api_key=SECRET,
            ) as relay:
                session_update = relay.app.session_update
                async with connect(relay.url + "/voice") as ws:
                    async with trio.open_nursery() as nursery:

                        async def driver() -> None:
                            try:
                                await drive(ws)
                            except ConnectionClosed:
                                await trio.sleep_forever()  # the relay closed us; the reader sees it
                            nursery.cancel_scope.cancel()  # we leave: close from our side

                        nursery.start_soon(driver)
                        try:
                            while True:
                                seen_client.received.append(await ws.get_message())
                                await trio.sleep(client.read_delay)
                        except ConnectionClosed as exc:
                            seen_client.close_code = exc.reason.code if exc.reason else None
                            seen_client.close_reason = exc.reason.reason if exc.reason else None
                            nursery.cancel_scope.cancel()
                with trio.fail_after(5):
                    while relay.app.pairs:
                        await trio.sleep(0.005)
                with trio.move_on_after(2):  # let a slow upstream finish reading what it was sent
                    if up.connections and up.connections[0].ws is not None:
                        await upstream_done.wait()
    errors = relay_errors(seen_client.received)
    if seen_client.close_code is None:
        cause = Cause.CLIENT_CLOSED
    elif errors:
        cause = CAUSE_BY_ERROR[errors[-1]]
    else:
        cause = Cause.UPSTREAM_CLOSED
    ending = Ending(cause, seen_client.close_code, "", None)
    return LoopbackOutcome(ending, seen_client, seen_upstream, session_update)


@settings(max_examples=EXAMPLES)
@given(scenarios())
def test_invariants_hold_through_hypercorn_over_loopback(
    scenario: tuple[ClientScript, UpstreamScript],
) -> None:
    client, upstream = scaled(*scenario)

    outcome = trio.run(run_over_loopback, client, upstream)
    check_common(outcome, client, upstream, outcome.session_update)  # type: ignore[arg-type]
    cause, up, cl = outcome.ending.cause, outcome.upstream, outcome.client
    drains = (len(client.messages) + 2) * upstream.read_delay < 0.5  # well inside the 1 s close budget
    if cause is Cause.CLIENT_CLOSED and up.received and upstream.ending == "stay" and drains:
        assert up.received[1:] == acceptable_prefix(client.messages)
        assert up.close_code == 1000
    if cause is Cause.UPSTREAM_CLOSED:
        assert upstream.ending == "close"
        assert cl.received == [redacted(e) for e in upstream.events]
        assert cl.close_code == client_code_for(upstream.close_code)
    if cause is Cause.UPSTREAM_UNAVAILABLE:
        assert cl.close_code == 1014
        assert upstream.unreachable or upstream.refuse_status or upstream.open_delay > DIAL_TIMEOUT


# -- against mockrealtime with its faults --------------------------------------------

faults = st.builds(
    Faults,
    handshake_delay=st.sampled_from([0.0, 0.0, 0.05, 0.8]),  # 0.8 > the 0.5 s dial timeout
    refuse_status=st.sampled_from([None, None, None, 401, 503]),
    close_after_open=st.sampled_from([None, None, None, (1000, "bye"), (4001, "going away"), (1011, "x")]),
    drop_after_events=st.sampled_from([None, None, 1, 3, 8]),
    send_delay=st.sampled_from([0.0, 0.0, 0.001]),
    inject_error_after=st.sampled_from([None, None, 1]),
)

DOCUMENTED = {1000, 1001, 1008, 1009, 1011, 1013, 1014, 4001}


@settings(max_examples=EXAMPLES)
@given(faults=faults, leave_early=st.booleans())
def test_a_text_turn_through_a_faulty_fake_ends_well_or_with_a_documented_close(
    faults: Faults, leave_early: bool
) -> None:
    """Whatever the fake does, the client gets its reply or a documented close (with the
    relay's error event when the relay decided it), the fake gets session.update first,
    the key never leaks, and the pair leaves no socket behind."""
    item = {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}

    async def main() -> None:
        fds_before = len(os.listdir("/proc/self/fd"))
        received: list[str] = []
        code: int | None = None
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                mock = await nursery.start(
                    serve_mock_realtime, MockConfig(api_keys=frozenset({SECRET}), faults=faults, pace=0)
                )
                async with running_relay(
                    upstream_url=mock.url,
                    dial_timeout=DIAL_TIMEOUT,
                    close_timeout=1.0,
                    openai_api_key=SECRET,
                    # The session ends with its upstream here (failover has its own tests: it
                    # would redial every faulty connection, past this test's time bound).
                    failover_attempts=0,
                ) as relay:
                    session_update = relay.app.session_update
                    async with connect(relay.url + "/voice") as ws:
                        await ws.send_message(orjson.dumps(item).decode())
                        await ws.send_message('{"type":"response.create"}')
                        try:
                            while True:
                                message = await ws.get_message()
                                received.append(message)
                                if leave_early or '"type":"response.done"' in message:
                                    break
                        except ConnectionClosed as exc:
                            code = exc.reason.code if exc.reason else None
                    with trio.fail_after(5):
                        while relay.app.pairs:
                            await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
        assert all(SECRET not in m for m in received)
        if code is not None:
            assert code in DOCUMENTED, code
            upstream_chose_it = faults.close_after_open is not None and faults.close_after_open[0] == code
            if not upstream_chose_it:
                assert relay_errors(received), (code, received)  # the relay decided: it says why
        elif not leave_early:
            assert orjson.loads(received[-1])["type"] == "response.done"
        for record in mock.connections:
            if record.received:
                assert record.received[0] == session_update
        assert len(os.listdir("/proc/self/fd")) <= fds_before

    trio.run(main)
