"""The fake Realtime session as a sans-IO state machine: client events in, server events out.

No trio, no sockets. ``Session.handle(message)`` takes one raw client message and
returns the server events it causes; ``Session.tick()`` returns events that became
due with time (paced reply audio, VAD idle timeouts, session expiry) and
``next_deadline()`` says when to call it next. Time comes only from the ``clock``
callable and randomness only from the ``random.Random`` given, so the same seed,
inputs and clock readings give the same events and ids.

The handshake decision lives in ``handshake.py``; ``Session.open()`` turns a
rejection into the real server's ``error`` event and close.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import orjson

from . import audio as au
from . import mcp
from .handshake import Rejection
from .ids import ALPHANUMERIC, IdFactory
from .models import DIARIZING_TRANSCRIPTION_MODELS
from .schema import instance_of
from .sessionconfig import (
    Dialect,
    SessionConfig,
    apply_beta_update,
    apply_ga_update,
    parse_beta_modalities,
    parse_ga_format,
    parse_ga_modalities,
    parse_max_tokens,
    parse_tool_choice,
    parse_tools,
    parse_voice,
    render_beta,
    render_ga,
    render_ga_format,
)
from .validation import (
    ClientError,
    check_keys,
    expect_choice,
    expect_int,
    expect_number,
    expect_object,
    expect_str,
    invalid_type,
    missing_parameter,
    unknown_parameter,
)

Event = dict[str, Any]

MIN_COMMIT_MS: Final = 100
DEFAULT_MAX_SESSION_SECONDS: Final = 3600.0
AUDIO_TOKENS_PER_CHUNK: Final = 2  # output audio: 20 tokens per second
INPUT_AUDIO_TOKENS_PER_SECOND: Final = 10
RATE_LIMIT_TOKENS: Final = 15_000_000
RATE_LIMIT_REQUESTS: Final = 5_000
SEGMENT_WORDS: Final = 5  # words per diarized transcription segment
TEXT_STEP_S: Final = 0.05  # one text delta per 50 ms of "generation" at pace 1
ARGS_STEP_S: Final = 0.02
MAX_REPLY_WORDS: Final = 400
#: A field of ``session.created`` that no real server sends, so that a person can tell the fake
#: from the real thing: the relay's demo page and ``relay talk`` say so when they see it. SDKs
#: ignore fields they do not know (the OpenAI SDK's models allow extra ones).
FAKE_MARKER: Final = "mockrealtime"
FAKE_NOTE: Final = "offline fake of the Realtime API: made-up transcripts, replies in milliseconds"
MAX_RETAINED_AUDIO_BYTES: Final = 16 * 1024 * 1024
"""Committed input audio kept per session for ``conversation.item.retrieve``; beyond it the
oldest items' audio is forgotten (their length still counts for usage), so long load
tests do not grow without bound."""

_GA_TYPES: Final = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
    "session.close",
)
_BETA_TYPES: Final = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.truncate",
    "conversation.item.delete",
    "conversation.item.retrieve",
    "response.create",
    "response.cancel",
)
_FILLERS: Final = (
    "Sure, I can help with that.",
    "That is a good question.",
    "Let me think about it for a moment.",
    "Here is what I can tell you.",
    "I hope that helps!",
    "Thanks for asking.",
)
_SPOKEN_WORDS: Final = (
    "hello",
    "can",
    "you",
    "hear",
    "me",
    "what",
    "is",
    "the",
    "weather",
    "like",
    "today",
    "please",
    "tell",
    "a",
    "short",
    "story",
    "about",
    "lighthouse",
    "keeper",
    "and",
    "cat",
)


# --- responses ------------------------------------------------------------------------


@dataclass
class _Step:
    due: float
    kind: Literal["transcript", "audio", "text", "args", "finish"]
    data: Any = None


@dataclass(frozen=True)
class _Call:
    """A tool call the fake model decided on: a function, or a tool on an MCP server."""

    name: str
    schema: dict[str, Any]
    server: Event | None = None
    """The ``mcp`` tool definition, for a tool on an MCP server."""
    arguments: str | None = None
    """Already decided (an approved request); otherwise drawn from ``schema``."""
    approval_request_id: str | None = None


@dataclass
class _Response:
    """One response in flight: its plan (timed steps) and what was emitted so far."""

    id: str
    item: Event
    in_conversation: bool
    conversation_id: str | None
    modality: Literal["audio", "text"]
    out_format: au.AudioFormat
    voice: str | dict[str, Any]
    temperature: float
    max_output_tokens: int | Literal["inf"]
    metadata: dict[str, Any] | None
    started: float
    input_text_tokens: int
    input_audio_tokens: int
    cached_tokens: int
    steps: deque[_Step] = field(default_factory=deque)
    final_status: str = "completed"
    text_parts: list[str] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)
    previous_item_id: str | None = None
    truncated_ms: int | None = None
    """Set by a ``conversation.item.truncate`` while the reply is still streaming."""
    server: Event | None = None
    """The ``mcp`` tool definition whose tool this response calls."""


@dataclass
class _InputAudio:
    """A committed user audio item: its bytes (None once evicted), format and length."""

    data: bytes | None
    fmt: au.AudioFormat
    ms: float


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


# --- the session -----------------------------------------------------------------------


class Session:
    """One Realtime session (one WebSocket connection), sans-IO.

    ``clock`` returns seconds on any monotonic scale (the Trio shell passes
    ``trio.current_time``); ``started_at`` is the Unix time used for ``expires_at``.
    ``pace`` streams reply audio at N× real time (0 → everything at once);
    ``response_delay`` is the time from ``response.created`` to the first delta (the
    model's "thinking"); ``obfuscation`` adds the GA ``obfuscation`` padding field to
    delta events, as the real server does; ``reply_sentences`` filler sentences follow the
    canned lead of each reply (about 1.5 s of audio each). ``preset`` replaces the default
    session config (a client secret's session, for connections authenticated with it).
    ``transcription_fails`` makes every input transcription end with
    ``conversation.item.input_audio_transcription.failed``.
    """

    def __init__(
        self,
        dialect: Dialect,
        model: str,
        clock: Callable[[], float],
        rng: random.Random,
        *,
        pace: float = 4.0,
        started_at: float = 0.0,
        max_duration: float = DEFAULT_MAX_SESSION_SECONDS,
        intent: str | None = None,
        response_delay: float = 0.0,
        obfuscation: bool = False,
        reply_sentences: int = 1,
        preset: SessionConfig | None = None,
        transcription_fails: bool = False,
    ) -> None:
        self.dialect: Dialect = dialect
        self.model = model
        self._clock = clock
        self._rng = rng
        self._ids = IdFactory(rng)
        self.pace = pace
        self.response_delay = response_delay
        self.obfuscation = obfuscation and dialect == "ga"
        self.reply_sentences = reply_sentences
        self.transcription_fails = transcription_fails
        self._segments = 0
        self.max_duration = max_duration
        self.config = SessionConfig() if preset is None else preset.copy()
        if intent == "transcription" and dialect == "ga":
            self.config.kind = "transcription"
        self.session_id = self._ids.new("sess")
        self.conversation_id = self._ids.new("conv")
        self.expires_at = int(started_at + max_duration)
        self._start = clock()
        self.close_requested: tuple[int, str] | None = None
        """Set when the server wants the connection closed (code, reason); shell acts on it."""
        self.closed = False
        # conversation
        self._items: list[Event] = []
        self._by_id: dict[str, Event] = {}
        self._input_audio: dict[str, _InputAudio] = {}
        self._retained_bytes = 0
        self._output_audio: dict[str, tuple[list[int], au.AudioFormat, int]] = {}
        self._mcp_tools: dict[str, tuple[Event, list[Event] | None]] = {}
        """MCP server label -> (what was listed, under which definition; None if it failed)."""
        self._voice_locked = False
        # input audio buffer and VAD
        self._buf = bytearray()
        self._buf_start_ms = 0.0
        self._total_ms = 0.0
        self._vad: au.EnergyVad | None = None
        self._speech_item_id: str | None = None
        self._speech_start_ms = 0
        self._idle_deadline: float | None = None
        self._rebuild_vad()
        # responses
        self._responses: dict[str, _Response] = {}
        self._inband: _Response | None = None
        self._last_input_tokens = 0
        self._tokens_used = 0
        self._requests = 0

    # --- public API ---------------------------------------------------------------

    def open(self, rejection: Rejection | None = None) -> list[Event]:
        """The first events of the connection: ``session.created``, or the fatal error."""
        if rejection is not None:
            self.close_requested = (rejection.close_code, rejection.close_reason)
            self.closed = True
            return [self._error(rejection.code, rejection.message)]
        created = self._event("session.created", session=self.render_session())
        created[FAKE_MARKER] = FAKE_NOTE
        out = [created]
        self._list_mcp_tools(self.config.tools, out)  # a client secret's session may have some
        return out

    def handle(self, message: str | bytes) -> list[Event]:
        """Process one client WebSocket message (text or binary); return server events."""
        now = self._clock()
        out = self._advance(now)
        if self.closed:
            return out
        if isinstance(message, bytes | bytearray | memoryview):
            out.append(
                self._error(
                    "invalid_event",
                    "Expected a text WebSocket message; binary frames are not supported.",
                )
            )
            return out
        try:
            event = orjson.loads(message)
        except orjson.JSONDecodeError as exc:
            out.append(
                self._error(
                    "invalid_json",
                    f"Invalid event: failed to parse JSON value. {exc}. The event must be a JSON "
                    "object with a 'type' field.",
                )
            )
            return out
        if not isinstance(event, dict):
            out.append(self._error("invalid_event", "The event must be a JSON object."))
            return out
        client_event_id = event.get("event_id")
        if not isinstance(client_event_id, str):
            client_event_id = None
        kind = event.get("type")
        if kind is None:
            out.append(
                self._error(
                    "invalid_event", "The 'type' field is missing.", event_id=client_event_id
                )
            )
            return out
        allowed = _GA_TYPES if self.dialect == "ga" else _BETA_TYPES
        if kind not in allowed:
            listed = ", ".join(f"'{t}'" for t in allowed)
            out.append(
                self._error(
                    "invalid_value",
                    f"Invalid value: '{kind}'. Supported values are: {listed}.",
                    param="type",
                    event_id=client_event_id,
                )
            )
            return out
        handler = getattr(self, "_on_" + kind.replace(".", "_"))
        try:
            handler(event, out, now)
        except ClientError as err:
            out.append(
                self._error(err.code, err.message, param=err.param, event_id=client_event_id)
            )
        out.extend(self._advance(now))
        return out

    def tick(self, now: float | None = None) -> list[Event]:
        """Emit whatever became due by ``now`` (default: the clock)."""
        return self._advance(self._clock() if now is None else now)

    def next_deadline(self) -> float | None:
        """Clock time at which ``tick`` has something to emit, or None if nothing is pending."""
        if self.closed:
            return None
        candidates = [self._start + self.max_duration]
        candidates.extend(r.steps[0].due for r in self._responses.values() if r.steps)
        if self._idle_deadline is not None:
            candidates.append(self._idle_deadline)
        return min(candidates)

    @property
    def has_active_response(self) -> bool:
        return self._inband is not None

    @property
    def items(self) -> list[Event]:
        """The conversation, in order (internal dicts; do not mutate)."""
        return self._items

    def render_session(self) -> Event:
        """The full effective session object in this connection's dialect."""
        if self.dialect == "ga":
            body = render_ga(self.config)
            head: Event = {"id": self.session_id, "object": body.pop("object")}
            if self.config.kind == "realtime":
                head["model"] = self.model
            head["expires_at"] = self.expires_at
            return {"type": body.pop("type"), **head, **body}
        body = render_beta(self.config)
        return {
            "id": self.session_id,
            "object": body.pop("object"),
            "model": self.model,
            "expires_at": self.expires_at,
            **body,
        }

    def notice(self, kind: str, **fields: Any) -> Event:
        """A server event of this session that its shell emits (e.g. a call's media side)."""
        return self._event(kind, **fields)

    # --- event helpers --------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> Event:
        return {"type": kind, "event_id": self._ids.new("event"), **fields}

    def _error(
        self,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> Event:
        return self._event(
            "error",
            error={
                "type": error_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        )

    def server_error(self) -> Event:
        """An internal-error ``error`` event (used by fault injection)."""
        return self._error(
            None,
            "The server had an error while processing your request. Sorry about that! You can "
            "retry your request, or contact us through our help center if the error persists.",
            error_type="server_error",
        )

    def _ga(self, ga_name: str, beta_name: str) -> str:
        return ga_name if self.dialect == "ga" else beta_name

    # --- session.update ----------------------------------------------------------------

    def _on_session_update(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "session"}, "")  # top-level extras
        if "session" not in event:
            raise missing_parameter("session")
        if self.dialect == "ga":
            new = apply_ga_update(self.config, event["session"])
        else:
            new = apply_beta_update(self.config, event["session"])
        if self._voice_locked and new.voice != self.config.voice:
            raise ClientError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice" if self.dialect == "ga" else "session.voice",
            )
        format_changed = new.input_format != self.config.input_format
        vad_changed = format_changed or new.turn_detection != self.config.turn_detection
        self.config = new
        if format_changed:
            self._buf.clear()  # bytes in the old format would be misread
            self._buf_start_ms = self._total_ms
        if vad_changed:
            self._rebuild_vad()
        out.append(self._event("session.updated", session=self.render_session()))
        self._list_mcp_tools(self.config.tools, out)

    def _list_mcp_tools(self, tools: list[Event], out: list[Event]) -> None:
        """List the tools of each MCP server not listed yet under its current definition.

        As the real server: ``mcp_list_tools.in_progress``, the ``mcp_list_tools`` item
        (added, done) holding the tools, then ``mcp_list_tools.completed`` (or ``.failed``,
        the item then empty and the server's tools unusable).
        """
        for definition in tools:
            if definition["type"] != "mcp":
                continue
            label = definition["server_label"]
            key = mcp.listing_key(definition)
            if label in self._mcp_tools and self._mcp_tools[label][0] == key:
                continue
            item_id = self._ids.new("item")
            out.append(self._event("mcp_list_tools.in_progress", item_id=item_id))
            listed = mcp.list_tools(definition)
            self._mcp_tools[label] = (key, listed)
            item = {
                "id": item_id,
                "type": "mcp_list_tools",
                "object": "realtime.item",
                "server_label": label,
                "tools": listed or [],
            }
            self._insert(item, len(self._items), out)
            outcome = "completed" if listed is not None else "failed"
            out.append(self._event(f"mcp_list_tools.{outcome}", item_id=item_id))

    def _on_transcription_session_update(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "session"}, "")
        s = expect_object(event.get("session", {}), "session")
        allowed = {
            "input_audio_format",
            "input_audio_transcription",
            "turn_detection",
            "input_audio_noise_reduction",
            "include",
            "modalities",
            "client_secret",
        }
        check_keys(s, allowed, "session")
        self.config = apply_beta_update(  # modalities/client_secret: accepted, not applied
            self.config, {k: v for k, v in s.items() if k not in ("client_secret", "modalities")}
        )
        self.config.kind = "transcription"  # from now on: transcribe, never respond
        self._rebuild_vad()
        session = {
            "id": self.session_id,
            "object": "realtime.transcription_session",
            "expires_at": self.expires_at,
            "modalities": ["text"],
            "input_audio_format": self.config.input_format,
            "input_audio_transcription": self.config.transcription,
            "turn_detection": self.render_session()["turn_detection"],
            "input_audio_noise_reduction": self.config.noise_reduction,
            "include": self.config.include,
            # no client_secret: "not present when a session is updated via the WebSocket API"
        }
        out.append(self._event("transcription_session.updated", session=session))

    def _on_session_close(self, event: Event, out: list[Event], now: float) -> None:
        self.close_requested = (1000, "")
        self.closed = True

    # --- input audio buffer -----------------------------------------------------------

    def _rebuild_vad(self) -> None:
        td = self.config.turn_detection
        if td is None:
            self._vad = None
            self._speech_item_id = None
            self._idle_deadline = None
            return
        if td["type"] == "semantic_vad":
            silence = {"high": 200, "medium": 500, "auto": 500, "low": 800}[td["eagerness"]]
            params = (0.5, 300, silence)
        else:
            params = (td["threshold"], td["prefix_padding_ms"], td["silence_duration_ms"])
            if td.get("idle_timeout_ms") is None:
                self._idle_deadline = None
        self._vad = au.EnergyVad(
            self.config.input_format,
            threshold=params[0],
            prefix_padding_ms=params[1],
            silence_duration_ms=params[2],
        )
        self._vad.position_ms = int(self._total_ms)
        self._vad.reset(int(self._total_ms))
        self._speech_item_id = None

    def _bytes_at(self, ms: float) -> int:
        bpm = au.bytes_per_ms(self.config.input_format)
        offset = int(round(ms - self._buf_start_ms)) * bpm
        return max(0, min(len(self._buf), offset))

    def _on_input_audio_buffer_append(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "audio"}, "")
        if "audio" not in event:
            raise missing_parameter("audio")
        raw = expect_str(event["audio"], "audio")
        try:
            data = au.b64decode(raw)
        except ValueError:
            raise ClientError(
                "invalid_value",
                "Invalid 'audio'. Expected base64-encoded audio in the session's input format.",
                "audio",
            ) from None
        fmt = self.config.input_format
        self._buf += data
        self._total_ms += au.duration_ms(len(data), fmt)
        if self._vad is None:
            return
        for result in self._vad.feed(data):
            if result.speech_started_ms is not None:
                self._speech_started(result.speech_started_ms, out, now)
            elif result.speech_stopped_ms is not None:
                self._speech_stopped(result.speech_stopped_ms, out, now)
        if not self._vad.in_speech:
            # keep only what could become prefix padding: memory stays bounded
            keep_ms = self._vad.prefix_padding_ms + au.FRAME_MS
            if self._total_ms - self._buf_start_ms > max(keep_ms, 10_000):
                cut = self._bytes_at(self._total_ms - keep_ms)
                del self._buf[:cut]
                self._buf_start_ms += cut / au.bytes_per_ms(fmt)

    def _speech_started(self, start_ms: int, out: list[Event], now: float) -> None:
        start_ms = max(start_ms, int(self._buf_start_ms))
        self._speech_item_id = self._ids.new("item")
        self._speech_start_ms = start_ms
        self._idle_deadline = None
        out.append(
            self._event(
                "input_audio_buffer.speech_started",
                audio_start_ms=start_ms,
                item_id=self._speech_item_id,
            )
        )
        td = self.config.turn_detection or {}
        if td.get("interrupt_response") and self._inband is not None:
            self._finish(self._inband, out, now, status="cancelled", reason="turn_detected")

    def _speech_stopped(self, end_ms: int, out: list[Event], now: float) -> None:
        item_id = self._speech_item_id or self._ids.new("item")
        out.append(
            self._event("input_audio_buffer.speech_stopped", audio_end_ms=end_ms, item_id=item_id)
        )
        start, end = self._bytes_at(self._speech_start_ms), self._bytes_at(end_ms)
        audio = bytes(self._buf[start:end])
        del self._buf[:end]
        self._buf_start_ms = max(self._buf_start_ms, float(end_ms))
        self._speech_item_id = None
        self._commit_audio(item_id, audio, out)
        td = self.config.turn_detection or {}
        if td.get("create_response") and self._inband is None and self.config.kind == "realtime":
            self._create_response({}, out, now)

    def _on_input_audio_buffer_commit(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id"}, "")
        fmt = self.config.input_format
        ms = au.duration_ms(len(self._buf), fmt)
        if ms < MIN_COMMIT_MS:
            raise ClientError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {ms:.2f}ms of audio.",
            )
        item_id = self._speech_item_id or self._ids.new("item")
        audio = bytes(self._buf)
        self._reset_buffer()
        self._commit_audio(item_id, audio, out)

    def _on_input_audio_buffer_clear(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id"}, "")
        self._reset_buffer()
        out.append(self._event("input_audio_buffer.cleared"))

    def _reset_buffer(self) -> None:
        self._buf.clear()
        self._buf_start_ms = self._total_ms
        self._speech_item_id = None
        if self._vad is not None:
            self._vad.reset(int(self._total_ms))

    def _commit_audio(self, item_id: str, audio: bytes, out: list[Event]) -> None:
        previous = self._items[-1]["id"] if self._items else None
        out.append(
            self._event("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        )
        item = {
            "id": item_id,
            "type": "message",
            "object": "realtime.item",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        fmt = self.config.input_format
        self._input_audio[item_id] = _InputAudio(audio, fmt, au.duration_ms(len(audio), fmt))
        self._retained_bytes += len(audio)
        for old in self._input_audio.values():
            if self._retained_bytes <= MAX_RETAINED_AUDIO_BYTES:
                break
            if old.data is not None:
                self._retained_bytes -= len(old.data)
                old.data = None
        self._insert(item, len(self._items), out)
        if self.config.transcription is not None:
            self._transcribe(item_id, au.duration_ms(len(audio), self.config.input_format), out)

    def _transcribe(self, item_id: str, ms: float, out: list[Event]) -> None:
        """Made-up words, length ∝ duration: deltas (or speaker segments) then ``completed``."""
        ids = {"item_id": item_id, "content_index": 0}
        if self.transcription_fails:
            error = {
                "type": "transcription_error",
                "code": "audio_unintelligible",
                "message": "The audio could not be transcribed.",
                "param": None,
            }
            out.append(
                self._event(
                    "conversation.item.input_audio_transcription.failed", **ids, error=error
                )
            )
            return
        n_words = max(1, round(ms / 400))
        words = [self._rng.choice(_SPOKEN_WORDS) for _ in range(n_words)]
        transcript = " ".join(words).capitalize() + "."
        pieces = transcript.split(" ")
        model = (self.config.transcription or {}).get("model", "")
        if model in DIARIZING_TRANSCRIPTION_MODELS and self.dialect == "ga":
            self._segment(pieces, ms, ids, out)
        else:
            for i, piece in enumerate(pieces):
                out.append(
                    self._event(
                        "conversation.item.input_audio_transcription.delta",
                        **ids,
                        delta=piece if i == 0 else " " + piece,
                    )
                )
                self._obfuscate(out[-1])
        seconds = round(ms / 1000, 3)
        usage: Event
        if model == "whisper-1":
            usage = {"type": "duration", "seconds": seconds}
        else:
            audio_tokens = max(1, round(seconds * INPUT_AUDIO_TOKENS_PER_SECOND))
            text_out = _tokens(transcript)
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "output_tokens": text_out,
                "total_tokens": audio_tokens + text_out,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
            }
        out.append(
            self._event(
                "conversation.item.input_audio_transcription.completed",
                item_id=item_id,
                content_index=0,
                transcript=transcript,
                usage=usage,
            )
        )
        item = self._by_id.get(item_id)
        if item is not None:
            item["content"][0]["transcript"] = transcript

    def _segment(self, words: list[str], ms: float, ids: Event, out: list[Event]) -> None:
        """A diarizing model's ``segment`` events: a few words each, speakers A and B in turn."""
        per_word = ms / 1000 / len(words)
        for first in range(0, len(words), SEGMENT_WORDS):
            last = min(first + SEGMENT_WORDS, len(words))
            out.append(
                self._event(
                    "conversation.item.input_audio_transcription.segment",
                    **ids,
                    id=f"seg_{self._segments}",
                    text=" ".join(words[first:last]),
                    speaker="AB"[first // SEGMENT_WORDS % 2],
                    start=round(first * per_word, 3),
                    end=round(last * per_word, 3),
                )
            )
            self._segments += 1

    # --- conversation items -------------------------------------------------------------

    def _public(self, item: Event) -> Event:
        """Copy of an item as sent in added/done events: no audio bytes."""
        out = dict(item)
        if "content" in item:
            out["content"] = [
                {k: v for k, v in part.items() if k != "audio"} for part in item["content"]
            ]
        return out

    def _insert(self, item: Event, index: int, out: list[Event] | None) -> None:
        previous = self._items[index - 1]["id"] if index > 0 else None
        self._items.insert(index, item)
        self._by_id[item["id"]] = item
        if out is None:
            return
        public = self._public(item)
        if self.dialect == "ga":
            out.append(
                self._event("conversation.item.added", previous_item_id=previous, item=public)
            )
            out.append(
                self._event("conversation.item.done", previous_item_id=previous, item=dict(public))
            )
        else:
            out.append(
                self._event("conversation.item.created", previous_item_id=previous, item=public)
            )

    def _parse_item(self, raw: Any, param: str = "item") -> Event:
        """Validate a client item; returns it normalized (no id assigned yet)."""
        item = expect_object(raw, param)
        check_keys(
            item,
            {
                "id",
                "type",
                "object",
                "status",
                "role",
                "content",
                "call_id",
                "name",
                "arguments",
                "output",
                *(mcp.ITEM_KEYS if self.dialect == "ga" else ()),
            },
            param,
        )
        if "type" not in item:
            raise missing_parameter(f"{param}.type")
        kinds: tuple[str, ...] = ("message", "function_call", "function_call_output")
        if self.dialect == "ga":
            kinds += tuple(mcp.ITEM_FIELDS)
        kind = expect_choice(item["type"], f"{param}.type", kinds)
        out: Event = {"type": kind, "object": "realtime.item"}
        if "id" in item:
            out["id"] = expect_str(item["id"], f"{param}.id")
        if kind in mcp.ITEM_FIELDS:
            out.update(mcp.parse_mcp_item(item, kind, param))
        elif kind == "message":
            for key in ("call_id", "name", "arguments", "output"):
                if key in item:
                    raise unknown_parameter(f"{param}.{key}")
            if "role" not in item:
                raise missing_parameter(f"{param}.role")
            role = expect_choice(item["role"], f"{param}.role", ("user", "assistant", "system"))
            if "content" not in item:
                raise missing_parameter(f"{param}.content")
            if not isinstance(item["content"], list):
                raise invalid_type(f"{param}.content", "an array", item["content"])
            out.update(
                status="completed",
                role=role,
                content=[
                    self._parse_part(p, role, f"{param}.content[{i}]")
                    for i, p in enumerate(item["content"])
                ],
            )
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if key not in item:
                    raise missing_parameter(f"{param}.{key}")
                out[key] = expect_str(item[key], f"{param}.{key}")
            out["status"] = "completed"
        else:
            for key in ("call_id", "output"):
                if key not in item:
                    raise missing_parameter(f"{param}.{key}")
                out[key] = expect_str(item[key], f"{param}.{key}")
        return out

    def _parse_part(self, raw: Any, role: str, param: str) -> Event:
        part = expect_object(raw, param)
        if self.dialect == "ga":
            kinds = {
                "user": ("input_text", "input_audio", "input_image"),
                "system": ("input_text",),
                "assistant": ("output_text", "output_audio"),
            }
        else:
            kinds = {
                "user": ("input_text", "input_audio"),
                "system": ("input_text",),
                "assistant": ("text",),
            }
        kind = expect_choice(part.get("type"), f"{param}.type", kinds[role])
        if kind == "output_audio":
            raise ClientError(
                "invalid_value",
                "Assistant audio messages cannot be created by the client; use output_text.",
                f"{param}.type",
            )
        if kind in ("input_text", "output_text", "text"):
            check_keys(part, {"type", "text"}, param)
            if "text" not in part:
                raise missing_parameter(f"{param}.text")
            return {"type": kind, "text": expect_str(part["text"], f"{param}.text")}
        if kind == "input_audio":
            check_keys(part, {"type", "audio", "transcript"}, param)
            out: Event = {"type": kind, "transcript": None}
            if part.get("audio") is not None:
                try:
                    au.b64decode(expect_str(part["audio"], f"{param}.audio"))
                except ValueError:
                    raise ClientError(
                        "invalid_value", "Invalid 'audio': expected base64.", f"{param}.audio"
                    ) from None
                out["audio"] = part["audio"]
            if part.get("transcript") is not None:
                out["transcript"] = expect_str(part["transcript"], f"{param}.transcript")
            return out
        check_keys(part, {"type", "image_url", "detail"}, param)
        if "image_url" not in part:
            raise missing_parameter(f"{param}.image_url")
        return {
            "type": kind,
            "image_url": expect_str(part["image_url"], f"{param}.image_url"),
            "detail": part.get("detail", "auto"),
        }

    def _has_call(self, call_id: str) -> bool:
        return any(
            i["type"] == "function_call" and i.get("call_id") == call_id for i in self._items
        )

    def _on_conversation_item_create(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "item", "previous_item_id"}, "")
        if "item" not in event:
            raise missing_parameter("item")
        item = self._parse_item(event["item"])
        prev = event.get("previous_item_id")
        if prev is None:
            index = len(self._items)
        elif prev == "root":
            index = 0
        else:
            expect_str(prev, "previous_item_id")
            if prev not in self._by_id:
                raise ClientError(
                    "item_not_found",
                    f"Error adding item: the previous item with id '{prev}' does not exist.",
                    "previous_item_id",
                )
            index = self._items.index(self._by_id[prev]) + 1
        if "id" in item and item["id"] in self._by_id:
            raise ClientError(
                "item_already_exists", f"Item with id '{item['id']}' already exists.", "item.id"
            )
        if item["type"] == "function_call_output" and not self._has_call(item["call_id"]):
            raise ClientError(
                "invalid_value",
                f"Tool call output with call_id '{item['call_id']}' has no matching "
                "function_call item in the conversation.",
                "item.call_id",
            )
        if item["type"] == "mcp_approval_response":
            request = self._by_id.get(item["approval_request_id"])
            if request is None or request["type"] != "mcp_approval_request":
                raise ClientError(
                    "invalid_value",
                    f"MCP approval response for '{item['approval_request_id']}' has no matching "
                    "mcp_approval_request item in the conversation.",
                    "item.approval_request_id",
                )
        item = {"id": item.pop("id", None) or self._ids.new("item"), **item}
        self._insert(item, index, out)

    def _require_item(self, event: Event) -> Event:
        if "item_id" not in event:
            raise missing_parameter("item_id")
        item_id = expect_str(event["item_id"], "item_id")
        item = self._by_id.get(item_id)
        if item is None:
            raise ClientError(
                "item_not_found", f"Item with item_id '{item_id}' not found.", "item_id"
            )
        return item

    def _on_conversation_item_delete(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "item_id"}, "")
        item = self._require_item(event)
        self._items.remove(item)
        del self._by_id[item["id"]]
        removed = self._input_audio.pop(item["id"], None)
        if removed is not None and removed.data is not None:
            self._retained_bytes -= len(removed.data)
        self._output_audio.pop(item["id"], None)
        out.append(self._event("conversation.item.deleted", item_id=item["id"]))

    def _on_conversation_item_retrieve(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "item_id"}, "")
        item = self._require_item(event)
        full = dict(item)
        if "content" in item:
            full["content"] = [dict(part) for part in item["content"]]
            kept = self._input_audio.get(item["id"])
            if kept is not None:
                if kept.data is not None:
                    full["content"][0]["audio"] = au.b64encode(kept.data)
            elif item["id"] in self._output_audio:
                chunks, fmt, end_ms = self._output_audio[item["id"]]
                data = b"".join(au.chunk_bytes(v, fmt) for v in chunks)
                full["content"][0]["audio"] = au.b64encode(data[: end_ms * au.bytes_per_ms(fmt)])
        out.append(self._event("conversation.item.retrieved", item=full))

    def _on_conversation_item_truncate(self, event: Event, out: list[Event], now: float) -> None:
        """Cut an assistant audio item to what the user heard, as the real server does.

        Accepted once the item has audio, even while its response still streams (the
        Agents SDK truncates first, then sends ``response.cancel``); the response goes on
        until it is cancelled or ends, and the item keeps the cut. The whole server-side
        transcript is dropped (the API documents it so), only ``audio_end_ms`` of audio
        stays for ``conversation.item.retrieve`` and for the next responses' context.
        """
        check_keys(event, {"type", "event_id", "item_id", "content_index", "audio_end_ms"}, "")
        item = self._require_item(event)
        for key in ("content_index", "audio_end_ms"):
            if key not in event:
                raise missing_parameter(key)
        content_index = expect_int(event["content_index"], "content_index", 0)
        end_ms = expect_int(event["audio_end_ms"], "audio_end_ms", 0)
        streaming = next((r for r in self._responses.values() if r.item is item), None)
        length_ms: int | None = None
        if content_index == 0 and streaming is not None and streaming.chunks:
            sent_ms = len(streaming.chunks) * au.CHUNK_MS
            length_ms = sent_ms if streaming.truncated_ms is None else streaming.truncated_ms
        elif content_index == 0 and item["id"] in self._output_audio:
            length_ms = self._output_audio[item["id"]][2]
        if length_ms is None:
            raise ClientError(
                "unsupported_content_type",
                "Only model output audio messages can be truncated",
                "item_id",
            )
        if end_ms > length_ms:
            raise ClientError(
                "invalid_value",
                f"Audio content of {length_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        if streaming is not None:
            streaming.truncated_ms = end_ms  # applied to the item when the response ends
        else:
            chunks, fmt, _ = self._output_audio[item["id"]]
            self._output_audio[item["id"]] = (chunks, fmt, end_ms)
            item["content"][0]["transcript"] = ""  # the unheard transcript is dropped
        out.append(
            self._event(
                "conversation.item.truncated",
                item_id=item["id"],
                content_index=content_index,
                audio_end_ms=end_ms,
            )
        )

    # --- responses ---------------------------------------------------------------------

    def _on_response_create(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "response"}, "")
        body = event.get("response")
        body = {} if body is None else expect_object(body, "response")
        if self.config.kind != "realtime":
            raise ClientError(
                "invalid_value", "Responses are not available in a transcription session.", "type"
            )
        self._create_response(body, out, now)

    def _parse_overrides(self, body: Event) -> tuple[SessionConfig, Event]:
        """Per-response overrides on a copy of the session config (+ extra fields)."""
        p = "response"
        cfg = self.config.copy()
        extra: Event = {"conversation": "auto", "metadata": None, "input": None}
        if self.dialect == "ga":
            allowed = {
                "output_modalities",
                "instructions",
                "audio",
                "tools",
                "tool_choice",
                "max_output_tokens",
                "conversation",
                "metadata",
                "input",
                "prompt",
                "tracing",
            }
        else:
            allowed = {
                "modalities",
                "instructions",
                "voice",
                "output_audio_format",
                "tools",
                "tool_choice",
                "temperature",
                "max_response_output_tokens",
                "max_output_tokens",
                "conversation",
                "metadata",
                "input",
            }
        check_keys(body, allowed, p)
        if "output_modalities" in body:
            cfg.modality = parse_ga_modalities(body["output_modalities"], f"{p}.output_modalities")
        if "modalities" in body:
            cfg.modality = parse_beta_modalities(body["modalities"], f"{p}.modalities")
        if "instructions" in body:
            cfg.instructions = expect_str(body["instructions"], f"{p}.instructions")
        if "audio" in body:
            a = expect_object(body["audio"], f"{p}.audio")
            check_keys(a, {"output"}, f"{p}.audio")
            o = expect_object(a.get("output", {}), f"{p}.audio.output")
            check_keys(o, {"format", "voice"}, f"{p}.audio.output")
            if "format" in o:
                cfg.output_format = parse_ga_format(o["format"], f"{p}.audio.output.format")
            if "voice" in o:
                cfg.voice = parse_voice(o["voice"], f"{p}.audio.output.voice")
        if "voice" in body:
            cfg.voice = parse_voice(body["voice"], f"{p}.voice")
        if "output_audio_format" in body:
            cfg.output_format = expect_choice(
                body["output_audio_format"],
                f"{p}.output_audio_format",
                ("pcm16", "g711_ulaw", "g711_alaw"),
            )  # type: ignore[assignment]
        if "tools" in body:
            cfg.tools = parse_tools(body["tools"], f"{p}.tools", allow_mcp=self.dialect == "ga")
        if "tool_choice" in body:
            cfg.tool_choice = parse_tool_choice(body["tool_choice"], f"{p}.tool_choice")
        if "temperature" in body:
            cfg.temperature = expect_number(body["temperature"], f"{p}.temperature", 0.6, 1.2)
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in body:
                cfg.max_output_tokens = parse_max_tokens(body[key], f"{p}.{key}")
        if "conversation" in body:
            extra["conversation"] = expect_choice(
                body["conversation"], f"{p}.conversation", ("auto", "none")
            )
        if body.get("metadata") is not None:
            meta = expect_object(body["metadata"], f"{p}.metadata")
            if len(meta) > 16:
                raise ClientError(
                    "invalid_value",
                    "Invalid 'response.metadata': at most 16 key-value pairs are allowed.",
                    f"{p}.metadata",
                )
            for k, v in meta.items():
                value = expect_str(v, f"{p}.metadata.{k}")
                if len(k) > 64 or len(value) > 512:
                    raise ClientError(
                        "invalid_value",
                        f"Invalid 'response.metadata.{k[:64]}': keys are at most 64 characters "
                        "and values at most 512.",
                        f"{p}.metadata",
                    )
            extra["metadata"] = dict(meta)
        if "input" in body:
            items = body["input"]
            if not isinstance(items, list):
                raise invalid_type(f"{p}.input", "an array", items)
            resolved = []
            for i, raw in enumerate(items):
                ip = f"{p}.input[{i}]"
                if isinstance(raw, dict) and raw.get("type") == "item_reference":
                    check_keys(raw, {"type", "id"}, ip)
                    ref = expect_str(raw.get("id"), f"{ip}.id")
                    if ref not in self._by_id:
                        raise ClientError(
                            "item_not_found", f"Item with id '{ref}' not found.", f"{ip}.id"
                        )
                    resolved.append(self._by_id[ref])
                else:
                    resolved.append(self._parse_item(raw, ip))
            extra["input"] = resolved
        if isinstance(cfg.tool_choice, dict) and cfg.tool_choice.get("type") == "function":
            names = [t.get("name") for t in cfg.tools if t.get("type") == "function"]
            if cfg.tool_choice["name"] not in names:
                raise ClientError(
                    "invalid_value",
                    f"Tool choice '{cfg.tool_choice['name']}' is not one of the provided tools.",
                    f"{p}.tool_choice",
                )
        return cfg, extra

    def _create_response(self, body: Event, out: list[Event], now: float) -> None:
        cfg, extra = self._parse_overrides(body)
        in_conversation = extra["conversation"] == "auto"
        if in_conversation and self._inband is not None:
            raise ClientError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self._inband.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self._list_mcp_tools(cfg.tools, out)  # per-response MCP servers
        context: list[Event] = extra["input"] if extra["input"] is not None else list(self._items)
        self._idle_deadline = None
        text_tokens = _tokens(cfg.instructions)
        audio_tokens = 0
        for earlier in context:
            text_tokens += self._item_text_tokens(earlier)
            audio_tokens += self._item_audio_tokens(earlier)
        total_in = text_tokens + audio_tokens
        cached = min(total_in, self._last_input_tokens // 64 * 64)
        self._last_input_tokens = total_in
        call = self._pick_tool(cfg, context)
        response_id = self._ids.new("resp")
        item, args = self._output_item(call)
        resp = _Response(
            id=response_id,
            item=item,
            in_conversation=in_conversation,
            conversation_id=self.conversation_id if in_conversation else None,
            modality=cfg.modality,
            out_format=cfg.output_format,
            voice=cfg.voice,
            temperature=cfg.temperature,
            max_output_tokens=cfg.max_output_tokens,
            metadata=extra["metadata"],
            started=now,
            input_text_tokens=text_tokens,
            input_audio_tokens=audio_tokens,
            cached_tokens=cached,
        )
        resp.server = None if call is None else call.server
        self._responses[response_id] = resp
        if in_conversation:
            self._inband = resp
        self._requests += 1
        out.append(self._event("response.created", response=self._render_response(resp, [])))
        out.append(
            self._event(
                "response.output_item.added",
                response_id=response_id,
                output_index=0,
                item=self._public(item),
            )
        )
        if in_conversation:
            resp.previous_item_id = self._items[-1]["id"] if self._items else None
            self._items.append(item)
            self._by_id[item["id"]] = item
            name = self._ga("conversation.item.added", "conversation.item.created")
            out.append(
                self._event(name, previous_item_id=resp.previous_item_id, item=self._public(item))
            )
        if item["type"] == "mcp_approval_request":  # asked whole: nothing to stream
            resp.steps.append(_Step(now + self.response_delay, "finish"))
            return
        if call is not None:
            self._plan_arguments(resp, args, now)
            return
        part = (
            {"type": "audio", "transcript": ""}
            if cfg.modality == "audio"
            else {"type": "text", "text": ""}
        )
        out.append(
            self._event(
                "response.content_part.added",
                response_id=response_id,
                item_id=item["id"],
                output_index=0,
                content_index=0,
                part=part,
            )
        )
        self._plan_message(resp, self._reply_text(context), now)

    def _output_item(self, call: _Call | None) -> tuple[Event, str]:
        """The response's output item (in progress) and the arguments it is to carry."""
        item_id = self._ids.new("item")
        if call is None:
            message: Event = {
                "id": item_id,
                "type": "message",
                "object": "realtime.item",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            return message, ""
        args = call.arguments or orjson.dumps(instance_of(call.schema, self._rng)).decode()
        head: Event = {"id": item_id}
        if call.server is None:
            head.update(type="function_call", object="realtime.item", status="in_progress")
            head.update(name=call.name, call_id=self._ids.new("call", 16), arguments="")
            return head, args
        head.update(server_label=call.server["server_label"], name=call.name)
        if call.approval_request_id is None and mcp.needs_approval(call.server, call.name):
            return {
                **head,
                "type": "mcp_approval_request",
                "object": "realtime.item",
                "arguments": args,
            }, args
        head.update(type="mcp_call", object="realtime.item", arguments="")
        head.update(approval_request_id=call.approval_request_id, output=None, error=None)
        return head, args

    def _item_text_tokens(self, item: Event) -> int:
        n = 0
        for part in item.get("content", ()):
            n += _tokens(part.get("text") or "") + _tokens(part.get("transcript") or "")
        for key in ("arguments", "output", "name"):
            n += _tokens(item.get(key) or "")
        return n

    def _item_audio_tokens(self, item: Event) -> int:
        item_id = item.get("id")
        if item_id in self._input_audio:
            return round(self._input_audio[item_id].ms / 1000 * INPUT_AUDIO_TOKENS_PER_SECOND)
        if item_id in self._output_audio:
            return self._output_audio[item_id][2] // au.CHUNK_MS * AUDIO_TOKENS_PER_CHUNK
        n = 0
        for part in item.get("content", ()):
            if part.get("audio"):
                n += len(part["audio"]) * 3 // 4 // 4800  # assume 24 kHz PCM16: 100 ms units
        return n

    def _pick_tool(self, cfg: SessionConfig, context: list[Event]) -> _Call | None:
        """The fake model's tool policy: named/required → call; auto → if the user names it.

        Tools are the session's functions and the listed tools of its MCP servers. After a
        tool result (or an unanswered approval request) the model speaks instead; after an
        approval it makes the approved call, after a refusal it speaks.
        """
        calls = [
            _Call(t["name"], t.get("parameters", {})) for t in cfg.tools if t["type"] == "function"
        ]
        for server in (t for t in cfg.tools if t["type"] == "mcp"):
            listed = self._mcp_tools.get(server["server_label"], ({}, None))[1] or []
            calls += [_Call(tool["name"], tool["input_schema"], server) for tool in listed]
        if not calls or cfg.tool_choice == "none":
            return None
        last = context[-1]["type"] if context else None
        if last in ("function_call_output", "mcp_call", "mcp_approval_request"):
            return None
        if last == "mcp_approval_response":
            return self._approved(context[-1], calls)
        return self._chosen(cfg, calls, self._last_user_text(context).lower())

    def _chosen(self, cfg: SessionConfig, calls: list[_Call], said: str) -> _Call | None:
        choice = cfg.tool_choice
        if isinstance(choice, dict):
            label = choice.get("server_label")
            for call in calls:
                if (call.server is None) == (choice["type"] == "function") and (
                    call.server is None or call.server["server_label"] == label
                ):
                    if choice.get("name") in (None, call.name):
                        return call
            return None
        if choice == "required":
            return calls[0]
        for call in calls:
            name = call.name.lower()
            if name in said or name.replace("_", " ") in said:
                return call
        return None

    def _approved(self, answer: Event, calls: list[_Call]) -> _Call | None:
        """The call an ``mcp_approval_response`` approves (None if refused or gone)."""
        request = self._by_id.get(answer["approval_request_id"])
        if not answer["approve"] or request is None:
            return None
        for call in calls:
            if call.server is not None and (call.server["server_label"], call.name) == (
                request["server_label"],
                request["name"],
            ):
                return replace(
                    call, arguments=request["arguments"], approval_request_id=request["id"]
                )
        return None

    @staticmethod
    def _last_user_text(context: list[Event]) -> str:
        for item in reversed(context):
            if item["type"] == "message" and item.get("role") == "user":
                texts = [p.get("text") or p.get("transcript") or "" for p in item["content"]]
                return " ".join(t for t in texts if t)
        return ""

    def _reply_text(self, context: list[Event]) -> str:
        lead = "Hello! How can I help you today?"
        for item in reversed(context):
            if item["type"] in ("function_call_output", "mcp_call") and item.get("output"):
                output = " ".join(item["output"].split()[:12])
                lead = f"The tool returned {output}."
                break
            if item["type"] == "mcp_call":
                error = item.get("error") or {}
                lead = f"The tool call failed: {error.get('message', 'no result')}"
                break
            if item["type"] == "mcp_approval_response" and not item["approve"]:
                lead = "All right, I will not run that tool."
                break
            if item["type"] == "mcp_approval_request":
                lead = f"May I run {item['name']}? Please approve or decline."
                break
            if item["type"] == "message" and item.get("role") == "user":
                text = self._last_user_text([item])
                if text:
                    lead = "You said: " + " ".join(text.split()[:20])
                    if lead[-1] not in ".?!":
                        lead += "."
                elif item.get("id") in self._input_audio:
                    seconds = self._input_audio[item["id"]].ms / 1000
                    lead = f"I heard {seconds:.1f} seconds of audio."
                else:
                    lead = "I got your message."
                break
        fillers = [self._rng.choice(_FILLERS) for _ in range(self.reply_sentences)]
        return " ".join([lead, *fillers])

    def _plan_message(self, resp: _Response, text: str, now: float) -> None:
        words = text.split()[:MAX_REPLY_WORDS]
        budget = resp.max_output_tokens
        used = 0
        t = now + self.response_delay
        audio = resp.modality == "audio"
        chunk_s = au.CHUNK_MS / 1000 / self.pace if self.pace > 0 else 0.0
        text_s = TEXT_STEP_S / self.pace if self.pace > 0 else 0.0
        last = t
        variants = au.voice_variants(resp.voice)
        for i, word in enumerate(words):
            delta = word if i == 0 else " " + word
            n_syl = au.syllables_in(word)
            pause = word[-1] in ",.;:?!"
            cost = _tokens(delta) + (AUDIO_TOKENS_PER_CHUNK * (n_syl + pause) if audio else 0)
            if budget != "inf" and used + cost > budget:
                resp.final_status = "incomplete"
                break
            used += cost
            if audio:
                resp.steps.append(_Step(t, "transcript", delta))
                for _ in range(n_syl):
                    resp.steps.append(_Step(t, "audio", self._rng.choice(variants)))
                    last, t = t, t + chunk_s
                if pause:
                    resp.steps.append(_Step(t, "audio", au.SILENCE))
                    last, t = t, t + chunk_s
            else:
                resp.steps.append(_Step(t, "text", delta))
                last, t = t, t + text_s
        resp.steps.append(_Step(last, "finish"))

    def _plan_arguments(self, resp: _Response, args: str, now: float) -> None:
        step = ARGS_STEP_S / self.pace if self.pace > 0 else 0.0
        t = now + self.response_delay
        last = t
        for i in range(0, len(args), 8):
            resp.steps.append(_Step(t, "args", args[i : i + 8]))
            last, t = t, t + step
        resp.steps.append(_Step(last, "finish"))

    def _on_response_cancel(self, event: Event, out: list[Event], now: float) -> None:
        check_keys(event, {"type", "event_id", "response_id"}, "")
        target: _Response | None
        if event.get("response_id") is not None:
            target = self._responses.get(expect_str(event["response_id"], "response_id"))
        else:
            target = self._inband
        if target is None:
            raise ClientError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        self._finish(target, out, now, status="cancelled", reason="client_cancelled")

    # --- emission ---------------------------------------------------------------------

    def _advance(self, now: float) -> list[Event]:
        out: list[Event] = []
        while not self.closed:
            best: _Response | None = None
            for resp in self._responses.values():
                if (
                    resp.steps
                    and resp.steps[0].due <= now
                    and (best is None or resp.steps[0].due < best.steps[0].due)
                ):
                    best = resp
            if best is not None:
                self._run_step(best, best.steps.popleft(), out, now)
                continue
            if self._idle_deadline is not None and self._idle_deadline <= now:
                self._idle_deadline = None
                self._idle_timeout(out, now)
                continue
            if now >= self._start + self.max_duration:
                self._expire(out)
            break
        return out

    def _run_step(self, resp: _Response, step: _Step, out: list[Event], now: float) -> None:
        if step.kind == "finish":
            self._finish(resp, out, now, status=resp.final_status)
            return
        self._emit_delta(resp, step, out)
        self._obfuscate(out[-1])

    def _obfuscate(self, event: Event) -> None:
        """GA pads delta events with a random ``obfuscation`` string (if enabled)."""
        if self.obfuscation:
            event["obfuscation"] = "".join(
                self._rng.choices(ALPHANUMERIC, k=self._rng.randrange(1, 16))
            )

    def _emit_delta(self, resp: _Response, step: _Step, out: list[Event]) -> None:
        ids = {"response_id": resp.id, "item_id": resp.item["id"], "output_index": 0}
        if step.kind == "audio":
            resp.chunks.append(step.data)
            out.append(
                self._event(
                    self._ga("response.output_audio.delta", "response.audio.delta"),
                    **ids,
                    content_index=0,
                    delta=au.chunk_b64(step.data, resp.out_format),
                )
            )
        elif step.kind == "transcript":
            resp.text_parts.append(step.data)
            name = self._ga(
                "response.output_audio_transcript.delta", "response.audio_transcript.delta"
            )
            out.append(self._event(name, **ids, content_index=0, delta=step.data))
        elif step.kind == "text":
            resp.text_parts.append(step.data)
            out.append(
                self._event(
                    self._ga("response.output_text.delta", "response.text.delta"),
                    **ids,
                    content_index=0,
                    delta=step.data,
                )
            )
        elif step.kind == "args" and resp.item["type"] == "mcp_call":
            resp.text_parts.append(step.data)
            out.append(self._event("response.mcp_call_arguments.delta", **ids, delta=step.data))
        elif step.kind == "args":
            resp.text_parts.append(step.data)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    **ids,
                    call_id=resp.item["call_id"],
                    delta=step.data,
                )
            )

    def _finish(
        self,
        resp: _Response,
        out: list[Event],
        now: float,
        *,
        status: str,
        reason: str | None = None,
    ) -> None:
        """Close the response's open parts and item, then ``response.done``."""
        resp.steps.clear()
        del self._responses[resp.id]
        if self._inband is resp:
            self._inband = None
        ids = {"response_id": resp.id, "item_id": resp.item["id"], "output_index": 0}
        text = "".join(resp.text_parts)
        item = resp.item
        if "status" in item:  # MCP items have none
            item["status"] = "completed" if status == "completed" else "incomplete"
        if item["type"] in ("function_call", "mcp_call"):
            self._close_call(resp, text, out, made=status == "completed")
            output_tokens = _tokens(text)
            audio_out = 0
        elif item["type"] == "mcp_approval_request":
            output_tokens = _tokens(item["arguments"])
            audio_out = 0
        elif resp.modality == "audio":
            out.append(
                self._event(
                    self._ga("response.output_audio.done", "response.audio.done"),
                    **ids,
                    content_index=0,
                )
            )
            name = self._ga(
                "response.output_audio_transcript.done", "response.audio_transcript.done"
            )
            out.append(self._event(name, **ids, content_index=0, transcript=text))
            out.append(
                self._event(
                    "response.content_part.done",
                    **ids,
                    content_index=0,
                    part={"type": "audio", "transcript": text},
                )
            )
            kind = self._ga("output_audio", "audio")
            heard = text if resp.truncated_ms is None else ""  # truncated while streaming
            item["content"] = [{"type": kind, "transcript": heard}]
            if resp.chunks:
                self._voice_locked = self._voice_locked or resp.in_conversation
                if resp.in_conversation:
                    length_ms = len(resp.chunks) * au.CHUNK_MS
                    self._output_audio[item["id"]] = (
                        list(resp.chunks),
                        resp.out_format,
                        length_ms if resp.truncated_ms is None else resp.truncated_ms,
                    )
            output_tokens = _tokens(text)
            audio_out = len(resp.chunks) * AUDIO_TOKENS_PER_CHUNK
        else:
            out.append(
                self._event(
                    self._ga("response.output_text.done", "response.text.done"),
                    **ids,
                    content_index=0,
                    text=text,
                )
            )
            out.append(
                self._event(
                    "response.content_part.done",
                    **ids,
                    content_index=0,
                    part={"type": "text", "text": text},
                )
            )
            item["content"] = [{"type": self._ga("output_text", "text"), "text": text}]
            output_tokens = _tokens(text)
            audio_out = 0
        public = self._public(item)
        if resp.in_conversation and self.dialect == "ga" and item["id"] in self._by_id:
            out.append(
                self._event(
                    "conversation.item.done", previous_item_id=resp.previous_item_id, item=public
                )
            )
        out.append(
            self._event(
                "response.output_item.done", response_id=resp.id, output_index=0, item=dict(public)
            )
        )
        details: Event | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason}
        elif status == "incomplete":
            details = {"type": "incomplete", "reason": "max_output_tokens"}
        usage = self._usage(resp, output_tokens, audio_out)
        self._tokens_used += usage["total_tokens"]
        rendered = self._render_response(
            resp, [dict(public)], status=status, details=details, usage=usage
        )
        out.append(self._event("response.done", response=rendered))
        out.append(self._rate_limits())
        td = self.config.turn_detection
        if (
            resp.in_conversation
            and td is not None
            and td.get("idle_timeout_ms")
            and status == "completed"
        ):
            playback = len(resp.chunks) * au.CHUNK_MS / 1000
            self._idle_deadline = max(now, resp.started + playback) + td["idle_timeout_ms"] / 1000

    def _close_call(self, resp: _Response, args: str, out: list[Event], *, made: bool) -> None:
        """The arguments' done event; for an MCP call, also running it (unless cut short)."""
        item = resp.item
        item["arguments"] = args
        ids = {"response_id": resp.id, "item_id": item["id"], "output_index": 0}
        if item["type"] == "function_call":
            done: Event = {**ids, "call_id": item["call_id"], "arguments": args}
            if self.dialect == "ga":
                done["name"] = item["name"]
            out.append(self._event("response.function_call_arguments.done", **done))
            return
        out.append(self._event("response.mcp_call_arguments.done", **ids, arguments=args))
        if not made or resp.server is None:
            return  # cancelled or cut off before the call was made
        del ids["response_id"]
        out.append(self._event("response.mcp_call.in_progress", **ids))
        item["output"], item["error"] = mcp.call(resp.server, item["name"], args)
        outcome = "completed" if item["error"] is None else "failed"
        out.append(self._event(f"response.mcp_call.{outcome}", **ids))

    def _usage(self, resp: _Response, text_out: int, audio_out: int) -> Event:
        total_in = resp.input_text_tokens + resp.input_audio_tokens
        cached_text = min(resp.cached_tokens, resp.input_text_tokens)
        cached_audio = resp.cached_tokens - cached_text
        in_details: Event = {
            "text_tokens": resp.input_text_tokens,
            "audio_tokens": resp.input_audio_tokens,
        }
        cached_details: Event = {"text_tokens": cached_text, "audio_tokens": cached_audio}
        if self.dialect == "ga":
            in_details["image_tokens"] = 0
            cached_details["image_tokens"] = 0
        in_details["cached_tokens"] = resp.cached_tokens
        in_details["cached_tokens_details"] = cached_details
        return {
            "total_tokens": total_in + text_out + audio_out,
            "input_tokens": total_in,
            "output_tokens": text_out + audio_out,
            "input_token_details": in_details,
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    def _rate_limits(self) -> Event:
        remaining = max(0, RATE_LIMIT_TOKENS - self._tokens_used)
        tokens = {
            "name": "tokens",
            "limit": RATE_LIMIT_TOKENS,
            "remaining": remaining,
            "reset_seconds": 0.001,
        }
        if self.dialect == "ga":
            return self._event("rate_limits.updated", rate_limits=[tokens])
        requests = {
            "name": "requests",
            "limit": RATE_LIMIT_REQUESTS,
            "remaining": max(0, RATE_LIMIT_REQUESTS - self._requests),
            "reset_seconds": 0.012,
        }
        return self._event("rate_limits.updated", rate_limits=[requests, tokens])

    def _render_response(
        self,
        resp: _Response,
        output: list[Event],
        *,
        status: str = "in_progress",
        details: Event | None = None,
        usage: Event | None = None,
    ) -> Event:
        body: Event = {
            "object": "realtime.response",
            "id": resp.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": resp.conversation_id,
        }
        if self.dialect == "ga":
            body["output_modalities"] = [resp.modality]
            body["max_output_tokens"] = resp.max_output_tokens
            body["audio"] = {
                "output": {"format": render_ga_format(resp.out_format), "voice": resp.voice}
            }
        else:
            body["modalities"] = ["text", "audio"] if resp.modality == "audio" else ["text"]
            body["voice"] = resp.voice
            body["output_audio_format"] = resp.out_format
            body["temperature"] = resp.temperature
            body["max_output_tokens"] = resp.max_output_tokens
        body["usage"] = usage
        body["metadata"] = resp.metadata
        return body

    def _idle_timeout(self, out: list[Event], now: float) -> None:
        item_id = self._ids.new("item")
        out.append(
            self._event(
                "input_audio_buffer.timeout_triggered",
                item_id=item_id,
                audio_start_ms=int(self._buf_start_ms),
                audio_end_ms=int(self._total_ms),
            )
        )
        audio = bytes(self._buf)
        self._reset_buffer()
        self._commit_audio(item_id, audio, out)
        if self._inband is None:
            self._create_response({}, out, now)

    def _expire(self, out: list[Event]) -> None:
        minutes = self.max_duration / 60
        shown = f"{minutes:.0f}" if minutes == int(minutes) else f"{minutes:g}"
        message = f"Your session hit the maximum duration of {shown} minutes."
        if self.dialect == "beta":
            out.append(self._error("session_expired", message))
        self.close_requested = (1001, message)
        self.closed = True
