"""The Python Agents SDK (``openai-agents``), unchanged, through the relay.

A voice agent as its docs write one: a ``RealtimeAgent`` with instructions and a
``@function_tool``, run by ``RealtimeRunner(agent).run(model_config={"url": ..., "api_key": ...})``.
Through ``relay demo`` and through a ``relay serve`` that sets and locks ``instructions``, it
completes a text turn, a tool round trip, a server-VAD audio turn and an interrupt; the first
event it sees is ``session.created``, and the locked fields keep the relay's values.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agents import function_tool
from agents.realtime import RealtimeAgent, RealtimeRunner, RealtimeSession

from .relays import (
    CLIENT_INSTRUCTIONS,
    Target,
    assert_the_four_steps_went_through,
    relay_demo,
    relay_serve,
    speech_then_silence,
    upstream_session_updates,
)

STEP_TIMEOUT = 20


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


class Seen:
    """What the session delivered: the server's events (raw, in order) and the tool calls."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.tools: list[tuple[str, str, Any]] = []
        self._changed = asyncio.Event()

    async def read(self, session: RealtimeSession) -> None:
        async for event in session:
            if event.type == "raw_model_event" and event.data.type == "raw_server_event":
                self.events.append(event.data.data)
            elif event.type == "tool_end":
                self.tools.append((event.tool.name, event.arguments, event.output))
            self._changed.set()

    async def after(
        self, mark: int, match: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """The first event from index ``mark`` on that ``match`` accepts."""
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while True:
                    for event in self.events[mark:]:
                        if match(event):
                            return event
                    mark = len(self.events)
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            kinds = [e["type"] for e in self.events if "delta" not in e["type"]]
            raise AssertionError(f"no {what} within {STEP_TIMEOUT} s; saw {kinds}") from None


def of_type(kind: str) -> Callable[[dict[str, Any]], bool]:
    return lambda event: event["type"] == kind


async def drive(target: Target) -> Seen:
    """The four steps, each waiting for what a user of the SDK would wait for."""
    agent = RealtimeAgent(name="Assistant", instructions=CLIENT_INSTRUCTIONS, tools=[get_weather])
    runner = RealtimeRunner(
        agent,
        config={
            "model_settings": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
        },
    )
    seen = Seen()
    session = await runner.run(model_config={"url": target.realtime_url, "api_key": target.api_key})
    async with session, asyncio.TaskGroup() as tasks:
        reader = tasks.create_task(seen.read(session))
        await seen.after(0, of_type("session.created"), "session.created")

        mark = len(seen.events)
        await session.send_message("Hello!")
        done = await seen.after(mark, of_type("response.done"), "answer to the text turn")
        assert done["response"]["status"] == "completed"

        mark = len(seen.events)
        await session.send_message("What is the weather in Paris? Use get_weather.")
        answer = await seen.after(
            mark,
            lambda e: (
                e["type"] == "response.done"
                and any(item["type"] == "message" for item in e["response"]["output"])
            ),
            "answer after the tool call",
        )
        # The fake model makes up the arguments from the tool's schema.
        [(name, arguments, output)] = seen.tools
        assert (name, output) == ("get_weather", f"sunny in {json.loads(arguments)['city']}")
        assert f"The tool returned {output}" in str(answer["response"]["output"])

        mark = len(seen.events)
        audio = speech_then_silence()
        for start in range(0, len(audio), 1920):  # 40 ms chunks, as a microphone delivers them
            await session.send_audio(audio[start : start + 1920])
        done = await seen.after(mark, of_type("response.done"), "answer to the audio turn")
        assert done["response"]["status"] == "completed"

        mark = len(seen.events)
        await session.send_message("Tell me a long story.")
        await seen.after(mark, of_type("response.output_audio.delta"), "the story's first audio")
        await session.interrupt()
        done = await seen.after(mark, of_type("response.done"), "the end of the interrupted story")
        reader.cancel()
    assert done["response"]["status"] == "cancelled", done["response"]
    return seen


def test_the_agents_sdk_through_relay_demo() -> None:
    with relay_demo() as target:
        seen = asyncio.run(asyncio.wait_for(drive(target), 90))
        assert_the_four_steps_went_through(target, seen.events)


def test_the_agents_sdk_through_a_relay_that_locks_instructions(tmp_path: Path) -> None:
    with relay_serve(tmp_path) as target:
        seen = asyncio.run(asyncio.wait_for(drive(target), 90))
        assert_the_four_steps_went_through(target, seen.events)
        # The client's instructions never reached the model.
        assert all(
            s.get("instructions") in (None, target.config.session_object()["instructions"])
            for s in upstream_session_updates(target)
        )


@pytest.fixture(autouse=True)
def _no_agents_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK would export traces to OpenAI's servers; there is no network here.
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")
