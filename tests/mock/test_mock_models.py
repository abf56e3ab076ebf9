"""The fake's model tables match the installed ``openai`` SDK, and the handshake follows them."""

from __future__ import annotations

import inspect
import random
import re
import typing
from datetime import date
from typing import Any

import pytest
from openai.types.realtime import audio_transcription, realtime_session_create_request
from openai.types.realtime.audio_transcription import AudioTranscription
from openai.types.realtime.realtime_session_create_request import RealtimeSessionCreateRequest

from mockrealtime.handshake import negotiate
from mockrealtime.models import REALTIME_MODELS, TRANSCRIPTION_MODELS, shutdown_date
from mockrealtime.session import Session

from .helpers import FakeClock, send, user_text


def sdk_literal(model: type, field: str) -> set[str]:
    """The string literals of a ``Union[str, Literal[...], None]`` field of an SDK model."""
    found: set[str] = set()
    for arg in typing.get_args(model.model_fields[field].annotation):
        if typing.get_origin(arg) is typing.Literal:
            found.update(typing.get_args(arg))
    return found


def sdk_shutdowns(module: object, field: str) -> dict[str, date]:
    """Names and dates from the field docstring's "Announced shutdown date" notes."""
    source = inspect.getsource(module)  # type: ignore[arg-type]
    doc = source.split(f"    {field}:", 1)[1].split('"""', 2)[1]
    notes = doc.split("Deprecated values:", 1)[1] if "Deprecated values:" in doc else ""
    dates: dict[str, date] = {}
    for bullet in notes.split("\n    - ")[1:]:
        names, _, rest = bullet.partition("Announced shutdown date:")
        when = re.search(r"\d{4}-\d{2}-\d{2}", rest)
        assert when, f"no date in {bullet!r}"
        for name in re.findall(r'"([^"]+)"', names):
            dates[name] = date.fromisoformat(when.group())
    return dates


@pytest.mark.parametrize(
    ("table", "model", "module", "field"),
    [
        (REALTIME_MODELS, RealtimeSessionCreateRequest, realtime_session_create_request, "model"),
        (TRANSCRIPTION_MODELS, AudioTranscription, audio_transcription, "model"),
    ],
    ids=["realtime", "transcription"],
)
def test_model_tables_match_the_sdk(
    table: typing.Mapping[str, date | None], model: type, module: object, field: str
) -> None:
    names = sdk_literal(model, field)
    shutdowns = sdk_shutdowns(module, field)
    assert shutdowns, "the SDK's docstring format changed: no deprecation notes found"
    assert sorted(names - set(table)) == [], "models the SDK knows and the fake does not"
    assert sorted(set(table) - names) == [], "models the fake knows and the SDK does not"
    assert {n: d for n, d in table.items() if d is not None} == shutdowns


def test_the_models_named_for_issue_20_are_current_or_deprecated_as_announced() -> None:
    for name in ("gpt-realtime-2", "gpt-realtime-2.1", "gpt-realtime-2.1-mini", "gpt-realtime-1.5"):
        assert REALTIME_MODELS[name] is None
    deprecated = (
        "gpt-realtime",
        "gpt-realtime-2025-08-28",
        "gpt-realtime-mini",
        "gpt-realtime-mini-2025-12-15",
        "gpt-audio-mini",
        "gpt-audio-mini-2025-12-15",
    )
    assert {shutdown_date(name) for name in deprecated} == {date(2027, 1, 20)}
    assert shutdown_date("gpt-realtime-2") is None and shutdown_date("nope") is None


def handshake(model: str) -> str | None:
    """The rejection code for ``?model=…`` with a valid key (None when accepted)."""
    decision = negotiate(
        f"/v1/realtime?model={model}",
        {"authorization": "Bearer sk-test"},
        [],
        key_is_valid=lambda key: True,
    )
    return None if decision.rejection is None else decision.rejection.code


@pytest.mark.parametrize("model", sorted(REALTIME_MODELS))
def test_every_known_model_opens_a_session_deprecated_ones_too(model: str) -> None:
    assert handshake(model) is None


@pytest.mark.parametrize(
    "model", ["gpt-realtime-3", "gpt-realtime-2.1-MINI", "gpt-4o", "whisper-1", "gpt-realtime-"]
)
def test_an_unknown_model_is_refused_with_invalid_model(model: str) -> None:
    assert handshake(model) == "invalid_model"


def test_a_deprecated_model_answers_like_a_current_one() -> None:
    def first_turn(model: str) -> list[dict[str, Any]]:
        session = Session("ga", model, FakeClock(), random.Random(3), pace=0)
        session.open()
        send(session, user_text("Hi"))
        return send(session, {"type": "response.create"})

    turn = first_turn("gpt-realtime-mini")
    assert turn == first_turn("gpt-realtime-2.1-mini")  # same seed: the very same events
    assert [e["type"] for e in turn][-2:] == ["response.done", "rate_limits.updated"]


def with_transcription(model: str) -> list[dict[str, Any]]:
    """The answer to a session.update that turns on input transcription with ``model``."""
    session = Session("ga", "gpt-realtime-2", FakeClock(), random.Random(0))
    session.open()
    audio = {"input": {"transcription": {"model": model}}}
    return send(
        session, {"type": "session.update", "session": {"type": "realtime", "audio": audio}}
    )


@pytest.mark.parametrize("model", sorted(TRANSCRIPTION_MODELS))
def test_every_known_transcription_model_is_accepted(model: str) -> None:
    out = with_transcription(model)
    assert [e["type"] for e in out] == ["session.updated"]
    assert out[0]["session"]["audio"]["input"]["transcription"]["model"] == model


def test_an_unknown_transcription_model_is_refused() -> None:
    error = with_transcription("gpt-4o-transcribe-latest")[0]["error"]
    assert error["code"] == "invalid_value"
    assert error["param"] == "session.audio.input.transcription.model"
