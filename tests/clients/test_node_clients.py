"""The JavaScript clients, unchanged, under Node, through the relay.

* The JS Agents SDK (``@openai/agents-realtime``): ``RealtimeSession`` with the WebSocket
  transport, ``connect({url, apiKey})``, a tool made with ``tool()``, and ``interrupt()``.
* The ``openai`` npm package's ``OpenAIRealtimeWS``, which always dials ``wss:``: against
  ``relay demo --tls``, Node trusting the demo's CA through ``NODE_EXTRA_CA_CERTS``.

The scripts in tests/clients/node/ drive them and print what they saw as JSON lines. They need
``node`` and the package's ``node_modules`` (``npm ci`` in tests/clients/node, which ``.ci/run``
does where Node is installed); without them these tests skip and say which is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from .relays import (
    CLIENT_INSTRUCTIONS,
    HELLO_WAV,
    Target,
    assert_the_four_steps_went_through,
    relay_demo,
    relay_serve,
)

NODE_DIR = Path(__file__).parent / "node"
SCRIPT_TIMEOUT = 80


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip(
            "node is not installed, so the JavaScript clients cannot run (install Node.js 20+)"
        )
    for package in ("@openai/agents-realtime", "openai", "ws", "zod"):
        if not (NODE_DIR / "node_modules" / package).is_dir():
            pytest.skip(f"{package} is not installed in tests/clients/node: run `npm ci` there")
    return node


def run_node(
    script: str, options: dict[str, Any], env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run one client script to its end; its JSON lines."""
    node = node_or_skip()
    result = subprocess.run(
        [node, script, orjson.dumps(options).decode()],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
        env={**os.environ, **(env or {})},
    )
    lines = [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    said_lines = [line for line in lines if line["kind"] != "server"]  # events may come after
    if result.returncode != 0 or not said_lines or said_lines[-1]["kind"] != "end":
        said = "\n".join(orjson.dumps(line).decode() for line in said_lines)
        kinds = [line["event"]["type"] for line in lines if line["kind"] == "server"]
        pytest.fail(
            f"{script} failed (exit {result.returncode}):\n{said}\nserver events: {kinds}\n"
            f"stderr: {result.stderr[-2000:]}"
        )
    return lines


def check(target: Target, lines: list[dict[str, Any]]) -> None:
    events = [line["event"] for line in lines if line["kind"] == "server"]
    steps = [line["name"] for line in lines if line["kind"] == "step"]
    assert steps == ["text", "tool", "audio", "interrupt"]
    # The fake model makes up the arguments from the tool's schema.
    [tool] = [line for line in lines if line["kind"] == "tool"]
    assert (tool["name"], tool["result"]) == ("get_weather", f"sunny in {tool['args']['city']}")
    answers = [str(e) for e in events if e["type"] == "response.done"]
    assert any(f"The tool returned {tool['result']}" in answer for answer in answers)
    done = [e["response"] for e in events if e["type"] == "response.done"]
    assert done[-1]["status"] == "cancelled", done[-1]
    assert_the_four_steps_went_through(target, events)


def agents_js(target: Target) -> list[dict[str, Any]]:
    return run_node(
        "agents.mjs",
        {
            "url": target.realtime_url,
            "apiKey": target.api_key,
            "wav": str(HELLO_WAV),
            "instructions": CLIENT_INSTRUCTIONS,
        },
    )


def openai_ws(target: Target) -> list[dict[str, Any]]:
    assert target.ca_file is not None and target.url.startswith("wss://")
    return run_node(
        "openai-ws.mjs",
        {
            "baseURL": f"{target.http_url}/v1",
            "apiKey": target.api_key,
            "model": target.config.model,
            "wav": str(HELLO_WAV),
            "instructions": CLIENT_INSTRUCTIONS,
        },
        env={"NODE_EXTRA_CA_CERTS": str(target.ca_file)},
    )


def test_the_js_agents_sdk_through_relay_demo() -> None:
    node_or_skip()
    with relay_demo() as target:
        check(target, agents_js(target))


def test_the_js_agents_sdk_through_a_relay_that_locks_instructions(tmp_path: Path) -> None:
    node_or_skip()
    with relay_serve(tmp_path) as target:
        check(target, agents_js(target))


def test_the_node_sdk_through_relay_demo_tls() -> None:
    node_or_skip()
    with relay_demo(tls=True) as target:
        check(target, openai_ws(target))


def test_the_node_sdk_through_a_tls_relay_that_locks_instructions(tmp_path: Path) -> None:
    node_or_skip()
    with relay_serve(tmp_path, tls=True) as target:
        check(target, openai_ws(target))


def test_the_node_sdk_refuses_the_tls_demo_without_its_ca() -> None:
    """Without NODE_EXTRA_CA_CERTS Node does not trust the demo: the printed line is needed."""
    node = node_or_skip()
    with relay_demo(tls=True) as target:
        result = subprocess.run(
            [
                node,
                "openai-ws.mjs",
                orjson.dumps(
                    {
                        "baseURL": f"{target.http_url}/v1",
                        "apiKey": target.api_key,
                        "model": target.config.model,
                        "wav": str(HELLO_WAV),
                        "instructions": "",
                    }
                ).decode(),
            ],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT,
            env={k: v for k, v in os.environ.items() if k != "NODE_EXTRA_CA_CERTS"},
        )
        assert result.returncode == 1
        assert (
            "self-signed certificate" in result.stdout
            or "unable to verify" in result.stdout.lower()
        )
        assert target.mock.connections == []
