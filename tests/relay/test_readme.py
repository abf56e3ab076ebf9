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
