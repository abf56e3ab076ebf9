"""The relay's model table follows the installed openai SDK, and the configuration uses it."""

from __future__ import annotations

import logging
import re
from datetime import date
from pathlib import Path
from typing import Literal, get_args, get_origin

import openai.types.realtime as sdk_types
import pytest

from relay.config import deprecation_warning, load_config
from relay.core import models

SDK_FILES = sorted(Path(sdk_types.__file__).parent.glob("realtime_session_create_request*.py"))

#: SDK models the relay neither offers by default nor warns about: the preview family of the
#: retired beta dialect, dated snapshots and the audio models the SDK lists without a shutdown
#: date. A model the SDK adds lands in none of the lists, and the tests below name it.
NEITHER = frozenset(
    {
        "gpt-4o-realtime-preview",
        "gpt-4o-realtime-preview-2024-10-01",
        "gpt-4o-realtime-preview-2024-12-17",
        "gpt-4o-realtime-preview-2025-06-03",
        "gpt-4o-mini-realtime-preview",
        "gpt-4o-mini-realtime-preview-2024-12-17",
        "gpt-realtime-mini-2025-10-06",
        "gpt-audio-1.5",
        "gpt-audio-mini-2025-10-06",
    }
)


def sdk_model_names() -> set[str]:
    """The names of ``RealtimeSessionCreateRequest.model``'s Literal."""
    annotation = sdk_types.RealtimeSessionCreateRequest.model_fields["model"].annotation
    names: set[str] = set()
    for arm in get_args(annotation):
        if get_origin(arm) is Literal:
            names.update(get_args(arm))
    return names


def sdk_deprecations(path: Path) -> dict[str, date]:
    """The "Deprecated values" of the ``model`` field's docstring: each name and its shutdown."""
    source = path.read_text(encoding="utf-8")
    field = re.search(r"\n    model: .*?\"\"\"(.*?)\"\"\"", source, re.DOTALL)
    assert field is not None, f"no model field in {path.name}"
    found: dict[str, date] = {}
    for names, day in re.findall(
        r"- ((?:\"[^\"]+\",?\s*)+):\s*Announced shutdown date: (\d{4}-\d{2}-\d{2})", field.group(1)
    ):
        for name in re.findall(r'"([^"]+)"', names):
            found[name] = date.fromisoformat(day)
    return found


def test_the_sdk_files_are_there() -> None:
    assert [p.name for p in SDK_FILES][:2] == [
        "realtime_session_create_request.py",
        "realtime_session_create_request_param.py",
    ]


@pytest.mark.parametrize("path", SDK_FILES[:2], ids=lambda p: p.name)
def test_deprecated_models_and_shutdown_dates_are_the_sdks(path: Path) -> None:
    assert dict(models.DEPRECATED) == sdk_deprecations(path)


def test_current_models_are_sdk_models_and_none_is_deprecated() -> None:
    names = sdk_model_names()
    assert set(models.CURRENT) <= names, set(models.CURRENT) - names
    assert not set(models.CURRENT) & set(models.DEPRECATED)
    unplaced = names - set(models.CURRENT) - set(models.DEPRECATED) - NEITHER
    assert not unplaced, f"the SDK lists models the relay does not place: {sorted(unplaced)}"


def test_defaults_are_todays_models() -> None:
    config = load_config({})
    assert config.model == "gpt-realtime-2.1"
    assert config.models == models.CURRENT
    assert not {config.model, *config.models} & set(models.DEPRECATED)
    assert deprecation_warning(config) is None


def test_the_allow_list_takes_glob_patterns() -> None:
    config = load_config({"RELAY_MODELS": "gpt-realtime-2*"})
    assert config.allows_model("gpt-realtime-2") and config.allows_model("gpt-realtime-2.1-mini")
    assert config.allows_model("gpt-realtime-2.1")  # RELAY_MODEL, always
    assert not config.allows_model("gpt-realtime-1.5")
    assert not config.allows_model("gpt-realtime")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELAY_MODEL": "gpt-realtime"}, ["gpt-realtime"]),
        ({"RELAY_MODELS": "gpt-realtime-mini,gpt-realtime-2"}, ["gpt-realtime-mini"]),
        ({"RELAY_MODELS": "gpt-realtime*"}, ["gpt-realtime", "gpt-realtime-2025-08-28", "gpt-realtime-mini"]),
    ],
)
def test_a_deprecated_model_in_the_configuration_is_named_with_its_shutdown(
    env: dict[str, str], named: list[str]
) -> None:
    warning = deprecation_warning(load_config(env))
    assert warning is not None
    for name in named:
        assert f"{name} (shuts down 2027-01-20)" in warning
    assert "gpt-realtime-2.1" in warning  # what to move to
    assert "\n" not in warning


def test_relay_serve_starts_with_one_warning_line_for_a_deprecated_model(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relay import cli

    started: list[object] = []
    monkeypatch.setattr(cli.trio, "run", lambda *args: started.append(args))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-models-0123456789")
    monkeypatch.setenv("RELAY_MODEL", "gpt-realtime-mini")
    monkeypatch.setenv("RELAY_ALLOW_ANONYMOUS", "true")
    with caplog.at_level(logging.WARNING, logger="relay"):
        assert cli.main(["serve"]) == 0
    lines = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert len(lines) == 1 and "gpt-realtime-mini (shuts down 2027-01-20)" in lines[0]
    assert started, "the relay went on to serve"


def test_the_relay_and_mockrealtime_know_the_same_models() -> None:
    """The fake keeps its own table (it must not import the relay); both follow the SDK."""
    from mockrealtime.models import REALTIME_MODELS

    mock_deprecated = {name: day for name, day in REALTIME_MODELS.items() if day is not None}
    assert dict(models.DEPRECATED) == mock_deprecated
    current = {name for name, day in REALTIME_MODELS.items() if day is None}
    assert set(models.CURRENT) <= current
    assert current - set(models.CURRENT) <= NEITHER  # the rest: the ones the relay leaves out


def test_a_spending_budget_wants_the_models_named_not_patterned() -> None:
    from relay.config import ConfigError

    with pytest.raises(ConfigError, match="pattern 'gpt-realtime-2\\*'"):
        load_config({"RELAY_MODELS": "gpt-realtime-2*", "RELAY_DAILY_BUDGET_USD": "5"})
    named = load_config({"RELAY_MODELS": "gpt-realtime-2,gpt-realtime-2.1-mini", "RELAY_DAILY_BUDGET_USD": "5"})
    assert named.allows_model("gpt-realtime-2")
