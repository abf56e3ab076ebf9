"""The sans-IO session, event by event: no sockets, a hand-driven clock."""

from __future__ import annotations

import base64
import json
import random
import re

import pytest

from mockrealtime.audio import b64encode
from mockrealtime.session import Session

from .helpers import (
    FakeClock,
    append_events,
    make_session,
    only,
    send,
    types,
    user_text,
    wav_pcm16,
)

ID = re.compile(r"^(event|sess|conv|resp|item)_[A-Za-z0-9]{21}$")

GA_TEXT_TURN = [
    "conversation.item.added",
    "conversation.item.done",  # the user item
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "conversation.item.done",
    "response.output_item.done",
    "response.done",
    "rate_limits.updated",
]


def text_turn(session: Session, text: str = "Hello there") -> list[dict]:
    return send(session, user_text(text)) + send(session, {"type": "response.create"})


def test_session_created_is_first_and_carries_the_captured_ga_defaults() -> None:
    _, opening = make_session()
    assert types(opening) == ["session.created"]
    s = opening[0]["session"]
    assert s["type"] == "realtime" and s["object"] == "realtime.session"
    assert s["model"] == "gpt-realtime"
    assert s["output_modalities"] == ["audio"]
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["output"] == {
        "format": {"type": "audio/pcm", "rate": 24000},
        "voice": "alloy",
        "speed": 1.0,
    }
    assert s["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }
    assert s["audio"]["input"]["transcription"] is None
    assert s["audio"]["input"]["noise_reduction"] is None
    assert (s["tools"], s["tool_choice"], s["max_output_tokens"]) == ([], "auto", "inf")
    assert (s["tracing"], s["truncation"], s["prompt"], s["include"]) == (None, "auto", None, None)
    assert s["expires_at"] == 1_700_000_000 + 3600
    assert "temperature" not in s


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_session_created_says_it_comes_from_the_offline_fake(dialect: str) -> None:
    """Beside the session, where a client that shows it to a person can find it; the SDKs'
    models allow fields they do not know (test_openai_sdk_models validates every event)."""
    _, [created] = make_session(dialect=dialect)
    assert created["mockrealtime"].startswith("offline fake of the Realtime API")
    assert "mockrealtime" not in created["session"]


def test_ids_use_the_real_prefixes_and_21_alphanumerics() -> None:
    session, opening = make_session()
    events = opening + text_turn(session)
    ids = [e["event_id"] for e in events] + [opening[0]["session"]["id"]]
    done = only(events, "response.done")["response"]
    ids += [done["id"], done["conversation_id"], done["output"][0]["id"]]
    assert all(ID.match(i) for i in ids), ids
    assert len(set(e["event_id"] for e in events)) == len(events)


def test_same_seed_same_inputs_same_clock_give_identical_events() -> None:
    def run(seed: int) -> list[dict]:
        session, opening = make_session(seed=seed)
        return opening + text_turn(session) + send(session, {"type": "input_audio_buffer.clear"})

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_session_update_is_partial_and_echoes_the_full_effective_config() -> None:
    session, _ = make_session()
    out = send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "Be brief.",
                "audio": {"output": {"voice": "marin"}},
            },
        },
    )
    s = only(out, "session.updated")["session"]
    assert s["instructions"] == "Be brief."
    assert s["audio"]["output"]["voice"] == "marin"
    assert s["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # untouched
    out = send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        },
    )
    s = only(out, "session.updated")["session"]
    assert s["audio"]["input"]["turn_detection"] is None
    assert s["instructions"] == "Be brief." and s["audio"]["output"]["voice"] == "marin"
    assert "event_id" not in s


@pytest.mark.parametrize(
    ("session_body", "code", "param"),
    [
        ({"type": "realtime", "bogus_field": 1}, "unknown_parameter", "session.bogus_field"),
        ({"instructions": "x"}, "missing_required_parameter", "session.type"),
        ({"type": "realtime", "instructions": 5}, "invalid_type", "session.instructions"),
        (
            {
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            },
            "integer_below_min_value",
            "session.audio.input.format.rate",
        ),
        ({"type": "transcription"}, "invalid_value", "session.type"),
        (
            {"type": "realtime", "output_modalities": ["audio", "text"]},
            "invalid_value",
            "session.output_modalities",
        ),
    ],
)
def test_invalid_session_update_is_discarded_whole_with_one_error(
    session_body: dict, code: str, param: str
) -> None:
    session, opening = make_session()
    before = opening[0]["session"]
    body = {**session_body, "instructions": session_body.get("instructions", "changed?")}
    if code == "invalid_type":
        body["instructions"] = 5
    out = send(session, {"type": "session.update", "event_id": "client-1", "session": body})
    error = only(out, "error")["error"]
    assert len(out) == 1
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert error["event_id"] == "client-1"
    assert session.render_session() == before  # nothing applied, not even the instructions


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        (b'{"type": "session.update"}', "invalid_event", None),
        ('{"event_id": "e1"}', "invalid_event", None),
        ('{"type": "no.such.event"}', "invalid_value", "type"),
        ('{"type": "transcription_session.update"}', "invalid_value", "type"),
    ],
)
def test_bad_messages_get_one_error_and_the_session_carries_on(
    message: str | bytes, code: str, param: str | None
) -> None:
    session, _ = make_session()
    out = session.handle(message)
    assert types(out) == ["error"]
    assert (out[0]["error"]["code"], out[0]["error"]["param"]) == (code, param)
    assert session.close_requested is None
    assert types(text_turn(session))[-1] == "rate_limits.updated"


def test_unknown_type_error_lists_the_supported_types() -> None:
    session, _ = make_session()
    message = send(session, {"type": "nope"})[0]["error"]["message"]
    assert message.startswith("Invalid value: 'nope'. Supported values are: 'session.update'")
    assert "'response.cancel'" in message


def test_text_turn_follows_the_ga_event_order_and_ends_with_usage() -> None:
    session, _ = make_session()
    out = text_turn(session, "What is the weather like?")
    assert types(out) == GA_TEXT_TURN
    deltas = [e for e in out if e["type"] == "response.output_audio.delta"]
    transcript = "".join(
        e["delta"] for e in out if e["type"] == "response.output_audio_transcript.delta"
    )
    assert deltas and transcript.startswith("You said: What is the weather like?")
    assert only(out, "response.output_audio_transcript.done")["transcript"] == transcript
    audio = b"".join(base64.b64decode(e["delta"]) for e in deltas)
    assert len(audio) == 4800 * len(deltas)  # 100 ms of PCM16 24 kHz per delta
    done = only(out, "response.done")["response"]
    assert done["status"] == "completed" and done["status_details"] is None
    assert done["conversation_id"] == session.conversation_id
    assert done["output"][0]["content"] == [{"type": "output_audio", "transcript": transcript}]
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    assert usage["output_token_details"]["audio_tokens"] > 0
    ids = {e.get("response_id") for e in out if "response_id" in e}
    assert ids == {done["id"]}


def test_usage_grows_with_the_conversation() -> None:
    session, _ = make_session()
    first = only(text_turn(session, "Hi"), "response.done")["response"]["usage"]
    second = only(
        text_turn(session, "Tell me more about this please, at some length"), "response.done"
    )["response"]["usage"]
    assert second["input_tokens"] > first["input_tokens"]
    assert second["output_tokens"] >= first["output_tokens"]
    assert second["input_token_details"]["cached_tokens"] <= second["input_tokens"]


def test_reply_audio_is_paced_by_the_clock() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=4.0, clock=clock)
    out = text_turn(session)
    assert types(out) == GA_TEXT_TURN[:6]  # only the head of the response so far
    first_audio = [e for e in out if e["type"] == "response.output_audio.delta"]
    assert len(first_audio) == 1
    emitted: list[dict] = list(out)
    steps = 0
    while (deadline := session.next_deadline()) is not None and deadline < 1000:
        steps += 1
        assert steps < 500
        clock.now = deadline
        emitted += session.tick()
    assert types(emitted) == GA_TEXT_TURN
    n_audio = sum(e["type"] == "response.output_audio.delta" for e in emitted)
    assert clock.now == pytest.approx((n_audio - 1) * 0.1 / 4.0)


def test_commit_below_100ms_is_an_error_and_clear_empties_the_buffer() -> None:
    session, _ = make_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        },
    )
    for msg in append_events(b"\x01\x00" * 2000):  # 83 ms
        assert session.handle(msg) == []
    err = only(send(session, {"type": "input_audio_buffer.commit"}), "error")["error"]
    assert err["code"] == "input_audio_buffer_commit_empty"
    assert "buffer only has 83.33ms of audio" in err["message"]
    assert types(send(session, {"type": "input_audio_buffer.clear"})) == [
        "input_audio_buffer.cleared"
    ]
    assert only(send(session, {"type": "input_audio_buffer.commit"}), "error")["error"][
        "message"
    ].endswith("buffer only has 0.00ms of audio.")


def test_manual_commit_creates_a_user_audio_item_without_a_response() -> None:
    session, _ = make_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
        },
    )
    for msg in append_events(wav_pcm16()):
        session.handle(msg)
    out = send(session, {"type": "input_audio_buffer.commit"})
    assert types(out) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    committed = out[0]
    assert committed["previous_item_id"] is None
    item = out[1]["item"]
    assert item["id"] == committed["item_id"]
    assert item["content"] == [{"type": "input_audio", "transcript": None}]
    reply = send(session, {"type": "response.create"})
    assert (
        "I heard 3.0 seconds of audio."
        in only(reply, "response.output_audio_transcript.done")["transcript"]
    )


def test_server_vad_turn_from_speech_fixture() -> None:
    session, _ = make_session()
    out: list[dict] = []
    for msg in append_events(wav_pcm16()):
        out += session.handle(msg)
    assert (
        types(out)
        == [
            "input_audio_buffer.speech_started",
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        + GA_TEXT_TURN[2:]
    )
    started, stopped = out[0], out[1]
    # the fixture has 0.3 s of leading silence; 300 ms of prefix padding puts the start near 0
    assert 0 <= started["audio_start_ms"] <= 100
    # 0.8 s of trailing silence: the stop (which includes 200 ms of silence) is before the end
    assert 1500 < stopped["audio_end_ms"] < 2998 - 500
    assert started["item_id"] == stopped["item_id"] == out[2]["item_id"] == out[3]["item"]["id"]
    retrieved = only(
        send(session, {"type": "conversation.item.retrieve", "item_id": started["item_id"]}),
        "conversation.item.retrieved",
    )
    audio = base64.b64decode(retrieved["item"]["content"][0]["audio"])
    assert len(audio) == (stopped["audio_end_ms"] - started["audio_start_ms"]) * 48


def test_silence_alone_never_triggers_the_vad() -> None:
    session, _ = make_session()
    for msg in append_events(b"\x00\x00" * 24000 * 3):
        assert session.handle(msg) == []


def test_vad_with_create_response_off_commits_without_responding() -> None:
    session, _ = make_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "create_response": False}}
                },
            },
        },
    )
    out = [e for msg in append_events(wav_pcm16()) for e in session.handle(msg)]
    assert types(out)[-1] == "conversation.item.done"
    assert "response.created" not in types(out)


def test_second_response_while_one_is_active_is_rejected() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=1.0, clock=clock)
    text_turn(session)
    err = only(send(session, {"type": "response.create", "event_id": "again"}), "error")["error"]
    assert err["code"] == "conversation_already_has_active_response"
    assert err["event_id"] == "again"
    assert re.search(r"in progress: resp_[A-Za-z0-9]{21}\.", err["message"])


def test_response_cancel_closes_the_open_parts_with_status_cancelled() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=1.0, clock=clock)
    head = text_turn(session)
    out = send(session, {"type": "response.cancel"})
    assert types(out) == GA_TEXT_TURN[6:]
    done = only(out, "response.done")["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
    assert done["output"][0]["status"] == "incomplete"
    sent = "".join(
        e["delta"] for e in head if e["type"] == "response.output_audio_transcript.delta"
    )
    assert only(out, "response.output_audio_transcript.done")["transcript"] == sent
    assert session.next_deadline() == pytest.approx(3600.0)  # nothing else pending
    err = only(send(session, {"type": "response.cancel"}), "error")["error"]
    assert err["code"] == "response_cancel_not_active"


def test_speech_during_a_response_interrupts_it() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=1.0, clock=clock)
    text_turn(session)
    out: list[dict] = []
    for msg in append_events(wav_pcm16()[: 48 * 1200]):
        out += session.handle(msg)
    assert types(out)[0] == "input_audio_buffer.speech_started"
    done = only(out, "response.done")["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert not session.has_active_response


def test_out_of_band_response_runs_beside_the_default_conversation() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=1.0, clock=clock)
    text_turn(session)
    out = send(
        session,
        {
            "type": "response.create",
            "response": {
                "conversation": "none",
                "output_modalities": ["text"],
                "metadata": {"topic": "x"},
                "input": [
                    {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Classify this"}],
                    }
                ],
            },
        },
    )
    created = only(out, "response.created")["response"]
    assert created["conversation_id"] is None and created["metadata"] == {"topic": "x"}
    assert "conversation.item.added" not in types(out)
    assert len(session.items) == 2  # the user item and the in-band reply only


def test_text_modality_streams_output_text() -> None:
    session, _ = make_session()
    send(
        session,
        {"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"]}},
    )
    out = text_turn(session)
    assert types(out) == [
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
        "response.output_item.added",
        "conversation.item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.content_part.done",
        "conversation.item.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    text = "".join(e["delta"] for e in out if e["type"] == "response.output_text.delta")
    assert only(out, "response.output_text.done")["text"] == text
    assert only(out, "response.content_part.added")["part"] == {"type": "text", "text": ""}


def test_max_output_tokens_cuts_the_reply_and_marks_it_incomplete() -> None:
    session, _ = make_session()
    send(session, user_text("Hello"))
    out = send(session, {"type": "response.create", "response": {"max_output_tokens": 5}})
    done = only(out, "response.done")["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
    assert done["usage"]["output_tokens"] <= 5


def test_named_tool_choice_yields_a_function_call_with_schema_valid_arguments() -> None:
    session, _ = make_session()
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "required": ["city", "unit"],
            "properties": {
                "city": {"type": "string"},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },
        },
    }
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "tools": [tool],
                "tool_choice": {"type": "function", "name": "get_weather"},
            },
        },
    )
    out = text_turn(session, "Weather in Paris?")
    args_done = only(out, "response.function_call_arguments.done")
    args = json.loads(args_done["arguments"])
    assert isinstance(args["city"], str) and args["unit"] in ("c", "f") and 1 <= args["days"] <= 3
    assert args_done["name"] == "get_weather"
    deltas = "".join(
        e["delta"] for e in out if e["type"] == "response.function_call_arguments.delta"
    )
    assert deltas == args_done["arguments"]
    item = only(out, "response.output_item.done")["item"]
    assert item["type"] == "function_call" and item["call_id"] == args_done["call_id"]
    follow = send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "type": "function_call_output",
                "call_id": item["call_id"],
                "output": '{"temp": 21}',
            },
        },
    )
    assert types(follow) == ["conversation.item.added", "conversation.item.done"]
    reply = send(session, {"type": "response.create"})
    assert "The tool returned" in only(reply, "response.output_audio_transcript.done")["transcript"]


def test_function_call_output_for_an_unknown_call_is_rejected() -> None:
    session, _ = make_session()
    out = send(
        session,
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "call_nope", "output": "x"},
        },
    )
    assert only(out, "error")["error"]["param"] == "item.call_id"


def test_items_can_be_prepended_inserted_deleted_and_retrieved() -> None:
    session, _ = make_session()
    a = only(send(session, user_text("a")), "conversation.item.added")["item"]["id"]
    b = send(session, user_text("b", previous_item_id="root"))[0]
    assert b["previous_item_id"] is None
    c = send(session, user_text("c", previous_item_id=a))[0]
    assert c["previous_item_id"] == a
    assert [i["content"][0]["text"] for i in session.items] == ["b", "a", "c"]
    err = only(send(session, user_text("d", previous_item_id="item_missing")), "error")["error"]
    assert err["param"] == "previous_item_id"
    assert types(send(session, {"type": "conversation.item.delete", "item_id": a})) == [
        "conversation.item.deleted"
    ]
    for kind in ("conversation.item.delete", "conversation.item.retrieve"):
        assert (
            only(send(session, {"type": kind, "item_id": a}), "error")["error"]["code"]
            == "item_not_found"
        )


def test_truncate_only_applies_to_assistant_audio_within_its_length() -> None:
    session, _ = make_session()
    out = text_turn(session)
    item_id = only(out, "response.output_item.done")["item"]["id"]
    n = sum(e["type"] == "response.output_audio.delta" for e in out)
    ok = send(
        session,
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": 150,
        },
    )
    assert only(ok, "conversation.item.truncated")["audio_end_ms"] == 150
    too_long = send(
        session,
        {
            "type": "conversation.item.truncate",
            "item_id": item_id,
            "content_index": 0,
            "audio_end_ms": n * 100 + 1,
        },
    )
    assert only(too_long, "error")["error"]["param"] == "audio_end_ms"
    user_id = session.items[0]["id"]
    wrong = send(
        session,
        {
            "type": "conversation.item.truncate",
            "item_id": user_id,
            "content_index": 0,
            "audio_end_ms": 0,
        },
    )
    assert only(wrong, "error")["error"]["code"] == "unsupported_content_type"


def test_max_session_duration_closes_with_1001() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(clock=clock, max_duration=60.0)
    assert session.next_deadline() == 60.0
    clock.now = 60.0
    assert session.tick() == []
    assert session.close_requested == (1001, "Your session hit the maximum duration of 1 minutes.")


def test_beta_dialect_uses_flat_session_and_beta_event_names() -> None:
    session, opening = make_session("beta")
    s = opening[0]["session"]
    assert s["modalities"] == ["text", "audio"] and s["input_audio_format"] == "pcm16"
    assert s["turn_detection"]["silence_duration_ms"] == 200 and "type" not in s
    out = text_turn(session)
    assert types(out) == [
        "conversation.item.created",
        "response.created",
        "response.output_item.added",
        "conversation.item.created",
        "response.content_part.added",
        "response.audio.done",
        "response.audio_transcript.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    assert [r["name"] for r in out[-1]["rate_limits"]] == ["requests", "tokens"]
    assert only(out, "response.output_item.done")["item"]["content"][0]["type"] == "audio"


def test_beta_session_expiry_sends_session_expired_first() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session("beta", clock=clock, max_duration=1800.0)
    clock.now = 1800.0
    out = session.tick()
    assert out[0]["error"]["code"] == "session_expired"
    assert "30 minutes" in out[0]["error"]["message"]
    assert session.close_requested is not None


def test_input_transcription_events_follow_the_committed_item() -> None:
    session, _ = make_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            },
        },
    )
    out = [e for msg in append_events(wav_pcm16()) for e in session.handle(msg)]
    kinds = types(out, deltas=True)
    i = kinds.index("conversation.item.input_audio_transcription.completed")
    assert (
        kinds.index("conversation.item.done")
        < kinds.index("conversation.item.input_audio_transcription.delta")
        < i
    )
    completed = out[i]
    deltas = "".join(
        e["delta"] for e in out if e["type"] == "conversation.item.input_audio_transcription.delta"
    )
    assert completed["transcript"] == deltas and completed["usage"]["type"] == "tokens"


def test_g711_input_drives_the_vad_too() -> None:
    from .helpers import wav_ulaw

    session, _ = make_session()
    send(
        session,
        {
            "type": "session.update",
            "session": {"type": "realtime", "audio": {"input": {"format": {"type": "audio/pcmu"}}}},
        },
    )
    out = []
    for piece in [wav_ulaw()[i : i + 160] for i in range(0, len(wav_ulaw()), 160)]:
        out += send(session, {"type": "input_audio_buffer.append", "audio": b64encode(piece)})
    assert types(out)[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]


def test_idle_timeout_triggers_a_response_after_silence() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(clock=clock)
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5000}}
                },
            },
        },
    )
    text_turn(session)
    deadline = session.next_deadline()
    assert deadline is not None and deadline > 5.0
    clock.now = deadline
    out = session.tick()
    assert types(out)[:4] == [
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert "response.created" in types(out)


def test_session_is_deterministic_across_instances_with_the_same_seed() -> None:
    a = Session("ga", "gpt-realtime", FakeClock(), random.Random(3))
    b = Session("ga", "gpt-realtime", FakeClock(), random.Random(3))
    assert a.open() == b.open()
