"""Settings are validated once, and a bad one names itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import SETTINGS, ConfigError, load_config
from relay.core import models


def test_defaults_need_nothing_but_give_the_real_api() -> None:
    config = load_config({})
    assert config.upstream_url == "wss://api.openai.com/v1/realtime"
    assert config.model == "gpt-realtime-2.1"
    assert config.port == 8000
    assert config.session_object()["type"] == "realtime"


def test_environment_values_are_typed() -> None:
    config = load_config(
        {"RELAY_PORT": "9001", "RELAY_DIAL_TIMEOUT": "2.5", "RELAY_MODELS": "a, b",
         "RELAY_PERMESSAGE_DEFLATE": "yes"}
    )
    assert (config.port, config.dial_timeout, config.models) == (9001, 2.5, ("a", "b"))
    assert config.permessage_deflate is True
    assert config.allowed_models == ("a", "b", "gpt-realtime-2.1")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELAY_PORT": "eighty"}, "RELAY_PORT"),
        ({"RELAY_PORT": "70000"}, "RELAY_PORT"),
        ({"RELAY_DIAL_TIMEOUT": "0"}, "RELAY_DIAL_TIMEOUT"),
        ({"RELAY_UPSTREAM_URL": "https://api.openai.com/v1/realtime"}, "RELAY_UPSTREAM_URL"),
        ({"RELAY_UPSTREAM_URL": "wss://x/v1/realtime?model=a"}, "RELAY_UPSTREAM_URL"),
        ({"RELAY_UPSTREAM_AUTH": "query"}, "RELAY_UPSTREAM_AUTH"),
        ({"RELAY_BINARY_FRAMES": "drop"}, "RELAY_BINARY_FRAMES"),
        ({"RELAY_BETA": "ignore"}, "RELAY_BETA"),
        ({"RELAY_MODEL_ALIASES": "gpt-4o-realtime-preview"}, "RELAY_MODEL_ALIASES"),
        ({"RELAY_MODEL_ALIASES": "old=gpt-realtime-9"}, "RELAY_MODEL_ALIASES"),
        ({"RELAY_SAFETY_IDENTIFIER": "plain"}, "RELAY_SAFETY_IDENTIFIER"),
        ({"RELAY_PERMESSAGE_DEFLATE": "maybe"}, "RELAY_PERMESSAGE_DEFLATE"),
        ({"RELAY_TWILIO_DTMF": "tones"}, "RELAY_TWILIO_DTMF"),
        ({"RELAY_TWILIO_MAX_CALLS": "-1"}, "RELAY_TWILIO_MAX_CALLS"),
        ({"RELAY_PUBLIC_URL": "relay.example.com"}, "RELAY_PUBLIC_URL"),
        ({"RELAY_PUBLIC_URL": "wss://relay.example.com"}, "RELAY_PUBLIC_URL"),
        ({"RELAY_PUBLIC_URL": "https://relay.example.com/?a=1"}, "RELAY_PUBLIC_URL"),
    ],
)
def test_a_bad_setting_stops_start_up_and_names_itself(env: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_config(env)


def test_toml_file_sets_values_and_the_session(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        'model = "gpt-realtime-2"\nqueue_messages = 3\n'
        '[session]\ninstructions = "Speak like a pirate."\n'
        '[session.audio.output]\nvoice = "cedar"\n'
    )
    config = load_config({"RELAY_CONFIG": str(path), "RELAY_VOICE": "ash"})
    assert config.model == "gpt-realtime-2"
    assert config.queue_messages == 3
    session = config.session_object()
    assert session["instructions"] == "Speak like a pirate."
    assert session["audio"]["output"]["voice"] == "ash"  # env wins over the file


def test_toml_file_may_not_hold_the_api_key(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('openai_api_key = "sk-x"\n')
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        load_config({"RELAY_CONFIG": str(path)})


def test_unknown_toml_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'prot'"):
        load_config({"RELAY_CONFIG": str(path)})


def test_the_key_never_shows_in_the_config_repr() -> None:
    config = load_config({"OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(config)
    # OTEL_EXPORTER_OTLP_ENDPOINT is OpenTelemetry's own name for where traces go.
    assert all(s.env.startswith(("RELAY_", "OPENAI_", "OTEL_")) for s in SETTINGS)


def test_retired_models_have_aliases_to_todays_models_by_default() -> None:
    config = load_config({})
    assert config.beta == "translate"
    assert config.aliases["gpt-4o-realtime-preview-2024-10-01"] == "gpt-realtime-2.1"
    assert config.aliases["gpt-4o-mini-realtime-preview"] == "gpt-realtime-2.1-mini"
    assert set(config.aliases.values()) <= set(models.CURRENT)
    # A shipped alias whose model the operator does not allow is left out, not an error.
    only_full = load_config({"RELAY_MODELS": "gpt-realtime-2.1"})
    assert "gpt-4o-mini-realtime-preview" not in only_full.aliases
    assert only_full.aliases["gpt-4o-realtime-preview"] == "gpt-realtime-2.1"


def test_model_aliases_can_be_replaced_or_turned_off() -> None:
    config = load_config({"RELAY_MODEL_ALIASES": "gpt-4o-realtime-preview=gpt-realtime-2"})
    assert config.aliases == {"gpt-4o-realtime-preview": "gpt-realtime-2"}
    assert load_config({"RELAY_MODEL_ALIASES": "none"}).aliases == {}


def test_the_twilio_auth_token_is_a_secret_read_from_the_environment_only(tmp_path: Path) -> None:
    config = load_config({"RELAY_TWILIO_AUTH_TOKEN": "tw-secret-0123"})
    assert "tw-secret-0123" not in repr(config)
    assert "tw-secret-0123" in config.secrets  # so the log redacts it
    path = tmp_path / "relay.toml"
    path.write_text('twilio_auth_token = "tw-secret-0123"\n')
    with pytest.raises(ConfigError, match="RELAY_TWILIO_AUTH_TOKEN"):
        load_config({"RELAY_CONFIG": str(path)})


def test_the_warm_pool_reads_n_for_the_default_model_or_model_n_pairs() -> None:
    assert load_config({}).warm_pool_sizes == {}
    assert load_config({"RELAY_WARM_POOL": "3"}).warm_pool_sizes == {"gpt-realtime-2.1": 3}
    config = load_config(
        {"RELAY_WARM_POOL": "gpt-realtime-2.1=2, gpt-realtime-mini=1, gpt-realtime=0",
         "RELAY_MODELS": "gpt-realtime-mini,gpt-realtime"}
    )
    assert config.warm_pool_sizes == {"gpt-realtime-2.1": 2, "gpt-realtime-mini": 1}
    assert load_config({"RELAY_WARM_POOL_MAX_AGE": "1800"}).warm_pool_max_age == 1800


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RELAY_WARM_POOL": "many"}, "`N` or `MODEL=N`"),
        ({"RELAY_WARM_POOL": "65"}, "from 0 to 64"),
        ({"RELAY_WARM_POOL": "-1"}, "from 0 to 64"),
        ({"RELAY_WARM_POOL": "gpt-4o=2"}, "not one of the relay's models"),
        ({"RELAY_WARM_POOL": "gpt-realtime*=2", "RELAY_MODELS": "gpt-realtime*"}, "not a pattern"),
        ({"RELAY_WARM_POOL": "2,gpt-realtime-2.1=1"}, "names gpt-realtime-2.1 twice"),
        ({"RELAY_WARM_POOL_MAX_AGE": "3600"}, "at most 1800"),
        ({"RELAY_WARM_POOL_MAX_AGE": "0"}, "above 0"),
    ],
)
def test_a_bad_warm_pool_is_refused_with_what_to_write(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError, match="RELAY_WARM_POOL") as refused:
        load_config(env)
    assert says in str(refused.value)
