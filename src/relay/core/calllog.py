"""What happened in one call, read from the events passing through its pair: the turns
(timing, tokens, cost), the transcript of both sides and, when asked, the audio.

A :class:`CallLog` exists only for a session whose call is recorded or traced; it is fed
every upstream text message (:meth:`CallLog.upstream_event`, in place of the pair's
:class:`VoiceClock`: it holds one, and returns its latency) and, when records are
on, every client message that went upstream (:meth:`CallLog.client_event`). Events are
recognised by their first bytes, as the Realtime API writes them (``type`` first); only the
few that carry a transcript, a format or a barge-in are parsed. Audio payloads are decoded
only when the audio is recorded.

A turn runs from the end of the caller's speech (``input_audio_buffer.speech_stopped``), or
from ``response.created`` when nobody spoke (a text turn), through the reply's first audio
to its ``response.done``. Nothing here does I/O; the clock is the caller's.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from .audio import PCM_RATE, session_formats
from .events import is_audio_append, parse_event
from .policy import DELTA
from .pricing import Tokens
from .stereo import ASSISTANT, CALLER, Spool, Timeline

_STOPPED: Final = '{"type":"input_audio_buffer.speech_stopped"'
_STARTED: Final = '{"type":"input_audio_buffer.speech_started"'
_CREATED: Final = '{"type":"response.created"'
_SPOKEN: Final = '{"type":"response.output_audio_transcript.done"'
_TEXT: Final = '{"type":"response.output_text.done"'
_HEARD: Final = '{"type":"conversation.item.input_audio_transcription.completed"'
_SESSION: Final = ('{"type":"session.created"', '{"type":"session.updated"')
_DONE: Final = '{"type":"response.done"'
CALLER_SPEAKER, ASSISTANT_SPEAKER = "caller", "assistant"


class VoiceClock:
    """Times one pair's voice turns from the upstream's events: speech end to first reply audio.

    Feed it every upstream text message; it returns the latency once per turn.
    Only audio of a response created after the speech stopped counts, so the tail
    of an earlier reply still streaming is not mistaken for the answer; a reply
    that finishes without audio ends the wait. Cheap enough for the hot path: one
    prefix check per message while idle, and the clock is read only on the two
    events that matter. It recognises the Realtime API's own serialisation
    (``type`` first), which is what the API and mockrealtime send.
    """

    __slots__ = ("_clock", "_created", "_stopped_at")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._stopped_at: float | None = None
        self._created = False

    def upstream_event(self, text: str) -> float | None:
        """Seconds since speech stopped if ``text`` is the reply's first audio, else None."""
        if text.startswith(_STOPPED):
            self._stopped_at = self._clock()
            self._created = False
            return None
        stopped_at = self._stopped_at
        if stopped_at is None:
            return None
        if not self._created:
            self._created = text.startswith(_CREATED)
            return None
        if text.startswith(DELTA):
            self._stopped_at = None
            return self._clock() - stopped_at
        if text.startswith(_DONE):
            self._stopped_at = None
        return None


@dataclass(slots=True)
class Turn:
    """One response: when it started, first sounded and finished (clock seconds)."""

    started: float
    spoken: bool
    first_audio: float | None = None
    done: float | None = None
    response_id: str | None = None
    status: str | None = None
    tokens: Tokens = field(default_factory=Tokens)
    #: Nanodollars, or None when the session's model has no price.
    cost: int | None = None
    #: End of speech to the reply's first audio, the delay the caller heard (VoiceClock's).
    latency: float | None = None


@dataclass(slots=True)
class Line:
    """One utterance of the transcript."""

    at: float
    speaker: str
    text: str
    item: str | None = None
    #: The caller heard only this much of the assistant's line (a barge-in), in ms.
    heard_ms: int | None = None


class CallLog:
    """See the module docstring. ``secret`` (the upstream key) is blanked in any transcript."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        secret: str = "",
        session: Any = None,
        spools: tuple[Spool, Spool] | None = None,
    ) -> None:
        self._clock = clock
        self.started = clock()
        self._secret = secret
        self.turns: list[Turn] = []
        self._current: Turn | None = None
        self._stopped_at: float | None = None
        self._voice = VoiceClock(clock)
        self.lines: list[Line] = []
        self._speech_at: dict[str, float] = {}
        self._by_item: dict[str, Line] = {}
        self._heard: dict[str, int] = {}
        self._formats = session_formats(session)
        #: The stereo timeline, when the audio is recorded (its rate: the output's).
        self.audio: Timeline | None = None
        if spools is not None:
            self.audio = Timeline(self.started, self._formats[1][1], spools)

    # -- upstream ------------------------------------------------------------------

    def upstream_event(self, text: str) -> float | None:
        """An upstream text message; the voice latency if it is a spoken reply's first audio
        (as the pair's VoiceClock would say: this log holds one)."""
        latency = self._voice.upstream_event(text)
        if text.startswith(DELTA):
            turn = self._current
            if turn is not None:
                if turn.first_audio is None:
                    turn.first_audio = self._clock()
                if latency is not None:
                    turn.latency = latency
            if self.audio is not None:
                self._assistant_audio(text)
            return latency
        if not text.startswith('{"type":"'):
            return None
        if text.startswith(_STOPPED):
            self._stopped_at = self._clock()
        elif text.startswith(_STARTED):
            event = parse_event(text) or {}
            item = event.get("item_id")
            if isinstance(item, str):
                self._speech_at[item] = self._clock()
        elif text.startswith(_CREATED):
            stopped, self._stopped_at = self._stopped_at, None
            now = self._clock()
            self._current = Turn(
                started=stopped if stopped is not None else now, spoken=stopped is not None
            )
            self.turns.append(self._current)
        elif text.startswith(_SPOKEN) or text.startswith(_TEXT):
            event = parse_event(text) or {}
            said = event.get("transcript", event.get("text"))
            item = event.get("item_id")
            turn = self._current
            at = turn.first_audio or turn.started if turn is not None else self._clock()
            self._line(at, ASSISTANT_SPEAKER, said, item if isinstance(item, str) else None)
        elif text.startswith(_HEARD):
            event = parse_event(text) or {}
            item = event.get("item_id")
            item = item if isinstance(item, str) else None
            at = self._speech_at.get(item or "", self._clock())
            self._line(at, CALLER_SPEAKER, event.get("transcript"), item)
        elif text.startswith(_SESSION):
            event = parse_event(text) or {}
            self._formats = session_formats(event.get("session"))
        return None

    def _line(self, at: float, speaker: str, said: object, item: str | None) -> None:
        if not isinstance(said, str) or not said.strip():
            return
        if self._secret and self._secret in said:
            said = said.replace(self._secret, "[redacted]")
        line = Line(at, speaker, said.strip(), item, self._heard.get(item or ""))
        self.lines.append(line)
        if item is not None:
            self._by_item[item] = line

    def _assistant_audio(self, text: str) -> None:
        b64 = _field(text, _DELTA_AUDIO)
        if b64 and self.audio is not None:
            kind, rate = self._formats[1]
            item = _field(text, _ITEM, parse=False)
            self.audio.add(ASSISTANT, self._clock(), b64.encode(), kind, rate, item)

    # -- client --------------------------------------------------------------------

    def client_event(self, data: str | bytes) -> None:
        """A client message that went upstream (audio only matters when it is recorded)."""
        if data.__class__ is bytes:  # raw audio (RELAY_BINARY_FRAMES=audio)
            if self.audio is not None:
                self._caller_audio(binascii.b2a_base64(data, newline=False))  # type: ignore[arg-type]
            return
        if is_audio_append(data):  # type: ignore[arg-type]
            if self.audio is not None:
                b64 = _field(data, _APPEND_AUDIO)  # type: ignore[arg-type]
                if b64:
                    self._caller_audio(b64.encode())
            return
        event = parse_event(data)
        kind = event.get("type") if event else None
        if kind == "conversation.item.truncate":
            self._truncated(event)  # type: ignore[arg-type]
        elif kind == "conversation.item.create":
            item = event.get("item")  # type: ignore[union-attr]
            if isinstance(item, dict) and item.get("role") == "user":
                parts = item.get("content")
                typed = [
                    p.get("text")
                    for p in (parts if isinstance(parts, list) else [])
                    if isinstance(p, dict) and p.get("type") == "input_text"
                ]
                said = " ".join(t for t in typed if isinstance(t, str))
                self._line(self._clock(), CALLER_SPEAKER, said, None)

    def _caller_audio(self, b64: bytes) -> None:
        """Base64 audio is kept as it is; it is decoded when the record is written."""
        assert self.audio is not None
        kind, rate = self._formats[0]
        self.audio.add(CALLER, self._clock(), b64, kind, rate)

    def _truncated(self, event: dict[str, Any]) -> None:
        item, heard = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(item, str) or isinstance(heard, bool) or not isinstance(heard, int):
            return
        self._heard[item] = heard
        if item in self._by_item:
            self._by_item[item].heard_ms = heard
        if self.audio is not None:
            self.audio.truncate(item, heard)

    # -- responses -----------------------------------------------------------------

    def responses_done(
        self, events: Sequence[dict[str, Any]], priced: Sequence[tuple[Tokens, int | None]]
    ) -> list[Turn]:
        """The ``response.done`` events (with their tokens and cost) the pair just took; the
        turns they finish, in order."""
        now = self._clock()
        finished = []
        for event, (tokens, cost) in zip(events, priced, strict=True):
            turn = self._current
            if turn is None or turn.done is not None:  # a response.created the relay missed
                turn = Turn(started=now, spoken=False)
                self.turns.append(turn)
            response = event.get("response")
            response = response if isinstance(response, dict) else {}
            turn.done = now
            turn.response_id = response.get("id") if isinstance(response.get("id"), str) else None
            turn.status = (
                response.get("status") if isinstance(response.get("status"), str) else None
            )
            turn.tokens, turn.cost = tokens, cost
            finished.append(turn)
            self._current = None
        return finished

    # -- the record ----------------------------------------------------------------

    def transcript(self) -> list[Line]:
        """Both sides' lines in the order they were spoken."""
        return sorted(self.lines, key=lambda line: line.at)


_APPEND_AUDIO: Final = '"audio":"'
_DELTA_AUDIO: Final = '"delta":"'
_ITEM: Final = '"item_id":"'


def _field(text: str, key: str, *, parse: bool = True) -> str | None:
    """A string field of an audio event, found by its key rather than by parsing some 6 KB of
    JSON per message: base64 and ids hold no quote or backslash, so the text between the key
    and the next quote is the value. Falls back to a parse for any other spelling (``parse``),
    where the field is worth it."""
    start = text.find(key)
    if start >= 0:
        start += len(key)
        end = text.find('"', start)
        if end > 0 and text.find("\\", start, end) < 0:
            return text[start:end]
    if not parse:
        return None
    value = (parse_event(text) or {}).get(key[1:-3])
    return value if isinstance(value, str) else None


__all__ = ["CallLog", "Line", "Turn", "PCM_RATE"]
