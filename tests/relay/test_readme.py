"""The README stays true to the code it documents."""

from __future__ import annotations

from pathlib import Path

from relay.config import SETTINGS

README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_quickstart_commands() -> None:
    head = README[:600]
    assert "uv run relay demo" in head and "uv run pytest" in head


def test_configuration_table_lists_every_setting_with_its_flag() -> None:
    for setting in SETTINGS:
        flag = "—" if setting.secret else f"`{setting.flag}`"
        assert f"| `{setting.env}` | {flag} |" in README, setting.env
