"""Write docs/configuration.md from the settings table, ``relay.config.SETTINGS``.

    uv run python tools/configuration_md.py

The page is generated so that it cannot drift from the code: a test
(tests/relay/test_docs.py) fails when the file differs from what this renders. Add or change a
setting in ``relay/config.py``, then run this. The prose around the table lives here.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from relay.config import DEFAULT_SESSION, SETTINGS, Setting

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "docs" / "configuration.md"
COMMAND = "uv run python tools/configuration_md.py"

INTRO = """\
# Configuration

Settings come from, in increasing priority: built-in defaults, the TOML file named by
`RELAY_CONFIG` (or `--config FILE`; keys are the lower-case setting names, plus the `[session]`,
`[policy]` and `[prices]` tables), environment variables, and command-line flags of `relay serve`.
Secrets are read from the environment only. `relay serve --help` lists the same flags with their
defaults.

The state directory, where the default SQLite usage store lives, is `$XDG_STATE_HOME/relay`, or
`~/.local/state/relay` when `XDG_STATE_HOME` is unset; `relay serve` prints the store's path at
start. The container image sets `XDG_STATE_HOME=/data`, its volume.
"""

#: The file the other settings may come from: a flag of its own, not a setting.
CONFIG_ROW = (
    "| `RELAY_CONFIG` | `--config` | (unset) | TOML file with settings and the `[session]`, `[policy]` and `[prices]` tables. |"
)

SESSION_INTRO = """\
Message sizes count characters for text frames and bytes for binary frames.

The session the relay asks for (sent as the first upstream message, GA shape) defaults to:
"""

SESSION_OUTRO = """\
A `[session]` table in `RELAY_CONFIG` replaces the top-level keys it names (so a
`[session.audio]` table replaces the whole `audio` object); `RELAY_INSTRUCTIONS` and `RELAY_VOICE`
override single fields. Clients may still send their own `session.update`; it reaches the upstream
after the relay's.
"""


def cell(text: str) -> str:
    """Markdown for a table cell: ``<``, ``>`` escaped outside code spans, ``|`` everywhere."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside backticks
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def row(setting: Setting) -> str:
    flag = "—" if setting.secret else f"`{setting.flag}`"
    default = setting.shown_default()
    return f"| `{setting.env}` | {flag} | {cell(default)} | {cell(setting.help)} |"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string, too
    raise TypeError(f"no TOML for {value!r} in the default session")


def toml_tables(name: str, table: dict[str, Any]) -> list[str]:
    """``[name]`` with its scalar keys, then its sub-tables; a table with no keys of its own
    is left implicit."""
    scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
    lines = [f"[{name}]", *(f"{k} = {toml_value(v)}" for k, v in scalars)] if scalars else []
    for key, value in table.items():
        if isinstance(value, dict):
            sub = toml_tables(f"{name}.{key}", value)
            lines += ([""] if lines and sub else []) + sub
    return lines


def render() -> str:
    banner = (
        f"<!-- Generated from the settings table (relay/config.py) by `{COMMAND}`."
        " Do not edit by hand: change the settings, then run it. -->"
    )
    table = [
        "| variable | flag | default | meaning |",
        "|---|---|---|---|",
        CONFIG_ROW,
        *(row(setting) for setting in SETTINGS),
    ]
    session = ["```toml", *toml_tables("session", DEFAULT_SESSION), "```"]
    return "\n".join(
        [banner, INTRO, *table, "", SESSION_INTRO, *session, "", SESSION_OUTRO.rstrip("\n")]
    ) + "\n"


def main() -> int:
    TARGET.write_text(render(), encoding="utf-8")
    rows = len(re.findall(r"^\| `[A-Z_]+` \|", TARGET.read_text(), re.M))
    print(f"wrote {TARGET.relative_to(ROOT)} ({rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
