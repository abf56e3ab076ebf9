"""docs/ stays true to the code: the configuration page is generated from the settings table,
and every link between the README and docs/ leads somewhere."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from relay.config import DEFAULT_SESSION, SETTINGS
from tools import configuration_md

ROOT = Path(__file__).parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"


def test_configuration_md_is_what_the_settings_table_renders() -> None:
    assert CONFIGURATION.read_text(encoding="utf-8") == configuration_md.render(), (
        "docs/configuration.md is stale (a setting changed in relay/config.py?):"
        f" regenerate it with `{configuration_md.COMMAND}`"
    )


def test_the_generated_page_names_its_command_at_the_top() -> None:
    first = configuration_md.render().splitlines()[0]
    assert first.startswith("<!--") and f"`{configuration_md.COMMAND}`" in first


def test_every_setting_has_a_row_with_its_default() -> None:
    page = configuration_md.render()
    for setting in SETTINGS:
        flag = "—" if setting.secret else f"`{setting.flag}`"
        assert f"| `{setting.env}` | {flag} | {setting.shown_default()} |" in page, setting.env


def test_the_session_block_is_the_default_session() -> None:
    block = re.search(r"```toml\n(\[session\].*?)```", configuration_md.render(), re.S)
    assert block is not None
    assert tomllib.loads(block.group(1)) == {"session": DEFAULT_SESSION}


def test_cells_escape_what_markdown_would_read_as_html_or_a_column() -> None:
    assert configuration_md.cell("a <key> `<b>` x|y") == "a &lt;key&gt; `<b>` x\\|y"


def test_every_relative_link_in_the_readme_and_docs_leads_to_a_file() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench/README.md"]
    for page in pages:
        for target in re.findall(r"\]\((?!https?:|#|mailto:)([^)#\s]+)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to {target}"
