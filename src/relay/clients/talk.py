"""``relay talk``: speak a WAV file through the relay, print what was said, save the reply.

A terminal client for trying a relay (or the real API behind it) without a
browser, and for scripted checks: it streams the file (a bundled sample if none is
given) as a microphone would (``--realtime``) or as fast as the connection takes it,
lets the server's VAD end the turn with trailing silence (or commits by hand when no
VAD ends it), and reports the transcripts, the reply audio and the latency from the
end of speech to the first reply audio. It speaks through the relay's own WebSocket
client (:mod:`relay.wire.websocket`), which reads every close code the relay sends.

Exit codes: 0 on a reply, 1 when the connection or session failed, 2 when the
input file cannot be used (argparse also uses 2 for bad flags).
"""

from __future__ import annotations

import argparse
import base64
import re
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import urlsplit

import orjson
import trio

from ..core.events import RESUME_SUBPROTOCOL
from ..wire.upstream import os_reason
from ..wire.websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeFailed,
    WebSocket,
    connect,
)
from . import wav

DEFAULT_URL: Final = "ws://127.0.0.1:8000/voice"
#: What ``relay talk`` says when given no file: "Hello, can you hear me?" (PCM16, 24 kHz).
SAMPLE: Final = Path(__file__).parent / "samples" / "hello.wav"
#: The largest message taken from the relay: a reply event is far smaller.
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
#: The field of ``session.created`` by which mockrealtime says it is the fake (it puts it there).
FAKE_MARKER: Final = "mockrealtime"
BYTES_PER_MS: Final = wav.API_RATE * 2 // 1000  # PCM16 mono at 24 kHz
FAST_CHUNK_MS: Final = 100  # as fast as allowed: fewer, larger messages
REALTIME_CHUNK_MS: Final = 40  # paced like a browser microphone
CONNECT_TIMEOUT: Final = 10.0  # TCP + WebSocket handshake + session.created
CLOSE_TIMEOUT: Final = 3.0
VAD_GRACE: Final = 2.0
"""Seconds without any event, after the trailing silence, before the turn is committed by hand."""
SETTLE_AFTER_DONE: Final = 1.0
"""Seconds to wait after the last response for a late input transcript (it runs asynchronously)."""
TOKEN_RE: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an HTTP token (RFC 9110)

PCM: Final = {"type": "audio/pcm", "rate": wav.API_RATE}
SESSION_UPDATE_ID: Final = "relay_talk_session"
TRANSCRIBE_MODEL: Final = "gpt-4o-mini-transcribe"


def session_update(transcribe: bool) -> dict[str, Any]:
    """The client's own session.update: the audio it speaks, and transcription if asked."""
    audio_input: dict[str, Any] = {"format": PCM}
    if transcribe:
        audio_input["transcription"] = {"model": TRANSCRIBE_MODEL}
    return {
        "type": "session.update",
        "event_id": SESSION_UPDATE_ID,
        "session": {"type": "realtime", "audio": {"input": audio_input, "output": {"format": PCM}}},
    }


EXIT_SESSION: Final = 1
EXIT_INPUT: Final = 2


class TalkError(Exception):
    """A failure reported to the user as one line; ``exit_code`` is the process's."""

    def __init__(self, message: str, exit_code: int = EXIT_SESSION) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Turn:
    """One exchange: the user's speech (if the VAD saw any) and the reply to it."""

    user_item: str | None = None
    user_transcript: str | None = None
    speech_start_ms: int | None = None  # audio_start_ms of speech_started
    speech_ms: int | None = None  # how long the VAD heard speech (with its padding)
    end_of_speech: float | None = None  # monotonic time speech_stopped (or the commit) arrived
    response_id: str | None = None
    assistant_transcript: str = ""
    reply_bytes: int = 0
    latency_ms: float | None = None
    status: str | None = None


@dataclass
class Conversation:
    """What the session has said so far; fed every server event by :meth:`handle`.

    Kept free of I/O so the turn bookkeeping reads as a plain function of the events.
    """

    turns: list[Turn] = field(default_factory=list)
    reply: bytearray = field(default_factory=bytearray)
    errors: list[str] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    ready: bool = False  # session.created (or updated) arrived
    fake: bool = False  # the upstream is mockrealtime, the offline fake
    updated: bool = False  # session.updated arrived
    in_speech: bool = False
    uncommitted_speech: bool = False  # speech started and not yet committed
    awaiting_response: bool = False  # a committed turn whose response has not started
    active_response: str | None = None
    responses_done: int = 0
    last_error: tuple[str, str] | None = None  # (code, message) of the latest error event
    format_refusal: str | None = None  # the error answering our session.update, if any

    def _turn_for_item(self, item_id: str | None) -> Turn:
        for turn in reversed(self.turns):
            if item_id is not None and turn.user_item == item_id:
                return turn
        turn = Turn(user_item=item_id)
        self.turns.append(turn)
        return turn

    def _current_reply_turn(self) -> Turn:
        for turn in reversed(self.turns):
            if turn.response_id == self.active_response and turn.response_id is not None:
                return turn
        return self.turns[-1] if self.turns else self._turn_for_item(None)

    def handle(self, event: dict[str, Any], now: float) -> None:
        kind = event.get("type")
        if kind in ("session.created", "session.updated"):
            self.ready = True
            self.fake = self.fake or bool(event.get(FAKE_MARKER))
            self.updated = self.updated or kind == "session.updated"
            if isinstance(event.get("session"), dict):
                self.session = event["session"]
        elif kind == "input_audio_buffer.speech_started":
            self.in_speech = self.uncommitted_speech = True
            turn = self._turn_for_item(event.get("item_id"))
            if isinstance(event.get("audio_start_ms"), int):
                turn.speech_start_ms = event["audio_start_ms"]
        elif kind == "input_audio_buffer.speech_stopped":
            self.in_speech = False
            self.awaiting_response = True  # the VAD commits the turn next; a reply should follow
            turn = self._turn_for_item(event.get("item_id"))
            turn.end_of_speech = now
            end = event.get("audio_end_ms")
            if isinstance(end, int) and turn.speech_start_ms is not None:
                turn.speech_ms = end - turn.speech_start_ms
        elif kind == "input_audio_buffer.committed":
            self.in_speech = self.uncommitted_speech = False
            self.awaiting_response = True
            turn = self._turn_for_item(event.get("item_id"))
            if turn.end_of_speech is None:
                turn.end_of_speech = now
        elif kind == "conversation.item.input_audio_transcription.delta":
            turn = self._turn_for_item(event.get("item_id"))
            turn.user_transcript = (turn.user_transcript or "") + str(event.get("delta", ""))
        elif kind == "conversation.item.input_audio_transcription.completed":
            self._turn_for_item(event.get("item_id")).user_transcript = str(
                event.get("transcript", "")
            )
        elif kind == "response.created":
            response_id = (event.get("response") or {}).get("id")
            self.active_response = response_id
            self.awaiting_response = False
            waiting = [t for t in self.turns if t.response_id is None]
            turn = waiting[-1] if waiting else self._turn_for_item(None)
            turn.response_id = response_id
        elif kind == "response.output_audio.delta":
            turn = self._current_reply_turn()
            audio = base64.b64decode(event.get("delta", ""))
            if turn.reply_bytes == 0 and turn.end_of_speech is not None:
                turn.latency_ms = (now - turn.end_of_speech) * 1000
            turn.reply_bytes += len(audio)
            self.reply += audio
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            self._current_reply_turn().assistant_transcript += str(event.get("delta", ""))
        elif kind in ("response.output_audio_transcript.done", "response.output_text.done"):
            text = event.get("transcript", event.get("text"))
            if isinstance(text, str):
                self._current_reply_turn().assistant_transcript = text
        elif kind == "response.done":
            response = event.get("response") or {}
            for turn in self.turns:
                if turn.response_id == response.get("id"):
                    turn.status = response.get("status")
            self.active_response = None
            self.responses_done += 1
        elif kind == "error":
            error = event.get("error") or {}
            code = str(error.get("code") or error.get("type") or "error")
            message = str(error.get("message") or "")
            self.last_error = (code, message)
            self.errors.append(f"{code}: {message}")
            if error.get("event_id") == SESSION_UPDATE_ID:
                self.format_refusal = f"{code}: {message}"

    @property
    def settled(self) -> bool:
        """Every turn the server started has been answered."""
        return (
            self.responses_done > 0
            and self.active_response is None
            and not self.in_speech
            and not self.awaiting_response
        )

    def speaks_pcm(self) -> bool:
        """The last session.updated has PCM16 24 kHz both ways."""
        audio = self.session.get("audio") if self.updated else None
        if not isinstance(audio, dict):
            return False
        formats = [(audio.get(side) or {}).get("format") for side in ("input", "output")]
        return all(
            isinstance(f, dict) and f.get("type") == "audio/pcm" and f.get("rate", 24000) == 24000
            for f in formats
        )

    def input_config(self) -> dict[str, Any]:
        """``session.audio.input`` as the server last reported it ({} if unknown)."""
        audio = self.session.get("audio")
        value = audio.get("input") if isinstance(audio, dict) else None
        return value if isinstance(value, dict) else {}

    def transcription_pending(self) -> bool:
        return bool(self.input_config().get("transcription")) and any(
            t.user_item and t.user_transcript is None for t in self.turns
        )


@dataclass
class Options:
    url: str = DEFAULT_URL
    token: str | None = None
    realtime: bool = False
    timeout: float = 60.0
    transcribe: bool = False  # ask the session to transcribe the input too


Progress = Callable[[float, float, Conversation], None]
"""Called with (seconds sent, seconds in total, the conversation) while streaming."""


async def talk(pcm: bytes, options: Options, progress: Progress | None = None) -> Conversation:
    """Send one utterance (PCM16 24 kHz mono) through the relay and collect the reply.

    Raises :class:`TalkError` when the relay cannot be reached, refuses the
    session, closes it early, or no reply comes within ``options.timeout``.
    Cancellation closes the WebSocket (bounded by ``CLOSE_TIMEOUT``) and the socket.
    """
    try:
        return await _talk(pcm, options, progress)
    except BaseExceptionGroup as group:
        # Nurseries wrap what their tasks raise; the user should see the error itself. The
        # reader and a sender may both meet the relay's close: one line says it.
        failed, rest = group.split(TalkError)
        if failed is not None and rest is None:
            raise _first(failed) from None
        raise


async def _talk(pcm: bytes, options: Options, progress: Progress | None) -> Conversation:
    conversation = Conversation()
    changed = trio.Event()
    done = False
    total_s = len(pcm) / BYTES_PER_MS / 1000
    deadline = trio.current_time() + options.timeout

    def note(event: dict[str, Any]) -> None:
        nonlocal changed
        conversation.handle(event, time.monotonic())
        changed.set()
        changed = trio.Event()

    async def wait_change(seconds: float) -> bool:
        """Wait for the next event; False if none came within ``seconds``."""
        with trio.move_on_after(seconds):
            await changed.wait()
            return True
        return False

    async def receive(ws: Resuming) -> None:
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed as exc:
                if done:
                    return
                raise TalkError(_closed_message(exc, conversation)) from None
            try:
                event = orjson.loads(message)
            except orjson.JSONDecodeError:
                continue  # not an event (e.g. a binary frame): nothing to show
            if isinstance(event, dict):
                note(event)

    async def send(ws: Resuming, event: dict[str, Any]) -> None:
        try:
            await ws.send_message(orjson.dumps(event).decode())
        except ConnectionClosed as exc:
            raise TalkError(_closed_message(exc, conversation)) from None

    async def append(ws: Resuming, chunk: bytes) -> None:
        await send(
            ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}
        )

    async with resuming_relay(options.url, options.token) as ws:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive, ws)
            with trio.move_on_after(CONNECT_TIMEOUT) as waited:
                while not conversation.ready:
                    await changed.wait()
            if waited.cancelled_caught:
                raise TalkError(
                    f"connected to {options.url}, but no session.created came within"
                    f" {CONNECT_TIMEOUT:.0f} s; is the relay's upstream reachable?"
                )
            # Say which audio this client speaks (the relay's own session may be set up for
            # phones), and start only once the session uses it: turn detection is then final too.
            await send(ws, session_update(options.transcribe))
            with trio.move_on_after(CONNECT_TIMEOUT) as waited:
                while not conversation.speaks_pcm():
                    if conversation.format_refusal is not None:
                        raise TalkError(
                            f"the session refused PCM16 24 kHz audio: {conversation.format_refusal}"
                        )
                    await changed.wait()
            if waited.cancelled_caught:
                raise TalkError(
                    f"the session did not confirm PCM16 24 kHz audio within {CONNECT_TIMEOUT:.0f} s"
                )
            with trio.move_on_at(deadline) as overall:
                chunk_ms = REALTIME_CHUNK_MS if options.realtime else FAST_CHUNK_MS
                step = chunk_ms * BYTES_PER_MS
                start = trio.current_time()
                for index, offset in enumerate(range(0, len(pcm), step)):
                    if options.realtime:
                        await trio.sleep_until(start + index * chunk_ms / 1000)
                    await append(ws, pcm[offset : offset + step])
                    if progress:
                        progress(
                            min(total_s, (offset + step) / BYTES_PER_MS / 1000),
                            total_s,
                            conversation,
                        )
                turn_detection = conversation.input_config().get(
                    "turn_detection", {"silence_duration_ms": 500}
                )
                manual = turn_detection is None
                if not manual:
                    # Enough silence for the VAD to hear the end of the turn: its silence
                    # window plus room for a hangover and the prefix it keeps.
                    tail_ms = int(turn_detection.get("silence_duration_ms") or 500) + 700
                    silence = bytes(chunk_ms * BYTES_PER_MS)
                    sent_at = trio.current_time()
                    for index in range(-(-tail_ms // chunk_ms)):
                        if options.realtime:
                            await trio.sleep_until(sent_at + index * chunk_ms / 1000)
                        await append(ws, silence)
                        if progress:
                            progress(total_s, total_s, conversation)
                # Wait until every turn is answered. Quiet for VAD_GRACE with no response
                # under way means the VAD did not end the turn (or is off): commit by hand
                # and ask for the response ourselves, once.
                asked = False
                while not conversation.settled:
                    quiet = (manual and not asked) or not await wait_change(VAD_GRACE)
                    if quiet and not asked and conversation.active_response is None:
                        asked = True
                        if conversation.uncommitted_speech or not conversation.turns:
                            await send(ws, {"type": "input_audio_buffer.commit"})
                        await send(ws, {"type": "response.create"})
                    if progress:
                        progress(total_s, total_s, conversation)
                while conversation.transcription_pending():
                    if not await wait_change(SETTLE_AFTER_DONE):
                        break
            done = True
            nursery.cancel_scope.cancel()
    if overall.cancelled_caught:
        raise TalkError(
            f"no complete reply within {options.timeout:g} s"
            f" ({conversation.responses_done} responses finished); try a larger --timeout"
        )
    return conversation


def _closed_message(exc: ConnectionClosed, conversation: Conversation) -> str:
    """Why the session ended, preferring the relay's ``error`` event to the bare close code."""
    reason = exc.reason
    code = reason.code if reason is not None else 1006
    text = f"the relay closed the session (close code {code}"
    if reason is not None and reason.reason:
        text += f", {reason.reason}"
    text += ")"
    if conversation.last_error is not None:
        error_code, message = conversation.last_error
        text += f": {error_code}: {message}"
    elif code == 1006:
        text += ": the connection was lost without a close frame"
    return text


@asynccontextmanager
async def open_relay(
    url: str, token: str | None = None, *, also: tuple[str, ...] = ()
) -> AsyncIterator[WebSocket]:
    """A WebSocket to the relay offering ``realtime`` (and ``relay-token.<token>``, and the
    subprotocols ``also`` names).

    The relay's own client, which takes every close code the relay may send (wsproto, under
    trio-websocket, reads the relay's 1014 as a protocol error, 1002). Owns its TCP (or TLS)
    stream and closes it on every path. Failures to connect raise :class:`TalkError`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise TalkError(
            f"--url must be a ws:// or wss:// URL such as {DEFAULT_URL}, not {url!r}", EXIT_INPUT
        )
    subprotocols = ["realtime"]
    if token:
        if not TOKEN_RE.match(token):
            raise TalkError("--token may only hold letters, digits and !#$%&'*+-.^_`|~", EXIT_INPUT)
        subprotocols.append(f"relay-token.{token}")
    subprotocols += also
    try:
        port = parts.port or (443 if parts.scheme == "wss" else 80)
    except ValueError:
        raise TalkError(f"--url has an invalid port: {url!r}", EXIT_INPUT) from None
    resource = (parts.path or "/voice") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if parts.scheme == "wss":
                stream: (
                    trio.SocketStream | trio.SSLStream[trio.SocketStream]
                ) = await trio.open_ssl_over_tcp_stream(
                    parts.hostname, port, ssl_context=ssl.create_default_context()
                )
            else:
                stream = await trio.open_tcp_stream(parts.hostname, port)
    except trio.TooSlowError:
        raise TalkError(
            f"cannot connect to {url}: no answer within {CONNECT_TIMEOUT:.0f} s"
        ) from None
    except OSError as exc:
        why = os_reason(exc)
        raise TalkError(
            f"cannot connect to {url}: {why}. Is the relay running? Start one with `relay demo`."
        ) from None
    try:
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                ws = await connect(
                    stream,
                    host_header,
                    resource,
                    subprotocols=tuple(subprotocols),
                    headers=(),
                    max_message_bytes=MAX_MESSAGE_BYTES,
                )
        except (ConnectionRejected, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            raise _connect_error(exc, url) from None
        try:
            yield ws
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose()
    finally:
        await trio.aclose_forcefully(stream)


class Resuming:
    """The relay's WebSocket, resumed after a drop (a relay with RELAY_RESUME_SECONDS).

    It offers ``relay-resume``; while the relay's ``relay.resume`` tokens come (they are not
    passed on), a connection lost without a close frame is reopened with
    ``relay-resume.<token>.<events received>``, once a second for as long as the relay holds
    the session, and the relay sends what was missed. A send meanwhile waits for the new
    connection; one sent into the lost connection is lost with it.
    """

    def __init__(self, url: str, token: str | None, stack: AsyncExitStack) -> None:
        self._url = url
        self._token = token
        self._stack = stack
        self._ws: WebSocket | None = None
        self._received = 0
        self._resume: tuple[str, float] | None = None  # the last token, and the window
        self._back = trio.Event()
        self.resumes = 0

    async def open(self, also: tuple[str, ...] = (RESUME_SUBPROTOCOL,)) -> None:
        opening = open_relay(self._url, self._token, also=also)
        self._ws = await self._stack.enter_async_context(opening)

    async def get_message(self) -> str | bytes:
        while True:
            ws = self._ws
            try:
                message = await ws.get_message()  # type: ignore[union-attr]
            except ConnectionClosed as exc:
                if (exc.reason is not None and exc.reason.code != 1006) or self._resume is None:
                    raise
                await self._come_back(exc)
                continue
            if message.startswith('{"type":"relay.resume"'):  # (the relay writes it so)
                event = orjson.loads(message)
                self._resume = (event["token"], float(event["seconds"]))
                continue
            self._received += 1
            return message

    async def _come_back(self, lost: ConnectionClosed) -> None:
        token, seconds = self._resume  # type: ignore[misc]
        until = trio.current_time() + seconds
        try:
            while trio.current_time() < until:
                try:
                    await self.open((f"{RESUME_SUBPROTOCOL}.{token}.{self._received}",))
                except TalkError:
                    await trio.sleep(1.0)
                    continue
                self.resumes += 1
                self._back.set()
                self._back = trio.Event()
                return
            raise lost
        finally:
            # Spent once the reconnect is over (the relay sends a new one), not before: a send
            # that finds the old connection gone meanwhile waits for the new one.
            self._resume = None

    async def send_message(self, message: str | bytes) -> None:
        while True:
            ws = self._ws
            try:
                await ws.send_message(message)  # type: ignore[union-attr]
                return
            except ConnectionClosed:
                if self._resume is None and self._ws is ws:
                    raise
                if self._ws is ws:
                    await self._back.wait()  # the reader reconnects

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        await self._ws.aclose(code, reason)  # type: ignore[union-attr]


@asynccontextmanager
async def resuming_relay(url: str, token: str | None = None) -> AsyncIterator[Resuming]:
    """:func:`open_relay`, resumed after a drop where the relay allows it (:class:`Resuming`)."""
    async with AsyncExitStack() as stack:
        resuming = Resuming(url, token, stack)
        await resuming.open()
        yield resuming


def _first(exc: BaseException) -> BaseException:
    """The first exception inside (nested) groups."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _connect_error(exc: BaseException, url: str) -> BaseException:
    """Turn a handshake failure into a one-line :class:`TalkError` (others pass through)."""
    if isinstance(exc, ConnectionRejected):
        detail = ""
        try:
            body = orjson.loads(exc.body or b"{}")
        except orjson.JSONDecodeError:
            body = None
        if isinstance(body, dict) and "error" in body:  # the relay's {"error", "code"?} body
            detail = (
                f": {body['code']}: {body['error']}" if body.get("code") else f": {body['error']}"
            )
        hint = " (check --token)" if exc.status_code in (401, 403) else ""
        return TalkError(
            f"the relay at {url} refused the WebSocket handshake"
            f" (HTTP {exc.status_code}){detail}{hint}"
        )
    if isinstance(exc, trio.TooSlowError):
        return TalkError(
            f"{url} accepted the connection but did not complete the WebSocket handshake"
            f" within {CONNECT_TIMEOUT:.0f} s"
        )
    if isinstance(exc, HandshakeFailed | trio.BrokenResourceError | OSError):
        return TalkError(f"the WebSocket handshake with {url} failed ({type(exc).__name__}: {exc})")
    return exc


class ProgressLine:
    """A one-line progress display on a terminal, redrawn at most every 100 ms."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.last = 0.0

    def __call__(self, sent: float, total: float, conversation: Conversation) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and sent < total:
            return
        self.last = now
        width = 24
        filled = int(width * sent / total) if total else width
        bar = "█" * filled + "·" * (width - filled)
        reply_s = len(conversation.reply) / BYTES_PER_MS / 1000
        state = (
            "speaking"
            if conversation.in_speech
            else "replying"
            if conversation.active_response
            else ""
        )
        self.out.write(
            f"\r\x1b[K sending {bar} {sent:4.1f}/{total:.1f} s   reply {reply_s:4.1f} s  {state}"
        )
        self.out.flush()

    def clear(self) -> None:
        self.out.write("\r\x1b[K")
        self.out.flush()


def report(conversation: Conversation, out: TextIO) -> None:
    """Print each turn's transcripts and latency (and that they are the fake's, if they are)."""
    if conversation.fake:
        print(
            "upstream:  the offline fake (mockrealtime): made-up transcripts, replies in"
            " milliseconds; not the OpenAI API",
            file=out,
        )
    numbered = len(conversation.turns) > 1
    for index, turn in enumerate(conversation.turns, 1):
        if turn.response_id is None and turn.user_item is None:
            continue
        prefix = f"[{index}] " if numbered else ""
        if turn.user_transcript:
            you = turn.user_transcript
        elif turn.user_item:
            heard = f"{turn.speech_ms / 1000:.1f} s of " if turn.speech_ms else ""
            you = f"({heard}speech; add --transcribe to see it as text)"
        else:
            you = "(no speech detected; committed by hand)"
        print(f"{prefix}you:       {you}", file=out)
        if turn.response_id is not None:
            status = "" if turn.status in (None, "completed") else f"  [{turn.status}]"
            print(
                f"{prefix}assistant: {turn.assistant_transcript or '(no transcript)'}{status}",
                file=out,
            )
        if turn.latency_ms is not None:
            latency = f"{turn.latency_ms:.0f} ms"
            print(f"{prefix}latency:   {latency} from end of speech to first reply audio", file=out)


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``relay talk`` itself: returns the exit code, prints errors as one line on stderr."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        try:
            pcm, fmt = wav.load_for_api(args.input or SAMPLE)
        except wav.WavError as exc:
            raise TalkError(str(exc), EXIT_INPUT) from None
        progress = ProgressLine(out) if out.isatty() else None
        options = Options(
            url=args.url,
            token=args.token,
            realtime=args.realtime,
            timeout=args.timeout,
            transcribe=args.transcribe,
        )
        try:
            conversation = trio.run(talk, pcm, options, progress)
        finally:
            if progress:
                progress.clear()
        for error in conversation.errors:
            print(f"relay talk: the server reported {error}", file=err)
        report(conversation, out)
        if not conversation.reply:
            raise TalkError("the reply held no audio (is the session's output text only?)")
        try:
            wav.write_wav(args.output, bytes(conversation.reply))
        except OSError as exc:
            raise TalkError(
                f"cannot write {args.output}: {exc.strerror or exc}", EXIT_INPUT
            ) from None
        seconds = len(conversation.reply) / BYTES_PER_MS / 1000
        print(
            f"reply:     {seconds:.1f} s of audio written to {args.output}"
            f"  (sent {len(pcm) / BYTES_PER_MS / 1000:.1f} s from {fmt.describe()}"
            f"{'' if args.input else ', the bundled sample'})",
            file=out,
        )
        return 0
    except TalkError as exc:
        print(f"relay talk: {exc}", file=err)
        return exc.exit_code
