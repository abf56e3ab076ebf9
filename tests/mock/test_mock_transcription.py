"""Input audio transcription outcomes: failure (a fault) and diarized segments."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from mockrealtime import Faults, MockConfig, parse_faults, serve_mock_realtime
from mockrealtime.session import Session

from .helpers import append_events, connect, make_session, only, send, types, wav_pcm16

TRANSCRIPTION_EVENTS = "conversation.item.input_audio_transcription."


def transcribed_turn(session: Session, model: str) -> list[dict[str, Any]]:
    """Configure transcription with ``model`` (manual commit) and commit the fixture."""
    audio = {"input": {"transcription": {"model": model}, "turn_detection": None}}
    if session.dialect == "ga":
        out = send(
            session, {"type": "session.update", "session": {"type": "realtime", "audio": audio}}
        )
    else:
        body = {"input_audio_transcription": {"model": model}, "turn_detection": None}
        out = send(session, {"type": "session.update", "session": body})
    assert "error" not in types(out)
    for message in append_events(wav_pcm16()):
        session.handle(message)
    return send(session, {"type": "input_audio_buffer.commit"})


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_a_failing_transcription_sends_failed_instead_of_a_transcript(dialect: str) -> None:
    session, _ = make_session(dialect, transcription_fails=True)
    out = transcribed_turn(session, "gpt-4o-transcribe")
    events = [e for e in out if e["type"].startswith(TRANSCRIPTION_EVENTS)]
    assert [e["type"] for e in events] == [TRANSCRIPTION_EVENTS + "failed"]
    failed = events[0]
    committed = only(out, "input_audio_buffer.committed")
    assert (failed["item_id"], failed["content_index"]) == (committed["item_id"], 0)
    assert failed["error"] == {
        "type": "transcription_error",
        "code": "audio_unintelligible",
        "message": "The audio could not be transcribed.",
        "param": None,
    }
    assert session.items[-1]["content"][0]["transcript"] is None  # nothing was heard


def test_a_diarizing_model_sends_speaker_segments_then_completed() -> None:
    session, _ = make_session()
    out = transcribed_turn(session, "gpt-4o-transcribe-diarize")
    events = [e for e in out if e["type"].startswith(TRANSCRIPTION_EVENTS)]
    kinds = [e["type"].removeprefix(TRANSCRIPTION_EVENTS) for e in events]
    assert kinds[-1] == "completed" and set(kinds[:-1]) == {"segment"} and len(kinds) >= 3
    segments, completed = events[:-1], events[-1]
    assert " ".join(s["text"] for s in segments) == completed["transcript"]
    assert [s["speaker"] for s in segments] == ["AB"[i % 2] for i in range(len(segments))]
    assert len({s["id"] for s in segments}) == len(segments)
    assert segments[0]["start"] == 0.0
    for before, after in zip(segments, segments[1:], strict=False):
        assert before["start"] < before["end"] == after["start"]
    seconds = len(wav_pcm16()) / 48_000
    assert segments[-1]["end"] == pytest.approx(seconds, abs=0.01)
    assert all(s["item_id"] == completed["item_id"] and s["content_index"] == 0 for s in segments)


def test_other_models_stream_deltas_and_no_segments() -> None:
    session, _ = make_session()
    kinds = set(types(transcribed_turn(session, "gpt-transcribe"), deltas=True))
    assert TRANSCRIPTION_EVENTS + "delta" in kinds and TRANSCRIPTION_EVENTS + "segment" not in kinds


def test_the_fault_is_a_flag_of_faults_and_of_the_header() -> None:
    assert parse_faults("transcription_failure") == Faults(transcription_failure=True)
    assert not Faults().transcription_failure


async def test_the_fault_reaches_the_session_over_a_socket(nursery: trio.Nursery) -> None:
    server = await nursery.start(serve_mock_realtime, MockConfig(pace=0, ping_interval=None))
    headers = [(b"authorization", b"Bearer k"), (b"x-mock-faults", b"transcription_failure")]
    update = {
        "type": "session.update",
        "session": {
            "type": "realtime",
            "audio": {"input": {"transcription": {"model": "whisper-1"}, "turn_detection": None}},
        },
    }
    with trio.fail_after(10):
        async with connect(f"{server.url}?model=gpt-realtime-2", extra_headers=headers) as ws:
            await ws.send_message(json.dumps(update))
            for message in append_events(wav_pcm16()):
                await ws.send_message(message)
            await ws.send_message(json.dumps({"type": "input_audio_buffer.commit"}))
            while True:
                event = json.loads(await ws.get_message())
                assert event["type"] != TRANSCRIPTION_EVENTS + "completed"
                if event["type"] == TRANSCRIPTION_EVENTS + "failed":
                    break
