"""The README's "Use with the OpenAI SDKs" snippets run, as written, against ``relay demo``.

Each snippet is taken from the README, pointed at a demo on a free port instead of 8000 (the
only change), and run: Python ones with this project's Python (which has ``openai`` and
``openai-agents``), JavaScript ones with Node and the packages of tests/clients/node. The
snippet that dials ``https://`` runs against ``relay demo --tls``, with the
``NODE_EXTRA_CA_CERTS`` the demo prints.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .relays import relay_demo
from .test_node_clients import NODE_DIR, node_or_skip

README = Path(__file__).parents[2] / "README.md"
SECTION = "## Use with the OpenAI SDKs"
RUN_TIMEOUT = 60


def snippets() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the README's SDK section."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end != -1 else len(text)]
    return re.findall(r"```(python|js)\n(.*?)```", section, re.DOTALL)


SNIPPETS = snippets()


def test_the_section_shows_python_agents_python_agents_js_and_node() -> None:
    assert [language for language, _ in SNIPPETS] == ["python", "python", "js", "js"]
    assert "client.realtime.connect" in SNIPPETS[0][1]
    assert "RealtimeRunner" in SNIPPETS[1][1]
    assert "@openai/agents-realtime" in SNIPPETS[2][1]
    assert "OpenAIRealtimeWS" in SNIPPETS[3][1]


@pytest.mark.parametrize(
    ("language", "code"), SNIPPETS, ids=[f"{lang}-{i}" for i, (lang, _) in enumerate(SNIPPETS)]
)
def test_the_readme_snippet_runs_against_relay_demo(
    language: str, code: str, tmp_path: Path
) -> None:
    assert "127.0.0.1:8000" in code, "a snippet that does not use the demo's address"
    tls = "https://127.0.0.1:8000" in code
    if language == "js":
        node = node_or_skip()
        (tmp_path / "node_modules").symlink_to(NODE_DIR / "node_modules")
    with relay_demo(tls=tls) as target:
        code = code.replace("127.0.0.1:8000", target.url.split("://", 1)[1])
        env = {**os.environ, "OPENAI_AGENTS_DISABLE_TRACING": "1"}
        if language == "python":
            command = [sys.executable, "-c", code]
        else:
            (tmp_path / "snippet.mjs").write_text(code, encoding="utf-8")
            command = [node, str(tmp_path / "snippet.mjs")]
            if tls:
                assert target.ca_file is not None
                env["NODE_EXTRA_CA_CERTS"] = str(target.ca_file)
        result = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
        assert result.returncode == 0, result.stderr[-3000:]
        if "get_weather" in code:
            assert re.search(r"get_weather -> Sunny in \S", result.stdout), result.stdout
        else:
            assert result.stdout.startswith("You said: Hello!"), result.stdout
        assert target.mock.connections, "the snippet never reached the model"
