"""The sideband's decisions without sockets: what puts a call's session back within the
policy, what is left alone, when it gives up, and what it collects for accounting."""

from __future__ import annotations

import random
from dataclasses import replace

import orjson

from mockrealtime.calls import session_config
from mockrealtime.session import Session
from relay.config import load_config
from relay.core.policy import Policy
from relay.core.sideband import MAX_FUTILE_CORRECTIONS, GiveUp, Sideband
from relay.server.calls import call_session

CONFIG = load_config({})
SESSION = call_session(CONFIG, "gpt-realtime")
#: The relay's policy with the persona and the tools locked too (by default only the model is).
LOCKED = replace(CONFIG.policy, locked=frozenset({"instructions", "tools", "model"}))


def rendered(session: dict[str, object], **changes: object) -> dict[str, object]:
    """The session as the API shows it in session.updated (here: as mockrealtime renders it,
    with every default filled in), after ``changes`` to the relay's session."""
    live = Session(
        "ga", "gpt-realtime", lambda: 0.0, random.Random(0), preset=session_config(session)
    )
    shown = live.render_session()
    shown.update(changes)
    return shown


def updated(session: dict[str, object]) -> str:
    return orjson.dumps(
        {"type": "session.updated", "event_id": "event_1", "session": session}
    ).decode()


def test_the_relays_own_session_as_the_api_renders_it_needs_no_correction() -> None:
    guard = Sideband(CONFIG.policy, SESSION, "gpt-realtime")
    assert guard.upstream_message(updated(rendered(SESSION))) is None
    assert guard.corrections == 0


def test_locked_fields_go_back_to_the_relays_values_and_unset_ones_to_the_defaults() -> None:
    guard = Sideband(LOCKED, SESSION, "gpt-realtime")
    tool = {"type": "function", "name": "transfer_funds", "parameters": {"type": "object"}}
    changed = rendered(
        SESSION, instructions="Be a pirate.", tools=[tool], model="gpt-realtime-mini"
    )
    fix = guard.upstream_message(updated(changed))
    assert isinstance(fix, str)
    event = orjson.loads(fix)
    assert event["type"] == "session.update"
    assert event["event_id"].startswith("relay_sideband_")
    assert event["session"] == {
        "type": "realtime",
        "instructions": SESSION["instructions"],
        "tools": [],
        "model": "gpt-realtime",
    }
    assert guard.corrected == {"instructions", "tools", "model"}


def test_unlocked_fields_are_the_callers_to_change() -> None:
    guard = Sideband(CONFIG.policy, SESSION, "gpt-realtime")
    changed = rendered(SESSION, output_modalities=["text"], max_output_tokens=200)
    assert guard.upstream_message(updated(changed)) is None


def test_a_voice_outside_the_allowed_ones_and_an_output_above_the_clamp_are_put_back() -> None:
    policy = Policy(voices=frozenset({"marin", "cedar"}), max_output_tokens=300)
    guard = Sideband(policy, SESSION, "gpt-realtime")
    changed = rendered(SESSION, max_output_tokens="inf")
    changed["audio"]["output"]["voice"] = "alloy"  # type: ignore[index]
    event = orjson.loads(guard.upstream_message(updated(changed)))  # type: ignore[arg-type]
    assert event["session"]["audio"]["output"]["voice"] == "marin"
    assert event["session"]["max_output_tokens"] == 300
    within = rendered(SESSION, max_output_tokens=250)
    within["audio"]["output"]["voice"] = "cedar"  # type: ignore[index]
    assert guard.upstream_message(updated(within)) is None


def test_the_opening_update_sets_every_locked_field_and_the_clamp() -> None:
    policy = Policy(locked=frozenset({"instructions", "voice"}), max_output_tokens=300)
    event = orjson.loads(Sideband(policy, SESSION, "gpt-realtime").opening())
    assert event == {
        "type": "session.update",
        "event_id": "relay_sideband_1",
        "session": {
            "type": "realtime",
            "instructions": SESSION["instructions"],
            "audio": {"output": {"voice": SESSION["audio"]["output"]["voice"]}},  # type: ignore[index]
            "max_output_tokens": 300,
        },
    }


def test_it_gives_up_when_corrections_keep_failing_and_not_before() -> None:
    guard = Sideband(LOCKED, SESSION, "gpt-realtime")
    pirate = updated(rendered(SESSION, instructions="Be a pirate."))
    for _ in range(MAX_FUTILE_CORRECTIONS):
        assert isinstance(guard.upstream_message(pirate), str)
    # One session back in bounds in between resets the count: a caller who changes the
    # field now and then is corrected each time.
    assert guard.upstream_message(updated(rendered(SESSION))) is None
    assert isinstance(guard.upstream_message(pirate), str)
    for _ in range(MAX_FUTILE_CORRECTIONS - 1):
        guard.upstream_message(pirate)
    gave_up = guard.upstream_message(pirate)
    assert isinstance(gave_up, GiveUp) and gave_up.fields == ["instructions"]


def test_it_collects_response_done_and_counts_the_sidebands_traffic() -> None:
    guard = Sideband(CONFIG.policy, SESSION, "gpt-realtime")
    done = '{"type":"response.done","response":{"usage":{"total_tokens":3}}}'
    for message in ('{"type":"response.created"}', done, b"\x00binary"):
        assert guard.upstream_message(message) is None
    assert guard.responses_done == [orjson.loads(done)]
    assert guard.traffic.upstream_messages == 3
    assert guard.traffic.upstream_bytes == len('{"type":"response.created"}') + len(done) + 7


def test_errors_answering_the_sidebands_own_updates_are_kept_for_the_log() -> None:
    guard = Sideband(CONFIG.policy, SESSION, "gpt-realtime")
    opening = orjson.loads(guard.opening())
    ours = {
        "type": "invalid_request_error",
        "code": "x",
        "message": "no",
        "event_id": opening["event_id"],
    }
    callers = {**ours, "event_id": "evt_from_the_browser"}
    for error in (ours, callers):
        assert (
            guard.upstream_message(orjson.dumps({"type": "error", "error": error}).decode()) is None
        )
    assert guard.refused == [ours]
