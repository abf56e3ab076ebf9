"""The fake server over real loopback sockets, with trio-websocket as the client."""

from __future__ import annotations

import json
import shutil
import ssl
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from mockrealtime import Faults, MockConfig, MockServer, serve_mock_realtime

from .helpers import append_events, connect, types, user_text, wav_pcm16

KEY = "sk-test-0123456789"
AUTH = [(b"authorization", f"Bearer {KEY}".encode())]


async def start(nursery: trio.Nursery, **options: Any) -> MockServer:
    options.setdefault("api_keys", frozenset({KEY}))
    options.setdefault("pace", 0.0)
    server: MockServer = await nursery.start(serve_mock_realtime, MockConfig(**options))
    return server


async def next_event(ws: WebSocketConnection) -> dict[str, Any]:
    return json.loads(await ws.get_message())  # type: ignore[no-any-return]


async def events_until(ws: WebSocketConnection, last: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while not out or out[-1]["type"] != last:
        out.append(await next_event(ws))
        assert len(out) < 10_000
    return out


async def expect_close(ws: WebSocketConnection) -> tuple[int, str | None, list[dict[str, Any]]]:
    """Read until the server closes; returns (code, reason, events read before)."""
    events: list[dict[str, Any]] = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            events.append(await next_event(ws))
    reason = info.value.reason
    return reason.code, reason.reason, events


async def test_bearer_key_opens_a_session_and_the_record_sees_the_request(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery)
    assert server.url == f"ws://127.0.0.1:{server.port}/v1/realtime"
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-realtime", extra_headers=AUTH + [(b"X-Trace", b"abc")]
        ) as ws:
            first = await next_event(ws)
            assert first["type"] == "session.created"
            assert ws.subprotocol is None
            await ws.send_message(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "realtime", "instructions": "hi"},
                    }
                )
            )
            assert (await next_event(ws))["type"] == "session.updated"
        record = server.connections[0]
        await record.closed.wait()
    assert record.path == "/v1/realtime?model=gpt-realtime"
    assert record.headers["authorization"] == f"Bearer {KEY}"
    assert record.headers["x-trace"] == "abc"
    assert record.received == [
        json.dumps(
            {"type": "session.update", "session": {"type": "realtime", "instructions": "hi"}}
        )
    ]
    assert record.close_code == 1000
    assert server.errors == []


async def test_subprotocol_key_selects_realtime_and_never_echoes_the_key(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-realtime",
            subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"],
        ) as ws:
            assert (await next_event(ws))["type"] == "session.created"
            assert ws.subprotocol == "realtime"
    assert server.connections[0].subprotocols == ["realtime", f"openai-insecure-api-key.{KEY}"]


@pytest.mark.parametrize(
    ("query", "headers", "code", "reason", "error_code"),
    [
        (
            "?model=gpt-realtime",
            [(b"authorization", b"Bearer sk-wrong-9876")],
            3000,
            "invalid_request_error.invalid_api_key",
            "invalid_api_key",
        ),
        ("?model=gpt-realtime", [], 3000, "invalid_request_error", None),
        ("", AUTH, 4000, "invalid_request_error.missing_model", "missing_model"),
        ("?model=gpt-5", AUTH, 4000, "invalid_request_error.invalid_model", "invalid_model"),
    ],
)
async def test_handshake_failures_are_a_101_then_one_error_then_a_close(
    nursery: trio.Nursery,
    query: str,
    headers: list[tuple[bytes, bytes]],
    code: int,
    reason: str,
    error_code: str | None,
) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(server.url + query, extra_headers=headers) as ws:
            got_code, got_reason, events = await expect_close(ws)
    assert (got_code, got_reason) == (code, reason)
    assert types(events) == ["error"]
    assert events[0]["error"]["code"] == error_code
    if error_code == "invalid_api_key":
        assert "sk-…9876" in events[0]["error"]["message"]
        assert "sk-wrong-9876" not in events[0]["error"]["message"]


async def test_any_non_empty_key_is_accepted_when_no_keys_are_configured(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, api_keys=frozenset())
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-4o-realtime-preview-2025-06-03",
            extra_headers=[(b"authorization", b"Bearer whatever")],
        ) as ws:
            assert (await next_event(ws))["type"] == "session.created"


async def test_text_turn_over_loopback_ends_with_rate_limits(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            await ws.send_message(json.dumps(user_text("Hello")))
            await ws.send_message(json.dumps({"type": "response.create"}))
            events = await events_until(ws, "rate_limits.updated")
    done = next(e for e in events if e["type"] == "response.done")
    assert done["response"]["status"] == "completed"
    assert types(events)[:3] == [
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    assert server.connections[0].sent_types == ["session.created"] + [e["type"] for e in events]


async def test_vad_turn_fed_from_the_speech_fixture(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            for message in append_events(wav_pcm16()):
                await ws.send_message(message)
            events = await events_until(ws, "rate_limits.updated")
    assert types(events)[:6] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    transcript = next(e for e in events if e["type"] == "response.output_audio_transcript.done")
    assert transcript["transcript"].startswith("I heard ")


async def test_errors_keep_the_socket_open(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            await ws.send_message("{oops")
            await ws.send_message(b"\x00\x01")
            await ws.send_message('{"type": "what.ever"}')
            codes = [(await next_event(ws))["error"]["code"] for _ in range(3)]
            assert codes == ["invalid_json", "invalid_event", "invalid_value"]
            await ws.send_message(json.dumps(user_text("still there?")))
            assert (await next_event(ws))["type"] == "conversation.item.added"
    assert server.connections[0].received[1] == b"\x00\x01"


async def test_client_close_code_is_recorded_and_echoed(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            await ws.aclose(4321, "client leaving")
            assert ws.closed is not None and ws.closed.code == 4321  # the server's echo
        await server.connections[0].closed.wait()
    assert server.connections[0].close_code == 4321
    assert server.connections[0].close_reason == "client leaving"


async def test_reject_beta_refuses_the_beta_header(nursery: trio.Nursery) -> None:
    server = await start(nursery, reject_beta=True)
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-4o-realtime-preview",
            extra_headers=AUTH + [(b"openai-beta", b"realtime=v1")],
        ) as ws:
            code, reason, events = await expect_close(ws)
    assert (code, reason) == (4000, "invalid_request_error.beta_api_shape_disabled")
    assert events[0]["error"]["code"] == "beta_api_shape_disabled"


async def test_beta_subprotocol_selects_the_beta_dialect(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-4o-realtime-preview",
            subprotocols=["realtime", f"openai-insecure-api-key.{KEY}", "openai-beta.realtime-v1"],
        ) as ws:
            session = (await next_event(ws))["session"]
            assert ws.subprotocol == "realtime"
    assert session["modalities"] == ["text", "audio"]
    assert server.connections[0].dialect == "beta"


# --- faults ---------------------------------------------------------------------------


async def upgrade(server: MockServer, extra: dict[str, str] | None = None) -> httpx.Response:
    """A WebSocket upgrade request sent as plain HTTP, to read a refusal's status and body.

    (trio-websocket's client leaks its socket when the handshake is rejected.)
    """
    headers = {
        "connection": "Upgrade",
        "upgrade": "websocket",
        "sec-websocket-version": "13",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "authorization": f"Bearer {KEY}",
        **(extra or {}),
    }
    async with httpx.AsyncClient(base_url=server.http_url) as client:
        return await client.get("/v1/realtime?model=gpt-realtime", headers=headers)


async def test_refuse_status_answers_the_upgrade_with_http_error(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(refuse_status=503))
    with trio.fail_after(10):
        response = await upgrade(server)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "mock_refused"
    assert server.connections == [] and server.handshakes == 1


async def test_a_real_upgrade_is_answered_101(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url) as client:
            headers = {
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "authorization": f"Bearer {KEY}",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            }
            async with client.stream(
                "GET", "/v1/realtime?model=gpt-realtime", headers=headers
            ) as response:
                assert response.status_code == 101
                assert response.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_close_after_open_sends_session_created_then_closes(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(close_after_open=(4001, "go away")))
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            code, reason, events = await expect_close(ws)
    assert (code, reason, types(events)) == (4001, "go away", ["session.created"])


async def test_drop_after_events_ends_tcp_without_a_close_frame(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(drop_after_events=3))
    update = json.dumps({"type": "session.update", "session": {"type": "realtime"}})
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            for _ in range(3):
                await ws.send_message(update)
            code, _, events = await expect_close(ws)
        await server.connections[0].closed.wait()
    assert code == 1006
    assert types(events) == ["session.updated", "session.updated"]
    assert server.connections[0].close_code is None


async def test_inject_error_after_sends_a_server_error_and_carries_on(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery, faults=Faults(inject_error_after=2))
    update = json.dumps({"type": "session.update", "session": {"type": "realtime"}})
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            for _ in range(3):
                await ws.send_message(update)
            events = [await next_event(ws) for _ in range(4)]
    assert types(events) == ["session.updated", "session.updated", "error", "session.updated"]
    assert events[2]["error"]["type"] == "server_error"


async def test_x_mock_faults_header_overrides_per_connection(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        headers = AUTH + [(b"x-mock-faults", b"close_after_open=4002:header said so")]
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=headers) as ws:
            code, reason, _ = await expect_close(ws)
        assert (code, reason) == (4002, "header said so")
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            assert (await next_event(ws))["type"] == "session.created"  # others unaffected


async def test_a_malformed_x_mock_faults_header_is_a_400(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        response = await upgrade(server, {"x-mock-faults": "explode=1"})
    assert response.status_code == 400
    assert "unknown fault 'explode'" in response.json()["error"]["message"]


# --- HTTP ---------------------------------------------------------------------------------


async def test_plain_http_on_the_same_port_gets_json_404(nursery: trio.Nursery) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url) as client:
            response = await client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Invalid URL (GET /v1/nothing)"


# --- test controls and robustness -------------------------------------------------------


async def test_tests_can_inject_events_and_close_or_drop_a_live_connection(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery)
    url = f"{server.url}?model=gpt-realtime"
    with trio.fail_after(10):
        async with connect(url, extra_headers=AUTH) as ws:
            await next_event(ws)
            record = server.connections[0]
            assert record.live
            record.inject({"type": "future.event", "x": 1})
            assert await next_event(ws) == {"type": "future.event", "x": 1}
            record.close(1011, "upstream trouble")
            code, reason, _ = await expect_close(ws)
            assert (code, reason) == (1011, "upstream trouble")
        await record.closed.wait()
        assert not record.live
        with pytest.raises(RuntimeError, match="already ended"):
            record.inject({"type": "x"})
        async with connect(url, extra_headers=AUTH) as ws:
            await next_event(ws)
            server.connections[1].drop()
            code, _, _ = await expect_close(ws)
            assert code == 1006


async def test_a_client_vanishing_mid_response_is_not_a_server_error(
    nursery: trio.Nursery,
) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            await ws.send_message(json.dumps(user_text("a long answer please " * 10)))
            await ws.send_message(json.dumps({"type": "response.create"}))
            await next_event(ws)
            await ws._stream.aclose()  # TCP gone, no close frame
        await server.connections[0].closed.wait()
    assert server.connections[0].close_code is None
    assert server.errors == []


async def test_handshake_delay_over_loopback(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(handshake_delay=0.2))
    with trio.fail_after(10):
        begin = trio.current_time()
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            assert trio.current_time() - begin >= 0.2
            assert (await next_event(ws))["type"] == "session.created"


async def test_send_delay_over_loopback(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(send_delay=0.05))
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            await next_event(ws)
            begin = trio.current_time()
            await ws.send_message(json.dumps(user_text("hi")))
            await next_event(ws)
            await next_event(ws)
            assert trio.current_time() - begin >= 0.1


async def test_stall_over_loopback_leaves_pings_unanswered(nursery: trio.Nursery) -> None:
    server = await start(nursery, faults=Faults(stall=True))
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime", extra_headers=AUTH) as ws:
            assert (await next_event(ws))["type"] == "session.created"
            with trio.move_on_after(0.3) as scope:
                await ws.ping()
            assert scope.cancelled_caught
            await trio.aclose_forcefully(ws._stream)  # the server will never answer a close
    assert server.connections[0].received == []


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",
        b"POST /v1/realtime/client_secrets HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_are_not_server_errors(
    nursery: trio.Nursery, raw: bytes
) -> None:
    server = await start(nursery)
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            await stream.send_all(raw)
            response = b""
            while chunk := await stream.receive_some(4096):
                response += chunk
    assert response.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
    assert b'"message":"Bad ' in response or b"too large" in response
    assert server.errors == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
async def test_tls_serves_wss_and_https(nursery: trio.Nursery, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    with trio.fail_after(30):  # a self-signed certificate for 127.0.0.1
        await trio.run_process(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
             "-keyout", str(key), "-out", str(cert)],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    config = MockConfig(api_keys=frozenset({KEY}), pace=0)
    server: MockServer = await nursery.start(
        partial(serve_mock_realtime, config, ssl_context=server_ctx)
    )
    assert server.url.startswith("wss://") and server.http_url.startswith("https://")
    with trio.fail_after(10):
        async with connect(
            f"{server.url}?model=gpt-realtime", ssl_context=client_ctx, extra_headers=AUTH
        ) as ws:
            assert (await next_event(ws))["type"] == "session.created"
        async with httpx.AsyncClient(base_url=server.http_url, verify=client_ctx) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
