"""The README and docs/ stay true to the code they document."""

from __future__ import annotations

from pathlib import Path

from relay.config import SETTINGS

ROOT = Path(__file__).parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
POLICY = (ROOT / "docs" / "policy.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_quickstart_commands() -> None:
    head = README[:600]
    assert "uv run relay demo" in head and "uv run pytest" in head


def test_configuration_table_lists_every_setting_with_its_flag() -> None:
    for setting in SETTINGS:
        flag = "—" if setting.secret else f"`{setting.flag}`"
        assert f"| `{setting.env}` | {flag} |" in CONFIGURATION, setting.env


def test_the_policy_block_shows_the_defaults_it_claims_to_show() -> None:
    import re
    import tomllib

    from relay.core.policy import TABLE_KEYS, Policy

    section = POLICY
    block = re.search(r"```toml\n(\[policy\]\n.*?)```", section, re.DOTALL)
    assert block is not None
    table = tomllib.loads(block.group(1))["policy"]
    assert Policy.from_table(table) == Policy()
    # Every key of the table is shown (a commented-out one where the default is "unset").
    for key in TABLE_KEYS:
        assert re.search(rf"^#? ?{key} = ", block.group(1), re.MULTILINE), key


def test_the_policy_recipe_is_a_configuration_the_relay_takes(tmp_path: Path) -> None:
    import re

    from relay.config import load_config

    recipe = POLICY[POLICY.index("## Recipe"):]
    toml = re.search(r"```toml\n(.*?)```", recipe, re.DOTALL)
    env = re.search(r"```sh\n(.*?)```", recipe, re.DOTALL)
    assert toml is not None and env is not None
    path = tmp_path / "relay.toml"
    path.write_text(toml.group(1))
    environ = {}
    for line in env.group(1).splitlines():
        name, _, value = line.split("#")[0].strip().partition("=")
        if name and name not in ("RELAY_JWT_SECRET", "RELAY_CONFIG"):  # placeholders
            environ[name] = value
    assert {s.env for s in SETTINGS} >= set(environ)
    environ["RELAY_CONFIG"] = str(path)
    config = load_config(environ)
    assert config.policy.locked >= {"model", "instructions", "tools"}
    assert config.policy.client_may_send("input_audio_buffer.append")
    assert config.allows_model(config.model) and not config.allows_model("gpt-realtime-2.1")
