"""The sans-IO session against the protocol's tables: every client event type, every error
code, and the event order of each kind of turn (connect, voice turn, text turn, barge-in and
cancel, function call, transcription session), pinned for both dialects.

Runs of delta events are folded into one ``deltas(...)`` entry naming the delta types seen,
so a pinned order says where the deltas come without depending on how many there are.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from mockrealtime.handshake import Rejection
from mockrealtime.session import Session

from .helpers import (
    DELTA_TYPES,
    FakeClock,
    append_events,
    make_session,
    only,
    send,
    types,
    user_text,
    wav_pcm16,
)

DIALECTS = ("ga", "beta")
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


class Names:
    """Event names that differ between the GA and beta dialects."""

    def __init__(self, dialect: str) -> None:
        ga = dialect == "ga"
        self.item = ["conversation.item.added", "conversation.item.done"] if ga else [
            "conversation.item.created"
        ]
        self.item_added = "conversation.item.added" if ga else "conversation.item.created"
        self.item_done = ["conversation.item.done"] if ga else []
        self.audio = "response.output_audio" if ga else "response.audio"
        self.transcript = "response.output_audio_transcript" if ga else "response.audio_transcript"
        self.text = "response.output_text" if ga else "response.text"
        self.output_audio = "output_audio" if ga else "audio"


def shape(events: list[dict[str, Any]]) -> list[str]:
    """Event types, each run of delta events folded into ``deltas(<sorted types>)``."""
    out: list[str] = []
    run: set[str] = set()
    for event in events:
        if event["type"] in DELTA_TYPES:
            run.add(event["type"])
            continue
        if run:
            out.append(f"deltas({', '.join(sorted(run))})")
            run = set()
        out.append(event["type"])
    if run:
        out.append(f"deltas({', '.join(sorted(run))})")
    return out


def deltas(*kinds: str) -> str:
    return f"deltas({', '.join(sorted(kinds))})"


def update(session: Session, **body: Any) -> list[dict[str, Any]]:
    if session.dialect == "ga":
        body.setdefault("type", "realtime")
    return send(session, {"type": "session.update", "session": body})


def speak(session: Session, pcm: bytes | None = None) -> list[dict[str, Any]]:
    """Append the speech fixture (or ``pcm``) in 20 ms pieces; return every event."""
    data = wav_pcm16() if pcm is None else pcm
    return [e for message in append_events(data) for e in session.handle(message)]


def text_only(session: Session) -> list[dict[str, Any]]:
    if session.dialect == "ga":
        return update(session, output_modalities=["text"])
    return update(session, modalities=["text"])


# --- every client event type ------------------------------------------------------------------


def _assistant_audio_item(session: Session) -> str:
    out = send(session, user_text("Hi")) + send(session, {"type": "response.create"})
    return str(only(out, "response.output_item.done")["item"]["id"])


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_client_event_type_gets_its_documented_reply(dialect: str) -> None:
    n = Names(dialect)
    session, _ = make_session(dialect)
    assert types(update(session, instructions="Be brief.")) == ["session.updated"]
    assert speak(session, b"\x00\x00" * 2400) == []  # input_audio_buffer.append: no ack
    if dialect == "ga":
        update(session, audio={"input": {"turn_detection": None}})
    else:
        update(session, turn_detection=None)
    speak(session, b"\x00\x00" * 4800)  # 200 ms, committed by hand
    assert types(send(session, {"type": "input_audio_buffer.commit"})) == [
        "input_audio_buffer.committed",
        *n.item,
    ]
    assert types(send(session, {"type": "input_audio_buffer.clear"})) == [
        "input_audio_buffer.cleared"
    ]
    added = send(session, user_text("Hello"))
    assert types(added) == n.item
    item_id = added[0]["item"]["id"]
    assert types(send(session, {"type": "conversation.item.retrieve", "item_id": item_id})) == [
        "conversation.item.retrieved"
    ]
    assert types(send(session, {"type": "conversation.item.delete", "item_id": item_id})) == [
        "conversation.item.deleted"
    ]
    assistant = _assistant_audio_item(session)
    truncate = {"item_id": assistant, "content_index": 0, "audio_end_ms": 100}
    assert types(send(session, {"type": "conversation.item.truncate", **truncate})) == [
        "conversation.item.truncated"
    ]
    paced, _ = make_session(dialect, pace=1.0, clock=FakeClock(0.0))
    send(paced, user_text("Hi"))
    assert types(send(paced, {"type": "response.create"}))[0] == "response.created"
    done = only(send(paced, {"type": "response.cancel"}), "response.done")
    assert done["response"]["status"] == "cancelled"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_output_audio_buffer_clear_is_webrtc_only_and_rejected_over_websocket(
    dialect: str,
) -> None:
    session, _ = make_session(dialect)
    error = only(send(session, {"type": "output_audio_buffer.clear", "event_id": "c1"}), "error")
    assert (error["error"]["code"], error["error"]["param"]) == ("invalid_value", "type")
    assert error["error"]["event_id"] == "c1"
    assert session.close_requested is None


def test_session_close_ends_a_ga_session_quietly_with_1000() -> None:
    session, _ = make_session("ga")
    assert send(session, {"type": "session.close"}) == []
    assert session.close_requested == (1000, "")
    assert send(session, user_text("Anyone there?")) == []  # closed: nothing more happens
    assert session.next_deadline() is None


def test_session_close_is_unknown_to_the_beta_dialect() -> None:
    session, _ = make_session("beta")
    error = only(send(session, {"type": "session.close"}), "error")["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "type")
    assert session.close_requested is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_response_cancel_with_a_response_id_stops_that_response_only(dialect: str) -> None:
    session, _ = make_session(dialect, pace=1.0, clock=FakeClock(0.0))
    send(session, user_text("Hi"))
    inband = only(send(session, {"type": "response.create"}), "response.created")["response"]
    oob = only(
        send(session, {"type": "response.create", "response": {"conversation": "none"}}),
        "response.created",
    )["response"]
    done = only(
        send(session, {"type": "response.cancel", "response_id": oob["id"]}), "response.done"
    )["response"]
    assert done["id"] == oob["id"] and done["status"] == "cancelled"
    assert done["conversation_id"] is None
    assert session.has_active_response  # the in-band response carries on
    error = only(
        send(session, {"type": "response.cancel", "response_id": "resp_gone", "event_id": "x"}),
        "error",
    )["error"]
    assert (error["code"], error["event_id"]) == ("response_cancel_not_active", "x")
    done = only(send(session, {"type": "response.cancel"}), "response.done")["response"]
    assert done["id"] == inband["id"]


# --- every error code ---------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    ("rejection", "reason"),
    [
        (
            Rejection("invalid_api_key", "Incorrect API key provided: sk-…abcd.", 3000),
            "invalid_request_error.invalid_api_key",
        ),
        (
            Rejection(None, "Missing bearer or basic authentication in header", 3000),
            "invalid_request_error",
        ),
        (
            Rejection("invalid_model", 'Model "x" is not supported in realtime mode.', 4000),
            "invalid_request_error.invalid_model",
        ),
        (
            Rejection("missing_model", "You must provide a model parameter.", 4000),
            "invalid_request_error.missing_model",
        ),
        (
            Rejection("beta_api_shape_disabled", "The beta API shape is disabled.", 4000),
            "invalid_request_error.beta_api_shape_disabled",
        ),
    ],
)
def test_handshake_rejection_is_one_error_then_a_close_with_type_dot_code(
    dialect: str, rejection: Rejection, reason: str
) -> None:
    model = "gpt-realtime" if dialect == "ga" else "gpt-4o-realtime-preview"
    session = Session(dialect, model, FakeClock(), random.Random(0))  # type: ignore[arg-type]
    opening = session.open(rejection)
    assert types(opening) == ["error"]
    error = opening[0]["error"]
    assert error == {
        "type": "invalid_request_error",
        "code": rejection.code,
        "message": rejection.message,
        "param": None,
        "event_id": None,
    }
    assert session.close_requested == (rejection.close_code, reason)
    assert send(session, user_text("Hi")) == []  # nothing is served after a rejection
    assert session.next_deadline() is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_server_error_has_type_server_error_and_no_code_and_is_not_fatal(dialect: str) -> None:
    session, _ = make_session(dialect)
    error = session.server_error()
    assert error["type"] == "error" and error["event_id"].startswith("event_")
    assert error["error"]["type"] == "server_error" and error["error"]["code"] is None
    assert error["error"]["message"].startswith("The server had an error")
    assert session.close_requested is None
    assert types(send(session, user_text("Hi")))[0] == Names(dialect).item_added


def test_a_transcription_update_on_a_realtime_session_is_refused_with_the_real_message() -> None:
    session, _ = make_session("ga")
    error = only(
        send(session, {"type": "session.update", "session": {"type": "transcription"}}), "error"
    )["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "session.type")
    assert error["message"] == (
        "Passing a transcription session update event to a realtime session is not allowed."
    )


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        (b'{"type": "response.create"}', "invalid_event", None),
        ('{"event_id": "e1"}', "invalid_event", None),
        ('["response.create"]', "invalid_event", None),
        ('{"type": "no.such.event"}', "invalid_value", "type"),
        ('{"type": "response.create", "bogus": 1}', "unknown_parameter", "bogus"),
        ('{"type": "session.update"}', "missing_required_parameter", "session"),
        ('{"type": "conversation.item.create", "item": 5}', "invalid_type", "item"),
        ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty", None),
        ('{"type": "response.cancel"}', "response_cancel_not_active", None),
    ],
)
def test_each_client_error_code_in_both_dialects(
    dialect: str, message: str | bytes, code: str, param: str | None
) -> None:
    session, _ = make_session(dialect)
    out = session.handle(message)
    assert types(out) == ["error"]
    error = out[0]["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)
    assert session.close_requested is None


@pytest.mark.parametrize("dialect", DIALECTS)
def test_rate_below_24000_and_a_second_in_band_response_in_both_dialects(dialect: str) -> None:
    session, _ = make_session(dialect, pace=1.0, clock=FakeClock(0.0))
    if dialect == "ga":
        fmt = {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}
        error = only(update(session, **fmt), "error")["error"]
        assert (error["code"], error["param"]) == (
            "integer_below_min_value",
            "session.audio.input.format.rate",
        )
    else:  # beta formats are names, not objects with a rate
        error = only(update(session, input_audio_format="pcm16_16k"), "error")["error"]
        assert (error["code"], error["param"]) == ("invalid_value", "session.input_audio_format")
    send(session, user_text("Hi"))
    send(session, {"type": "response.create"})
    error = only(send(session, {"type": "response.create"}), "error")["error"]
    assert error["code"] == "conversation_already_has_active_response"


def test_session_expiry_is_a_close_in_ga_and_an_error_then_close_in_beta() -> None:
    message = "Your session hit the maximum duration of 2 minutes."
    for dialect, first in (("ga", []), ("beta", ["error"])):
        clock = FakeClock(0.0)
        session, _ = make_session(dialect, clock=clock, max_duration=120.0)
        clock.now = 120.0
        out = session.tick()
        assert types(out) == first
        if first:
            assert out[0]["error"]["code"] == "session_expired"
            assert out[0]["error"]["message"] == message
        assert session.close_requested == (1001, message)


# --- event order --------------------------------------------------------------------------------


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_connect_session_created_first_then_session_updated(dialect: str) -> None:
    session, opening = make_session(dialect)
    assert types(opening) == ["session.created"]
    updated = update(session, instructions="Be brief.")
    assert types(updated) == ["session.updated"]
    assert updated[0]["session"]["instructions"] == "Be brief."
    assert updated[0]["session"]["id"] == opening[0]["session"]["id"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_b_voice_turn_with_server_vad_and_audio_reply(dialect: str) -> None:
    n = Names(dialect)
    session, _ = make_session(dialect)
    out = speak(session)
    assert shape(out) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        *n.item,
        "response.created",
        "response.output_item.added",
        n.item_added,
        "response.content_part.added",
        deltas(f"{n.audio}.delta", f"{n.transcript}.delta"),
        f"{n.audio}.done",
        f"{n.transcript}.done",
        "response.content_part.done",
        *n.item_done,
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    user = only(out, "input_audio_buffer.committed")
    assert user["previous_item_id"] is None
    user_item = next(e for e in out if e["type"] == n.item_added)["item"]
    assert user_item["id"] == user["item_id"] and user_item["status"] == "completed"
    assert user_item["content"] == [{"type": "input_audio", "transcript": None}]
    created = only(out, "response.created")["response"]
    assert (created["status"], created["output"], created["usage"]) == ("in_progress", [], None)
    added = only(out, "response.output_item.added")["item"]
    assert (added["status"], added["content"]) == ("in_progress", [])
    assert only(out, "response.content_part.added")["part"] == {"type": "audio", "transcript": ""}
    transcript = only(out, f"{n.transcript}.done")["transcript"]
    finished = only(out, "response.output_item.done")["item"]
    assert finished["status"] == "completed"
    assert finished["content"] == [{"type": n.output_audio, "transcript": transcript}]
    kinds = types(out, deltas=True)
    first_audio = kinds.index(f"{n.audio}.delta")
    assert f"{n.transcript}.delta" in kinds[: first_audio + 3]  # interleaved, not one after all


@pytest.mark.parametrize("dialect", DIALECTS)
def test_c_text_only_turn(dialect: str) -> None:
    n = Names(dialect)
    session, _ = make_session(dialect)
    text_only(session)
    out = send(session, user_text("Hi")) + send(session, {"type": "response.create"})
    assert shape(out) == [
        *n.item,
        "response.created",
        "response.output_item.added",
        n.item_added,
        "response.content_part.added",
        deltas(f"{n.text}.delta"),
        f"{n.text}.done",
        "response.content_part.done",
        *n.item_done,
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    assert only(out, "response.content_part.added")["part"] == {"type": "text", "text": ""}
    text = only(out, f"{n.text}.done")["text"]
    content = only(out, "response.output_item.done")["item"]["content"]
    assert content == [{"type": "output_text" if dialect == "ga" else "text", "text": text}]


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("how", ["barge_in", "response_cancel"])
def test_d_an_interrupted_reply_closes_its_parts_and_ends_cancelled(
    dialect: str, how: str
) -> None:
    n = Names(dialect)
    session, _ = make_session(dialect, pace=1.0, clock=FakeClock(0.0))
    send(session, user_text("Hi"))
    head = send(session, {"type": "response.create"})
    assert shape(head)[-2:] == [
        "response.content_part.added",
        deltas(f"{n.audio}.delta", f"{n.transcript}.delta"),
    ]
    closing = [
        f"{n.audio}.done",
        f"{n.transcript}.done",
        "response.content_part.done",
        *n.item_done,
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    if how == "barge_in":
        out = speak(session)
        assert shape(out)[: len(closing) + 4] == [
            "input_audio_buffer.speech_started",
            *closing,
            "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed",
            n.item_added,
        ]
        reason = "turn_detected"
    else:
        out = send(session, {"type": "response.cancel"})
        assert shape(out) == closing
        reason = "client_cancelled"
    done = only(out, "response.done")["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": reason}
    assert done["output"][0]["status"] == "incomplete"
    assert only(out, "response.output_item.done")["item"]["status"] == "incomplete"


@pytest.mark.parametrize("dialect", DIALECTS)
def test_e_function_call_then_output_then_reply(dialect: str) -> None:
    n = Names(dialect)
    session, _ = make_session(dialect)
    update(session, tools=[TOOL], tool_choice={"type": "function", "name": "lookup_order"})
    out = send(session, user_text("Where is my order?")) + send(
        session, {"type": "response.create"}
    )
    assert shape(out) == [
        *n.item,
        "response.created",
        "response.output_item.added",
        n.item_added,
        deltas("response.function_call_arguments.delta"),
        "response.function_call_arguments.done",
        *n.item_done,
        "response.output_item.done",
        "response.done",
        "rate_limits.updated",
    ]
    added = only(out, "response.output_item.added")["item"]
    assert (added["type"], added["name"], added["arguments"]) == (
        "function_call",
        "lookup_order",
        "",
    )
    args = only(out, "response.function_call_arguments.done")
    assert args["call_id"] == added["call_id"] and args["item_id"] == added["id"]
    assert isinstance(json.loads(args["arguments"])["order_id"], str)
    result = {"type": "function_call_output", "call_id": added["call_id"], "output": "shipped"}
    assert types(send(session, {"type": "conversation.item.create", "item": result})) == n.item
    update(session, tool_choice="auto")
    reply = send(session, {"type": "response.create"})
    assert only(reply, "response.output_item.done")["item"]["type"] == "message"
    assert "The tool returned shipped." in only(reply, f"{n.transcript}.done")["transcript"]


def _transcription_session(dialect: str) -> Session:
    transcription = {"model": "gpt-4o-transcribe"}
    if dialect == "ga":
        session = Session("ga", "", FakeClock(), random.Random(0), pace=0, intent="transcription")
        session.open()
        assert types(
            update(session, type="transcription", audio={"input": {"transcription": transcription}})
        ) == ["session.updated"]
    else:
        session, _ = make_session("beta")
        out = send(
            session,
            {
                "type": "transcription_session.update",
                "session": {"input_audio_transcription": transcription},
            },
        )
        assert types(out) == ["transcription_session.updated"]
    return session


@pytest.mark.parametrize("dialect", DIALECTS)
def test_f_transcription_session_transcribes_and_never_responds(dialect: str) -> None:
    n = Names(dialect)
    session = _transcription_session(dialect)
    out = speak(session)
    assert shape(out) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        *n.item,
        deltas("conversation.item.input_audio_transcription.delta"),
        "conversation.item.input_audio_transcription.completed",
    ]
    completed = only(out, "conversation.item.input_audio_transcription.completed")
    assert completed["item_id"] == only(out, "input_audio_buffer.committed")["item_id"]
    assert completed["usage"]["type"] == "tokens"
    error = only(send(session, {"type": "response.create"}), "error")["error"]
    assert error["code"] == "invalid_value"
