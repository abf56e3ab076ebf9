"""``relay demo`` end to end: the relay in front of the bundled fake, as a newcomer runs it."""

from __future__ import annotations

import base64
import math
import os
import re
import signal
import struct
import subprocess
import sys
from functools import partial
from urllib.request import urlopen

import orjson
import pytest
import trio

from relay.server.demo import run_demo

from .harness import connect

TIMEOUT = 20


def tone_then_silence(tone_s: float = 1.0, silence_s: float = 1.2) -> list[str]:
    """input_audio_buffer.append events of 20 ms: a 440 Hz tone, then silence (PCM16 24 kHz)."""
    rate, chunk = 24000, 480
    samples = [int(12000 * math.sin(2 * math.pi * 440 * n / rate)) for n in range(int(rate * tone_s))]
    samples += [0] * int(rate * silence_s)
    events = []
    for start in range(0, len(samples), chunk):
        pcm = struct.pack(f"<{len(samples[start:start + chunk])}h", *samples[start:start + chunk])
        events.append(orjson.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}).decode())
    return events


async def events_until(ws, last_type: str) -> list[dict]:
    events = []
    while True:
        event = orjson.loads(await ws.get_message())
        events.append(event)
        if event["type"] == last_type:
            return events


@pytest.mark.parametrize("path", ["/voice", "/v1/realtime?model=gpt-realtime-2.1"])
async def test_demo_serves_a_text_turn_and_a_voice_turn(path: str) -> None:
    stop = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            demo = await nursery.start(partial(run_demo, "127.0.0.1", 0, shutdown_trigger=stop.wait))
            async with connect(demo.relay_url + path, subprotocols=["realtime"]) as ws:
                opening = await events_until(ws, "session.created")
                assert [e["type"] for e in opening] == ["session.created"]  # nothing before it
                # It shows the relay's session (its voice), without the relay's instructions,
                # which reached the upstream; the relay's own session.updated never comes.
                assert opening[0]["session"]["audio"]["output"]["voice"] == "marin"
                assert "instructions" not in opening[0]["session"]
                first_upstream = orjson.loads(demo.mock.connections[-1].received[0])
                assert first_upstream["session"]["instructions"] == demo.config.session_object()["instructions"]

                # A text turn.
                await ws.send_message(orjson.dumps({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user",
                    "content": [{"type": "input_text", "text": "What is the weather like?"}]}}).decode())
                await ws.send_message('{"type":"response.create"}')
                text_turn = await events_until(ws, "response.done")
                assert text_turn[-1]["response"]["status"] == "completed"
                assert text_turn[-1]["response"]["usage"]["total_tokens"] > 0

                # A voice turn: server VAD hears the tone end and answers with audio.
                for event in tone_then_silence():
                    await ws.send_message(event)
                voice_turn = await events_until(ws, "response.done")
                kinds = [e["type"] for e in voice_turn]
                for expected in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                 "input_audio_buffer.committed", "response.created"):
                    assert expected in kinds
                assert kinds.index("input_audio_buffer.speech_started") < kinds.index(
                    "input_audio_buffer.speech_stopped") < kinds.index("input_audio_buffer.committed")
                assert kinds.count("response.output_audio.delta") > 0
                assert "response.output_audio_transcript.delta" in kinds
                assert voice_turn[-1]["response"]["status"] == "completed"
            stop.set()


def test_relay_demo_command_serves_and_stops_cleanly_on_ctrl_c() -> None:
    """It prints the page's URL first, then the WebSocket URLs and what the upstream is."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "relay", "demo", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        page, sockets, upstream = (proc.stdout.readline() for _ in range(3))
        opened = re.fullmatch(r"relay demo: open (http://127\.0\.0\.1:(\d+)/) in a browser.*\n",
                              page)
        assert opened, page
        with urlopen(opened.group(1), timeout=10) as response:
            assert b"<title>relay" in response.read()
        match = re.search(r"relay on (ws://127\.0\.0\.1:(\d+))/voice", sockets)
        assert match and match.group(2) == opened.group(2), sockets
        assert "offline fake" in upstream and "made-up transcripts" in upstream, upstream

        async def one_session() -> str:
            async with connect(match.group(1) + "/voice") as ws:
                return orjson.loads(await ws.get_message())["type"]

        assert trio.run(one_session) == "session.created"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe:
                pipe.close()


def test_relay_serve_refuses_to_start_without_an_api_key() -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert result.returncode == 2
    assert "OPENAI_API_KEY is not set" in result.stderr


def test_relay_serve_refuses_to_start_without_client_auth_unless_told_to() -> None:
    env = dict(os.environ, OPENAI_API_KEY="sk-x")
    env.pop("RELAY_API_KEYS", None)
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--port", "0"],
        capture_output=True, text=True, env=env, timeout=30,
    )
    assert result.returncode == 2
    assert "no client authentication is configured" in result.stderr
    assert "--allow-anonymous" in result.stderr


def test_relay_keygen_prints_a_key_and_the_entry_that_accepts_it() -> None:
    from relay.usage.auth import hash_key

    result = subprocess.run(
        [sys.executable, "-m", "relay", "keygen", "alice"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    key = re.search(r"client key \(give it to alice\): (\S+)", result.stdout).group(1)
    entry = re.search(r"RELAY_API_KEYS entry \(give it to the relay\): (\S+)", result.stdout).group(1)
    assert entry == f"alice:{hash_key(key)}"
    assert key not in entry


def test_relay_serve_names_a_bad_setting() -> None:
    env = dict(os.environ, OPENAI_API_KEY="sk-x", RELAY_DIAL_TIMEOUT="soon")
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 2
    assert "RELAY_DIAL_TIMEOUT" in result.stderr


def test_the_documented_hypercorn_command_line_serves_the_app() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, OPENAI_API_KEY="sk-x", RELAY_ALLOW_ANONYMOUS="true", RELAY_STORE="sqlite:///:memory:")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "-k", "trio", "--bind", f"127.0.0.1:{port}",
         "relay.server.app:create_app()"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        for _ in range(20):
            if "Running on" in proc.stdout.readline():
                break

        async def health() -> int:
            import httpx

            async with httpx.AsyncClient() as http:
                return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code

        assert trio.run(health) == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_relay_demo_refuses_a_non_loopback_host_without_allow_anonymous() -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: were the check missing, binding would fail
    # rather than expose anything, and this test would still fail on the exit code and message.
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--host", "192.0.2.1", "--port", "0"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "--host 192.0.2.1 is not a loopback address" in result.stderr
    assert "--allow-anonymous" in result.stderr


@pytest.mark.parametrize(("host", "allowed"), [("127.0.0.1", True), ("::1", True), ("[::1]", True),
                                               ("localhost", True), ("127.0.0.2", True), ("0.0.0.0", False),
                                               ("::", False), ("192.0.2.1", False), ("relay.example", False)])
def test_only_loopback_hosts_may_serve_the_anonymous_demo(host: str, allowed: bool) -> None:
    from relay.config import ConfigError
    from relay.server.demo import check_demo_host

    check_demo_host(host, allow_anonymous=True)  # told to: any host
    if allowed:
        check_demo_host(host, allow_anonymous=False)
    else:
        with pytest.raises(ConfigError, match="not a loopback address"):
            check_demo_host(host, allow_anonymous=False)


async def test_run_demo_itself_refuses_a_non_loopback_host() -> None:
    from relay.config import ConfigError

    with pytest.raises(ConfigError):
        await run_demo("192.0.2.1", 0)  # refused before anything listens
