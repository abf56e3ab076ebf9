"""The ``openai-realtime-api`` npm client, unchanged, under Node, through a relay that translates
the retired beta dialect, against mockrealtime refusing beta as the real API does.

It is a fork of OpenAI's reference beta client (about 118k downloads a month): under Node it
dials with ``ws`` and the ``OpenAI-Beta: realtime=v1`` header, names the retired
``gpt-4o-realtime-preview-2024-10-01`` by default and sends its flat ``session.update`` on
connect. tests/clients/node/beta-realtime-api.mjs drives a text turn, a function-call round trip
(the client runs the tool itself), a server-VAD audio turn and a cancel through its own methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from mockrealtime import MockServer
from relay.clients.talk import SAMPLE

from ..relay.test_beta_clients import GA_ONLY, assert_upstream_heard_ga_only, beta_relay_starter
from ..relay.test_browser import served_in_thread
from .test_node_clients import NODE_DIR, run_node


@pytest.fixture(scope="module")
def beta_relay() -> Iterator[tuple[str, MockServer]]:
    with served_in_thread(beta_relay_starter) as started:
        yield started


def said(lines: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [line] = [line for line in lines if line["kind"] == kind]
    return line


def test_the_beta_npm_client_completes_its_four_steps(beta_relay: tuple[str, MockServer]) -> None:
    if not (NODE_DIR / "node_modules" / "openai-realtime-api").is_dir():
        pytest.skip(
            "openai-realtime-api is not installed in tests/clients/node: run `npm ci` there"
        )
    http_url, mock = beta_relay
    url = http_url.replace("http", "ws", 1) + "/v1/realtime"
    lines = run_node("beta-realtime-api.mjs", {"url": url, "apiKey": "sk-beta", "wav": str(SAMPLE)})
    assert [line["name"] for line in lines if line["kind"] == "step"] == [
        "text",
        "tool",
        "audio",
        "cancel",
    ]
    kinds = [line["event"]["type"] for line in lines if line["kind"] == "server"]
    assert kinds[0] == "session.created"
    assert "error" not in kinds, [line for line in lines if line["kind"] == "server"][:3]
    assert not [kind for kind in kinds if kind.startswith(GA_ONLY)]
    text = said(lines, "text")
    assert text["status"] == "completed" and text["text"].startswith("You said: Hello there.")
    tool = said(lines, "tool")
    assert (tool["name"], tool["result"]) == ("get_weather", f"sunny in {tool['args']['city']}")
    answer = said(lines, "tool_answer")
    assert answer["text"].startswith(f'The tool returned "{tool["result"]}".')
    audio = said(lines, "audio")
    assert audio["status"] == "completed" and audio["samples"] > 12000  # half a second and more
    assert audio["transcript"].startswith("You said:")
    cancel = said(lines, "cancel")
    assert (cancel["status"], cancel["truncated"]) == ("cancelled", 100)
    # The retired model the client names by default reached the upstream by its alias.
    record = mock.connections[-1]
    assert record.path.endswith("?model=gpt-realtime-2.1")
    assert_upstream_heard_ga_only(mock)
