"""More of the sans-IO session: dialect details, VAD options, tools, overrides, robustness."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mockrealtime.audio import b64encode

from .helpers import FakeClock, append_events, make_session, only, send, types, user_text, wav_pcm16


def update(session: Any, **body: Any) -> list[dict]:
    if session.dialect == "ga":
        body.setdefault("type", "realtime")
    return send(session, {"type": "session.update", "session": body})


def vad_turn(session: Any, pcm: bytes | None = None) -> list[dict]:
    return [
        e for m in append_events(wav_pcm16() if pcm is None else pcm) for e in session.handle(m)
    ]


def test_semantic_vad_is_treated_like_server_vad() -> None:
    session, _ = make_session()
    s = only(
        update(
            session,
            audio={"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}},
        ),
        "session.updated",
    )["session"]
    assert s["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "high",
        "create_response": True,
        "interrupt_response": True,
    }
    kinds = types(vad_turn(session))
    assert kinds[:3] == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
    ]
    assert "response.done" in kinds


def test_turn_detection_replaces_the_whole_object_with_defaults_filled_in() -> None:
    session, _ = make_session()
    s = only(
        update(session, audio={"input": {"turn_detection": {"silence_duration_ms": 800}}}),
        "session.updated",
    )["session"]
    td = s["audio"]["input"]["turn_detection"]
    assert (
        td["silence_duration_ms"] == 800 and td["threshold"] == 0.5 and td["type"] == "server_vad"
    )


def test_vad_options_reach_the_detector() -> None:
    session, _ = make_session()
    update(
        session,
        audio={
            "input": {
                "turn_detection": {
                    "type": "server_vad",
                    "prefix_padding_ms": 100,
                    "silence_duration_ms": 500,
                }
            }
        },
    )
    out = vad_turn(session)
    assert only(out, "input_audio_buffer.speech_started")["audio_start_ms"] == 250
    assert only(out, "input_audio_buffer.speech_stopped")["audio_end_ms"] == 2450
    session, _ = make_session()
    update(session, audio={"input": {"turn_detection": {"type": "server_vad", "threshold": 1.0}}})
    assert vad_turn(session) == []


def test_audio_start_ms_counts_all_audio_appended_this_session() -> None:
    session, _ = make_session()
    update(
        session,
        audio={"input": {"turn_detection": {"type": "server_vad", "create_response": False}}},
    )
    first = vad_turn(session)
    second = vad_turn(session)
    a = only(first, "input_audio_buffer.speech_started")["audio_start_ms"]
    b = only(second, "input_audio_buffer.speech_started")["audio_start_ms"]
    assert abs((b - a) - len(wav_pcm16()) / 48) <= 10  # within one 10 ms VAD frame
    assert (
        only(second, "input_audio_buffer.committed")["previous_item_id"]
        == only(first, "input_audio_buffer.committed")["item_id"]
    )


def test_interrupt_response_false_lets_the_response_finish() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(pace=1.0, clock=clock)
    update(
        session,
        audio={"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}},
    )
    send(session, user_text("Hi"))
    send(session, {"type": "response.create"})
    out = vad_turn(session)
    assert "input_audio_buffer.speech_started" in types(out)
    assert "response.done" not in types(out) and session.has_active_response


def test_voice_cannot_change_once_assistant_audio_exists() -> None:
    session, _ = make_session()
    assert types(update(session, audio={"output": {"voice": "verse"}})) == ["session.updated"]
    send(session, user_text("Hi"))
    send(session, {"type": "response.create"})
    err = only(update(session, audio={"output": {"voice": "ash"}}), "error")["error"]
    assert err["code"] == "cannot_update_voice"
    assert types(update(session, instructions="fine")) == ["session.updated"]


def test_response_overrides_change_only_that_response() -> None:
    session, _ = make_session()
    send(session, user_text("Hi"))
    out = send(
        session,
        {
            "type": "response.create",
            "response": {
                "audio": {"output": {"format": {"type": "audio/pcmu"}, "voice": "echo"}},
                "instructions": "whisper",
                "metadata": {"k": "v"},
            },
        },
    )
    created = only(out, "response.created")["response"]
    assert created["audio"]["output"] == {"format": {"type": "audio/pcmu"}, "voice": "echo"}
    deltas = [
        base64.b64decode(e["delta"]) for e in out if e["type"] == "response.output_audio.delta"
    ]
    assert deltas and all(len(d) == 800 for d in deltas)  # 100 ms of 8 kHz μ-law
    assert session.render_session()["audio"]["output"]["voice"] == "alloy"
    err = only(
        send(session, {"type": "response.create", "response": {"modalities": ["text"]}}), "error"
    )["error"]
    assert err["code"] == "unknown_parameter" and err["param"] == "response.modalities"


TOOL = {
    "type": "function",
    "name": "lookup_order",
    "description": "Find an order",
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
    },
}


@pytest.mark.parametrize(
    ("choice", "text", "calls"),
    [
        ("required", "hello", True),
        ("auto", "please lookup order 42", True),
        ("auto", "hello", False),
        ("none", "lookup_order now", False),
    ],
)
def test_tool_choice_policy(choice: str, text: str, calls: bool) -> None:
    session, _ = make_session()
    update(session, tools=[TOOL], tool_choice=choice)
    send(session, user_text(text))
    out = send(session, {"type": "response.create"})
    assert ("response.function_call_arguments.done" in types(out)) == calls
    if calls:
        args = json.loads(only(out, "response.function_call_arguments.done")["arguments"])
        assert isinstance(args["order_id"], str)


def test_unknown_named_tool_is_rejected() -> None:
    session, _ = make_session()
    out = send(
        session,
        {
            "type": "response.create",
            "response": {"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}},
        },
    )
    assert only(out, "error")["error"]["param"] == "response.tool_choice"


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ({"role": "user", "content": []}, "item.type"),
        ({"type": "message", "content": []}, "item.role"),
        (
            {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]},
            "item.content[0].type",
        ),
        (
            {"type": "message", "role": "assistant", "content": [{"type": "output_audio"}]},
            "item.content[0].type",
        ),
        ({"type": "message", "role": "user", "content": "hi"}, "item.content"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "item.call_id"),
    ],
)
def test_invalid_items_are_rejected_with_the_offending_param(item: dict, param: str) -> None:
    session, _ = make_session()
    out = send(session, {"type": "conversation.item.create", "item": item})
    assert only(out, "error")["error"]["param"] == param
    assert session.items == []


def test_client_audio_items_are_retrievable_but_added_without_audio_bytes() -> None:
    session, _ = make_session()
    audio = b64encode(b"\x00\x01" * 2400)
    out = send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "id": "my_item",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_audio", "audio": audio}],
            },
        },
    )
    assert out[0]["item"]["id"] == "my_item"
    assert out[0]["item"]["content"] == [{"type": "input_audio", "transcript": None}]
    got = only(
        send(session, {"type": "conversation.item.retrieve", "item_id": "my_item"}),
        "conversation.item.retrieved",
    )["item"]
    assert got["content"][0]["audio"] == audio
    dup = send(
        session,
        {
            "type": "conversation.item.create",
            "item": {
                "id": "my_item",
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "x"}],
            },
        },
    )
    assert only(dup, "error")["error"]["param"] == "item.id"


def test_beta_session_update_validates_the_flat_shape() -> None:
    session, _ = make_session("beta")
    out = update(
        session,
        modalities=["text"],
        input_audio_format="g711_ulaw",
        temperature=0.7,
        input_audio_transcription={"model": "whisper-1"},
    )
    s = only(out, "session.updated")["session"]
    assert (s["modalities"], s["input_audio_format"], s["temperature"]) == (
        ["text"],
        "g711_ulaw",
        0.7,
    )
    assert s["input_audio_transcription"]["model"] == "whisper-1"
    err = only(update(session, audio={"input": {}}), "error")["error"]
    assert (err["code"], err["param"]) == ("unknown_parameter", "session.audio")
    err = only(update(session, temperature=2.0), "error")["error"]
    assert err["code"] == "decimal_above_max_value"
    err = only(update(session, input_audio_format="opus"), "error")["error"]
    assert err["code"] == "invalid_value"


def test_beta_text_turn_uses_response_text_events() -> None:
    session, _ = make_session("beta")
    update(session, modalities=["text"])
    out = send(session, user_text("Hi")) + send(session, {"type": "response.create"})
    assert "response.text.done" in types(out)
    assert only(out, "response.output_item.done")["item"]["content"][0]["type"] == "text"
    assert "temperature" in only(out, "response.done")["response"]


def test_beta_transcription_session_update_is_accepted_only_in_beta() -> None:
    session, _ = make_session("beta")
    out = send(
        session,
        {
            "type": "transcription_session.update",
            "session": {"input_audio_transcription": {"model": "gpt-4o-mini-transcribe"}},
        },
    )
    s = only(out, "transcription_session.updated")["session"]
    assert s["object"] == "realtime.transcription_session"
    assert s["input_audio_transcription"]["model"] == "gpt-4o-mini-transcribe"


def test_ga_transcription_intent_transcribes_without_responding() -> None:
    from mockrealtime.session import Session

    session = Session(
        "ga", "", FakeClock(), __import__("random").Random(0), pace=0, intent="transcription"
    )
    s = session.open()[0]["session"]
    assert s["type"] == "transcription" and s["object"] == "realtime.transcription_session"
    assert "model" not in s
    send(
        session,
        {
            "type": "session.update",
            "session": {
                "type": "transcription",
                "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
            },
        },
    )
    kinds = types(vad_turn(session))
    assert kinds == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "conversation.item.input_audio_transcription.completed",
    ]
    err = only(send(session, {"type": "response.create"}), "error")["error"]
    assert err["code"] == "invalid_value"
    err = only(send(session, {"type": "session.update", "session": {"type": "realtime"}}), "error")[
        "error"
    ]
    assert "realtime session update event to a transcription session" in err["message"]


def test_top_level_unknown_fields_are_rejected() -> None:
    session, _ = make_session()
    err = only(send(session, {"type": "input_audio_buffer.clear", "extra": 1}), "error")["error"]
    assert (err["code"], err["param"]) == ("unknown_parameter", "extra")


def test_bad_base64_audio_is_an_error() -> None:
    session, _ = make_session()
    err = only(send(session, {"type": "input_audio_buffer.append", "audio": "@@@"}), "error")
    assert err["error"]["param"] == "audio"


# --- robustness -------------------------------------------------------------------------

_client_events = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                [
                    "session.update",
                    "input_audio_buffer.append",
                    "input_audio_buffer.commit",
                    "input_audio_buffer.clear",
                    "conversation.item.create",
                    "conversation.item.truncate",
                    "conversation.item.delete",
                    "conversation.item.retrieve",
                    "response.create",
                    "response.cancel",
                    "no.such",
                ]
            )
        },
        optional={
            "session": st.dictionaries(
                st.sampled_from(
                    ["type", "instructions", "audio", "tools", "output_modalities", "bogus"]
                ),
                st.one_of(
                    st.none(),
                    st.text(max_size=5),
                    st.integers(),
                    st.just("realtime"),
                    st.just(["text"]),
                ),
            ),
            "audio": st.binary(max_size=2000).map(b64encode),
            "item_id": st.sampled_from(["item_x", "root"]),
            "item": st.just(
                {
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "hi"}],
                }
            ),
            "response": st.one_of(
                st.none(), st.just({"conversation": "none"}), st.just({"max_output_tokens": 3})
            ),
            "audio_end_ms": st.integers(-5, 5000),
            "content_index": st.integers(0, 1),
        },
    ),
    st.text(max_size=20),
    st.binary(max_size=8),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_client_events, st.floats(0, 0.5)), max_size=25))
def test_any_client_input_yields_well_formed_events_and_no_crash(
    steps: list[tuple[Any, float]],
) -> None:
    clock = FakeClock(0.0)
    session, opening = make_session(pace=2.0, clock=clock)
    emitted = list(opening)
    for message, dt in steps:
        clock.now += dt
        raw = json.dumps(message) if isinstance(message, dict) else message
        emitted += session.handle(raw)
    for _ in range(10_000):
        deadline = session.next_deadline()
        if deadline is None or deadline >= 3600:
            break
        clock.now = max(clock.now, deadline)
        emitted += session.tick()
    for event in emitted:
        assert event["event_id"].startswith("event_")
        json.dumps(event)
        if event["type"] == "error":
            assert set(event["error"]) == {"type", "code", "message", "param", "event_id"}
    created = [e["response"]["id"] for e in emitted if e["type"] == "response.created"]
    done = [e["response"]["id"] for e in emitted if e["type"] == "response.done"]
    assert sorted(created) == sorted(done)  # every response ends, exactly once
    assert not session.has_active_response


def test_response_delay_holds_back_the_first_delta() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(clock=clock, pace=0.0, response_delay=0.4)
    send(session, user_text("Hi"))
    head = send(session, {"type": "response.create"})
    assert types(head, deltas=True)[-1] == "response.content_part.added"
    assert session.next_deadline() == pytest.approx(0.4)
    clock.now = 0.4
    assert types(session.tick())[-1] == "rate_limits.updated"


def test_obfuscation_pads_ga_delta_events_only() -> None:
    session, _ = make_session(obfuscation=True)
    out = send(session, user_text("Hi")) + send(session, {"type": "response.create"})
    deltas = [e for e in out if e["type"].endswith(".delta")]
    assert deltas and all(isinstance(e["obfuscation"], str) and e["obfuscation"] for e in deltas)
    assert not any("obfuscation" in e for e in out if not e["type"].endswith(".delta"))


def test_reply_sentences_lengthen_the_reply_audio() -> None:
    def audio_chunks(n: int) -> int:
        session, _ = make_session(reply_sentences=n)
        out = send(session, user_text("Hi")) + send(session, {"type": "response.create"})
        return sum(e["type"] == "response.output_audio.delta" for e in out)

    assert audio_chunks(0) < audio_chunks(1) < audio_chunks(5)


@pytest.mark.parametrize(
    "metadata",
    [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}, {"k": 1}],
)
def test_response_metadata_limits(metadata: dict[str, Any]) -> None:
    session, _ = make_session()
    out = send(session, {"type": "response.create", "response": {"metadata": metadata}})
    assert only(out, "error")["error"]["param"].startswith("response.metadata")
    assert not session.has_active_response


def test_old_input_audio_is_forgotten_beyond_the_retention_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mockrealtime.session as session_module

    monkeypatch.setattr(session_module, "MAX_RETAINED_AUDIO_BYTES", 200_000)
    session, _ = make_session()
    update(session, audio={"input": {"turn_detection": None}})
    ids = []
    for _ in range(3):
        for msg in append_events(wav_pcm16()):  # ~144 kB each
            session.handle(msg)
        ids.append(only(send(session, {"type": "input_audio_buffer.commit"}),
                        "input_audio_buffer.committed")["item_id"])  # fmt: skip
    retrieved = [
        only(
            send(session, {"type": "conversation.item.retrieve", "item_id": i}),
            "conversation.item.retrieved",
        )["item"]["content"][0]  # fmt: skip
        for i in ids
    ]
    assert ["audio" in part for part in retrieved] == [False, False, True]
    reply = send(session, {"type": "response.create"})
    usage = only(reply, "response.done")["response"]["usage"]
    assert usage["input_token_details"]["audio_tokens"] == 3 * 30  # lengths still count


def test_changing_the_input_format_drops_audio_buffered_in_the_old_one() -> None:
    session, _ = make_session()
    update(session, audio={"input": {"turn_detection": None}})
    for msg in append_events(b"\x00\x01" * 4800):  # 200 ms of PCM16
        session.handle(msg)
    update(session, audio={"input": {"format": {"type": "audio/pcmu"}}})
    err = only(send(session, {"type": "input_audio_buffer.commit"}), "error")["error"]
    assert err["code"] == "input_audio_buffer_commit_empty"
