"""Shared helpers for the mockrealtime tests: fixture audio, a fake clock, a sans-IO driver."""

from __future__ import annotations

import json
import random
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from mockrealtime.audio import b64encode
from mockrealtime.session import Session

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
#: "Hello, can you hear me?": the sample `relay talk` says when given no file.
SAMPLE = Path(__file__).resolve().parents[2] / "src" / "relay" / "clients" / "samples" / "hello.wav"
DELTA_TYPES = frozenset(
    {
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
        "response.output_text.delta",
        "response.audio.delta",
        "response.audio_transcript.delta",
        "response.text.delta",
        "response.function_call_arguments.delta",
        "response.mcp_call_arguments.delta",
        "conversation.item.input_audio_transcription.delta",
    }
)


def wav_pcm16(path: Path = SAMPLE) -> bytes:
    """The PCM16 24 kHz frames of a WAV (the spoken sample by default)."""
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (24000, 2, 1)
        return w.readframes(w.getnframes())


def wav_ulaw(name: str = "hello-ulaw8k.wav") -> bytes:
    """The raw μ-law bytes of the 8 kHz fixture (format 7, which ``wave`` cannot read)."""
    data = (FIXTURES / name).read_bytes()
    pos = 12
    while pos < len(data):
        chunk, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if chunk == b"data":
            return data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)
    raise AssertionError("no data chunk")


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def append_events(audio: bytes, chunk_bytes: int = 960) -> list[str]:
    """``input_audio_buffer.append`` messages carrying ``audio`` in 20 ms (PCM16) pieces."""
    return [
        json.dumps({"type": "input_audio_buffer.append", "audio": b64encode(c)})
        for c in chunks(audio, chunk_bytes)
    ]


class FakeClock:
    """A settable clock for the sans-IO session."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_session(
    dialect: str = "ga",
    *,
    seed: int = 1,
    pace: float = 0.0,
    clock: FakeClock | None = None,
    **kwargs: Any,
) -> tuple[Session, list[dict]]:
    """A session and its opening events."""
    session = Session(
        dialect,
        "gpt-realtime"
        if dialect == "ga"
        # type: ignore[arg-type]
        else "gpt-4o-realtime-preview",
        clock or FakeClock(),
        random.Random(seed),
        pace=pace,
        started_at=1_700_000_000,
        **kwargs,
    )
    return session, session.open()


def send(session: Session, event: dict[str, Any]) -> list[dict[str, Any]]:
    """Feed one client event (as JSON text)."""
    return session.handle(json.dumps(event))


def types(events: list[dict[str, Any]], *, deltas: bool = False) -> list[str]:
    """Event types, without the many delta events unless asked."""
    return [e["type"] for e in events if deltas or e["type"] not in DELTA_TYPES]


def user_text(text: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": text}],
        },
        **extra,
    }


def only(events: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [e for e in events if e["type"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {[e['type'] for e in events]}"
    return found[0]


@asynccontextmanager
async def connect(url: str, **options: Any) -> AsyncIterator[WebSocketConnection]:
    """``open_websocket_url`` that also releases the client socket at the end.

    trio-websocket 0.12 leaves its TCP socket open when the *server* closes first
    (``aclose()`` returns early once the connection is closed), which would surface
    as a ResourceWarning later.
    """
    ws: WebSocketConnection | None = None
    try:
        async with open_websocket_url(url, **options) as ws:
            yield ws
    finally:
        if ws is not None:
            await trio.aclose_forcefully(ws._stream)
