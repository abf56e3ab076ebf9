"""The beta dialect translated to GA and back (relay.core.beta), event by event and as a property.

The expected GA forms are written out here from the tables of the protocol notes (beta and GA
columns side by side), not computed from the module's own tables.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.beta import (
    DEFAULT_MODEL_ALIASES,
    BetaBridge,
    BetaTranslator,
    client_to_beta,
    client_to_ga,
    ga_to_beta_param,
    server_to_beta,
    server_to_ga,
)
from relay.core.bridge import Amended, Batch, Bridge, Ending, Limits, Reply
from relay.core.policy import Policy

LIMITS = Limits(queue_messages=16, queue_bytes=1 << 20, max_message_bytes=1 << 20)
PCM = {"type": "audio/pcm", "rate": 24000}


def dumps(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


# -- client events, beta → GA ---------------------------------------------------------------

BETA_SESSION = {
    "modalities": ["text", "audio"],
    "instructions": "Be brief.",
    "voice": "alloy",
    "speed": 1.1,
    "input_audio_format": "g711_ulaw",
    "output_audio_format": "pcm16",
    "input_audio_transcription": {"model": "whisper-1", "language": "en"},
    "input_audio_noise_reduction": {"type": "near_field"},
    "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 400},
    "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {}}],
    "tool_choice": "auto",
    "max_response_output_tokens": 1000,
    "tracing": "auto",
    "include": ["item.input_audio_transcription.logprobs"],
}
GA_SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "instructions": "Be brief.",
    "audio": {
        "input": {
            "format": {"type": "audio/pcmu"},
            "transcription": {"model": "whisper-1", "language": "en"},
            "noise_reduction": {"type": "near_field"},
            "turn_detection": {"type": "server_vad", "threshold": 0.6, "silence_duration_ms": 400},
        },
        "output": {"voice": "alloy", "speed": 1.1, "format": PCM},
    },
    "tools": [{"type": "function", "name": "f", "description": "d", "parameters": {}}],
    "tool_choice": "auto",
    "max_output_tokens": 1000,
    "tracing": "auto",
    "include": ["item.input_audio_transcription.logprobs"],
}

#: (beta client event, its GA form): every client event type of the tables.
CLIENT_PAIRS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (
        {"type": "session.update", "event_id": "e1", "session": BETA_SESSION},
        {"type": "session.update", "event_id": "e1", "session": GA_SESSION},
    ),
    (
        {"type": "session.update", "session": {"output_audio_format": "g711_alaw"}},
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "audio": {"output": {"format": {"type": "audio/pcma"}}},
            },
        },
    ),
    (
        {"type": "session.update", "session": {"modalities": ["text"], "turn_detection": None}},
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": None}},
            },
        },
    ),
    (
        {
            "type": "response.create",
            "response": {
                "modalities": ["text"],
                "instructions": "Shout.",
                "voice": "echo",
                "output_audio_format": "g711_ulaw",
                "tools": [],
                "tool_choice": "none",
                "max_response_output_tokens": "inf",
                "conversation": "none",
                "metadata": {"k": "v"},
                "input": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "text", "text": "Hi"}],
                    },
                    {"type": "item_reference", "id": "item_1"},
                ],
            },
        },
        {
            "type": "response.create",
            "response": {
                "output_modalities": ["text"],
                "instructions": "Shout.",
                "audio": {"output": {"voice": "echo", "format": {"type": "audio/pcmu"}}},
                "tools": [],
                "tool_choice": "none",
                "max_output_tokens": "inf",
                "conversation": "none",
                "metadata": {"k": "v"},
                "input": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi"}],
                    },
                    {"type": "item_reference", "id": "item_1"},
                ],
            },
        },
    ),
    ({"type": "response.create"}, {"type": "response.create"}),
    (
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "Earlier."}],
            },
        },
        {
            "type": "conversation.item.create",
            "previous_item_id": "root",
            "item": {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Earlier."}],
            },
        },
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi"}],
            },
        },
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hi"}],
            },
        },
    ),
    (
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "c", "output": "{}"},
        },
        {
            "type": "conversation.item.create",
            "item": {"type": "function_call_output", "call_id": "c", "output": "{}"},
        },
    ),
    *[
        (event, event)
        for event in (
            {"type": "input_audio_buffer.append", "audio": "AAAA"},
            {"type": "input_audio_buffer.commit", "event_id": "e2"},
            {"type": "input_audio_buffer.clear"},
            {
                "type": "conversation.item.truncate",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": 10,
            },
            {"type": "conversation.item.delete", "item_id": "i"},
            {"type": "conversation.item.retrieve", "item_id": "i"},
            {"type": "response.cancel", "response_id": "r"},
        )
    ],
]


@pytest.mark.parametrize(("beta", "ga"), CLIENT_PAIRS, ids=lambda e: e["type"])
def test_each_client_event_translates_to_its_ga_form_and_back(beta: dict, ga: dict) -> None:
    assert client_to_ga(beta) == (ga, [])
    assert client_to_beta(ga) == beta


def test_the_translator_sends_the_ga_text_of_a_beta_session_update() -> None:
    sent, warning = BetaTranslator().client(dumps(CLIENT_PAIRS[0][0]))
    assert warning is None and orjson.loads(sent) == CLIENT_PAIRS[0][1]  # type: ignore[arg-type]


def test_events_alike_in_both_dialects_pass_as_the_same_string() -> None:
    translator = BetaTranslator()
    for text in (
        '{"type":"input_audio_buffer.append","audio":"AAAA"}',
        '{"type":"response.cancel"}',
        "not json",
    ):
        sent, warning = translator.client(text)
        assert sent is text and warning is None


def test_a_retired_model_in_session_update_is_sent_as_its_alias() -> None:
    translator = BetaTranslator(DEFAULT_MODEL_ALIASES)
    sent, _ = translator.client(
        dumps(
            {"type": "session.update", "session": {"model": "gpt-4o-realtime-preview-2024-10-01"}}
        )
    )
    assert orjson.loads(sent)["session"] == {"type": "realtime", "model": "gpt-realtime-2.1"}  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        (
            {"type": "transcription_session.update", "event_id": "t1", "session": {}},
            "relay_beta_not_translated",
            "type",
        ),
        (
            {"type": "session.update", "event_id": "t1", "session": {"input_audio_format": "mp3"}},
            "invalid_value",
            "session.input_audio_format",
        ),
        (
            {
                "type": "response.create",
                "event_id": "t1",
                "response": {"output_audio_format": "opus"},
            },
            "invalid_value",
            "response.output_audio_format",
        ),
        (
            {"type": "session.update", "event_id": "t1", "session": {"modalities": ["video"]}},
            "invalid_value",
            "session.modalities",
        ),
    ],
)
def test_what_has_no_ga_form_is_refused_with_an_error_naming_it(
    event: dict, code: str, param: str
) -> None:
    sent, error = BetaTranslator().client(dumps(event))
    assert sent is None
    body = orjson.loads(error)["error"]  # type: ignore[arg-type]
    assert (body["code"], body["param"], body["event_id"]) == (code, param, "t1")
    assert body["message"]


def test_temperature_is_dropped_quietly_at_its_default_and_with_a_warning_otherwise() -> None:
    translator = BetaTranslator()
    quiet, warning = translator.client(
        dumps({"type": "session.update", "session": {"voice": "ash", "temperature": 0.8}})
    )
    assert warning is None
    assert orjson.loads(quiet)["session"] == {
        "type": "realtime",
        "audio": {"output": {"voice": "ash"}},
    }  # type: ignore[arg-type]
    for kind, key in (("session.update", "session"), ("response.create", "response")):
        sent, warning = translator.client(
            dumps({"type": kind, "event_id": "w1", key: {"instructions": "x", "temperature": 1.1}})
        )
        assert orjson.loads(sent)[key]["instructions"] == "x"  # type: ignore[arg-type]
        assert "temperature" not in orjson.loads(sent)[key]  # type: ignore[arg-type]
        error = orjson.loads(warning)["error"]  # type: ignore[arg-type]
        assert (error["code"], error["param"], error["event_id"]) == (
            "relay_beta_field_dropped",
            f"{key}.temperature",
            "w1",
        )


# -- server events, GA → beta ---------------------------------------------------------------

GA_SESSION_OBJECT = {
    **GA_SESSION,
    "id": "sess_1",
    "object": "realtime.session",
    "model": "gpt-realtime",
    "expires_at": 1,
    "truncation": "auto",
    "prompt": None,
}
BETA_SESSION_OBJECT = {
    **BETA_SESSION,
    "id": "sess_1",
    "object": "realtime.session",
    "model": "gpt-realtime",
    "expires_at": 1,
    "truncation": "auto",
    "prompt": None,
}
ASSISTANT_GA = {
    "id": "item_2",
    "object": "realtime.item",
    "type": "message",
    "role": "assistant",
    "status": "completed",
    "content": [
        {"type": "output_audio", "transcript": "Hi."},
        {"type": "output_text", "text": "Hi."},
    ],
}
ASSISTANT_BETA = {
    **ASSISTANT_GA,
    "content": [{"type": "audio", "transcript": "Hi."}, {"type": "text", "text": "Hi."}],
}
USER = {
    "id": "item_1",
    "object": "realtime.item",
    "type": "message",
    "role": "user",
    "status": "completed",
    "content": [{"type": "input_audio", "transcript": None}],
}
IDS = {"response_id": "resp_1", "item_id": "item_2", "output_index": 0, "content_index": 0}
USAGE = {"total_tokens": 3, "input_tokens": 1, "output_tokens": 2}

#: (GA server event, its beta form): every server event type of the tables.
SERVER_PAIRS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"type": kind, "session": GA_SESSION_OBJECT}, {"type": kind, "session": BETA_SESSION_OBJECT})
    for kind in ("session.created", "session.updated")
] + [
    (
        {"type": "conversation.item.added", "previous_item_id": None, "item": USER},
        {"type": "conversation.item.created", "previous_item_id": None, "item": USER},
    ),
    (
        {"type": "conversation.item.added", "previous_item_id": "item_1", "item": ASSISTANT_GA},
        {"type": "conversation.item.created", "previous_item_id": "item_1", "item": ASSISTANT_BETA},
    ),
    (
        {"type": "conversation.item.retrieved", "item": ASSISTANT_GA},
        {"type": "conversation.item.retrieved", "item": ASSISTANT_BETA},
    ),
    *[
        (
            {"type": kind, "response_id": "resp_1", "output_index": 0, "item": ASSISTANT_GA},
            {"type": kind, "response_id": "resp_1", "output_index": 0, "item": ASSISTANT_BETA},
        )
        for kind in ("response.output_item.added", "response.output_item.done")
    ],
    *[
        (
            {
                "type": kind,
                "response": {
                    "object": "realtime.response",
                    "id": "resp_1",
                    "status": "completed",
                    "status_details": None,
                    "output": [ASSISTANT_GA],
                    "conversation_id": "conv_1",
                    "output_modalities": ["audio"],
                    "max_output_tokens": "inf",
                    "audio": {"output": {"format": PCM, "voice": "marin"}},
                    "usage": USAGE,
                    "metadata": None,
                },
            },
            {
                "type": kind,
                "response": {
                    "object": "realtime.response",
                    "id": "resp_1",
                    "status": "completed",
                    "status_details": None,
                    "output": [ASSISTANT_BETA],
                    "conversation_id": "conv_1",
                    "modalities": ["text", "audio"],
                    "max_output_tokens": "inf",
                    "output_audio_format": "pcm16",
                    "voice": "marin",
                    "usage": USAGE,
                    "metadata": None,
                },
            },
        )
        for kind in ("response.created", "response.done")
    ],
    *[
        (
            {"type": kind, **IDS, "part": {"type": "output_text", "text": ""}},
            {"type": kind, **IDS, "part": {"type": "text", "text": ""}},
        )
        for kind in ("response.content_part.added", "response.content_part.done")
    ],
    (
        {"type": "response.output_text.delta", **IDS, "delta": "Hi"},
        {"type": "response.text.delta", **IDS, "delta": "Hi"},
    ),
    (
        {"type": "response.output_text.done", **IDS, "text": "Hi"},
        {"type": "response.text.done", **IDS, "text": "Hi"},
    ),
    (
        {"type": "response.output_audio.delta", **IDS, "delta": "AAAA"},
        {"type": "response.audio.delta", **IDS, "delta": "AAAA"},
    ),
    ({"type": "response.output_audio.done", **IDS}, {"type": "response.audio.done", **IDS}),
    (
        {"type": "response.output_audio_transcript.delta", **IDS, "delta": "Hi"},
        {"type": "response.audio_transcript.delta", **IDS, "delta": "Hi"},
    ),
    (
        {"type": "response.output_audio_transcript.done", **IDS, "transcript": "Hi"},
        {"type": "response.audio_transcript.done", **IDS, "transcript": "Hi"},
    ),
    (
        {
            "type": "error",
            "event_id": "event_1",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_value",
                "message": "m",
                "param": "session.audio.output.voice",
                "event_id": "e9",
            },
        },
        {
            "type": "error",
            "event_id": "event_1",
            "error": {
                "type": "invalid_request_error",
                "code": "invalid_value",
                "message": "m",
                "param": "session.voice",
                "event_id": "e9",
            },
        },
    ),
    *[
        (event, event)
        for event in (
            {
                "type": "error",
                "error": {"type": "server_error", "code": None, "message": "m", "param": None},
            },
            {
                "type": "conversation.created",
                "conversation": {"id": "conv_1", "object": "realtime.conversation"},
            },
            {"type": "input_audio_buffer.speech_started", "audio_start_ms": 5, "item_id": "item_1"},
            {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 9, "item_id": "item_1"},
            {"type": "input_audio_buffer.committed", "item_id": "item_1", "previous_item_id": None},
            {"type": "input_audio_buffer.cleared"},
            {
                "type": "conversation.item.input_audio_transcription.delta",
                "item_id": "i",
                "content_index": 0,
                "delta": "h",
            },
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": "i",
                "content_index": 0,
                "transcript": "hi",
                "usage": {"type": "duration", "seconds": 1},
            },
            {
                "type": "conversation.item.input_audio_transcription.failed",
                "item_id": "i",
                "content_index": 0,
                "error": {"type": "server_error", "code": None, "message": "m", "param": None},
            },
            {
                "type": "conversation.item.truncated",
                "item_id": "i",
                "content_index": 0,
                "audio_end_ms": 5,
            },
            {"type": "conversation.item.deleted", "item_id": "i"},
            {
                "type": "response.function_call_arguments.delta",
                "response_id": "r",
                "item_id": "i",
                "output_index": 0,
                "call_id": "c",
                "delta": "{",
            },
            {
                "type": "response.function_call_arguments.done",
                "response_id": "r",
                "item_id": "i",
                "output_index": 0,
                "call_id": "c",
                "arguments": "{}",
            },
            {
                "type": "rate_limits.updated",
                "rate_limits": [{"name": "tokens", "limit": 9, "remaining": 8, "reset_seconds": 1}],
            },
        )
    ],
]


@pytest.mark.parametrize(("ga", "beta"), SERVER_PAIRS, ids=lambda e: e["type"])
def test_each_server_event_translates_to_its_beta_form_and_back(ga: dict, beta: dict) -> None:
    assert server_to_beta(ga) == beta
    text = BetaTranslator().server(dumps(ga))
    assert text is not None and orjson.loads(text) == beta
    assert server_to_ga(beta) == ga


def test_the_null_idle_timeout_ga_writes_is_left_out_as_beta_did() -> None:
    vad = {"type": "server_vad", "threshold": 0.5, "idle_timeout_ms": None}
    ga = {"type": "session.updated", "session": {"audio": {"input": {"turn_detection": vad}}}}
    beta = server_to_beta(ga)
    assert beta == {
        "type": "session.updated",
        "session": {"turn_detection": {"type": "server_vad", "threshold": 0.5}},
    }


def test_item_done_is_not_sent_to_beta_clients_which_had_created_only() -> None:
    done = {"type": "conversation.item.done", "previous_item_id": None, "item": USER}
    assert server_to_beta(done) is None
    assert BetaTranslator().server(dumps(done)) is None


def test_audio_deltas_are_renamed_without_touching_the_payload() -> None:
    payload = "A" * 6000
    text = '{"type":"response.output_audio.delta","event_id":"e","delta":"' + payload + '"}'
    assert BetaTranslator().server(text) == (
        '{"type":"response.audio.delta","event_id":"e","delta":"' + payload + '"}'
    )


GA_TYPES = [
    "response.output_audio.delta",
    "response.output_text.delta",
    "response.output_audio_transcript.done",
    "conversation.item.done",
    "conversation.item.added",
    "rate_limits.updated",
    "error",
    "response.done",
]


@given(
    first=st.sampled_from(GA_TYPES),
    second=st.none() | st.sampled_from(GA_TYPES),
    note=st.text(max_size=8),
    payload=st.text(alphabet="AZaz09+/=", max_size=40),
)
def test_the_type_acted_on_is_the_one_a_parser_reads(
    first: str, second: str | None, note: str, payload: str
) -> None:
    """A second type key (the parser takes the last) or escapes in the event: the translation
    is what translating the parsed event gives."""
    text = '{"type":' + orjson.dumps(first).decode() + ',"note":' + orjson.dumps(note).decode()
    if second is not None:
        text += ',"type":' + orjson.dumps(second).decode()
    text += ',"delta":"' + payload + '"}'
    out = BetaTranslator().server(text)
    expected = server_to_beta(orjson.loads(text))
    assert (None if out is None else orjson.loads(out)) == expected


def test_ga_only_events_reach_beta_clients_unchanged() -> None:
    text = '{"type":"input_audio_buffer.timeout_triggered","item_id":"i","audio_end_ms":9}'
    assert BetaTranslator().server(text) is text


@pytest.mark.parametrize(
    ("ga", "beta"),
    [
        ("session.audio.input.turn_detection.threshold", "session.turn_detection.threshold"),
        ("session.audio.input.format.rate", "session.input_audio_format.rate"),
        ("session.output_modalities[0]", "session.modalities[0]"),
        ("session.max_output_tokens", "session.max_response_output_tokens"),
        ("response.audio.output.voice", "response.voice"),
        ("response.max_output_tokens", "response.max_response_output_tokens"),
        ("session.tools[0].name", "session.tools[0].name"),
        ("item.content[0].type", "item.content[0].type"),
    ],
)
def test_error_params_name_the_field_as_the_beta_client_wrote_it(ga: str, beta: str) -> None:
    assert ga_to_beta_param(ga) == beta


# -- the round trip, as a property --------------------------------------------------------

text = st.text(max_size=12)
ident = st.from_regex(r"[a-z]{2,4}_[A-Za-z0-9]{4}", fullmatch=True)
modalities = st.sampled_from([["text"], ["text", "audio"], ["audio"], ["audio", "text"]])
formats = st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"])
voices = st.sampled_from(["alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse"])
tokens = st.one_of(st.integers(1, 4096), st.just("inf"))
turn_detection = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {"type": st.just("server_vad")},
        optional={
            "threshold": st.floats(0, 1),
            "prefix_padding_ms": st.integers(0, 1000),
            "silence_duration_ms": st.integers(0, 2000),
            "create_response": st.booleans(),
            "interrupt_response": st.booleans(),
            "idle_timeout_ms": st.one_of(st.none(), st.integers(5000, 30000)),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("semantic_vad")},
        optional={"eagerness": st.sampled_from(["low", "medium", "high", "auto"])},
    ),
)
tools = st.lists(
    st.fixed_dictionaries(
        {"type": st.just("function"), "name": ident},
        optional={"description": text, "parameters": st.just({"type": "object"})},
    ),
    max_size=2,
)
part = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["input_text", "text"]), "text": text}),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["input_audio", "audio"]), "transcript": st.none() | text}
    ),
)
item = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": st.lists(part, max_size=2),
        },
        optional={"id": ident, "object": st.just("realtime.item"), "status": st.just("completed")},
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call"), "call_id": ident, "name": ident, "arguments": text}
    ),
    st.fixed_dictionaries(
        {"type": st.just("function_call_output"), "call_id": ident, "output": text}
    ),
)
session = st.fixed_dictionaries(
    {},
    optional={
        "modalities": modalities,
        "instructions": text,
        "voice": voices,
        "speed": st.floats(0.25, 1.5),
        "input_audio_format": formats,
        "output_audio_format": formats,
        "input_audio_transcription": st.none()
        | st.fixed_dictionaries(
            {"model": st.sampled_from(["whisper-1", "gpt-4o-transcribe"])},
            optional={"language": text},
        ),
        "input_audio_noise_reduction": st.none()
        | st.fixed_dictionaries({"type": st.just("far_field")}),
        "turn_detection": turn_detection,
        "tools": tools,
        "tool_choice": st.sampled_from(["auto", "none", "required"]),
        "temperature": st.floats(0.6, 1.2),
        "max_response_output_tokens": tokens,
        "tracing": st.none() | st.just("auto"),
        "include": st.none() | st.just(["item.input_audio_transcription.logprobs"]),
        "model": st.sampled_from(["gpt-realtime", *DEFAULT_MODEL_ALIASES]),
        "client_secret": st.none(),
    },
)
session_object = st.builds(
    lambda head, body: {**head, **body},
    st.fixed_dictionaries(
        {
            "id": ident,
            "object": st.just("realtime.session"),
            "expires_at": st.integers(0, 2**31),
            "model": st.sampled_from(["gpt-realtime", "gpt-realtime-mini"]),
        }
    ),
    session,
)
overrides = st.fixed_dictionaries(
    {},
    optional={
        "modalities": modalities,
        "instructions": text,
        "voice": voices,
        "output_audio_format": formats,
        "tools": tools,
        "tool_choice": st.sampled_from(["auto", "none"]),
        "temperature": st.floats(0.6, 1.2),
        "max_response_output_tokens": tokens,
        "conversation": st.sampled_from(["auto", "none"]),
        "metadata": st.none() | st.dictionaries(ident, text, max_size=2),
        "input": st.lists(item, max_size=2),
    },
)
response = st.fixed_dictionaries(
    {
        "object": st.just("realtime.response"),
        "id": ident,
        "status": st.sampled_from(["in_progress", "completed", "cancelled"]),
        "output": st.lists(item, max_size=2),
        "modalities": modalities,
        "voice": voices,
        "output_audio_format": formats,
        "usage": st.none() | st.just(USAGE),
    },
    optional={
        "temperature": st.floats(0.6, 1.2),
        "max_output_tokens": tokens,
        "metadata": st.none(),
    },
)
ids = st.fixed_dictionaries(
    {
        "response_id": ident,
        "item_id": ident,
        "output_index": st.integers(0, 3),
        "content_index": st.integers(0, 3),
    }
)
params = st.sampled_from(
    [
        None,
        "type",
        "session.voice",
        "session.input_audio_format",
        "session.turn_detection.threshold",
        "session.modalities[0]",
        "session.max_response_output_tokens",
        "response.voice",
        "response.output_audio_format",
        "response.max_response_output_tokens",
        "item.content[0].type",
    ]
)


def event(kind: str, **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just(kind), **fields}, optional={"event_id": ident})


#: A strategy per beta event type, keyed by a name for the test's id.
BETA_CLIENT_EVENTS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "session.update": event("session.update", session=session),
    "response.create": event("response.create", response=overrides),
    "response.create (bare)": event("response.create"),
    "conversation.item.create": event("conversation.item.create", item=item),
    "conversation.item.create (placed)": event(
        "conversation.item.create", item=item, previous_item_id=ident
    ),
    "input_audio_buffer.append": event("input_audio_buffer.append", audio=st.just("AAAA")),
    "input_audio_buffer.commit": event("input_audio_buffer.commit"),
    "input_audio_buffer.clear": event("input_audio_buffer.clear"),
    "conversation.item.truncate": event(
        "conversation.item.truncate",
        item_id=ident,
        content_index=st.just(0),
        audio_end_ms=st.integers(0, 9999),
    ),
    "conversation.item.delete": event("conversation.item.delete", item_id=ident),
    "conversation.item.retrieve": event("conversation.item.retrieve", item_id=ident),
    "response.cancel": event("response.cancel"),
}
_IDS_KINDS = {
    "response.text.delta": "delta",
    "response.text.done": "text",
    "response.audio.delta": "delta",
    "response.audio_transcript.delta": "delta",
    "response.audio_transcript.done": "transcript",
}
BETA_SERVER_EVENTS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "error": event(
        "error",
        error=st.fixed_dictionaries(
            {
                "type": st.just("invalid_request_error"),
                "code": st.none() | ident,
                "message": text,
                "param": params,
                "event_id": st.none() | ident,
            }
        ),
    ),
    "session.created": event("session.created", session=session_object),
    "session.updated": event("session.updated", session=session_object),
    "conversation.created": event(
        "conversation.created", conversation=st.fixed_dictionaries({"id": ident})
    ),
    "input_audio_buffer.speech_started": event(
        "input_audio_buffer.speech_started", audio_start_ms=st.integers(0, 9), item_id=ident
    ),
    "input_audio_buffer.speech_stopped": event(
        "input_audio_buffer.speech_stopped", audio_end_ms=st.integers(0, 9), item_id=ident
    ),
    "input_audio_buffer.committed": event(
        "input_audio_buffer.committed", item_id=ident, previous_item_id=st.none() | ident
    ),
    "input_audio_buffer.cleared": event("input_audio_buffer.cleared"),
    "conversation.item.created": event(
        "conversation.item.created", item=item, previous_item_id=st.none() | ident
    ),
    "conversation.item.retrieved": event("conversation.item.retrieved", item=item),
    "conversation.item.input_audio_transcription.delta": event(
        "conversation.item.input_audio_transcription.delta",
        item_id=ident,
        content_index=st.just(0),
        delta=text,
    ),
    "conversation.item.input_audio_transcription.completed": event(
        "conversation.item.input_audio_transcription.completed",
        item_id=ident,
        content_index=st.just(0),
        transcript=text,
    ),
    "conversation.item.input_audio_transcription.failed": event(
        "conversation.item.input_audio_transcription.failed",
        item_id=ident,
        content_index=st.just(0),
        error=st.fixed_dictionaries({"type": st.just("server_error"), "message": text}),
    ),
    "conversation.item.truncated": event(
        "conversation.item.truncated",
        item_id=ident,
        content_index=st.just(0),
        audio_end_ms=st.integers(0, 9),
    ),
    "conversation.item.deleted": event("conversation.item.deleted", item_id=ident),
    "response.created": event("response.created", response=response),
    "response.done": event("response.done", response=response),
    **{
        kind: event(kind, response_id=ident, output_index=st.just(0), item=item)
        for kind in ("response.output_item.added", "response.output_item.done")
    },
    **{
        kind: st.builds(lambda i, p, k=kind: {"type": k, **i, "part": p}, ids, part)
        for kind in ("response.content_part.added", "response.content_part.done")
    },
    **{
        kind: st.builds(lambda i, v, k=kind, f=key: {"type": k, **i, f: v}, ids, text)
        for kind, key in _IDS_KINDS.items()
    },
    "response.audio.done": ids.map(lambda i: {"type": "response.audio.done", **i}),
    **{
        f"response.function_call_arguments.{step}": event(
            f"response.function_call_arguments.{step}",
            response_id=ident,
            item_id=ident,
            output_index=st.just(0),
            call_id=ident,
            **{key: text},
        )
        for step, key in (("delta", "delta"), ("done", "arguments"))
    },
    "rate_limits.updated": event(
        "rate_limits.updated",
        rate_limits=st.just([{"name": "requests", "limit": 1, "remaining": 1, "reset_seconds": 1}]),
    ),
}


def normalised(beta: dict[str, Any], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """A beta event after beta → GA → beta, by the normalisations docs/beta.md lists (a client
    naming a retired model gets its alias; a server never names one)."""
    out = orjson.loads(orjson.dumps(beta))
    for key in ("session", "response"):
        obj = out.get(key)
        if not isinstance(obj, dict):
            continue
        obj.pop("temperature", None)  # GA has none
        obj.pop("client_secret", None)
        if obj.get("modalities") in (["audio"], ["audio", "text"]):
            obj["modalities"] = ["text", "audio"]
        if aliases and isinstance(obj.get("model"), str):
            obj["model"] = aliases.get(obj["model"], obj["model"])
        td = obj.get("turn_detection")
        if isinstance(td, dict) and "idle_timeout_ms" in td and td["idle_timeout_ms"] is None:
            del td["idle_timeout_ms"]
    return out


#: Each of the 40 event types gets a quarter of the profile's examples (the suite's time).
EACH_TYPE = settings(max_examples=max(10, settings.default.max_examples // 4))


@pytest.mark.parametrize("kind", sorted(BETA_CLIENT_EVENTS))
@EACH_TYPE
@given(data=st.data())
def test_every_beta_client_event_survives_the_round_trip_through_ga(
    kind: str, data: st.DataObject
) -> None:
    beta = data.draw(BETA_CLIENT_EVENTS[kind])
    ga, _ = client_to_ga(beta, DEFAULT_MODEL_ALIASES)
    assert client_to_beta(ga) == normalised(beta, DEFAULT_MODEL_ALIASES)


@pytest.mark.parametrize("kind", sorted(BETA_SERVER_EVENTS))
@EACH_TYPE
@given(data=st.data())
def test_every_beta_server_event_survives_the_round_trip_through_ga(
    kind: str, data: st.DataObject
) -> None:
    beta = data.draw(BETA_SERVER_EVENTS[kind])
    again = server_to_beta(server_to_ga(beta))
    assert again == normalised(beta)
    text = BetaTranslator().server(dumps(server_to_ga(beta)))
    assert text is not None and orjson.loads(text) == again


#: The beta event types of the protocol notes' tables (transcription_session.update and
#: .updated, which have no translation, are tested on their own).
BETA_TYPES = {
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
    "error",
    "session.created",
    "session.updated",
    "conversation.created",
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "input_audio_buffer.committed",
    "input_audio_buffer.cleared",
    "conversation.item.created",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.completed",
    "conversation.item.input_audio_transcription.failed",
    "conversation.item.truncated",
    "conversation.item.deleted",
    "conversation.item.retrieved",
    "response.created",
    "response.done",
    "response.output_item.added",
    "response.output_item.done",
    "response.content_part.added",
    "response.content_part.done",
    "response.text.delta",
    "response.text.done",
    "response.audio.delta",
    "response.audio.done",
    "response.audio_transcript.delta",
    "response.audio_transcript.done",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "rate_limits.updated",
}


def test_the_examples_and_the_round_trips_cover_every_event_type_of_the_tables() -> None:
    round_trips = {name.split(" ")[0] for name in BETA_CLIENT_EVENTS} | set(BETA_SERVER_EVENTS)
    examples = {beta["type"] for beta, _ in CLIENT_PAIRS} | {
        beta["type"] for _, beta in SERVER_PAIRS
    }
    assert round_trips == BETA_TYPES
    assert examples == BETA_TYPES


# -- the bridge: policy and limits on the GA side ----------------------------------------------


def opened(bridge: Bridge) -> Bridge:
    """``bridge`` with its upstream open and its session started (the client has had
    ``session.created``), so what it says reaches the client at once."""
    bridge.upstream_opened()
    while bridge.next_to_flush() is not None:
        pass
    bridge.upstream_message('{"type":"session.created","session":{}}')
    started = bridge.upstream_message('{"type":"session.updated","session":{}}')
    assert isinstance(started, Batch)
    return bridge


def bridges(policy: Policy) -> tuple[Bridge, BetaBridge]:
    """A GA bridge and a beta one with the same policy, both open."""
    ga = Bridge(session_update="{}", limits=LIMITS, policy=policy)
    beta = BetaBridge(
        session_update="{}", limits=LIMITS, policy=policy, translator=BetaTranslator()
    )
    opened(ga)
    opened(beta)
    return ga, beta


def answer(out: object) -> tuple[object, ...]:
    """What a bridge's answer comes to: the event sent upstream (if any), and the code and
    param of what the client is told (if anything)."""
    if isinstance(out, Reply):
        error = orjson.loads(out.text)["error"]
        return (None, error["code"], error["param"])
    if isinstance(out, Amended):
        error = orjson.loads(out.notice)["error"]
        return (orjson.loads(out.text), error["code"], error["param"])
    assert isinstance(out, str)
    return (orjson.loads(out), None, None)


LOCK_VOICE = Policy(locked=frozenset({"voice"}))
BETA_BY_POLICY = [
    (Policy(), {"type": "session.update", "session": {"model": "gpt-realtime-2"}}),
    (Policy(), {"type": "session.update", "session": {"voice": "ash", "modalities": ["text"]}}),
    (LOCK_VOICE, {"type": "session.update", "event_id": "p", "session": {"voice": "ash"}}),
    (LOCK_VOICE, {"type": "response.create", "response": {"voice": "ash", "instructions": "x"}}),
    (
        Policy(locked=frozenset({"voice"}), on_locked="refuse"),
        {"type": "session.update", "session": {"voice": "ash"}},
    ),
    (
        Policy(locked=frozenset({"turn_detection"})),
        {"type": "session.update", "session": {"turn_detection": None, "speed": 1.2}},
    ),
    (
        Policy(locked=frozenset({"output_modalities"})),
        {"type": "session.update", "session": {"modalities": ["text"]}},
    ),
    (
        Policy(locked=frozenset({"instructions", "tools"})),
        {"type": "session.update", "session": {"instructions": "Obey.", "tools": []}},
    ),
    (Policy(voices=frozenset({"marin"})), {"type": "session.update", "session": {"voice": "ash"}}),
    (
        Policy(voices=frozenset({"marin"})),
        {"type": "response.create", "response": {"voice": "marin"}},
    ),
    (
        Policy(max_output_tokens=100),
        {"type": "session.update", "session": {"max_response_output_tokens": "inf"}},
    ),
    (
        Policy(max_output_tokens=100),
        {"type": "response.create", "response": {"max_response_output_tokens": 500}},
    ),
    (
        Policy(client_events_denied=frozenset({"conversation.item.create"})),
        {"type": "conversation.item.create", "item": {"type": "message", "role": "user"}},
    ),
]


@pytest.mark.parametrize(("policy", "beta"), BETA_BY_POLICY)
def test_a_beta_event_meets_the_policy_exactly_as_its_ga_form_does(
    policy: Policy, beta: dict
) -> None:
    ga_bridge, beta_bridge = bridges(policy)
    ga_form, _ = client_to_ga(beta)
    sent, code, param = answer(ga_bridge.client_message(dumps(ga_form)))
    got = answer(beta_bridge.client_message(dumps(beta)))
    # The same goes upstream, and the client is told the same, the field named its way.
    assert got == (sent, code, None if param is None else ga_to_beta_param(param))


def test_a_locked_field_in_beta_shape_is_dropped_or_refused_by_its_beta_name() -> None:
    event = {"type": "session.update", "event_id": "v", "session": {"voice": "ash", "speed": 1.1}}
    _, bridge = bridges(LOCK_VOICE)
    out = bridge.client_message(dumps(event))
    assert isinstance(out, str)  # dropped, the rest sent (the policy does not announce drops)
    assert orjson.loads(out)["session"] == {"type": "realtime", "audio": {"output": {"speed": 1.1}}}
    _, strict = bridges(Policy(locked=frozenset({"voice"}), on_locked="refuse"))
    refused = strict.client_message(dumps(event))
    assert isinstance(refused, Reply)
    error = orjson.loads(refused.text)["error"]
    assert (error["code"], error["param"], error["event_id"]) == (
        "relay_field_locked",
        "session.voice",
        "v",
    )


def test_a_dropped_beta_field_warns_the_client_and_the_rest_goes_upstream() -> None:
    _, bridge = bridges(Policy())
    out = bridge.client_message(
        dumps({"type": "session.update", "session": {"voice": "ash", "temperature": 1.0}})
    )
    assert isinstance(out, Amended)
    assert orjson.loads(out.notice)["error"]["code"] == "relay_beta_field_dropped"
    assert orjson.loads(out.text)["session"] == {
        "type": "realtime",
        "audio": {"output": {"voice": "ash"}},
    }


def test_a_policy_notice_and_a_translation_warning_about_one_event_come_as_one() -> None:
    _, bridge = bridges(Policy())
    mcp = {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com/"}
    out = bridge.client_message(
        dumps({"type": "session.update", "session": {"tools": [mcp], "temperature": 1.0}})
    )
    assert isinstance(out, Amended)
    error = orjson.loads(out.notice)["error"]
    assert (error["code"], error["param"]) == ("relay_mcp_server_not_allowed", "session.tools")
    assert "session.temperature" in error["message"]


def test_before_session_created_a_translated_event_is_queued_in_ga_form_and_its_warning_waits() -> (
    None
):
    bridge = BetaBridge(
        session_update='{"type":"session.update"}', limits=LIMITS, translator=BetaTranslator()
    )
    assert (
        bridge.client_message(dumps({"type": "response.create", "response": {"temperature": 1.0}}))
        is None
    )
    assert (
        bridge.client_message(dumps({"type": "session.update", "session": {"voice": "ash"}}))
        is None
    )
    bridge.upstream_opened()
    flushed = [bridge.next_to_flush() for _ in range(3)]
    assert flushed[0] == '{"type":"session.update"}'
    assert orjson.loads(flushed[1]) == {"type": "response.create", "response": {}}  # type: ignore[arg-type]
    assert orjson.loads(flushed[2])["session"]["audio"] == {"output": {"voice": "ash"}}  # type: ignore[arg-type,index]
    bridge.next_to_flush()
    assert bridge.upstream_message('{"type":"session.created","session":{}}') is None
    started = bridge.upstream_message(
        dumps({"type": "session.updated", "session": {"output_modalities": ["audio"]}})
    )
    assert isinstance(started, Batch)
    first, warning = (orjson.loads(text) for text in started.texts)
    assert first == {"type": "session.created", "session": {"modalities": ["text", "audio"]}}
    assert warning["error"]["code"] == "relay_beta_field_dropped"  # after session.created


def test_an_untranslatable_event_is_answered_and_counted_but_never_sent() -> None:
    _, bridge = bridges(Policy())
    before = bridge.traffic.client_messages
    text = dumps({"type": "transcription_session.update", "session": {}})
    out = bridge.client_message(text)
    assert isinstance(out, Reply)
    assert orjson.loads(out.text)["error"]["code"] == "relay_beta_not_translated"
    assert bridge.traffic.client_messages == before + 1


def test_an_oversized_beta_message_ends_the_pair_as_any_other() -> None:
    _, bridge = bridges(Policy())
    big = '{"type":"session.update","session":{"instructions":"' + "x" * (1 << 20) + '"}}'
    out = bridge.client_message(big)
    assert isinstance(out, Ending) and out.client_code == 1009


def test_upstream_events_are_screened_in_ga_then_sent_in_beta() -> None:
    _, bridge = bridges(Policy())  # instructions are redacted by default
    updated = {
        "type": "session.updated",
        "session": {
            "type": "realtime",
            "instructions": "secret",
            "audio": {"output": {"voice": "marin"}},
        },
    }
    out = bridge.upstream_message(dumps(updated))
    assert orjson.loads(out) == {"type": "session.updated", "session": {"voice": "marin"}}  # type: ignore[arg-type]
    delta = '{"type":"response.output_audio.delta","delta":"AAAA"}'
    assert bridge.upstream_message(delta) == '{"type":"response.audio.delta","delta":"AAAA"}'
    done = dumps(
        {"type": "response.done", "response": {"output_modalities": ["text"], "usage": USAGE}}
    )
    assert orjson.loads(bridge.upstream_message(done))["response"]["modalities"] == ["text"]  # type: ignore[arg-type]
    assert len(bridge.responses_done) == 1  # accounting read the GA event
