"""negotiate(): the sans-IO handshake decision (the upgrade itself always succeeds)."""

from __future__ import annotations

import pytest

from mockrealtime.faults import Faults, parse_faults
from mockrealtime.handshake import mask_key, negotiate
from mockrealtime.models import is_realtime_model


def decide(
    target: str = "/v1/realtime?model=gpt-realtime",
    headers: dict[str, str] | None = None,
    protocols: tuple[str, ...] = (),
    reject_beta: bool = False,
):  # type: ignore[no-untyped-def]
    return negotiate(
        target,
        headers if headers is not None else {"authorization": "Bearer good"},
        list(protocols),
        key_is_valid=lambda k: k == "good",
        reject_beta=reject_beta,
    )


def test_bearer_header_wins_over_the_subprotocol_key() -> None:
    d = decide(protocols=("realtime", "openai-insecure-api-key.bad"))
    assert d.rejection is None and d.api_key == "good" and d.subprotocol == "realtime"


def test_subprotocol_key_alone_authenticates_and_realtime_is_selected_only_if_offered() -> None:
    d = decide(headers={}, protocols=("openai-insecure-api-key.good",))
    assert d.rejection is None and d.subprotocol is None
    d = decide(headers={}, protocols=("realtime", "openai-insecure-api-key.good"))
    assert d.subprotocol == "realtime"


def test_rejections_in_order_key_then_beta_then_model() -> None:
    assert decide(headers={}).rejection.close_reason == "invalid_request_error"  # type: ignore[union-attr]
    bad = decide(target="/v1/realtime?model=nope", headers={"authorization": "Bearer x"})
    assert bad.rejection is not None and bad.rejection.code == "invalid_api_key"
    beta = decide(
        target="/v1/realtime",
        headers={"authorization": "Bearer good", "openai-beta": "realtime = v1"},
        reject_beta=True,
    )
    assert beta.rejection is not None and beta.rejection.code == "beta_api_shape_disabled"
    assert beta.rejection.close_code == 4000
    assert decide(target="/v1/realtime").rejection.code == "missing_model"  # type: ignore[union-attr]


def test_transcription_intent_needs_no_model() -> None:
    d = decide(target="/v1/realtime?intent=transcription")
    assert d.rejection is None and d.intent == "transcription"


@pytest.mark.parametrize(
    "model",
    [
        "gpt-realtime",
        "gpt-realtime-2025-08-28",
        "gpt-realtime-mini",
        "gpt-4o-realtime-preview",
        "gpt-4o-mini-realtime-preview-2024-12-17",
    ],
)
def test_realtime_model_families_are_accepted(model: str) -> None:
    assert is_realtime_model(model)


@pytest.mark.parametrize("model", ["gpt-4o", "whisper-1", "realtime", "gpt-5-realtime"])
def test_other_models_are_not(model: str) -> None:
    assert not is_realtime_model(model)


def test_keys_are_masked_to_prefix_and_last_four() -> None:
    assert mask_key("sk-proj-abcdefgh1234") == "sk-…1234"
    assert mask_key("short") == "…"


def test_fault_header_syntax() -> None:
    faults = parse_faults("drop_after_events=3, send_delay=0.5,stall, close_after_open=4001:a b")
    assert faults == Faults(
        drop_after_events=3, send_delay=0.5, stall=True, close_after_open=(4001, "a b")
    )
    assert parse_faults("refuse_status=none", Faults(refuse_status=503)).refuse_status is None
    assert parse_faults("stall=false", Faults(stall=True)).stall is False
    for bad, message in [
        ("nope=1", "unknown fault"),
        ("send_delay=x", "bad value"),
        ("refuse_status", "needs a value"),
        ("refuse_status=200", "400-599"),
        ("send_delay=-1", ">= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_faults(bad)
