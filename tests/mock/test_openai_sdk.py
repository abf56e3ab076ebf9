"""Conformance: the official OpenAI Python SDK, unchanged, talks to the mock over loopback.

The SDK's realtime client is synchronous here (``websockets.sync``), so the mock runs
in its own thread under ``trio.run`` and the test body is plain blocking code. Every
server event is read with the SDK (``recv_bytes`` + ``parse_event``) and, because the
SDK's own parsing is lenient (``construct_type_unchecked`` never raises), also validated
strictly against the SDK's ``RealtimeServerEvent`` union: a field the typed models
reject is a bug in the mock.

Time bounds: each test runs under a watchdog that, after ``TEST_TIMEOUT`` seconds,
stops the mock; the SDK's blocking receive then fails at once and the test reports
the timeout. REST calls use the SDK's own request timeout.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import openai
import pydantic
import pytest
import trio
from openai.types.beta.realtime import RealtimeServerEvent as BetaServerEvent
from openai.types.beta.realtime import SessionCreateResponse as BetaSessionCreateResponse
from openai.types.realtime import (
    ClientSecretCreateResponse,
    RealtimeErrorEvent,
    RealtimeServerEvent,
    ResponseDoneEvent,
    SessionCreatedEvent,
)
from websockets.exceptions import ConnectionClosedError

from mockrealtime import MockConfig, MockServer, serve_mock_realtime

from .helpers import chunks, wav_pcm16

KEY = "sk-sdk-conformance"
TEST_TIMEOUT = 20.0
"""Absolute bound per test (the tests themselves take well under a second each)."""
START_TIMEOUT = 5.0
SERVER_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeServerEvent)
BETA_SERVER_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(BetaServerEvent)

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}


class RunningMock:
    """``serve_mock_realtime`` in a thread of its own (its own Trio run)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.server: MockServer | None = None
        self.timed_out = False
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mockrealtime", daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by stop()
            self._failure = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(serve_mock_realtime, self.config)
            self._scope = nursery.cancel_scope
            self._ready.set()

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"{self.server.http_url}/v1"

    def client(self, api_key: str = KEY, *, websocket_base_url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=api_key,
            base_url=self.base_url,
            websocket_base_url=websocket_base_url,
            max_retries=0,
            timeout=5.0,
        )

    def beta_client(self, api_key: str = KEY) -> openai.OpenAI:
        """The beta realtime client always dials ``wss://`` unless given a WebSocket base URL."""
        assert self.server is not None
        return self.client(api_key, websocket_base_url=self.server.url.removesuffix("/realtime"))

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(START_TIMEOUT), "the mock did not start"
        if self._failure is not None:
            raise self._failure

    def abort(self) -> None:
        """Stop serving now: every connection ends at the TCP level."""
        if self._scope is not None and self._token is not None:
            try:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            except trio.RunFinishedError:
                pass

    def wait_closed(self) -> None:
        """Wait (bounded) until the mock has finished every connection it accepted."""

        async def all_closed() -> None:
            assert self.server is not None
            with trio.fail_after(START_TIMEOUT):
                for record in self.server.connections:
                    await record.closed.wait()

        trio.from_thread.run(all_closed, trio_token=self._token)

    def stop(self) -> None:
        self.abort()
        self._thread.join(START_TIMEOUT)
        assert not self._thread.is_alive(), "the mock's thread did not end"
        if self._failure is not None:
            raise self._failure


@contextmanager
def running_mock(**options: Any) -> Iterator[RunningMock]:
    """A mock on 127.0.0.1 (port 0) for the duration of one test, under a watchdog."""
    options.setdefault("api_keys", frozenset({KEY}))
    options.setdefault("pace", 0.0)
    options.setdefault("ping_interval", None)
    mock = RunningMock(MockConfig(**options))
    mock.start()

    def expire() -> None:
        mock.timed_out = True
        mock.abort()

    watchdog = threading.Timer(TEST_TIMEOUT, expire)
    watchdog.start()
    try:
        try:
            yield mock
        except Exception as exc:
            if mock.timed_out:
                raise AssertionError(f"timed out after {TEST_TIMEOUT} s") from exc
            raise
        assert not mock.timed_out, f"timed out after {TEST_TIMEOUT} s"
        mock.wait_closed()  # the client closed first; the mock saw every connection end
    finally:
        watchdog.cancel()
        mock.stop()
    assert mock.server is not None and mock.server.errors == []


def receive(conn: Any, models: pydantic.TypeAdapter[Any] = SERVER_EVENT) -> Any:
    """The next server event, parsed by the SDK and checked against its typed models."""
    raw = conn.recv_bytes()
    event = conn.parse_event(raw)
    data = json.loads(raw)
    try:
        models.validate_json(raw, strict=True)
    except pydantic.ValidationError as exc:  # pragma: no cover - shows what the mock got wrong
        pytest.fail(f"the SDK's models reject {data['type']}: {exc}")
    assert event.type == data["type"]
    return event


def receive_until(
    conn: Any, done: Callable[[Any], bool], models: pydantic.TypeAdapter[Any] = SERVER_EVENT
) -> list[Any]:
    """Events up to and including the first for which ``done`` holds (errors fail the test)."""
    events = []
    while True:
        event = receive(conn, models)
        events.append(event)
        assert not isinstance(event, RealtimeErrorEvent), event.error
        if done(event):
            return events


def of_type(kind: str) -> Callable[[Any], bool]:
    return lambda event: event.type == kind


def kinds(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def opened(conn: Any) -> SessionCreatedEvent:
    first = receive(conn)
    assert isinstance(first, SessionCreatedEvent)
    return first


def say_hello_text(conn: Any) -> None:
    conn.conversation.item.create(
        item={
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Hello, mock!"}],
        }
    )


def test_text_turn_completes_with_typed_events() -> None:
    with running_mock() as mock, mock.client().realtime.connect(model="gpt-realtime") as conn:
        created = opened(conn)
        assert created.session.type == "realtime"
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        updated = receive_until(conn, of_type("session.updated"))[-1]
        assert updated.session.output_modalities == ["text"]
        say_hello_text(conn)
        conn.response.create()
        events = receive_until(conn, of_type("rate_limits.updated"))
        assert [k for k in kinds(events) if k != "response.output_text.delta"] == [
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_text.done",
            "response.content_part.done",
            "conversation.item.done",
            "response.output_item.done",
            "response.done",
            "rate_limits.updated",
        ]
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert text.startswith("You said: Hello, mock!")
        assert next(e for e in events if e.type == "response.output_text.done").text == text
        done = next(e for e in events if isinstance(e, ResponseDoneEvent))
        assert done.response.status == "completed"
        assert done.response.usage is not None and done.response.usage.output_tokens
        assert done.response.output is not None
        message = done.response.output[0]
        assert message.type == "message" and message.role == "assistant"


def test_the_sdks_event_dispatch_runs_a_turn_to_the_end() -> None:
    """The push-style API: handlers per event type, ``dispatch_events`` until closed."""
    seen: list[str] = []
    with running_mock() as mock, mock.client().realtime.connect(model="gpt-realtime") as conn:

        @conn.on("event")
        def every(event: Any) -> None:
            seen.append(event.type)

        @conn.on("session.created")
        def start(event: SessionCreatedEvent) -> None:
            say_hello_text(conn)
            conn.response.create(response={"output_modalities": ["text"]})

        @conn.on("rate_limits.updated")
        def finish(event: Any) -> None:
            conn.close()

        conn.dispatch_events()  # returns once the connection is closed (no error event)
    assert seen[0] == "session.created" and seen[-1] == "rate_limits.updated"
    assert "response.output_text.delta" in seen and "response.done" in seen


def test_manual_commit_audio_turn_streams_audio_and_transcripts() -> None:
    pcm = wav_pcm16()
    with running_mock() as mock, mock.client().realtime.connect(model="gpt-realtime") as conn:
        opened(conn)
        conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcm", "rate": 24000},
                        "turn_detection": None,
                        "transcription": {"model": "gpt-4o-transcribe"},
                    },
                    "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
                },
            }
        )
        updated = receive_until(conn, of_type("session.updated"))[-1]
        assert updated.session.audio.input.turn_detection is None
        for piece in chunks(pcm, 4800):  # 100 ms each
            conn.input_audio_buffer.append(audio=base64.b64encode(piece).decode())
        conn.input_audio_buffer.commit()
        conn.response.create()
        seen: set[str] = set()

        def finished(event: Any) -> bool:
            seen.add(event.type)
            return {
                "rate_limits.updated",
                "conversation.item.input_audio_transcription.completed",
            } <= seen

        events = receive_until(conn, finished)
        assert kinds(events)[:3] == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        audio = b"".join(
            base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
        )
        assert audio and len(audio) % 4800 == 0  # whole 100 ms chunks of PCM16 24 kHz
        transcript = "".join(
            e.delta for e in events if e.type == "response.output_audio_transcript.delta"
        )
        heard = "".join(
            e.delta
            for e in events
            if e.type == "conversation.item.input_audio_transcription.delta"
        )
        completed = next(
            e for e in events if e.type == "conversation.item.input_audio_transcription.completed"
        )
        assert heard and completed.transcript == heard
        assert transcript.startswith(f"You said: {heard}")  # the mock echoes what it "heard"
        assert next(
            e for e in events if e.type == "response.output_audio_transcript.done"
        ).transcript == transcript
        done = next(e for e in events if isinstance(e, ResponseDoneEvent))
        assert done.response.status == "completed"
        assert done.response.usage is not None
        assert done.response.usage.input_token_details is not None
        assert done.response.usage.input_token_details.audio_tokens


def test_function_call_round_trip() -> None:
    with running_mock() as mock, mock.client().realtime.connect(model="gpt-realtime") as conn:
        opened(conn)
        conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "tools": [WEATHER_TOOL],
                "tool_choice": {"type": "function", "name": "get_weather"},
            }
        )
        receive_until(conn, of_type("session.updated"))
        say_hello_text(conn)
        conn.response.create()
        events = receive_until(conn, of_type("response.done"))
        args_done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert args_done.name == "get_weather"
        deltas = "".join(
            e.delta for e in events if e.type == "response.function_call_arguments.delta"
        )
        assert deltas == args_done.arguments
        args = json.loads(args_done.arguments)
        assert set(args) == {"city", "unit", "days"}
        assert isinstance(args["city"], str) and args["city"]
        assert args["unit"] in ("celsius", "fahrenheit")
        assert isinstance(args["days"], int) and 1 <= args["days"] <= 5
        done = events[-1]
        assert done.response.status == "completed" and done.response.output is not None
        call = done.response.output[0]
        assert call.type == "function_call" and call.call_id == args_done.call_id
        assert call.arguments == args_done.arguments
        receive_until(conn, of_type("rate_limits.updated"))

        conn.conversation.item.create(
            item={
                "type": "function_call_output",
                "call_id": args_done.call_id,
                "output": json.dumps({"temperature": 21}),
            }
        )
        conn.response.create(response={"tool_choice": "auto"})
        events = receive_until(conn, of_type("rate_limits.updated"))
        assert kinds(events)[:3] == [
            "conversation.item.added",
            "conversation.item.done",
            "response.created",
        ]
        assert events[0].item.type == "function_call_output"
        text = next(e for e in events if e.type == "response.output_text.done").text
        assert "The tool returned" in text
        done = next(e for e in events if isinstance(e, ResponseDoneEvent))
        assert done.response.status == "completed"


def test_remote_mcp_tool_listing_approval_and_call() -> None:
    server = {
        "type": "mcp",
        "server_label": "docs",
        "server_url": "https://mcp.example.com/docs",
        "allowed_tools": ["search_docs"],
        "require_approval": "always",
    }
    with running_mock() as mock, mock.client().realtime.connect(model="gpt-realtime-2") as conn:
        opened(conn)
        conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "tools": [server],
                "tool_choice": {"type": "mcp", "server_label": "docs"},
            }
        )
        events = receive_until(conn, of_type("mcp_list_tools.completed"))
        assert kinds(events)[:2] == ["session.updated", "mcp_list_tools.in_progress"]
        listing = next(e for e in events if e.type == "conversation.item.done").item
        assert listing.type == "mcp_list_tools" and [t.name for t in listing.tools] == [
            "search_docs"
        ]
        say_hello_text(conn)
        conn.response.create()
        events = receive_until(conn, of_type("response.done"))
        request = events[-1].response.output[0]
        assert request.type == "mcp_approval_request" and request.name == "search_docs"
        receive_until(conn, of_type("rate_limits.updated"))
        answer = {"type": "mcp_approval_response", "approval_request_id": request.id}
        conn.conversation.item.create(item={**answer, "approve": True})
        conn.response.create()
        events = receive_until(conn, of_type("response.done"))
        assert [k for k in kinds(events) if k.startswith("response.mcp_call")][-3:] == [
            "response.mcp_call_arguments.done",
            "response.mcp_call.in_progress",
            "response.mcp_call.completed",
        ]
        call = events[-1].response.output[0]
        assert call.type == "mcp_call" and call.approval_request_id == request.id
        assert call.arguments == request.arguments and json.loads(call.output)["results"]
        receive_until(conn, of_type("rate_limits.updated"))


def test_response_cancel_during_a_paced_reply() -> None:
    with (
        running_mock(pace=1.0, reply_sentences=4) as mock,  # ~7 s of reply audio in real time
        mock.client().realtime.connect(model="gpt-realtime") as conn,
    ):
        opened(conn)
        say_hello_text(conn)
        conn.response.create()
        receive_until(conn, of_type("response.output_audio.delta"))
        conn.response.cancel()
        events = receive_until(conn, of_type("response.done"))
        assert {"response.output_audio.done", "response.output_audio_transcript.done"} <= set(
            kinds(events)
        )
        assert kinds(events)[-4:] == [
            "response.content_part.done",
            "conversation.item.done",
            "response.output_item.done",
            "response.done",
        ]
        done = events[-1]
        assert done.response.status == "cancelled"
        assert done.response.status_details is not None
        assert done.response.status_details.reason == "client_cancelled"
        assert done.response.output is not None
        assert done.response.output[0].status == "incomplete"
        receive_until(conn, of_type("rate_limits.updated"))
        conn.response.cancel()  # nothing active any more
        error = receive(conn)
        assert isinstance(error, RealtimeErrorEvent)
        assert error.error.code == "response_cancel_not_active"


def test_interrupt_as_the_agents_sdk_does_it_truncate_then_cancel() -> None:
    """The Agents SDK's ``interrupt()``: truncate the playing item mid-stream, then cancel."""
    with (
        running_mock(pace=1.0, reply_sentences=4) as mock,
        mock.client().realtime.connect(model="gpt-realtime-2") as conn,
    ):
        opened(conn)
        say_hello_text(conn)
        conn.response.create()
        events = receive_until(conn, of_type("response.output_audio.delta"))
        events += receive_until(conn, of_type("response.output_audio.delta"))
        item_id = events[-1].item_id
        audio = [base64.b64decode(e.delta) for e in events if e.type.endswith("audio.delta")]
        played_ms = sum(map(len, audio)) // 48  # PCM16 at 24 kHz: 48 bytes per ms
        conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played_ms)
        conn.response.cancel()
        events = receive_until(conn, of_type("response.done"))
        truncated = next(e for e in events if e.type == "conversation.item.truncated")
        assert (truncated.item_id, truncated.audio_end_ms) == (item_id, played_ms)
        done = events[-1]
        assert done.response.status == "cancelled"
        receive_until(conn, of_type("rate_limits.updated"))
        conn.conversation.item.retrieve(item_id=item_id)
        item = receive_until(conn, of_type("conversation.item.retrieved"))[-1].item
        assert item.content[0].transcript == ""
        assert len(base64.b64decode(item.content[0].audio)) == played_ms * 48


def test_client_secret_mint_then_connect_with_the_ek_key() -> None:
    with running_mock() as mock:
        client = mock.client()
        raw = client.realtime.client_secrets.with_raw_response.create(
            expires_after={"anchor": "created_at", "seconds": 120},
            session={"type": "realtime", "model": "gpt-realtime", "instructions": "Be brief."},
        )
        body = json.loads(raw.content)
        ClientSecretCreateResponse.model_validate(body)  # strict, not just constructed
        secret = raw.parse()
        assert isinstance(secret, ClientSecretCreateResponse)
        assert secret.value.startswith("ek_")
        assert secret.session.type == "realtime"
        assert secret.expires_at > 0
        with mock.client(api_key=secret.value).realtime.connect(model="gpt-realtime") as conn:
            created = opened(conn)
            assert created.session.instructions == "Be brief."  # the secret's session config
            say_hello_text(conn)
            conn.response.create()
            events = receive_until(conn, of_type("response.done"))
            assert events[-1].response.status == "completed"
        assert mock.server is not None
        assert mock.server.connections[-1].headers["authorization"] == f"Bearer {secret.value}"
        with pytest.raises(openai.AuthenticationError):  # a minted key cannot mint more
            mock.client(api_key=secret.value).realtime.client_secrets.create()


def test_wrong_key_gets_invalid_api_key_then_close_3000() -> None:
    reconnects: list[Any] = []
    with (
        running_mock() as mock,
        mock.client(api_key="sk-wrong-key-1234")
        .realtime.connect(
            model="gpt-realtime",
            on_reconnecting=lambda event: reconnects.append(event) or {"abort": True},
        ) as conn,
    ):
        error = receive(conn)
        assert isinstance(error, RealtimeErrorEvent)
        assert error.error.type == "invalid_request_error"
        assert error.error.code == "invalid_api_key"
        assert "1234" in error.error.message and "sk-wrong-key-1234" not in error.error.message
        with pytest.raises(ConnectionClosedError) as closed:
            next(iter(conn))  # the SDK's iterator re-raises: 3000 is not a retryable close
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 3000
        assert closed.value.rcvd.reason == "invalid_request_error.invalid_api_key"
    assert reconnects == []


def test_beta_client_text_turn_and_session_mint() -> None:
    """The SDK's deprecated beta client (``OpenAI-Beta: realtime=v1``) still works too."""
    model = "gpt-4o-realtime-preview"
    with running_mock() as mock:
        raw = mock.client().beta.realtime.sessions.with_raw_response.create(
            model=model, modalities=["text"]
        )
        BetaSessionCreateResponse.model_validate_json(raw.content, strict=True)
        minted = raw.parse()
        assert minted.client_secret.value.startswith("ek_")
        client = mock.beta_client(api_key=minted.client_secret.value)
        with client.beta.realtime.connect(model=model) as conn:
            created = receive(conn, BETA_SERVER_EVENT)
            assert created.type == "session.created" and created.session.model == model
            assert created.session.modalities == ["text"]  # minted with the secret
            say_hello_text(conn)
            conn.response.create()
            events = receive_until(conn, of_type("rate_limits.updated"), BETA_SERVER_EVENT)
            text = "".join(e.delta for e in events if e.type == "response.text.delta")
            assert text.startswith("You said: Hello, mock!")
            assert kinds(events)[:4] == [
                "conversation.item.created",
                "response.created",
                "response.output_item.added",
                "conversation.item.created",
            ]
            done = next(e for e in events if e.type == "response.done")
            assert done.response.status == "completed"
        assert mock.server is not None and mock.server.connections[-1].dialect == "beta"


def test_beta_client_against_a_server_that_rejects_beta() -> None:
    with (
        running_mock(reject_beta=True) as mock,
        mock.beta_client().beta.realtime.connect(model="gpt-4o-realtime-preview") as conn,
    ):
        error = receive(conn, BETA_SERVER_EVENT)
        assert error.type == "error" and error.error.code == "beta_api_shape_disabled"
        with pytest.raises(ConnectionClosedError) as closed:
            conn.recv()
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            4000,
            "invalid_request_error.beta_api_shape_disabled",
        )
