"""``relay talk`` end to end: through ``relay demo`` and the relay's failure paths."""

from __future__ import annotations

import base64
import io
import os
import re
import sys
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from mockrealtime import MockConfig, serve_mock_realtime
from relay.cli import main
from relay.clients import wav
from relay.clients.talk import (
    BYTES_PER_MS,
    SAMPLE,
    Conversation,
    Options,
    ProgressLine,
    TalkError,
    open_relay,
    report,
    talk,
)
from relay.server.demo import Demo, run_demo

from .harness import TEST_KEY, closed_port_url, running_relay, scripted_upstream

FIXTURES = Path(__file__).parents[1] / "fixtures"
HELLO = SAMPLE
TIMEOUT = 30


@asynccontextmanager
async def demo() -> AsyncIterator[Demo]:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        yield await nursery.start(partial(run_demo, "127.0.0.1", 0, shutdown_trigger=stop.wait))
        stop.set()


def hello_pcm() -> bytes:
    return wav.load_for_api(HELLO)[0]


async def test_the_command_round_trips_a_wav_through_relay_demo(tmp_path: Path) -> None:
    reply = tmp_path / "reply.wav"
    with trio.fail_after(TIMEOUT):
        async with demo() as running:
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "talk",
                    str(FIXTURES / "hello-ulaw8k.wav"),
                    "-o",
                    str(reply),
                    "--url",
                    running.relay_url + "/voice",
                    "--transcribe",
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    said = re.search(
        r"^you:       ([A-Z][a-z]*(?: [a-z]+)*)\.$", out, re.M
    )  # the fake's made-up words
    assert said, out
    assert f"assistant: You said: {said.group(1)}." in out
    assert "ms from end of speech to first reply audio" in out
    assert f"written to {reply}" in out
    assert "\r" not in out and "sending" not in out  # no progress display when stdout is a pipe
    with wave.open(str(reply)) as r:
        assert (r.getframerate(), r.getnchannels(), r.getsampwidth()) == (24000, 1, 2)
        frames = r.readframes(r.getnframes())
    assert r.getnframes() > 24000 // 2  # the fake says a sentence: well over half a second
    assert any(wav.pcm16_samples(frames))  # and it is not silence


async def test_realtime_pacing_takes_as_long_as_the_audio_and_reports_the_turn() -> None:
    pcm = hello_pcm()
    with trio.fail_after(TIMEOUT):
        async with demo() as running:
            started = trio.current_time()
            conversation = await talk(pcm, Options(url=running.relay_url + "/voice", realtime=True))
            elapsed = trio.current_time() - started
    assert elapsed >= len(pcm) / BYTES_PER_MS / 1000  # paced like a microphone
    [turn] = conversation.turns
    assert turn.user_item is not None and turn.status == "completed"
    assert turn.user_transcript is None  # not asked for
    assert turn.assistant_transcript.startswith("I heard")
    assert turn.latency_ms is not None and turn.latency_ms >= 0
    assert turn.reply_bytes == len(conversation.reply) > 0


async def test_silence_the_vad_never_hears_is_committed_by_hand() -> None:
    with trio.fail_after(TIMEOUT):
        async with demo() as running:
            conversation = await talk(bytes(48000), Options(url=running.relay_url + "/voice"))
    [turn] = conversation.turns
    assert turn.user_item is not None  # the item of the manual commit
    assert turn.assistant_transcript.startswith("I heard")
    assert conversation.reply


async def test_without_turn_detection_it_commits_and_shows_the_input_transcript() -> None:
    session = {
        "audio": {
            "input": {"turn_detection": None, "transcription": {"model": "gpt-4o-mini-transcribe"}}
        }
    }
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(
                serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}))
            )
            async with running_relay(upstream_url=mock.url, session=session) as relay:
                conversation = await talk(hello_pcm(), Options(url=relay.url + "/voice"))
            nursery.cancel_scope.cancel()
    [turn] = conversation.turns
    assert turn.user_transcript  # the fake transcribes with made-up words
    assert turn.assistant_transcript.startswith("You said:")
    received = mock.connections[0].received
    assert '{"type":"input_audio_buffer.commit"}' in received
    assert not any("speech_started" in str(m) for m in received)


async def test_it_asks_for_pcm_when_the_relay_is_set_up_for_phones() -> None:
    session = {
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcmu"}},
        }
    }
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(
                serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}))
            )
            async with running_relay(upstream_url=mock.url, session=session) as relay:
                conversation = await talk(hello_pcm(), Options(url=relay.url + "/voice"))
            nursery.cancel_scope.cancel()
    assert conversation.speaks_pcm()
    [turn] = conversation.turns
    assert turn.assistant_transcript.startswith("I heard 2.")  # the VAD heard the PCM speech
    # PCM16 at 24 kHz: 4800 bytes per 100 ms chunk of the fake's reply (μ-law would be 800).
    assert len(conversation.reply) % 4800 == 0 and conversation.reply


def test_the_progress_line_draws_on_a_terminal_and_clears_itself() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    line = ProgressLine(screen)
    line(1.5, 3.0, Conversation(in_speech=True))
    line.clear()
    drawn = screen.getvalue()
    assert drawn.startswith("\r\x1b[K sending ") and " 1.5/3.0 s" in drawn and "speaking" in drawn
    assert drawn.endswith("\r\x1b[K")
    assert "█" * 12 + "·" * 12 in drawn  # half of the bar


async def test_a_token_is_offered_as_a_subprotocol_next_to_realtime() -> None:
    async def accept(conn) -> None:  # type: ignore[no-untyped-def]
        await conn.accept()
        await conn.receive()

    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(accept) as server:
            async with open_relay(server.url, token="s3cr3t-Token") as ws:
                assert ws.subprotocol == "realtime"
    assert list(server.connections[0].request.proposed_subprotocols) == [
        "realtime",
        "relay-token.s3cr3t-Token",
    ]


async def test_a_relay_with_client_keys_takes_the_token_and_refuses_others() -> None:
    from relay.usage.auth import hash_key, new_api_key

    key = new_api_key()
    pcm = hello_pcm()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(
                serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}))
            )
            async with running_relay(
                upstream_url=mock.url,
                api_keys=(f"alice:{hash_key(key)}",),
                allow_anonymous=False,
            ) as relay:
                conversation = await talk(pcm, Options(url=relay.url + "/voice", token=key))
                assert conversation.reply
                for token in ("rk_not-the-key", None):
                    with pytest.raises(TalkError, match=r"\(HTTP 401\): .*\(check --token\)$"):
                        await talk(pcm, Options(url=relay.url + "/voice", token=token))
            nursery.cancel_scope.cancel()


async def test_the_relays_error_event_explains_a_closed_session() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url(), dial_timeout=2.0) as relay:
            with pytest.raises(TalkError, match="relay_upstream_unavailable") as caught:
                await talk(hello_pcm(), Options(url=relay.url + "/voice"))
    assert "\n" not in str(caught.value)


async def test_a_refused_handshake_says_what_the_relay_answered() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay() as relay:
            with pytest.raises(
                TalkError, match=r"refused the WebSocket handshake \(HTTP 404\): no WebSocket"
            ):
                await talk(hello_pcm(), Options(url=relay.url + "/nowhere"))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["missing.wav"], 2, "relay talk: missing.wav: no such file"),
        ([__file__], 2, "is not a WAV file (no RIFF/WAVE header)"),
        (
            [str(HELLO), "--url", "http://127.0.0.1:1/voice"],
            2,
            "--url must be a ws:// or wss:// URL",
        ),
        ([str(HELLO), "--token", "a b"], 2, "--token may only hold"),
        (
            [str(HELLO), "--url", closed_port_url().replace("/v1/realtime", "/voice")],
            1,
            "connection refused. Is the relay running?",
        ),
    ],
)
def test_clear_one_line_errors(
    args: list[str], code: int, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["talk", *args, "-o", str(tmp_path / "r.wav")]) == code
    captured = capsys.readouterr()
    assert message in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "r.wav").exists()


def test_a_turn_stays_open_from_speech_stopped_until_its_response_is_done() -> None:
    """The bookkeeping behind the exit: two utterances, the second interrupting the first reply."""
    audio = base64.b64encode(bytes(4800)).decode()
    conversation = Conversation()
    script: list[tuple[float, dict[str, object]]] = [
        (0.0, {"type": "input_audio_buffer.speech_started", "item_id": "u1", "audio_start_ms": 0}),
        (1.0, {"type": "input_audio_buffer.speech_stopped", "item_id": "u1", "audio_end_ms": 900}),
        (1.0, {"type": "input_audio_buffer.committed", "item_id": "u1"}),
        (1.0, {"type": "response.created", "response": {"id": "r1", "status": "in_progress"}}),
        (
            1.2,
            {
                "type": "response.output_audio.delta",
                "response_id": "r1",
                "item_id": "a1",
                "delta": audio,
            },
        ),
        (
            1.3,
            {
                "type": "response.output_audio_transcript.delta",
                "response_id": "r1",
                "item_id": "a1",
                "delta": "Hel",
            },
        ),
        (
            1.5,
            {"type": "input_audio_buffer.speech_started", "item_id": "u2", "audio_start_ms": 1400},
        ),
        (1.5, {"type": "response.done", "response": {"id": "r1", "status": "cancelled"}}),
        (2.0, {"type": "input_audio_buffer.speech_stopped", "item_id": "u2", "audio_end_ms": 1900}),
    ]
    for now, event in script:
        conversation.handle(event, now)
        assert not conversation.settled, event["type"]
    conversation.handle({"type": "input_audio_buffer.committed", "item_id": "u2"}, 2.0)
    conversation.handle(
        {
            "type": "conversation.item.input_audio_transcription.completed",
            "item_id": "u2",
            "transcript": "Stop.",
        },
        2.0,
    )
    conversation.handle({"type": "response.created", "response": {"id": "r2"}}, 2.0)
    conversation.handle(
        {
            "type": "response.output_audio.delta",
            "response_id": "r2",
            "item_id": "a2",
            "delta": audio,
        },
        2.05,
    )
    conversation.handle(
        {
            "type": "response.output_audio_transcript.done",
            "response_id": "r2",
            "item_id": "a2",
            "transcript": "Okay.",
        },
        2.1,
    )
    assert not conversation.settled
    conversation.handle(
        {"type": "response.done", "response": {"id": "r2", "status": "completed"}}, 2.2
    )
    assert conversation.settled
    first, second = conversation.turns
    assert (first.user_item, first.status, first.assistant_transcript) == ("u1", "cancelled", "Hel")
    assert first.latency_ms == pytest.approx(200)
    assert (first.speech_ms, second.speech_ms) == (900, 500)
    assert (second.user_item, second.user_transcript, second.assistant_transcript) == (
        "u2",
        "Stop.",
        "Okay.",
    )
    assert second.latency_ms == pytest.approx(50)
    assert len(conversation.reply) == 2 * 4800


def client_sockets_to(port: int) -> int:
    """Sockets of this process connected to ``port`` on loopback (Linux /proc)."""
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # closed meanwhile
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and f"socket:[{fields[9]}]" in ours:
                count += 1
    return count


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc to list sockets")
async def test_failed_sessions_leave_no_socket_open() -> None:
    """A refused handshake and a session the relay closes both give back the client's socket."""
    pcm = hello_pcm()
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url(), dial_timeout=2.0) as relay:
            port = int(relay.url.rsplit(":", 1)[1])
            for path in ("/nowhere", "/voice", "/nowhere", "/voice"):  # HTTP 404; error + 1014
                with pytest.raises(TalkError):
                    await talk(pcm, Options(url=relay.url + path))
                assert client_sockets_to(port) == 0, path


# -- the first hour: no file needed, the fake named, every close code read -------------------------


async def test_with_no_file_it_says_the_bundled_sample_and_names_the_fake(tmp_path: Path) -> None:
    reply = tmp_path / "reply.wav"
    with trio.fail_after(TIMEOUT):
        async with demo() as running:
            result = await trio.run_process(
                [sys.executable, "-m", "relay", "talk", "-o", str(reply),
                 "--url", running.relay_url + "/voice"],
                capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path,
            )  # fmt: skip
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert out.startswith("upstream:  the offline fake (mockrealtime): made-up transcripts")
    assert "from 16-bit PCM, 24000 Hz, mono, the bundled sample)" in out
    assert reply.is_file()


def test_only_the_fakes_marker_makes_it_say_fake() -> None:
    real, fake = Conversation(), Conversation()
    real.handle({"type": "session.created", "session": {"id": "sess_1"}}, 0.0)
    fake.handle({"type": "session.created", "session": {}, "mockrealtime": "offline fake"}, 0.0)
    assert (real.fake, fake.fake) == (False, True)
    shown = io.StringIO()
    report(real, shown)
    assert "fake" not in shown.getvalue()


@asynccontextmanager
async def relay_that_closes(code: int, reason: str) -> AsyncIterator[str]:
    """A WebSocket server that accepts, sends session.created, then closes with ``code``:
    written with the relay's own framer, so any code goes on the wire as it is."""
    from relay.wire import frames
    from relay.wire.websocket import accept_key

    async def handler(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request).group(1)  # type: ignore[union-attr]
        await stream.send_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n"
            b"Sec-WebSocket-Protocol: realtime\r\n\r\n"
        )
        created = b'{"type":"session.created"}'
        await stream.send_all(frames.frame(frames.OP_TEXT, created, mask=False))
        close = frames.close_payload(code, reason)
        await stream.send_all(frames.frame(frames.OP_CLOSE, close, mask=False))
        with trio.move_on_after(TIMEOUT):
            while await stream.receive_some(4096):
                pass  # the client's close reply, then its end

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        yield f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/voice"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("code", [1000, 1001, 1008, 1009, 1011, 1012, 1013, 1014, 4000, 4008, 4429])
async def test_every_close_code_the_relay_sends_is_read_as_sent(code: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_that_closes(code, "because") as url:
            with pytest.raises(TalkError) as caught:
                await talk(hello_pcm(), Options(url=url))
    said = str(caught.value)
    assert said.startswith(f"the relay closed the session (close code {code}, because)"), said


async def test_the_command_reports_the_relays_1014_as_1014() -> None:
    """In a process of its own, where nothing of the tests' set-up helps a client read 1014."""
    with trio.fail_after(TIMEOUT):
        async with running_relay(upstream_url=closed_port_url(), dial_timeout=2.0) as relay:
            result = await trio.run_process(
                [sys.executable, "-m", "relay", "talk", "--url", relay.url + "/voice",
                 "-o", os.devnull],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "(close code 1014" in err and "relay_upstream_unavailable" in err, err


def test_it_speaks_through_the_relays_own_websocket_client() -> None:
    import ast

    import relay.clients.talk as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
    assert "wire.websocket" in imported
    assert not any(name.startswith(("trio_websocket", "wsproto")) for name in imported)
