"""Clients written for the retired beta dialect, unchanged, through the relay.

The upstream is mockrealtime refusing beta as the real API now does (``reject_beta``), so
every turn here works only because the relay translates. Each client completes a text turn,
an audio turn with server VAD, a function-call round trip and a cancel:

* the Python SDK's ``client.beta.realtime`` (it sends ``OpenAI-Beta: realtime=v1``);
* a browser page written the beta way (tests/relay/beta_page/), which completes a voice turn
  in headless Chromium.
"""

from __future__ import annotations

import base64
import logging
import threading
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import trio
from openai.types.beta.realtime import (
    ConversationItemCreatedEvent,
    ResponseAudioDeltaEvent,
    ResponseDoneEvent,
    ResponseTextDeltaEvent,
    SessionUpdatedEvent,
)

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.clients.talk import SAMPLE

from .harness import TEST_KEY, running_relay
from .test_browser import (
    Starter,
    Trigger,
    body_data,
    microphone_file,
    needs_chromium,
    open_browser,
    served_in_thread,
    wait_for,
)
from .test_openai_sdk_through_relay import GET_WEATHER

#: What a beta client must never see: GA names.
GA_ONLY = (
    "response.output_text.",
    "response.output_audio.",
    "response.output_audio_transcript.",
    "conversation.item.added",
    "conversation.item.done",
)
#: What the upstream must never get: the flat beta session and overrides.
BETA_FIELDS = {
    "modalities",
    "voice",
    "input_audio_format",
    "output_audio_format",
    "turn_detection",
    "input_audio_transcription",
    "max_response_output_tokens",
    "temperature",
}
RETIRED_MODEL = "gpt-4o-realtime-preview-2024-12-17"


def beta_relay_starter(trigger: Trigger) -> Starter:
    """Mockrealtime that refuses beta, and a relay with the default settings in front of it,
    for ``served_in_thread``."""

    async def run(task_status: trio.TaskStatus[tuple[str, MockServer]]) -> None:
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(
                serve_mock_realtime,
                MockConfig(api_keys=frozenset({TEST_KEY}), reject_beta=True, pace=2.0),
            )
            async with running_relay(
                upstream_url=mock.url,
                # A watchdog: a turn that never ends gets the relay's warning (an error event,
                # which fails the test) after 15 s rather than blocking the client's recv().
                max_session_seconds=30.0,
            ) as relay:
                task_status.started((relay.http_url, mock))
                await trigger()
            nursery.cancel_scope.cancel()

    return run


@pytest.fixture(scope="module")
def beta_relay() -> Iterator[tuple[str, MockServer]]:
    with served_in_thread(beta_relay_starter) as started:
        yield started


# -- the Python SDK's client.beta.realtime ---------------------------------------------------


class Turns:
    """A beta SDK connection and every event it received, checked as it arrives."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.events: list[Any] = []

    def until(self, kind: str) -> list[Any]:
        """Events up to and including the next one of type ``kind``."""
        seen = []
        while True:
            event = self.conn.recv()
            assert not event.type.startswith(GA_ONLY), event.type
            assert event.type != "error", event
            seen.append(event)
            self.events.append(event)
            if event.type == kind:
                return seen

    def updated(self, shows: Callable[[Any], bool]) -> Any:
        """The first ``session.updated`` whose session ``shows`` what the client asked for
        (the relay's own update may be answered first)."""
        while True:
            [event] = self.until("session.updated")[-1:]
            if shows(event.session):
                return event


def sdk_connect(http_url: str) -> Any:
    client = openai.OpenAI(
        api_key="sk-beta-user",
        base_url=f"{http_url}/v1",
        # (the beta resource always dials wss:// from base_url; the GA one follows its scheme)
        websocket_base_url=f"{http_url.replace('http', 'ws', 1)}/v1",
        max_retries=0,
    )
    return client.beta.realtime.connect(model=RETIRED_MODEL)


def user_text(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def upstream_messages(mock: MockServer) -> list[str]:
    record = mock.connections[-1]
    assert record.dialect == "ga" and record.path.endswith("?model=gpt-realtime-2.1")
    return [m for m in record.received if isinstance(m, str)]


def assert_upstream_heard_ga_only(mock: MockServer) -> None:
    for message in upstream_messages(mock):
        event = orjson.loads(message)
        body = event.get("session") or event.get("response") or {}
        assert not BETA_FIELDS & set(body), message
        if event["type"] == "session.update":
            assert body["type"] == "realtime"


def test_sdk_beta_client_completes_a_text_turn(beta_relay: tuple[str, MockServer]) -> None:
    http_url, mock = beta_relay
    with sdk_connect(http_url) as conn:
        turns = Turns(conn)
        [created] = turns.until("session.created")
        assert created.session.model == "gpt-realtime-2.1"  # the retired name's alias
        conn.session.update(session={"modalities": ["text"], "voice": "ash", "temperature": 0.8})
        updated = turns.updated(lambda session: session.voice == "ash")
        assert isinstance(updated, SessionUpdatedEvent)
        assert updated.session.modalities == ["text"]
        conn.conversation.item.create(item=user_text("Hello there"))
        conn.response.create()
        events = turns.until("response.done")
    kinds = [e.type for e in events]
    assert kinds[:2] == ["conversation.item.created", "response.created"]
    assert {"response.text.delta", "response.text.done", "response.content_part.done"} <= set(kinds)
    text = "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))
    assert text.startswith("You said: Hello there.")
    done = events[-1]
    assert isinstance(done, ResponseDoneEvent) and done.response.status == "completed"
    assert done.response.modalities == ["text"]
    assert done.response.output[0].content[0].type == "text"  # beta's name for output_text
    assert done.response.usage.total_tokens > 0  # type: ignore[union-attr]
    assert_upstream_heard_ga_only(mock)


def pcm16_24k(path: Path) -> bytes:
    with wave.open(str(path)) as clip:
        assert (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) == (24000, 1, 2)
        return clip.readframes(clip.getnframes())


def test_sdk_beta_client_completes_an_audio_turn_with_server_vad(
    beta_relay: tuple[str, MockServer],
) -> None:
    http_url, mock = beta_relay
    speech = pcm16_24k(SAMPLE) + bytes(2 * 24000)  # and a second of silence
    with sdk_connect(http_url) as conn:
        turns = Turns(conn)
        turns.until("session.created")
        conn.session.update(
            session={
                "modalities": ["text", "audio"],
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
                "input_audio_transcription": {"model": "whisper-1"},
            }
        )
        updated = turns.updated(lambda session: session.input_audio_transcription is not None)
        assert updated.session.turn_detection.silence_duration_ms == 500  # type: ignore[union-attr]
        assert updated.session.input_audio_format == "pcm16"
        for at in range(0, len(speech), 4800):  # 100 ms appends
            conn.input_audio_buffer.append(audio=base64.b64encode(speech[at : at + 4800]).decode())
        events = turns.until("response.done")
    kinds = [e.type for e in events]
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.created",
        "response.created",
    ]
    assert [k for k in kinds if k in order][:5] == order
    audio = b"".join(
        base64.b64decode(e.delta) for e in events if isinstance(e, ResponseAudioDeltaEvent)
    )
    assert len(audio) > 24000  # over half a second of reply
    assert "response.audio_transcript.done" in kinds and "response.audio.done" in kinds
    [user] = [e.item for e in events if isinstance(e, ConversationItemCreatedEvent)][:1]
    assert (user.role, user.content[0].type) == ("user", "input_audio")  # type: ignore[index]
    assert events[-1].response.status == "completed"  # one turn, not cut by another
    assert kinds.count("input_audio_buffer.speech_started") == 1
    assert events[-1].response.modalities == ["text", "audio"]
    assert events[-1].response.output_audio_format == "pcm16"
    assert_upstream_heard_ga_only(mock)


def test_sdk_beta_client_completes_a_function_call_round_trip(
    beta_relay: tuple[str, MockServer],
) -> None:
    http_url, mock = beta_relay
    with sdk_connect(http_url) as conn:
        turns = Turns(conn)
        turns.until("session.created")
        conn.session.update(
            session={"modalities": ["text"], "tools": [GET_WEATHER], "tool_choice": "auto"}
        )
        turns.updated(lambda session: bool(session.tools))
        conn.conversation.item.create(item=user_text("Please get_weather for Paris."))
        conn.response.create()
        call_turn = turns.until("response.done")
        [call] = call_turn[-1].response.output
        assert (call.type, call.name) == ("function_call", "get_weather")
        arguments = orjson.loads(call.arguments)  # type: ignore[arg-type]
        assert isinstance(arguments["city"], str)
        kinds = [e.type for e in call_turn]
        assert "response.function_call_arguments.done" in kinds
        conn.conversation.item.create(
            item={"type": "function_call_output", "call_id": call.call_id, "output": '"sunny"'}
        )
        conn.response.create()
        answer = turns.until("response.done")
    text = "".join(e.delta for e in answer if isinstance(e, ResponseTextDeltaEvent))
    assert text.startswith('The tool returned "sunny".')
    sent = [orjson.loads(m) for m in upstream_messages(mock)]
    [update] = [m for m in sent if m["type"] == "session.update" and "tools" in m["session"]]
    assert update["session"]["tools"] == [GET_WEATHER]
    assert update["session"]["output_modalities"] == ["text"]


def test_sdk_beta_client_cancels_a_response_mid_stream(beta_relay: tuple[str, MockServer]) -> None:
    http_url, mock = beta_relay
    with sdk_connect(http_url) as conn:
        turns = Turns(conn)
        turns.until("session.created")
        conn.conversation.item.create(item=user_text("Tell me a long story."))
        conn.response.create(response={"modalities": ["text", "audio"], "voice": "verse"})
        turns.until("response.audio.delta")
        conn.response.cancel()
        events = turns.until("response.done")
    done = events[-1]
    assert done.response.status == "cancelled"
    assert done.response.status_details.reason == "client_cancelled"  # type: ignore[union-attr]
    assert done.response.voice == "verse"
    sent = [orjson.loads(m) for m in upstream_messages(mock)]
    [create] = [m for m in sent if m["type"] == "response.create"]
    assert create["response"] == {
        "output_modalities": ["audio"],
        "audio": {"output": {"voice": "verse"}},
    }
    assert {"type": "response.cancel"} in [{"type": m["type"]} for m in sent]


def test_a_field_ga_lacks_is_dropped_with_a_warning_and_the_rest_applied(
    beta_relay: tuple[str, MockServer],
) -> None:
    http_url, mock = beta_relay
    with sdk_connect(http_url) as conn:
        assert conn.recv().type == "session.created"
        conn.session.update(session={"voice": "coral", "temperature": 1.1}, event_id="t7")
        seen = []
        while not (
            seen and seen[-1].type == "session.updated" and seen[-1].session.voice == "coral"
        ):
            seen.append(conn.recv())
    [warning] = [e for e in seen if e.type == "error"]
    assert (warning.error.code, warning.error.param, warning.error.event_id) == (
        "relay_beta_field_dropped",
        "session.temperature",
        "t7",
    )
    [update] = [orjson.loads(m) for m in upstream_messages(mock) if '"coral"' in m]
    assert update["session"] == {"type": "realtime", "audio": {"output": {"voice": "coral"}}}


def test_the_relay_named_the_retired_model_by_its_alias_upstream(
    beta_relay: tuple[str, MockServer], caplog: pytest.LogCaptureFixture
) -> None:
    http_url, mock = beta_relay
    with caplog.at_level(logging.INFO, logger="relay"):
        with sdk_connect(http_url) as conn:
            assert conn.recv().type == "session.created"
    [started] = [r for r in caplog.records if r.getMessage() == "session started"]
    assert started.fields["model"] == "gpt-realtime-2.1"  # type: ignore[attr-defined]
    assert started.fields["dialect"] == "beta"  # type: ignore[attr-defined]
    record = mock.connections[-1]
    assert record.path == "/v1/realtime?model=gpt-realtime-2.1"
    assert "openai-beta" not in {name.lower() for name in record.headers}
    assert "sk-beta-user" not in str(record.headers)


# -- a page written the beta way, in a browser -------------------------------------------------

BETA_PAGE = Path(__file__).parent / "beta_page"


@contextmanager
def page_server() -> Iterator[str]:
    """tests/relay/beta_page/ over HTTP on a loopback port (a secure context for the mic)."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(BETA_PAGE), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@needs_chromium
def test_a_page_written_the_beta_way_completes_a_voice_turn(
    beta_relay: tuple[str, MockServer], tmp_path: Path
) -> None:
    http_url, mock = beta_relay
    mic = microphone_file(tmp_path / "mic.wav", 1.0, SAMPLE, 1.5)
    drv = open_browser(mic, tmp_path / "profile")
    try:
        with page_server() as page:
            relay_ws = http_url.replace("http", "ws", 1) + "/v1/realtime"
            drv.get(f"{page}/index.html?ws={relay_ws}")
            wait_for(drv, "d.state === 'replied'")
            data = body_data(drv)
    finally:
        drv.quit()
    types = data["types"].split()
    assert "error" not in data and "error" not in types, data
    assert types[0] == "session.created"
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.committed",
        "conversation.item.created",
        "response.audio.delta",
        "response.audio_transcript.done",
        "response.done",
    ):
        assert kind in types, (kind, types)
    assert not [t for t in types if t.startswith(GA_ONLY)], types
    assert int(data["sentMs"]) >= 2000  # the speech and the silence after it
    assert int(data["receivedMs"]) >= 500
    assert int(data["playedMs"]) >= int(data["receivedMs"]) - 1  # every delta played out
    record = mock.connections[-1]
    assert "openai-beta.realtime-v1" not in record.subprotocols  # GA upstream
    assert_upstream_heard_ga_only(mock)
    [update] = [
        orjson.loads(m)
        for m in upstream_messages(mock)
        if m.startswith('{"type":"session.update"')
        and '"silence_duration_ms":500' in m
        and '"format"' in m
    ]
    assert update["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
