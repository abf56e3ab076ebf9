"""Every event the sans-IO session emits, in both dialects, fits the OpenAI SDK's typed models.

The SDK itself parses leniently (``construct_type_unchecked`` never raises), so these tests
validate strictly (pydantic, JSON mode) against the SDK's ``RealtimeServerEvent`` unions:
GA events against ``openai.types.realtime``, beta events against ``openai.types.beta.realtime``.
A tour drives the session through every server event type it can emit; a property test
throws random client input at it. The socket-level conformance tests are in
``test_openai_sdk.py``.
"""

from __future__ import annotations

import json
import random
import typing
from typing import Any

import orjson
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.realtime import RealtimeServerEvent as GAServerEvent

from mockrealtime.audio import b64encode
from mockrealtime.handshake import Rejection
from mockrealtime.session import Session

from .helpers import FakeClock, append_events, make_session, only, send, user_text, wav_pcm16

ADAPTERS: dict[str, pydantic.TypeAdapter[Any]] = {
    "ga": pydantic.TypeAdapter(GAServerEvent),
    "beta": pydantic.TypeAdapter(BetaServerEvent),
}

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
        "required": ["city"],
    },
}

MCP_SERVER = {
    "type": "mcp",
    "server_label": "docs",
    "server_url": "https://mcp.example.com/docs",
    "require_approval": {"never": {"tool_names": ["search_docs"]}},
}

NOT_EMITTED: dict[str, dict[str, str]] = {
    "ga": {
        "conversation.created": "defined by the SDK but not sent by today's server",
        "conversation.item.created": "the GA server sends conversation.item.added/.done instead",
        "input_audio_buffer.dtmf_event_received": "SIP calls only (keypad digits)",
        "output_audio_buffer.started": "WebRTC/SIP only: over WebSocket the client plays audio",
        "output_audio_buffer.stopped": "WebRTC/SIP only",
        "output_audio_buffer.cleared": "WebRTC/SIP only (answers output_audio_buffer.clear)",
    },
    "beta": {
        "conversation.created": "defined by the SDK but not sent by the server",
        "output_audio_buffer.started": "WebRTC only: over WebSocket the client plays audio",
        "output_audio_buffer.stopped": "WebRTC only",
        "output_audio_buffer.cleared": "WebRTC only",
    },
}
"""Server event types of the SDK's union that the fake never sends over WebSocket, and why."""


def sdk_event_types(dialect: str) -> set[str]:
    """Every ``type`` literal of the SDK's server-event union for ``dialect``."""
    union = typing.get_args(GAServerEvent if dialect == "ga" else BetaServerEvent)[0]
    found: set[str] = set()
    for model in typing.get_args(union):
        found.update(typing.get_args(model.model_fields["type"].annotation))
    return found


def sdk_rejections(dialect: str, events: list[dict[str, Any]]) -> list[str]:
    """What the SDK's models reject among ``events`` (empty when all fit)."""
    problems = []
    for event in events:
        if event["type"] == "transcription_session.updated":
            # The SDK types TranscriptionSession.client_secret as required, yet documents it
            # as "not present when a session is updated via the WebSocket API"; the mock
            # follows the documentation, so fill it in for the check.
            event = {
                **event,
                "session": {**event["session"], "client_secret": {"value": "", "expires_at": 0}},
            }
        try:
            ADAPTERS[dialect].validate_json(orjson.dumps(event), strict=True)
        except pydantic.ValidationError as exc:
            problems.append(f"{event['type']}: {exc}")
    return problems


def drain(session: Session, clock: FakeClock, until: float) -> list[dict[str, Any]]:
    """Tick the session through every deadline up to ``until``."""
    out: list[dict[str, Any]] = []
    while (deadline := session.next_deadline()) is not None and deadline <= until:
        clock.now = max(clock.now, deadline)
        out += session.tick()
    return out


def update(session: Session, **body: Any) -> list[dict[str, Any]]:
    if session.dialect == "ga":
        body.setdefault("type", "realtime")
    return send(session, {"type": "session.update", "session": body})


def tour(dialect: str) -> list[dict[str, Any]]:
    """Drive one session through every kind of server event it can emit."""
    ga = dialect == "ga"
    clock = FakeClock(0.0)
    session, out = make_session(dialect, clock=clock, pace=2.0)
    transcription = {"model": "whisper-1"}
    if ga:
        out += update(session, audio={"input": {"transcription": transcription}}, tools=[TOOL])
    else:
        out += update(session, input_audio_transcription=transcription, tools=[TOOL])
    for message in append_events(wav_pcm16()):  # a VAD turn, transcribed, answered with audio
        out += session.handle(message)
    out += drain(session, clock, 100)
    out += send(session, user_text("Hi"))
    out += send(session, {"type": "response.create"})
    out += send(session, {"type": "response.create"})  # already active: error
    out += send(session, {"type": "response.cancel"})
    out += send(session, {"type": "response.cancel"})  # nothing active: error
    text_only = {"output_modalities": ["text"]} if ga else {"modalities": ["text"]}
    out += send(session, {"type": "response.create", "response": {"conversation": "none"}})
    out += send(session, {"type": "response.create", "response": text_only})
    out += drain(session, clock, 200)
    required = {"tool_choice": "required", "metadata": {"k": "v"}}
    out += send(session, {"type": "response.create", "response": required})
    out += drain(session, clock, 300)
    call = [e for e in out if e["type"] == "response.function_call_arguments.done"][-1]
    output_item = {"type": "function_call_output", "call_id": call["call_id"], "output": "21"}
    out += send(session, {"type": "conversation.item.create", "item": output_item})
    out += send(session, {"type": "response.create", "response": {"max_output_tokens": 3}})
    out += drain(session, clock, 400)
    assistant = next(
        e["item"]["id"]
        for e in out
        if e["type"] == "response.output_item.done" and e["item"]["type"] == "message"
    )
    truncate = {"item_id": assistant, "content_index": 0, "audio_end_ms": 100}
    out += send(session, {"type": "conversation.item.truncate", **truncate})
    assistant_text = {"type": "output_text" if ga else "text", "text": "Earlier reply."}
    for item in (
        {"type": "message", "role": "system", "content": [{"type": "input_text", "text": "Sys"}]},
        {"type": "message", "role": "assistant", "content": [assistant_text]},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_audio", "audio": b64encode(b"\x00\x01" * 4800)}],
        },
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
    ):
        out += send(session, {"type": "conversation.item.create", "item": item})
    for item in list(session.items):
        out += send(session, {"type": "conversation.item.retrieve", "item_id": item["id"]})
    out += send(session, {"type": "conversation.item.delete", "item_id": assistant})
    out += send(session, {"type": "conversation.item.delete", "item_id": assistant})  # error
    out += send(session, {"type": "input_audio_buffer.commit"})  # empty: error
    out += send(session, {"type": "input_audio_buffer.clear"})
    out += session.handle("{not json")
    out += session.handle(b"binary")
    out.append(session.server_error())
    if ga:
        vad = {"type": "server_vad", "idle_timeout_ms": 5000}
        out += update(session, audio={"input": {"turn_detection": vad}})
        out += send(session, {"type": "response.create"})  # the idle timer starts after it
        out += drain(session, clock, clock.now + 30)  # the idle timeout fires and answers
        out += update(session, audio={"input": {"turn_detection": None}})  # once is enough
    else:
        out += send(
            session,
            {
                "type": "transcription_session.update",
                "session": {"input_audio_transcription": {"model": "gpt-4o-mini-transcribe"}},
            },
        )
    out += drain(session, clock, 10_000)  # the session expires
    return out + transcription_outcomes(dialect) + (mcp_tour() if ga else [])


def transcription_outcomes(dialect: str) -> list[dict[str, Any]]:
    """A failed transcription, and (GA) a diarized one."""
    models = ["whisper-1"] + (["gpt-4o-transcribe-diarize"] if dialect == "ga" else [])
    out: list[dict[str, Any]] = []
    for fails, model in [(True, "whisper-1")] + [(False, m) for m in models[1:]]:
        session, opening = make_session(dialect, transcription_fails=fails)
        out += opening
        transcription = {"model": model}
        if dialect == "ga":
            out += update(session, audio={"input": {"transcription": transcription}})
        else:
            out += update(session, input_audio_transcription=transcription)
        out += send(session, {"type": "response.cancel"})  # keep the turn short: no reply
        for message in append_events(wav_pcm16()):
            out += session.handle(message)
    return out


def mcp_tour() -> list[dict[str, Any]]:
    """GA MCP servers: a failed listing, a call, a failed call, an approval request."""
    session, out = make_session("ga")
    broken = {**MCP_SERVER, "server_label": "broken", "server_url": "https://x/list-error"}
    flaky = {**MCP_SERVER, "server_label": "flaky", "server_url": "https://x/call-error"}
    out += update(session, tools=[MCP_SERVER, broken, flaky], output_modalities=["text"])
    for name, label in [("search_docs", "docs"), ("search_docs", "flaky"), ("fetch_doc", "docs")]:
        out += send(session, user_text("Hi"))
        choice = {"type": "mcp", "server_label": label, "name": name}
        out += send(session, {"type": "response.create", "response": {"tool_choice": choice}})
    made = [e["item"]["type"] for e in out if e["type"] == "response.output_item.done"]
    assert made == ["mcp_call", "mcp_call", "mcp_approval_request"]
    return out


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_the_fake_sends_every_sdk_server_event_type_but_the_listed_ones(dialect: str) -> None:
    sdk = sdk_event_types(dialect)
    sent = {e["type"] for e in tour(dialect)}
    skipped = set(NOT_EMITTED[dialect])
    assert sorted(sdk - sent - skipped) == [], "SDK server events the fake never sends"
    assert sorted(sent - sdk) == [], "events the fake sends that the SDK does not know"
    assert sorted(sent & skipped) == [], "listed as not sent, yet sent"
    assert sorted(skipped - sdk) == [], "listed as not sent, but no longer in the SDK"
    assert len(sent) == len(sdk) - len(skipped)


@pytest.mark.parametrize("dialect", ["ga", "beta"])
def test_every_event_the_session_emits_fits_the_sdk_models(dialect: str) -> None:
    events = tour(dialect)
    for event in events:
        if event["type"] == "transcription_session.updated":
            assert "client_secret" not in event["session"]  # as the SDK documents
    assert sdk_rejections(dialect, events) == []


@pytest.mark.parametrize("dialect", ["ga", "beta"])
@pytest.mark.parametrize(
    "rejection",
    [
        Rejection("invalid_api_key", "Incorrect API key provided: sk-…1234.", 3000),
        Rejection(None, "Missing bearer or basic authentication in header", 3000),
        Rejection("invalid_model", 'Model "x" is not supported in realtime mode.', 4000),
    ],
)
def test_handshake_errors_fit_the_sdk_models(dialect: str, rejection: Rejection) -> None:
    session, _ = make_session(dialect)
    assert sdk_rejections(dialect, session.open(rejection)) == []


def test_ga_transcription_session_events_fit_the_sdk_models() -> None:
    session = Session("ga", "", FakeClock(), random.Random(0), pace=0, intent="transcription")
    out = session.open()
    out += update(
        session,
        type="transcription",
        audio={"input": {"transcription": {"model": "gpt-4o-transcribe"}}},
    )
    for message in append_events(wav_pcm16()):
        out += session.handle(message)
    assert only(out, "conversation.item.input_audio_transcription.completed")
    assert sdk_rejections("ga", out) == []


_client_event = st.fixed_dictionaries(
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
            ]
        )
    },
    optional={
        "audio": st.sampled_from([b"\x00\x00" * 2400, wav_pcm16()[14_400:24_000]]).map(b64encode),
        "item": st.sampled_from(
            [
                user_text("Hi")["item"],
                {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": ""},
            ]
        ),
        "item_id": st.sampled_from(["item_x", "root"]),
        "response": st.sampled_from(
            [
                {"conversation": "none"},
                {"max_output_tokens": 2},
                {"tool_choice": "required", "tools": [TOOL]},
                {"tool_choice": "required", "tools": [MCP_SERVER]},
            ]
        ),
        "audio_end_ms": st.integers(0, 3000),
        "content_index": st.just(0),
    },
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["ga", "beta"]),
    st.lists(st.tuples(_client_event, st.floats(0, 0.5)), max_size=20),
)
def test_any_client_input_yields_events_the_sdk_accepts(
    dialect: str, steps: list[tuple[dict[str, Any], float]]
) -> None:
    clock = FakeClock(0.0)
    session, out = make_session(dialect, clock=clock, pace=2.0)
    for message, dt in steps:
        clock.now += dt
        out += session.handle(json.dumps(message))
    out += drain(session, clock, 3000)
    assert sdk_rejections(dialect, out) == []
