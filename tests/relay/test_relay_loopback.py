"""The relay under Hypercorn, over real loopback sockets, against a scripted upstream."""

from __future__ import annotations

import base64
import contextlib
import os

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from .harness import (
    TEST_KEY,
    UpstreamConnection,
    closed_port_url,
    connect,
    open_session,
    running_relay,
    scripted_upstream,
    silent_upstream,
    without_relay_ids,
)

TIMEOUT = 10


async def accept_and_echo(conn: UpstreamConnection) -> None:
    ws = await conn.accept()
    while True:
        await ws.send_message(await conn.receive())


async def receive_until_closed(ws) -> tuple[list[str | bytes], int, str | None]:
    """Every message the client gets, then the close code and reason."""
    messages = []
    while True:
        try:
            messages.append(await ws.get_message())
        except ConnectionClosed as exc:
            return messages, exc.reason.code, exc.reason.reason


def error_codes(messages: list[str | bytes]) -> list[str]:
    events = [orjson.loads(m) for m in messages]
    return [e["error"]["code"] for e in events if e.get("type") == "error"]


# -- HTTP routes -------------------------------------------------------------------


async def test_http_routes_give_200_400_and_404() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url()) as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                health = await http.get("/healthz")
                assert health.status_code == 200
                plain = await http.get("/voice")
                assert plain.status_code == 400
                assert "WebSocket" in plain.json()["error"]
                assert (await http.get("/v1/realtime")).status_code == 400
                assert (await http.get("/nope")).status_code == 404


async def test_websocket_on_an_unknown_path_is_refused_with_404() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url()) as relay:
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/nope"):
                    pass
            assert refused.value.status_code == 404


# -- opening -------------------------------------------------------------------------


async def test_session_update_is_the_first_message_upstream() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(
            upstream_url=up.url, instructions="Be brief."
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                await ws.send_message('{"type":"response.create"}')
                first = orjson.loads(await ws.get_message())
                second = await ws.get_message()
            assert first["type"] == "session.update"
            assert first["session"]["type"] == "realtime"
            assert first["session"]["instructions"] == "Be brief."
            assert second == '{"type":"response.create"}'
            assert up.connections[0].received[:2] == [
                up.connections[0].received[0],
                '{"type":"response.create"}',
            ]


async def test_messages_sent_before_the_upstream_opened_arrive_in_order_after_it() -> None:
    release = trio.Event()

    async def slow_accept(conn: UpstreamConnection) -> None:
        await release.wait()
        await accept_and_echo(conn)

    sent = [orjson.dumps({"type": "conversation.item.create", "n": n}).decode() for n in range(50)]
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(slow_accept) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                for message in sent:
                    await ws.send_message(message)
                conn = await up.arrivals.receive()  # the dial reached the upstream
                # The relay holds every message until the upstream opens.
                while len(relay.app.pairs) != 1 or next(iter(relay.app.pairs)).bridge._queued_bytes < sum(map(len, sent)):
                    await trio.sleep(0.01)
                assert conn.received == []
                release.set()
                echoed = [await ws.get_message() for _ in range(51)]
            assert orjson.loads(echoed[0])["type"] == "session.update"
            assert echoed[1:] == sent
            assert conn.received[1:] == sent


async def test_client_offering_realtime_gets_it_and_its_token_protocol_is_never_echoed() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(
                relay.url + "/v1/realtime",
                subprotocols=["realtime", "openai-insecure-api-key.sk-client-own-key"],
            ) as ws:
                assert ws.subprotocol == "realtime"
                await ws.get_message()
            request = up.connections[0].request
            headers = dict(request.headers)
            assert headers[b"authorization"] == f"Bearer {TEST_KEY}".encode()
            assert b"sk-client-own-key" not in b"".join(v for _, v in request.headers)
            assert request.proposed_subprotocols == ()


async def test_subprotocol_auth_mode_sends_the_key_as_a_subprotocol() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(
            upstream_url=up.url, upstream_auth="subprotocol"
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                await ws.get_message()
            request = up.connections[0].request
            assert request.proposed_subprotocols == ("realtime", f"openai-insecure-api-key.{TEST_KEY}")
            assert b"authorization" not in dict(request.headers)


async def test_model_query_is_honoured_within_the_allow_list() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/v1/realtime?model=gpt-realtime-2") as ws:
                await ws.get_message()
            assert up.connections[0].request.path == "/v1/realtime?model=gpt-realtime-2"
            async with connect(relay.url + "/v1/realtime?model=not-a-model") as ws:
                messages, code, reason = await receive_until_closed(ws)
            assert error_codes(messages) == ["invalid_model"]
            assert (code, reason) == (4000, "invalid_request_error.invalid_model")
            assert len(up.connections) == 1  # no upstream session for a refused model


async def test_a_retired_model_is_dialed_by_its_alias_and_an_unknown_one_still_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/v1/realtime?model=gpt-4o-mini-realtime-preview") as ws:
                await ws.get_message()
            assert up.connections[0].request.path == "/v1/realtime?model=gpt-realtime-2.1-mini"
            async with connect(relay.url + "/v1/realtime?model=gpt-4o-realtime-preview-1999") as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["invalid_model"] and code == 4000
            assert len(up.connections) == 1


async def test_beta_clients_are_told_the_relay_speaks_ga_when_it_does_not_translate() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(
            upstream_url=up.url, beta="refuse"
        ) as relay:
            async with connect(
                relay.url + "/v1/realtime", subprotocols=["realtime", "openai-beta.realtime-v1"]
            ) as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["beta_api_shape_disabled"]
            assert code == 4000
            assert up.connections == []


async def test_binary_frames_reach_the_upstream_as_audio_appends() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                await ws.get_message()
                await ws.send_message(b"\x00\x01" * 480)
                echoed = orjson.loads(await ws.get_message())
            assert echoed == {
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(b"\x00\x01" * 480).decode(),
            }


# -- closing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, "bye"), (1001, "Your session hit the maximum duration of 60 minutes."),
     (4000, "invalid_request_error.invalid_model"), (1011, "server trouble")],
)
async def test_upstream_close_reaches_the_client_with_its_code(code: int, reason: str) -> None:
    async def greet_and_close(conn: UpstreamConnection) -> None:
        ws = await open_session(conn)
        await ws.send_message('{"type":"last.words"}')
        await ws.aclose(code, reason)

    with trio.fail_after(TIMEOUT):
        # Without failover the upstream's close is the session's (with it, 1001 and 1011 move
        # the session to a new upstream: tests/relay/test_failover.py).
        async with scripted_upstream(greet_and_close) as up, running_relay(
            upstream_url=up.url, failover_attempts=0
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, got_code, got_reason = await receive_until_closed(ws)
            assert messages == ['{"type":"session.created"}', '{"type":"last.words"}']
            assert (got_code, got_reason) == (code, reason)
            with trio.fail_after(2):
                while relay.app.pairs:
                    await trio.sleep(0.01)


async def test_upstream_vanishing_without_a_close_frame_gives_an_error_and_1011() -> None:
    async def greet_and_drop(conn: UpstreamConnection) -> None:
        ws = await open_session(conn)
        await ws._stream.aclose()  # TCP gone, no close frame

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet_and_drop) as up, running_relay(
            upstream_url=up.url, failover_attempts=0
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert messages[0] == '{"type":"session.created"}'
            assert error_codes(messages) == ["relay_upstream_lost"]
            assert code == 1011


async def test_client_closing_closes_the_upstream_with_1000_after_its_messages() -> None:
    upstream_closed = trio.Event()
    close_codes: list[int] = []

    async def record(conn: UpstreamConnection) -> None:
        await conn.accept()
        try:
            while True:
                await conn.receive()
        except ConnectionClosed as exc:
            close_codes.append(exc.reason.code)
            upstream_closed.set()

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(record) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                for n in range(20):
                    await ws.send_message(f'{{"type":"x","n":{n}}}')
            await upstream_closed.wait()
            assert close_codes == [1000]
            assert up.connections[0].received[1:] == [f'{{"type":"x","n":{n}}}' for n in range(20)]
            while relay.app.pairs:
                await trio.sleep(0.01)


async def test_client_leaving_during_the_dial_cancels_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with silent_upstream() as up, running_relay(upstream_url=up.url, dial_timeout=60.0) as relay:
            async with connect(relay.url + "/voice") as ws:
                await ws.send_message('{"type":"queued"}')
                await up.connected.wait()
            # The relay gives up the half-open upstream at once, not after the dial timeout.
            with trio.fail_after(2):
                await up.peer_closed.wait()
                while relay.app.pairs:
                    await trio.sleep(0.01)


async def test_unreachable_upstream_gives_an_error_event_and_1014() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url()) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["relay_upstream_unavailable"]
            assert code == 1014


async def test_upstream_that_never_answers_gives_1014_within_the_dial_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with silent_upstream() as up, running_relay(upstream_url=up.url, dial_timeout=0.5) as relay:
            started = trio.current_time()
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert trio.current_time() - started < 2.5
            assert error_codes(messages) == ["relay_upstream_unavailable"]
            assert code == 1014


async def test_oversized_client_message_gets_an_error_and_1009() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept_and_echo) as up, running_relay(
            upstream_url=up.url, max_message_bytes=1000
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                await ws.get_message()
                await ws.send_message('{"type":"ok"}')
                await ws.send_message("x" * 1001)
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["relay_message_too_big"]
            assert code == 1009
            assert up.connections[0].received[1:] == ['{"type":"ok"}']


async def test_pre_open_queue_overflow_gives_an_error_and_1013() -> None:
    with trio.fail_after(TIMEOUT):
        async with silent_upstream() as up, running_relay(upstream_url=up.url, queue_messages=5) as relay:
            async with connect(relay.url + "/voice") as ws:
                for n in range(6):
                    await ws.send_message(f'{{"type":"x","n":{n}}}')
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["relay_queue_overflow"]
            assert code == 1013
            with trio.fail_after(2):
                await up.peer_closed.wait()  # and the dial was given up


async def test_an_upstream_message_over_the_upstream_limit_ends_the_session_with_1009() -> None:
    async def send_a_big_one(conn: UpstreamConnection) -> None:
        ws = await open_session(conn)
        await ws.send_message('{"type":"big","pad":"' + "a" * 5000 + '"}')
        await ws.send_message('{"type":"after"}')
        await conn.receive()  # until the relay's close

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(send_a_big_one) as up, running_relay(
            upstream_url=up.url, upstream_max_message_bytes=1000
        ) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, code, reason = await receive_until_closed(ws)
            assert (code, reason) == (1009, "message over 1000 bytes")
            assert [orjson.loads(m)["type"] for m in messages] == ["session.created", "error"]
            assert error_codes(messages) == ["relay_upstream_message_too_big"]
            assert "RELAY_UPSTREAM_MAX_MESSAGE_BYTES" in orjson.loads(messages[-1])["error"]["message"]
            assert up.connections[0].ws.closed.code == 1009


async def test_an_upstream_closing_with_1009_itself_is_passed_on_as_before() -> None:
    async def close_1009(conn: UpstreamConnection) -> None:
        ws = await conn.accept()
        await ws.aclose(1009, "Exceeded maximum message size: 100 bytes")

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(close_1009) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, code, reason = await receive_until_closed(ws)
    assert (messages, code, reason) == ([], 1009, "Exceeded maximum message size: 100 bytes")


# -- secrecy -------------------------------------------------------------------------


async def test_the_upstream_key_never_reaches_the_client() -> None:
    async def leak_everything(conn: UpstreamConnection) -> None:
        ws = await conn.accept()
        headers = {k.decode(): v.decode() for k, v in conn.request.headers}
        await ws.send_message(orjson.dumps({"type": "echo.headers", "headers": headers}).decode())
        await ws.send_message(orjson.dumps(
            {"type": "error", "event_id": "event_1", "error": {
                "type": "invalid_request_error", "code": "invalid_api_key",
                "message": f"Incorrect API key provided: sk-…{TEST_KEY[-4:]}. You can find"
                " your API key at https://platform.openai.com/account/api-keys.",
                "param": None, "event_id": None}}).decode())
        await ws.aclose(3000, "invalid_request_error.invalid_api_key")

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(leak_everything) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:
                messages, code, reason = await receive_until_closed(ws)
    everything = "".join(m if isinstance(m, str) else m.decode() for m in messages) + (reason or "")
    assert TEST_KEY not in everything
    assert TEST_KEY[-4:] not in without_relay_ids(everything)
    assert error_codes(messages) == ["relay_upstream_auth_refused"]
    assert code == 1011


async def test_an_upstream_close_reason_quoting_the_key_reaches_the_client_redacted() -> None:
    async def close_quoting_the_key(conn: UpstreamConnection) -> None:
        ws = await conn.accept()
        await ws.aclose(4000, f"key {TEST_KEY} revoked")

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(close_quoting_the_key) as up, running_relay(upstream_url=up.url) as relay:
            async with connect(relay.url + "/voice") as ws:  # connect fails the test on a leak
                _, code, reason = await receive_until_closed(ws)
    assert (code, reason) == (4000, "key [redacted] revoked")


async def test_a_drain_warns_live_sessions_lets_them_finish_then_closes_the_rest_with_1012() -> None:
    upstream_got: dict[str, list[str]] = {}
    upstream_codes: dict[str, int] = {}

    async def record(conn: UpstreamConnection) -> None:
        name = conn.request.path.rsplit("=", 1)[-1]
        upstream_got[name] = []
        await open_session(conn)  # (the relay's session.update is not recorded)
        try:
            while True:
                upstream_got[name].append(await conn.receive())
        except ConnectionClosed as exc:
            upstream_codes[name] = exc.reason.code

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(record) as up:
            async with running_relay(upstream_url=up.url, models=("stays", "leaves")) as relay:
                async with connect(relay.url + "/voice?model=stays") as stays, connect(
                    relay.url + "/voice?model=leaves"
                ) as leaves:
                    for ws in (stays, leaves):
                        assert await ws.get_message() == '{"type":"session.created"}'
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(relay.app.drain, 1.0)
                        for ws in (stays, leaves):
                            assert error_codes([await ws.get_message()]) == ["relay_draining"]
                        async with httpx.AsyncClient(base_url=relay.http_url) as http:
                            assert (await http.get("/readyz")).status_code == 503
                        # Both sessions go on during the drain; one finishes its business and leaves.
                        for n in range(5):
                            await stays.send_message(f'{{"type":"input_audio_buffer.clear","n":{n}}}')
                        await leaves.send_message('{"type":"response.cancel"}')
                        await leaves.aclose()
                        messages, code, reason = await receive_until_closed(stays)
            assert error_codes(messages) == ["relay_shutting_down"]
            assert code == 1012
            with trio.fail_after(2):
                while len(upstream_codes) < 2:
                    await trio.sleep(0.01)
            assert upstream_codes == {"leaves": 1000, "stays": 1001}
            assert upstream_got["leaves"] == ['{"type":"response.cancel"}']
            assert [orjson.loads(m)["n"] for m in upstream_got["stays"]] == list(range(5))


async def test_a_session_the_relay_closes_ends_when_the_client_answers_not_after_the_close_timeout() -> None:
    """The relay reads the client's close reply itself, so a session it ends (here by a
    drain with no grace) is over, its slot and its place in the drain freed, as soon as
    the client answers: not RELAY_CLOSE_TIMEOUT later, as when Hypercorn never reported
    that reply to the app."""

    async def stay(conn: UpstreamConnection) -> None:
        await open_session(conn)
        with contextlib.suppress(ConnectionClosed):
            while True:
                await conn.receive()

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(stay) as up, running_relay(upstream_url=up.url, close_timeout=5.0) as relay:
            async with connect(relay.url + "/voice") as ws:
                assert await ws.get_message() == '{"type":"session.created"}'
                async with trio.open_nursery() as nursery:

                    async def drain() -> None:
                        started = trio.current_time()
                        await relay.app.drain(0.0)
                        drained.append(trio.current_time() - started)

                    drained: list[float] = []
                    nursery.start_soon(drain)
                    messages, code, _ = await receive_until_closed(ws)
            assert code == 1012
            assert error_codes(messages) == ["relay_draining", "relay_shutting_down"]
            assert drained and drained[0] < 2.0, drained  # well under the 5 s close timeout


async def test_readiness_reports_starting_ready_and_an_unreachable_upstream() -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(lambda conn: conn.accept()) as up, running_relay(upstream_url=up.url) as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                ready = await http.get("/readyz?upstream=1")
                assert ready.status_code == 200 and ready.json()["status"] == "ready"
        async with running_relay(upstream_url=closed_port_url()) as relay:
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.get("/readyz")).status_code == 200
                down = await http.get("/readyz?upstream=1")
                assert down.status_code == 503 and down.json()["status"] == "upstream unreachable"


async def test_many_sessions_leave_no_socket_behind() -> None:
    """Whatever way a pair ends, its sockets are closed when it is over."""

    async def varied(conn: UpstreamConnection) -> None:
        ws = await open_session(conn)
        while True:
            message = await conn.receive()
            if "drop" in str(message):
                await ws._stream.aclose()
                return
            if "close" in str(message):
                await ws.aclose(4000, "asked to")
                return

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with trio.fail_after(30):
        # (failover off: a drop ends the session here, the path whose sockets are counted)
        async with scripted_upstream(varied) as up, running_relay(
            upstream_url=up.url, failover_attempts=0
        ) as relay:
            async with connect(relay.url + "/voice") as ws:  # warm up lazily created resources
                await ws.get_message()
            while relay.app.pairs:
                await trio.sleep(0.01)
            baseline = open_fds()
            for n in range(30):
                async with connect(relay.url + "/voice") as ws:
                    await ws.get_message()
                    kind = ("drop", "close", "client")[n % 3]
                    if kind != "client":
                        await ws.send_message(f'{{"type":"{kind}"}}')
                        await receive_until_closed(ws)
            while relay.app.pairs:
                await trio.sleep(0.01)
            # The scripted upstream's own server-side sockets close as their handlers end.
            for _ in range(200):
                if open_fds() <= baseline:
                    break
                await trio.sleep(0.01)
            assert open_fds() <= baseline


async def test_a_client_still_sending_when_closed_gets_the_error_and_close_frame() -> None:
    """A client that keeps sending and reads slowly still gets the relay's error event and
    close frame. (The loopback properties once saw such a client get 1006 when the app
    returned right after its close frame; the app now waits for the client's close reply.
    This test does not reproduce that failure deterministically; the property covers it.)"""
    with trio.fail_after(TIMEOUT):
        async with silent_upstream() as up, running_relay(upstream_url=up.url, queue_messages=5) as relay:
            async with connect(relay.url + "/voice") as ws:

                async def keep_sending() -> None:
                    for n in range(2000):
                        try:
                            await ws.send_message(f'{{"type":"x","n":{n}}}')
                        except ConnectionClosed:
                            return
                        await trio.sleep(0.001)

                messages: list[str | bytes] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(keep_sending)
                    try:
                        while True:
                            await trio.sleep(0.05)  # a slow reader
                            messages.append(await ws.get_message())
                    except ConnectionClosed as exc:
                        code = exc.reason.code
                    nursery.cancel_scope.cancel()
            assert error_codes(messages) == ["relay_queue_overflow"]
            assert code == 1013
