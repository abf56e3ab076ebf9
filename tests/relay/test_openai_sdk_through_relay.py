"""The official OpenAI Python SDK, unchanged, talks to the relay's /v1/realtime.

Through ``relay demo`` and through a ``relay serve`` that sets and locks ``instructions``, the
SDK's own Realtime client completes a text turn, a function-tool round trip, a server-VAD audio
turn and an interrupt (truncate + cancel), written as its docs write them. The first event it
reads is ``session.created``; the locked fields keep the relay's values.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
from openai.resources.realtime.realtime import RealtimeConnection

from tests.clients.relays import (
    CLIENT_INSTRUCTIONS,
    Target,
    assert_the_four_steps_went_through,
    relay_demo,
    relay_serve,
    speech_then_silence,
)

GET_WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def sdk_client(target: Target) -> openai.OpenAI:
    return openai.OpenAI(api_key=target.api_key, base_url=f"{target.http_url}/v1", max_retries=0)


class Reader:
    """Every event the connection delivered, as dicts, and reading on to the one wanted."""

    def __init__(self, conn: RealtimeConnection) -> None:
        self.conn = conn
        self.events: list[dict[str, Any]] = []

    def until(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            event = self.conn.recv().model_dump(mode="json", exclude_unset=True)
            self.events.append(event)
            if match(event):
                return event

    def until_type(self, kind: str) -> dict[str, Any]:
        return self.until(lambda event: event["type"] == kind)


def ask(conn: RealtimeConnection, text: str) -> None:
    conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )
    conn.response.create()


def four_steps(target: Target) -> list[dict[str, Any]]:
    with sdk_client(target).realtime.connect(model=target.config.model) as conn:
        read = Reader(conn)
        read.until_type("session.created")
        conn.session.update(
            session={
                "type": "realtime",
                "instructions": CLIENT_INSTRUCTIONS,
                "tools": [GET_WEATHER],
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}
                },
            }
        )
        read.until_type("session.updated")

        ask(conn, "Hello!")
        assert read.until_type("response.done")["response"]["status"] == "completed"

        ask(conn, "What is the weather in Paris? Use get_weather.")
        output = read.until_type("response.done")["response"]["output"]
        call = next((item for item in output if item["type"] == "function_call"), None)
        assert call is not None and call["name"] == "get_weather", output
        conn.conversation.item.create(
            item={
                "type": "function_call_output",
                "call_id": call["call_id"],
                "output": "sunny in Paris",
            }
        )
        conn.response.create()
        answer = read.until_type("response.done")["response"]["output"]
        assert "The tool returned sunny in Paris" in str(answer)

        audio = speech_then_silence()
        for start in range(0, len(audio), 1920):  # 40 ms chunks, as a microphone delivers them
            conn.input_audio_buffer.append(
                audio=base64.b64encode(audio[start : start + 1920]).decode()
            )
        assert read.until_type("response.done")["response"]["status"] == "completed"

        ask(conn, "Tell me a long story.")
        delta = read.until_type("response.output_audio.delta")
        heard_ms = len(base64.b64decode(delta["delta"])) // 48  # PCM16 at 24 kHz
        conn.conversation.item.truncate(
            item_id=delta["item_id"], content_index=0, audio_end_ms=heard_ms
        )
        conn.response.cancel()
        assert read.until_type("response.done")["response"]["status"] == "cancelled"
    assert "conversation.item.truncated" in [event["type"] for event in read.events]
    return read.events


def test_the_sdk_pointed_at_the_relay_completes_a_text_turn() -> None:
    with relay_demo() as target:
        with sdk_client(target).realtime.connect(model=target.config.model) as conn:
            assert conn.recv().type == "session.created"
            ask(conn, "Hello")
            kinds = []
            while not kinds or kinds[-1] != "response.done":
                kinds.append(conn.recv().type)
        assert "response.output_audio_transcript.delta" in kinds
        # The SDK user's own key went nowhere: the fake only ever saw the relay's key.
        record = target.mock.connections[-1]
        assert target.api_key not in str(record.headers) + str(record.subprotocols)


def test_the_sdk_through_relay_demo_completes_text_tool_voice_and_interrupt() -> None:
    with relay_demo() as target:
        assert_the_four_steps_went_through(target, four_steps(target))


def test_the_sdk_through_a_relay_that_locks_instructions(tmp_path: Path) -> None:
    with relay_serve(tmp_path) as target:
        assert_the_four_steps_went_through(target, four_steps(target))


def test_the_sdk_asks_for_text_output_and_the_next_session_updated_says_text(
    tmp_path: Path,
) -> None:
    """Through a relay serve with JWT auth: the relay's own session.updated is not the answer."""
    with relay_serve(tmp_path, auth="jwt") as target:
        with sdk_client(target).realtime.connect(model=target.config.model) as conn:
            read = Reader(conn)
            read.until_type("session.created")
            conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
            updated = read.until_type("session.updated")
            assert updated["session"]["output_modalities"] == ["text"]
            ask(conn, "Hello!")
            done = read.until_type("response.done")
        kinds = [event["type"] for event in read.events]
        assert kinds[0] == "session.created"
        assert "response.output_text.delta" in kinds
        assert "response.output_audio.delta" not in kinds
        assert done["response"]["status"] == "completed"
