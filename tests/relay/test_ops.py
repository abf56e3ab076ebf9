"""Operating the relay: TLS, keepalive on both legs, metrics, logs, and a drain by signal."""

from __future__ import annotations

import logging
import os
import re
import signal
import ssl
import subprocess
import sys
from functools import partial

import httpx
import orjson
import pytest
import trio
import trio.testing
import trustme
from prometheus_client.parser import text_string_to_metric_families
from trio_websocket import ConnectionClosed

from mockrealtime import MockConfig, serve_mock_realtime
from relay.core.bridge import Cause

from .harness import (
    TEST_KEY,
    UpstreamConnection,
    connect,
    greet,
    open_session,
    running_relay,
    scripted_upstream,
)
from .memory import OPENING, ClientScript, UpstreamScript, run_pair
from .test_demo import events_until, tone_then_silence
from .test_relay_loopback import error_codes, receive_until_closed

TIMEOUT = 20


# -- TLS ----------------------------------------------------------------------------------


async def test_tls_serves_wss_and_https_end_to_end(tmp_path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(
            upstream_url=up.url, tls_cert=str(cert_file), tls_key=str(key_file)
        ) as relay:
            assert relay.url.startswith("wss://")
            async with connect(relay.url + "/voice", ssl_context=client_context) as ws:
                assert await ws.get_message() == '{"type":"session.created"}'
                await ws.send_message('{"type":"input_audio_buffer.clear"}')
                while len(up.connections[0].received) < 2:
                    await trio.sleep(0.01)
            assert up.connections[0].received[1] == '{"type":"input_audio_buffer.clear"}'
            async with httpx.AsyncClient(base_url=relay.http_url, verify=client_context) as http:
                assert (await http.get("/healthz")).status_code == 200
            # A client that does not trust the certificate gets no further than the TLS handshake.
            port = int(relay.http_url.rsplit(":", 1)[1])
            untrusting = trio.SSLStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                ssl.create_default_context(),
                server_hostname="127.0.0.1",
            )
            with pytest.raises(trio.BrokenResourceError) as refused:
                await untrusting.do_handshake()
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            await trio.aclose_forcefully(untrusting)


# -- keepalive ------------------------------------------------------------------------------


def test_an_upstream_that_stops_answering_pings_is_reaped() -> None:
    async def main():
        return await run_pair(
            ClientScript(closes_after=None),
            UpstreamScript(events=OPENING, gaps=(0.0, 0.0), deaf_after=110.0),
            ping_interval=20.0,
            peer_timeout=30.0,
        )

    outcome = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcome.ending.cause is Cause.UPSTREAM_LOST
    assert error_codes(outcome.client.received[1:]) == ["relay_upstream_lost"]
    assert outcome.client.close_code == 1011
    # Pings at 20 … 100 are answered; the peer dies at 110. Nothing heard since the pong at
    # 100 (the one at 120 never comes): cut at 100 + 30.
    assert outcome.ended_at == pytest.approx(130.0)


def test_a_quiet_session_whose_peers_answer_pings_lives_on() -> None:
    async def main():
        return await run_pair(
            ClientScript(messages=('{"type":"input_audio_buffer.clear"}',), gaps=(500.0,)),
            UpstreamScript(),
            ping_interval=20.0,
            peer_timeout=30.0,
        )

    outcome = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcome.ending.cause is Cause.CLIENT_CLOSED  # it ended when the client left, at 500 s
    assert outcome.ended_at == pytest.approx(500.0)
    assert outcome.client.pings == 25  # at 20, 40, … 500, every one answered


def test_a_client_that_stops_answering_pings_is_reaped() -> None:
    async def main():
        with trio.fail_after(1000):  # virtual seconds: a relay that never reaps fails here
            return await run_pair(
                ClientScript(closes_after=None, mute_after=55.0),
                UpstreamScript(events=OPENING, gaps=(0.0, 0.0)),
                ping_interval=20.0,
                peer_timeout=30.0,
            )

    outcome = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert outcome.ending.cause is Cause.CLIENT_CLOSED
    assert outcome.client.close_code is None  # nobody is left to read a close frame
    assert outcome.upstream.close_code == 1000
    # Pings at 20 and 40 are answered; it goes mute at 55, so the last word was at 40: cut at 70.
    assert outcome.ended_at == pytest.approx(70.0)
    assert outcome.client.pings == 3


async def test_a_client_that_sends_nothing_not_even_pongs_is_reaped() -> None:
    """A raw socket that completes the upgrade and then goes dead, as a vanished phone does."""
    upstream_closed = trio.Event()
    upstream_codes: list[int] = []

    async def record(conn: UpstreamConnection) -> None:
        await open_session(conn)
        try:
            while True:
                await conn.receive()
        except ConnectionClosed as exc:
            upstream_codes.append(exc.reason.code)
            upstream_closed.set()

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(record) as up, running_relay(
            upstream_url=up.url, ping_interval=0.2, peer_timeout=1.0, send_timeout=0.5
        ) as relay:
            port = int(relay.http_url.rsplit(":", 1)[1])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"GET /voice HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101")
            opened = trio.current_time()
            await upstream_closed.wait()  # the relay gave up on the client and closed the upstream
            assert 1.0 <= trio.current_time() - opened < 5
            assert upstream_codes == [1000]
            await stream.aclose()


# -- metrics and logs ------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_move_after_a_voice_turn_and_the_session_log_line_has_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
            async with running_relay(upstream_url=mock.url) as relay:
                async with httpx.AsyncClient(base_url=relay.http_url) as http:
                    before = samples((await http.get("/metrics")).text)
                    async with connect(relay.url + "/voice") as ws:
                        await events_until(ws, "session.created")
                        for event in tone_then_silence():
                            await ws.send_message(event)
                        turn = await events_until(ws, "response.done")
                        during = samples((await http.get("/metrics")).text)
                    while relay.app.pairs:
                        await trio.sleep(0.01)
                    after = samples((await http.get("/metrics")).text)
            nursery.cancel_scope.cancel()
    up = ("relay_messages_total", (("direction", "client_to_upstream"),))
    down = ("relay_messages_total", (("direction", "upstream_to_client"),))
    assert before[up] == 0 and during[up] >= len(tone_then_silence()) and after[up] == during[up]
    assert during[down] >= len(turn) and after[down] >= during[down]
    assert during[("relay_sessions_active", ())] == 1 and after[("relay_sessions_active", ())] == 0
    assert after[("relay_voice_latency_seconds_count", ())] == 1
    assert after[("relay_upstream_dial_seconds_count", ())] == 1
    ended = ("relay_sessions_ended_total", (("cause", "client_closed"), ("client_code", "none")))
    assert after[ended] == 1
    lines = [r for r in caplog.records if r.getMessage() == "session ended"]
    assert len(lines) == 1
    fields = lines[0].fields  # type: ignore[attr-defined]
    assert fields["cause"] == "client_closed" and fields["responses"] == 1
    assert fields["client_messages"] == len(tone_then_silence())
    assert TEST_KEY not in orjson.dumps(fields).decode()


# -- drain by signal ---------------------------------------------------------------------


async def test_sigterm_drains_then_closes_with_1012_and_the_process_exits_0() -> None:
    """`relay serve` as deployed: SIGTERM, a notice, the grace time, 1012, exit 0."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
            env = dict(os.environ, OPENAI_API_KEY=TEST_KEY, RELAY_LOG_FORMAT="json")
            proc = await nursery.start(partial(
                trio.run_process,
                [sys.executable, "-m", "relay", "serve", "--allow-anonymous", "--port", "0",
                 "--upstream-url", mock.url, "--store", "sqlite:///:memory:", "--drain-seconds", "1"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
            ))  # fmt: skip
            buffered = b""
            while b"listening on" not in buffered:
                buffered += await proc.stdout.receive_some(4096)
            url = re.search(rb"listening on (ws://127\.0\.0\.1:\d+)/voice", buffered).group(1).decode()
            async with connect(url + "/voice") as ws:
                await events_until(ws, "session.created")
                proc.send_signal(signal.SIGTERM)
                notice = await ws.get_message()
                assert error_codes([notice]) == ["relay_draining"]
                await ws.send_message('{"type":"input_audio_buffer.clear"}')  # still relayed
                messages, code, reason = await receive_until_closed(ws)
            assert code == 1012 and error_codes(messages)[-1] == "relay_shutting_down"
            assert "input_audio_buffer.cleared" in [orjson.loads(m)["type"] for m in messages]
            assert await proc.wait() == 0
            stderr = b""
            while chunk := await proc.stderr.receive_some(65536):
                stderr += chunk
            log = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
            assert any(entry["msg"] == "session ended" and entry["client_code"] == 1012 for entry in log)
            assert TEST_KEY.encode() not in stderr
            nursery.cancel_scope.cancel()


def test_the_documented_hypercorn_line_configures_hypercorn_as_relay_serve_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    import shlex
    from pathlib import Path

    import hypercorn.__main__ as hypercorn_main

    from relay.config import load_config
    from relay.server.serve import hypercorn_config

    readme = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(OPENAI_API_KEY=\S+ RELAY_API_KEYS=\S+ hypercorn -k trio -w 2 .*?)\n```", readme, re.S)
    assert block, "the Deployment section's hypercorn line"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    argv = argv[argv.index("hypercorn") + 1:]
    captured = []
    monkeypatch.setattr(hypercorn_main, "run", lambda config: captured.append(config) or 0)
    hypercorn_main.main(argv)
    (theirs,) = captured
    ours = hypercorn_config(load_config({}, {"host": "0.0.0.0", "workers": 2, "tls_cert": "", "tls_key": ""}))
    ours.certfile, ours.keyfile, ours.workers = "C", "K", 2
    for name in ("bind", "workers", "certfile", "keyfile", "keep_alive_timeout", "read_timeout",
                 "websocket_ping_interval"):
        assert getattr(theirs, name) == getattr(ours, name), name
    assert theirs.application_path == "relay.server.app:create_app()" and theirs.worker_class == "trio"


async def test_a_closed_websockets_ping_task_ends_with_it_so_shutdown_does_not_wait() -> None:
    """Hypercorn's ping task sleeps a whole interval before it sees the close; the relay
    cancels it, so a relay whose sessions are over stops at once, not after its graceful
    timeout (2 s), and no connection lingers for up to an interval."""
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up:
            async with running_relay(upstream_url=up.url, ping_interval=30) as relay:
                async with connect(relay.url + "/voice") as ws:
                    assert await ws.get_message() == '{"type":"session.created"}'
                while relay.app.pairs:
                    await trio.sleep(0.01)
                stopping = trio.current_time()
            assert trio.current_time() - stopping < 1.0
