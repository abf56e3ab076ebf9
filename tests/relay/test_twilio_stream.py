"""The Twilio Media Streams adapter, event by event, without sockets (relay.core.twilio)."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest

from relay.core.twilio import (
    BYTES_PER_MS,
    End,
    Out,
    StreamError,
    TwilioStream,
    request_signature,
    signature_matches,
)

SID = "MZ00000000000000000000000000000001"
ITEM = "item_reply1"


def msg(event: str, **fields: Any) -> str:
    return orjson.dumps({"event": event, "streamSid": SID, **fields}).decode()


def start(**parameters: str) -> str:
    return msg(
        "start",
        sequenceNumber="1",
        start={
            "accountSid": "AC1",
            "streamSid": SID,
            "callSid": "CA1",
            "tracks": ["inbound"],
            "customParameters": parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    )


def media(payload: bytes) -> str:
    return msg(
        "media",
        media={
            "track": "inbound",
            "chunk": "1",
            "timestamp": "0",
            "payload": base64.b64encode(payload).decode(),
        },
    )


def delta(n_bytes: int, item: str = ITEM) -> str:
    audio = base64.b64encode(bytes(range(256)) * (n_bytes // 256) + bytes(n_bytes % 256)).decode()
    return orjson.dumps(
        {"type": "response.output_audio.delta", "item_id": item, "content_index": 0, "delta": audio}
    ).decode()


def event(kind: str, **fields: Any) -> str:
    return orjson.dumps({"type": kind, **fields}).decode()


def streaming(**kwargs: Any) -> TwilioStream:
    stream = TwilioStream(**kwargs)
    assert stream.opening(msg("connected", protocol="Call", version="1.0.0")) is None
    assert stream.opening(start()) is not None
    return stream


def twilio(out: Out | None) -> list[dict[str, Any]]:
    assert out is not None
    return [orjson.loads(m) for m in out.twilio]


def upstream(out: Out | None) -> list[dict[str, Any]]:
    assert out is not None
    return [orjson.loads(m) for m in out.upstream]


def mark_names(out: Out | None) -> list[str]:
    return [m["mark"]["name"] for m in twilio(out) if m["event"] == "mark"]


# -- the opening ---------------------------------------------------------------------


def test_start_gives_the_call_and_its_parameters() -> None:
    stream = TwilioStream()
    assert stream.opening(msg("connected", protocol="Call", version="1.0.0")) is None
    started = stream.opening(start(token="t1", relay_transcripts="true"))
    assert started is not None
    assert (started.stream_sid, started.call_sid, started.account_sid) == (SID, "CA1", "AC1")
    assert started.parameters == {"token": "t1", "relay_transcripts": "true"}
    assert stream.transcripts


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (b"\x00\x01", "binary frame"),
        ("not json", "not JSON"),
        ('{"type":"input_audio_buffer.append","audio":""}', "not a Realtime API one"),
        ('{"event":"hello"}', "'hello' message came before 'start'"),
        (msg("media", media={"payload": ""}), "came before 'start'"),
        (msg("start", start={"callSid": "CA1"}), "streamSid, callSid and accountSid"),
    ],
)
def test_what_is_not_a_twilio_opening_is_refused_with_a_reason(
    message: str | bytes, says: str
) -> None:
    with pytest.raises(StreamError, match=says):
        TwilioStream().opening(message)


def test_a_stream_in_another_audio_format_is_refused() -> None:
    other = orjson.loads(start())
    other["start"]["mediaFormat"]["encoding"] = "audio/l16"
    with pytest.raises(StreamError, match="μ-law 8 kHz"):
        TwilioStream().opening(orjson.dumps(other).decode())


# -- caller → upstream -----------------------------------------------------------------


def test_media_becomes_an_append_with_the_same_base64() -> None:
    stream = streaming()
    payload = bytes(range(160))
    append = stream.from_twilio(media(payload))
    assert isinstance(append, str)
    assert orjson.loads(append) == {
        "type": "input_audio_buffer.append",
        "audio": base64.b64encode(payload).decode(),
    }


@pytest.mark.parametrize("payload", ['abc"}', "not base64!", 5])
def test_media_that_is_not_base64_is_refused(payload: object) -> None:
    # A quote in the payload must never reach the upstream inside the append's JSON.
    with pytest.raises(StreamError, match="base64"):
        streaming().from_twilio(msg("media", media={"payload": payload}))


def test_stop_ends_the_call() -> None:
    out = streaming().from_twilio(msg("stop", stop={"accountSid": "AC1", "callSid": "CA1"}))
    assert isinstance(out, Out) and out.end is End.STOPPED


def test_a_second_start_is_refused() -> None:
    with pytest.raises(StreamError, match="second 'start'"):
        streaming().from_twilio(start())


def test_an_event_twilio_added_later_is_passed_over_and_the_call_goes_on() -> None:
    """Twilio may add events; a call must not end because this code predates one."""
    stream = streaming()
    assert stream.from_twilio(msg("transcription", transcription={"text": "hi"})) is None
    assert stream.from_twilio(msg("media", media={"payload": "AAAA"})).startswith(  # type: ignore[union-attr]
        '{"type":"input_audio_buffer.append"'
    )


def test_a_key_press_becomes_a_user_item_and_a_response() -> None:
    out = streaming().from_twilio(msg("dtmf", dtmf={"track": "inbound_track", "digit": "5"}))
    item, response = upstream(out)  # type: ignore[arg-type]
    assert item["type"] == "conversation.item.create"
    assert item["item"]["role"] == "user"
    assert "pressed 5" in item["item"]["content"][0]["text"]
    assert response == {"type": "response.create"}


def test_a_key_press_during_a_response_adds_only_the_item() -> None:
    stream = streaming()
    stream.from_upstream(event("response.created", response={"id": "r1"}))
    out = stream.from_twilio(msg("dtmf", dtmf={"digit": "#"}))
    assert [e["type"] for e in upstream(out)] == ["conversation.item.create"]  # type: ignore[arg-type]


def test_key_presses_are_ignored_when_dtmf_is_off() -> None:
    assert streaming(dtmf="off").from_twilio(msg("dtmf", dtmf={"digit": "1"})) is None


def test_a_malformed_key_press_is_refused() -> None:
    with pytest.raises(StreamError, match="one key"):
        streaming().from_twilio(msg("dtmf", dtmf={"digit": "12"}))


# -- upstream → caller ---------------------------------------------------------------


def test_each_audio_delta_becomes_media_then_a_mark() -> None:
    stream = streaming()
    first, second = stream.from_upstream(delta(800)), stream.from_upstream(delta(800))
    sent = twilio(first)
    assert [m["event"] for m in sent] == ["media", "mark"]
    assert all(m["streamSid"] == SID for m in sent)
    assert sent[0]["media"]["payload"] == orjson.loads(delta(800))["delta"]  # passed as it came
    assert mark_names(first) != mark_names(second)
    assert stream.unplayed == 2


@pytest.mark.parametrize(
    "kind",
    [
        "session.created",
        "response.output_audio_transcript.delta",
        "conversation.item.added",
        "rate_limits.updated",
        "input_audio_buffer.speech_stopped",
    ],
)
def test_other_events_are_consumed(kind: str) -> None:
    assert streaming().from_upstream(event(kind)) is None


def test_the_relays_own_errors_are_not_sent_to_twilio() -> None:
    stream = streaming()
    error = event("error", error={"code": "relay_draining", "message": "restarting"})
    assert stream.from_upstream(error) is None


def test_transcripts_go_to_a_phone_that_asked_for_them() -> None:
    stream = TwilioStream()
    stream.opening(start(relay_transcripts="1"))
    said = event("response.output_audio_transcript.done", item_id=ITEM, transcript="Hi there.")
    heard = event("conversation.item.input_audio_transcription.completed", transcript="Hello.")
    assert twilio(stream.from_upstream(said)) == [
        {"streamSid": SID, "event": "relay.transcript", "role": "assistant", "text": "Hi there."}
    ]
    assert twilio(stream.from_upstream(heard))[0]["role"] == "caller"
    assert streaming().from_upstream(said) is None  # a stream that did not ask: Twilio itself


# -- barge-in ----------------------------------------------------------------------------


def test_speech_over_unplayed_audio_clears_twilio_and_truncates_at_the_echoed_mark() -> None:
    stream = streaming()
    names = [mark_names(stream.from_upstream(delta(800)))[0] for _ in range(5)]  # 5 x 100 ms
    assert stream.from_twilio(msg("mark", mark={"name": names[1]})) is None  # 200 ms played
    out = stream.from_upstream(event("input_audio_buffer.speech_started", audio_start_ms=0))
    assert twilio(out) == [{"streamSid": SID, "event": "clear"}]
    assert upstream(out) == [
        {
            "type": "conversation.item.truncate",
            "item_id": ITEM,
            "content_index": 0,
            "audio_end_ms": 2 * 800 // BYTES_PER_MS,
        }
    ]
    assert stream.unplayed == 0 and stream.barge_ins == 1


def test_marks_twilio_echoes_at_a_clear_do_not_count_as_heard() -> None:
    stream = streaming()
    names = [mark_names(stream.from_upstream(delta(800)))[0] for _ in range(3)]
    stream.from_twilio(msg("mark", mark={"name": names[0]}))
    stream.from_upstream(event("input_audio_buffer.speech_started"))
    for name in names[1:]:  # echoed at once after the clear
        assert stream.from_twilio(msg("mark", mark={"name": name})) is None
    # The next reply starts from nothing heard.
    next_names = [mark_names(stream.from_upstream(delta(400, "item_reply2")))[0] for _ in range(2)]
    stream.from_twilio(msg("mark", mark={"name": next_names[0]}))
    out = stream.from_upstream(event("input_audio_buffer.speech_started"))
    assert upstream(out)[0]["item_id"] == "item_reply2"
    assert upstream(out)[0]["audio_end_ms"] == 400 // BYTES_PER_MS


def test_a_barge_in_before_any_mark_came_back_truncates_at_zero() -> None:
    stream = streaming()
    stream.from_upstream(delta(800))
    out = stream.from_upstream(event("input_audio_buffer.speech_started"))
    assert upstream(out)[0]["audio_end_ms"] == 0


def test_speech_after_the_reply_has_played_cuts_nothing() -> None:
    stream = streaming()
    [name] = mark_names(stream.from_upstream(delta(800)))
    stream.from_twilio(msg("mark", mark={"name": name}))
    assert stream.from_upstream(event("input_audio_buffer.speech_started")) is None


def test_audio_of_a_cut_item_still_arriving_is_dropped() -> None:
    stream = streaming()
    stream.from_upstream(delta(800))
    stream.from_upstream(event("input_audio_buffer.speech_started"))
    assert stream.from_upstream(delta(800)) is None
    assert twilio(stream.from_upstream(delta(800, "item_next")))[0]["event"] == "media"


def test_the_played_position_counts_each_items_own_audio() -> None:
    stream = streaming()
    [first] = mark_names(stream.from_upstream(delta(1600, "item_a")))
    stream.from_twilio(msg("mark", mark={"name": first}))
    names = [mark_names(stream.from_upstream(delta(320, "item_b")))[0] for _ in range(3)]
    stream.from_twilio(msg("mark", mark={"name": names[1]}))
    out = stream.from_upstream(event("input_audio_buffer.speech_started"))
    assert upstream(out)[0] == {
        "type": "conversation.item.truncate",
        "item_id": "item_b",
        "content_index": 0,
        "audio_end_ms": 640 // BYTES_PER_MS,
    }


# -- goodbye -----------------------------------------------------------------------------


def goodbye_done(response_id: str = "r9") -> str:
    return event(
        "response.done", response={"id": response_id, "metadata": {"relay": "relay_goodbye"}}
    )


def test_no_goodbye_is_said_unless_configured() -> None:
    stream = streaming()
    assert stream.goodbye() is None
    assert stream.from_upstream(event("error", error={"code": "relay_session_ending_soon"})) is None


def test_the_session_warning_asks_for_the_goodbye_and_its_last_mark_ends_the_call() -> None:
    stream = streaming(goodbye="Say goodbye.")
    out = stream.from_upstream(event("error", error={"code": "relay_session_ending_soon"}))
    [request] = upstream(out)
    assert request["type"] == "response.create"
    assert request["response"]["instructions"] == "Say goodbye."
    assert stream.from_twilio(media(bytes(160))) is None  # the caller's audio stops going up
    stream.from_upstream(event("response.created", response={"id": "r9"}))
    names = [mark_names(stream.from_upstream(delta(800)))[0] for _ in range(2)]
    assert stream.from_upstream(goodbye_done()) is None
    assert stream.from_twilio(msg("mark", mark={"name": names[0]})) is None
    out = stream.from_twilio(msg("mark", mark={"name": names[1]}))
    assert isinstance(out, Out) and out.end is End.GOODBYE_SAID


def test_the_goodbye_waits_for_the_response_under_way() -> None:
    stream = streaming(goodbye="Bye.")
    stream.from_upstream(event("response.created", response={"id": "r1"}))
    assert upstream(stream.goodbye()) == []
    assert stream.goodbye_asked
    [request] = upstream(stream.from_upstream(event("response.done", response={"id": "r1"})))
    assert request["event_id"] == "relay_goodbye"


def test_a_goodbye_refused_for_a_response_under_way_is_asked_again_after_it() -> None:
    stream = streaming(goodbye="Bye.")
    stream.goodbye()
    refusal = event(
        "error",
        error={"code": "conversation_already_has_active_response", "event_id": "relay_goodbye"},
    )
    assert stream.from_upstream(refusal) is None
    stream.from_upstream(event("response.created", response={"id": "r1"}))
    [again] = upstream(stream.from_upstream(event("response.done", response={"id": "r1"})))
    assert again["event_id"] == "relay_goodbye"


def test_a_silent_goodbye_ends_the_call_at_once() -> None:
    stream = streaming(goodbye="Bye.")
    stream.goodbye()
    out = stream.from_upstream(goodbye_done())
    assert out is not None and out.end is End.GOODBYE_SAID


# -- signatures --------------------------------------------------------------------------


URL = "https://mycompany.com/myapp.php?foo=1&bar=2"
PARAMS = [
    ("CallSid", "CA1234567890ABCDE"),
    ("Digits", "1234"),
    ("From", "+14158675309"),
    ("To", "+18005551212"),
    ("Caller", "+14158675309"),
]


def test_the_signature_is_the_one_twilios_own_library_computes() -> None:
    # The vectors of twilio-python's request-validator tests (auth token 12345).
    assert request_signature("12345", URL, PARAMS) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="
    repeated = [("Sid", "CA123"), ("SidAccount", "AC123"), ("Digits", "5678"), ("Digits", "1234")]
    assert request_signature("12345", URL, repeated) == "IK+Dwps556ElfBT0I3Rgjkr1wJU="


@pytest.mark.parametrize(
    ("url", "signature"),
    [
        (URL, "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        (URL.replace(".com", ".com:1234"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # port removed
        (URL, "kvajT1Ptam85bY51eRf/AJRuM3w="),  # signed with :443
        (URL.replace("https", "http"), "0ZXoZLH/DfblKGATFgpif+LLRf4="),  # signed with :80
    ],
)
def test_signatures_are_checked_with_and_without_the_port_as_twilio_does(
    url: str, signature: str
) -> None:
    assert signature_matches("12345", url, PARAMS, signature)


def test_a_wrong_or_missing_signature_does_not_match() -> None:
    signed = request_signature("12345", URL, PARAMS)
    assert not signature_matches("12345", URL, PARAMS[1:], signed)  # a parameter less
    assert not signature_matches("54321", URL, PARAMS, signed)  # another account's token
    assert not signature_matches("12345", URL.replace("foo", "fo0"), PARAMS, signed)
    assert not signature_matches("12345", URL, PARAMS, "")
    assert not signature_matches("12345", URL, PARAMS, None)
