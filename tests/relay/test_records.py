"""Call records: the call's log (turns, transcript, audio timeline), the files, the webhook."""

from __future__ import annotations

import base64
import copy
import math
import os
import stat
import wave
from array import array
from pathlib import Path

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.config import DEFAULT_SESSION
from relay.core.calllog import CallLog
from relay.core.pricing import Tokens
from relay.core.stereo import ASSISTANT, CALLER, MemorySpool, Timeline
from relay.ops.metrics import VoiceClock
from relay.ops.records import SIGNATURE_HEADER, Record, Recorder, sweep, verify, write_record

from ..leaks import upstream_key_in
from .harness import TEST_KEY, connect
from .test_accounting import BEARER, relays_and_mock

TIMEOUT = 20
RATE = 24_000
INSTRUCTIONS = "HIDDEN-INSTRUCTIONS-7c1e: you are the relay's own assistant"
WEBHOOK_SECRET = "whsec-test-0123456789abcdef"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def tone(ms: int, amplitude: int = 8000) -> bytes:
    n = RATE * ms // 1000
    return array(
        "h", (int(amplitude * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(n))
    ).tobytes()


def silence(ms: int) -> bytes:
    return bytes(2 * (RATE * ms // 1000))


def ev(kind: str, **fields: object) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


def delta(item: str, pcm: bytes) -> str:
    return ev("response.output_audio.delta", item_id=item, delta=base64.b64encode(pcm).decode())


# -- the call's log -------------------------------------------------------------------------


def test_a_spoken_turn_and_a_text_turn_are_timed_and_transcribed() -> None:
    clock = Clock()
    log = CallLog(clock, secret=TEST_KEY)
    log.upstream_event(ev("input_audio_buffer.speech_started", item_id="in1"))
    clock.now = 101.0
    log.upstream_event(ev("input_audio_buffer.speech_stopped", item_id="in1"))
    clock.now = 101.2
    log.upstream_event(ev("response.created", response={"id": "r1"}))
    clock.now = 101.5
    assert log.upstream_event(delta("out1", b"\0\0")) == pytest.approx(0.5)
    assert log.upstream_event(delta("out1", b"\0\0")) is None  # only the first audio counts
    log.upstream_event(
        ev(
            "conversation.item.input_audio_transcription.completed",
            item_id="in1",
            transcript="Hello there",
        )
    )
    log.upstream_event(
        ev("response.output_audio_transcript.done", item_id="out1", transcript=f"Hi! {TEST_KEY}")
    )
    clock.now = 102.0
    done = {"type": "response.done", "response": {"id": "r1", "status": "completed"}}
    (turn,) = log.responses_done([done], [(Tokens(output_audio=40), 1234)])
    assert (turn.started, turn.first_audio, turn.done, turn.spoken) == (101.0, 101.5, 102.0, True)
    assert (turn.response_id, turn.status, turn.cost, turn.latency) == (
        "r1",
        "completed",
        1234,
        0.5,
    )
    clock.now = 103.0  # a typed turn
    log.client_event(
        ev(
            "conversation.item.create",
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "And in text?"}],
            },
        )
    )
    log.upstream_event(ev("response.created", response={"id": "r2"}))
    log.upstream_event(ev("response.output_text.done", item_id="out2", text="Yes."))
    (text_turn,) = log.responses_done(
        [{"type": "response.done", "response": {"id": "r2"}}], [(Tokens(), None)]
    )
    assert not text_turn.spoken and text_turn.latency is None and text_turn.cost is None
    said = [(line.at, line.speaker, line.text) for line in log.transcript()]
    assert said == [
        (100.0, "caller", "Hello there"),  # placed where the caller started speaking
        (101.5, "assistant", "Hi! [redacted]"),  # the upstream key never reaches a record
        (103.0, "caller", "And in text?"),
        (103.0, "assistant", "Yes."),
    ]


EVENTS = [
    ev("input_audio_buffer.speech_stopped"),
    ev("response.created"),
    delta("x", b"\0\0"),
    ev("response.output_audio_transcript.delta", delta="hi"),
    "DONE",
]


@given(
    st.lists(st.sampled_from(EVENTS), max_size=40),
    st.lists(st.floats(0, 2), min_size=40, max_size=40),
)
def test_the_call_log_times_voice_latency_exactly_as_the_voice_clock(
    events: list[str], steps: list[float]
) -> None:
    """Where a call is logged, its log replaces the pair's VoiceClock: same latencies."""
    clock = Clock()
    log, voice = CallLog(clock), VoiceClock(clock)
    for event, step in zip(events, steps, strict=False):
        clock.now += step
        if event == "DONE":
            text = ev("response.done", response={})
            assert voice.upstream_event(text) is None
            log.upstream_event(text)
            log.responses_done([orjson.loads(text)], [(Tokens(), None)])
        else:
            assert log.upstream_event(event) == voice.upstream_event(event)


def b64(pcm: bytes) -> bytes:
    return base64.b64encode(pcm)


PCM = ("audio/pcm", RATE)


def test_a_barge_in_cuts_the_assistants_audio_where_the_caller_stopped_hearing_it() -> None:
    spools = (MemorySpool(), MemorySpool())
    timeline = Timeline(10.0, RATE, spools)
    timeline.add(CALLER, 10.0, b64(tone(500)), *PCM)  # the caller speaks for half a second
    timeline.add(ASSISTANT, 11.0, b64(tone(1000)), *PCM, item="a")  # a reply arrives at once...
    timeline.add(ASSISTANT, 11.0, b64(tone(1000)), *PCM, item="a")  # ...two seconds of it
    timeline.truncate("a", 700)  # the caller heard 0.7 s, then spoke again
    timeline.add(ASSISTANT, 11.0, b64(tone(100)), *PCM, item="a")  # a late delta of it: dropped
    timeline.add(CALLER, 11.7, b64(tone(300)), *PCM)
    timeline.add(ASSISTANT, 12.5, b64(tone(400)), *PCM, item="b")  # the next reply, after the cut
    stereo = b"".join(timeline.render(window=5000))  # several windows
    left, right = channel(stereo, 0), channel(stereo, 1)
    assert loud(left, 0.0, 0.5) and quiet(left, 0.5, 1.7) and loud(left, 1.7, 2.0)
    assert quiet(right, 0.0, 1.0) and loud(right, 1.0, 1.7)
    assert quiet(right, 1.7, 2.5)  # cut where the caller stopped hearing it
    assert loud(right, 2.5, 2.9) and len(right) == int(2.9 * RATE)
    assert len(timeline.runs[ASSISTANT]) == 2  # the two pieces of "a" were kept as one run


@given(st.lists(st.integers(1, 700), min_size=1, max_size=12), st.integers(0, 3000), st.booleans())
def test_rendering_gives_back_exactly_the_audio_laid_down(
    sizes: list[int], window: int, g711: bool
) -> None:
    """Any pieces (padded base64 or not), any window, 24 kHz or 8 kHz G.711 in a 24 kHz call."""
    from relay.core.audio import MULAW_TO_PCM16

    timeline = Timeline(0.0, RATE, (MemorySpool(), MemorySpool()))
    expected = bytearray()
    for n, size in enumerate(sizes):
        if g711:
            raw = bytes((n * 7 + i) % 256 for i in range(size))
            timeline.add(CALLER, 0.0, b64(raw), "audio/pcmu", 8000)
            expected += b"".join(array("h", [MULAW_TO_PCM16[b]] * 3).tobytes() for b in raw)
        else:
            raw = tone(40)[: 2 * size]
            timeline.add(CALLER, 0.0, b64(raw), *PCM)
            expected += raw
    stereo = b"".join(timeline.render(window=window + 1))
    assert channel(stereo, 0).tobytes() == bytes(expected)


def channel(stereo: bytes, which: int) -> array[int]:
    samples = array("h", stereo)
    return samples[which::2]


def sounding(samples: array[int], gap: float = 0.2) -> list[tuple[float, float]]:
    """(start, end) in seconds of each stretch with sound, shorter silences than ``gap`` inside."""
    stretches: list[list[float]] = []
    for i, s in enumerate(samples):
        if s:
            t = i / RATE
            if stretches and t - stretches[-1][1] < gap:
                stretches[-1][1] = t + 1 / RATE
            else:
                stretches.append([t, t + 1 / RATE])
    return [(a, b) for a, b in stretches]


def loud(samples: array[int], start: float, end: float) -> bool:
    part = samples[int(start * RATE) + 10 : int(end * RATE) - 10]
    return len(part) > 0 and max(abs(s) for s in part) > 4000


def quiet(samples: array[int], start: float, end: float) -> bool:
    part = samples[int(start * RATE) : int(end * RATE)]
    return len(part) > 0 and max(abs(s) for s in part) == 0


def test_g711_audio_is_decoded_into_the_record() -> None:
    clock = Clock()
    session = {
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}},
            "output": {"format": {"type": "audio/pcmu"}},
        }
    }
    log = CallLog(clock, session=session, spools=(MemorySpool(), MemorySpool()))
    assert log.audio is not None and log.audio.rate == 8000
    log.client_event(bytes([0x00] * 800))  # μ-law 0x00 is the loudest negative sample
    left = channel(b"".join(log.audio.render()), 0)
    assert len(left) == 800
    (sample,) = set(left)
    assert sample == -32124


# -- files ----------------------------------------------------------------------------------


def test_record_files_are_private_and_old_ones_are_swept(tmp_path: Path) -> None:
    record = Record(
        "s1", 1_790_000_000.0,
        {"user": "alice", "model": "m", "started": "a", "ended": "b", "cause": "client_closed"},
        [],
    )  # fmt: skip
    files = write_record(tmp_path, record)
    for name in files.values():
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / files["summary"]).parent.stat().st_mode) == 0o700
    assert "nothing was transcribed" in (tmp_path / files["transcript"]).read_text()
    keep = 86400.0
    old = tmp_path / files["summary"]
    os.utime(old, (old.stat().st_atime, 1_000.0))
    assert sweep(tmp_path, keep, now=1_000.0 + keep + 1) == 1
    assert not old.exists() and (tmp_path / files["transcript"]).exists()


# -- through the relay ------------------------------------------------------------------------


async def paced(ws: object, speech: bytes) -> None:
    """Stream ``speech`` in 20 ms appends at the pace of a microphone."""
    began = trio.current_time()
    for n, i in enumerate(range(0, len(speech), 960)):
        await trio.sleep_until(began + n * 0.02)
        chunk = base64.b64encode(speech[i : i + 960]).decode()
        await ws.send_message(ev("input_audio_buffer.append", audio=chunk))  # type: ignore[attr-defined]


def recorded_session() -> dict:
    session = copy.deepcopy(DEFAULT_SESSION)
    session["instructions"] = INSTRUCTIONS
    session["audio"]["input"]["transcription"] = {"model": "gpt-4o-transcribe"}
    return session


async def test_a_recorded_call_yields_summary_transcript_and_stereo_wav_with_the_barge_in(
    tmp_path: Path,
) -> None:
    settings = {
        "records": str(tmp_path),
        "records_audio": True,
        "session": recorded_session(),
        "model": "gpt-realtime-2",
        "models": ("gpt-realtime-2",),
    }
    received: list[dict] = []
    with trio.fail_after(TIMEOUT):
        async with relays_and_mock("sqlite:///:memory:", **settings) as ((relay,), mock):
            recorder = relay.app.recorder
            assert recorder is not None
            written, seen = trio.open_memory_channel[Record](1)
            recorder.observe = lambda what, record: (
                written.send_nowait(record) if what == "written" else None
            )
            async with connect(
                relay.url + "/voice?model=gpt-realtime-2", extra_headers=BEARER
            ) as ws:
                await paced(ws, tone(600) + silence(900))
                while not received or received[-1]["type"] != "response.done":
                    received.append(orjson.loads(await ws.get_message()))
                audio_item = next(
                    e["item_id"] for e in received if e["type"] == "response.output_audio.delta"
                )
                # The caller heard 300 ms of the reply, then barged in and spoke for 400 ms.
                await ws.send_message(
                    ev(
                        "conversation.item.truncate",
                        item_id=audio_item,
                        content_index=0,
                        audio_end_ms=300,
                    )
                )
                await paced(ws, tone(400))
                (upstream,) = mock.connections
                upstream.inject(
                    {
                        "type": "response.output_audio_transcript.done",
                        "item_id": "late",
                        "transcript": f"leak {TEST_KEY}",
                    }
                )
                while (
                    orjson.loads(await ws.get_message())["type"]
                    != "response.output_audio_transcript.done"
                ):
                    pass
            record = await seen.receive()
    summary = orjson.loads((tmp_path / record.summary["files"]["summary"]).read_bytes())
    done = received[-1]["response"]
    assert summary["user"] == "alice" and summary["model"] == "gpt-realtime-2"
    assert summary["cause"] == "client_closed" and summary["turns"] == 1
    assert (
        summary["tokens"]["output_audio"] == done["usage"]["output_token_details"]["audio_tokens"]
    )
    assert summary["cost_usd"] > 0 and summary["dial_ms"] > 0
    (turn,) = summary["turn_details"]
    assert turn["spoken"] and turn["latency_ms"] > 0 and turn["status"] == "completed"
    heard = next(
        e["transcript"]
        for e in received
        if e["type"] == "conversation.item.input_audio_transcription.completed"
    )
    answered = next(
        e["transcript"] for e in received if e["type"] == "response.output_audio_transcript.done"
    )
    lines = [(line["speaker"], line["text"]) for line in summary["transcript"]]
    assert lines[:2] == [("caller", heard), ("assistant", answered)]
    assert summary["transcript"][1]["heard_ms"] == 300
    text = (tmp_path / record.summary["files"]["transcript"]).read_text()
    assert f"caller: {heard}" in text and f"assistant: {answered}" in text and "heard 0.3 s" in text
    with wave.open(str(tmp_path / record.summary["files"]["audio"])) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (2, 2, RATE)
        stereo = wav.readframes(wav.getnframes())
    left, right = channel(stereo, 0), channel(stereo, 1)
    # Where each side sounds (a busy machine may delay a chunk, which then lands later: the
    # record follows arrival, so only the order and the amounts are certain).
    (speech, barge_in) = sounding(left)
    assert sum(1 for s in left if s) == pytest.approx(RATE * (0.6 + 0.4), rel=0.03)
    (reply,) = sounding(right)
    assert reply[0] > speech[1]  # the reply comes after the caller spoke...
    assert barge_in[0] > reply[0]  # ...who spoke again while it played, having heard 300 ms:
    assert reply[1] - reply[0] <= 0.3 + 1 / RATE
    assert loud(right, reply[0], reply[0] + 0.29)
    assert quiet(right, reply[0] + 0.301, barge_in[1])  # from there on, the reply is cut
    for path in list(tmp_path.rglob("*")):  # noqa: ASYNC240 (the relay has stopped)
        if path.is_file():
            content = path.read_bytes().decode("latin-1")
            assert upstream_key_in(content) is None, path
            assert INSTRUCTIONS not in content and "HIDDEN-INSTRUCTIONS" not in content, path
    assert not list((tmp_path / "spool").iterdir())  # the audio spools are gone


async def test_the_webhook_is_signed_retried_and_never_delays_the_relay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    answers = iter([503, 500, 200])
    posts: list[httpx.Request] = []
    release = trio.Event()

    async def receiver(request: httpx.Request) -> httpx.Response:
        if request.headers["Relay-Delivery"] == "hung":
            await release.wait()
        posts.append(request)
        return httpx.Response(next(answers) if request.headers["Relay-Delivery"] == "s1" else 200)

    recorder = Recorder(
        webhook="https://hooks.example/calls",
        secret=WEBHOOK_SECRET,
        clock=lambda: 1_790_000_000.0 + trio.current_time(),
        transport=httpx.MockTransport(receiver),
    )
    told: list[tuple[str, str, float]] = []
    recorder.observe = lambda what, record: told.append(
        (what, record.session_id, trio.current_time())
    )
    summary = {"session": "s1", "user": "alice", "cost_usd": 0.02}
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for n in range(3):  # a receiver that hangs holds up none of what follows
            recorder.submit(Record("hung" if n == 0 else f"filler{n}", 0.0, {}, []))
        started = trio.current_time()
        recorder.submit(Record("s1", 0.0, summary, []))
        assert trio.current_time() == started  # submitting never waits
        for n in range(600):  # far more than the queues hold: dropped, never waited for
            recorder.submit(Record(f"extra{n}", 0.0, {}, []))
        assert trio.current_time() == started
        with trio.fail_after(60):
            while ("delivered", "s1") not in [(w, s) for w, s, _ in told]:
                await trio.testing.wait_all_tasks_blocked()
                await trio.sleep(1)
        release.set()
        recorder.close()
    s1 = [p for p in posts if p.headers["Relay-Delivery"] == "s1"]
    assert len(s1) == 3  # 503, 500, then 200
    times = [t for w, s, t in told if s == "s1"]
    assert times[0] - started >= 1 + 2  # it waited 1 s, then 2 s, before retrying
    for post in s1:
        body = post.read()
        assert verify(
            WEBHOOK_SECRET, post.headers[SIGNATURE_HEADER], body, now=1_790_000_000.0 + times[0]
        )
        assert not verify(
            WEBHOOK_SECRET,
            post.headers[SIGNATURE_HEADER],
            body + b" ",
            now=1_790_000_000.0 + times[0],
        )
        assert not verify(
            "another-secret", post.headers[SIGNATURE_HEADER], body, now=1_790_000_000.0 + times[0]
        )
        assert orjson.loads(body)["summary"] == summary
    assert any(what == "dropped" for what, _, _ in told)


async def test_a_webhook_that_refuses_a_record_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    posts: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        posts.append(request)
        return httpx.Response(400)

    recorder = Recorder(
        webhook="https://hooks.example/calls", secret="k", transport=httpx.MockTransport(receiver)
    )
    told: list[str] = []
    recorder.observe = lambda what, record: told.append(what)
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.submit(Record("s1", 0.0, {}, []))
        recorder.close()
    assert len(posts) == 1 and told == ["failed"]
