"""``relay call``: a WAV file played as a phone call through the relay's ``/twilio`` route.

It does for a call what Twilio does, with no Twilio account: it asks the relay's voice webhook
what to do (a POST signed with the auth token: ``relay demo``'s is built in), connects to the
media stream its TwiML names (a signed upgrade), sends ``connected`` and ``start``, then the
caller's audio as 20 ms μ-law ``media`` messages at real-time pace (silence while the caller
says nothing, as a phone line does), and plays what comes back the way a phone does
(:class:`Handset`): in real time, echoing each ``mark`` once the audio before it has played,
dropping what is left at a ``clear``. It prints the transcripts (it asks the relay for them,
which Twilio itself never does), the latency from the end of the caller's speech to the
first reply audio and each barge-in, and writes what the caller heard to a WAV file.

Exit codes: 0 when a reply was heard, 1 when the call failed, 2 when the input cannot be used.
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import secrets
import ssl
import sys
import xml.etree.ElementTree as ElementTree
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TextIO
from urllib.parse import urlsplit

import httpx
import orjson
import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

from ..config import DEMO_TWILIO_AUTH_TOKEN
from ..core.twilio import BYTES_PER_MS, TRANSCRIPTS_PARAMETER, request_signature
from ..wire.websocket import HandshakeFailed, connect
from . import wav
from .talk import SAMPLE

DEFAULT_URL: Final = "http://127.0.0.1:8000"
RATE: Final = 8000
CHUNK_MS: Final = 20  # Twilio's media messages
CHUNK_BYTES: Final = CHUNK_MS * BYTES_PER_MS
SILENCE: Final = b"\xff" * CHUNK_BYTES  # μ-law's zero
#: A reply is over when nothing is left to play and no audio came for this long.
QUIET_SECONDS: Final = 1.0
#: Audio after a gap this long (with nothing left to play) starts a new reply.
REPLY_GAP_SECONDS: Final = 0.5
#: RMS (of full scale) above which a 20 ms chunk counts as speech, for the latency.
SPEECH_LEVEL: Final = 0.01
CONNECT_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 3.0
EXIT_CALL: Final = 1
EXIT_INPUT: Final = 2


class CallError(Exception):
    """A failure reported as one line; ``exit_code`` is the process's."""

    def __init__(self, message: str, exit_code: int = EXIT_CALL) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- the phone's speaker, without I/O -----------------------------------------------------


@dataclass
class Reply:
    """One reply as the caller heard it."""

    started_at: float  # when its first audio arrived
    heard_bytes: int = 0
    cut_bytes: int | None = None  # unplayed audio a clear dropped: a barge-in
    latency_ms: float | None = None  # from the end of the caller's speech to its first audio

    @property
    def heard_ms(self) -> float:
        return self.heard_bytes / BYTES_PER_MS


@dataclass
class Handset:
    """Plays the call's audio as a phone would, fed messages and the time.

    Audio plays at 8 kHz (times ``speed``) from when it arrives; a ``mark`` is echoed once
    everything received before it has played (at once if nothing is left), and ``clear``
    drops what has not played and echoes every mark still waiting, as Twilio does.
    """

    speed: float = 1.0
    heard: bytearray = field(default_factory=bytearray)  # what the caller heard, μ-law
    replies: list[Reply] = field(default_factory=list)
    transcripts: list[tuple[str, str]] = field(default_factory=list)
    speech_end: float | None = None  # set by the caller's side: when its speech ended
    last_audio_at: float | None = None
    _pending: bytearray = field(default_factory=bytearray)  # received, not played yet
    _played: int = 0  # bytes played in all
    _carry: float = 0.0  # a fraction of a byte's time, carried to the next step
    _at: float | None = None  # the time playback was last brought up to
    _marks: deque[tuple[int, str]] = field(default_factory=deque)  # (position, name)

    @property
    def playing(self) -> bool:
        return bool(self._pending)

    def play(self, now: float) -> list[str]:
        """Bring playback up to ``now``; the names of the marks whose audio has now played."""
        if self._at is not None and self._pending:
            budget = (now - self._at) * RATE * self.speed + self._carry
            n = min(int(budget + 1e-6), len(self._pending))  # (a float a hair short of a byte)
            self._carry = max(0.0, budget - n) if n < len(self._pending) else 0.0
            self.heard += self._pending[:n]
            del self._pending[:n]
            self._played += n
            self.replies[-1].heard_bytes += n
        self._at = now
        echoes = []
        while self._marks and self._marks[0][0] <= self._played:
            echoes.append(self._marks.popleft()[1])
        return echoes

    def receive(self, message: dict[str, Any], now: float) -> list[str]:
        """A message from the relay; the names of the marks to echo now."""
        echoes = self.play(now)
        kind = message.get("event")
        if kind == "media":
            audio = base64.b64decode(message["media"]["payload"])
            gap = self.last_audio_at is None or now - self.last_audio_at >= REPLY_GAP_SECONDS
            if (
                not self.replies
                or self.replies[-1].cut_bytes is not None
                or (not self._pending and gap)
            ):
                reply = Reply(started_at=now)
                if self.speech_end is not None and self.speech_end <= now:
                    reply.latency_ms = (now - self.speech_end) * 1000
                self.replies.append(reply)
            self._pending += audio
            self.last_audio_at = now
        elif kind == "mark":
            name = message["mark"]["name"]
            if self._pending:
                self._marks.append((self._played + len(self._pending), name))
            else:
                echoes.append(name)
        elif kind == "clear":
            if self.replies and self._pending:
                self.replies[-1].cut_bytes = len(self._pending)
            self._pending.clear()
            self._carry = 0.0
            echoes.extend(name for _, name in self._marks)
            self._marks.clear()
        elif kind == "relay.transcript":
            self.transcripts.append((str(message.get("role")), str(message.get("text"))))
        return echoes

    def next_due(self) -> float | None:
        """When the next mark falls due, if one is waiting."""
        if not self._marks or self._at is None:
            return None
        return self._at + (self._marks[0][0] - self._played - self._carry) / (RATE * self.speed)


# -- the call ---------------------------------------------------------------------------


class Connection(Protocol):
    """The media stream's WebSocket (the relay's own client, or a test's)."""

    async def send_message(self, message: str) -> None: ...

    async def get_message(self) -> str | bytes: ...

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None: ...


@dataclass(frozen=True)
class Twiml:
    """What the webhook's TwiML says: where to stream the call, with which parameters."""

    stream_url: str
    parameters: dict[str, str]


def new_sid(prefix: str) -> str:
    """A Twilio-style id: two letters and 32 hex digits."""
    return prefix + secrets.token_hex(16)


class PhoneCall:
    """A call in progress: the caller's line (:meth:`say`), the phone's speaker (:attr:`handset`),
    and waits on what the caller hears. Built by :func:`phone_call`."""

    def __init__(self, ws: Connection, stream_sid: str, speed: float) -> None:
        self._ws = ws
        self.stream_sid = stream_sid
        self.speed = speed
        self.handset = Handset(speed=speed)
        self._speech: deque[tuple[bytes, bool]] = deque()  # chunks to say, loud or not
        self._sequence = 0
        self._changed = trio.Event()
        self.closed: CloseReason | None = None
        #: ``error`` events the relay sent (only to a peer that is not Twilio).
        self.errors: list[str] = []

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _send(self, message: dict[str, Any]) -> None:
        """Send a message as Twilio writes them; nothing once the stream is closed (the
        listener reports the close)."""
        self._sequence += 1
        text = orjson.dumps(
            {
                "event": message.pop("event"),
                "sequenceNumber": str(self._sequence),
                **message,
                "streamSid": self.stream_sid,
            }
        ).decode()
        try:
            await self._ws.send_message(text)
        except ConnectionClosed:
            pass

    async def _echo(self, names: list[str]) -> None:
        for name in names:
            await self._send({"event": "mark", "mark": {"name": name}})

    async def say(self, ulaw: bytes) -> None:
        """Speak ``ulaw`` (μ-law 8 kHz) on the line; returns once it is all sent."""
        chunks = [ulaw[i : i + CHUNK_BYTES] for i in range(0, len(ulaw), CHUNK_BYTES)]
        self._speech.extend((chunk.ljust(CHUNK_BYTES, b"\xff"), _loud(chunk)) for chunk in chunks)
        while self._speech:
            await self._wait()

    async def _wait(self) -> None:
        if self.closed is not None:
            raise CallError(_closed_message(self.closed, self.errors))
        await self._changed.wait()

    async def hear(self, seconds: float) -> Reply:
        """Wait until the current reply has played for ``seconds``."""
        while not (self.handset.replies and self.handset.replies[-1].heard_ms >= seconds * 1000):
            await self._wait()
        return self.handset.replies[-1]

    async def until_quiet(self, replies: int = 1) -> None:
        """Wait until at least ``replies`` replies have come and all was played, with no audio
        for :data:`QUIET_SECONDS`."""
        handset = self.handset
        while (
            len(handset.replies) < replies
            or handset.playing
            or handset.last_audio_at is None
            or trio.current_time() - handset.last_audio_at < QUIET_SECONDS / self.speed
        ):
            await self._wait()

    async def _line(self) -> None:
        """The caller's side: a 20 ms chunk every 20 ms, speech if any, else silence."""
        started = trio.current_time()
        step = CHUNK_MS / 1000 / self.speed
        chunk = 0
        while True:
            await trio.sleep_until(started + chunk * step)
            audio, loud = self._speech.popleft() if self._speech else (SILENCE, False)
            if loud:
                self.handset.speech_end = trio.current_time() + step
            await self._send(
                {
                    "event": "media",
                    "media": {
                        "track": "inbound",
                        "chunk": str(chunk + 1),
                        "timestamp": str(chunk * CHUNK_MS),
                        "payload": base64.b64encode(audio).decode(),
                    },
                }
            )
            chunk += 1
            self._note()

    async def _speaker(self) -> None:
        """The phone's side: play in real time, echo marks as their audio plays."""
        step = CHUNK_MS / 1000 / self.speed
        while True:
            tick = trio.current_time() + step
            due = self.handset.next_due()
            await trio.sleep_until(tick if due is None else min(due, tick))
            await self._echo(self.handset.play(trio.current_time()))
            self._note()

    async def _listen(self) -> None:
        while True:
            try:
                data = await self._ws.get_message()
            except ConnectionClosed as exc:
                self.closed = exc.reason or CloseReason(1006, None)
                self._note()
                return
            try:
                message = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue  # not a Twilio message: nothing a phone would do with it
            if message.get("type") == "error":
                error = message.get("error") or {}
                self.errors.append(f"{error.get('code')}: {error.get('message')}")
                continue
            await self._echo(self.handset.receive(message, trio.current_time()))
            self._note()

    async def press(self, digit: str) -> None:
        """Press a key: Twilio's ``dtmf``."""
        await self._send({"event": "dtmf", "dtmf": {"track": "inbound_track", "digit": digit}})

    async def hang_up(self) -> None:
        """Twilio's ``stop``; the relay then closes the stream (waited for, bounded)."""
        if self.closed is not None:
            return
        await self._send({"event": "stop", "stop": {}})
        with trio.move_on_after(CLOSE_TIMEOUT):
            while self.closed is None:
                await self._changed.wait()


@asynccontextmanager
async def phone_call(
    ws: Connection,
    twiml: Twiml,
    *,
    call_sid: str,
    account_sid: str,
    speed: float = 1.0,
    transcripts: bool = True,
) -> AsyncIterator[PhoneCall]:
    """Start a call on ``ws`` as Twilio does (``connected``, ``start``), run the line and the
    speaker while the body runs, then hang up (``stop``) and close."""
    parameters = dict(twiml.parameters)
    if transcripts:
        parameters[TRANSCRIPTS_PARAMETER] = "true"
    call = PhoneCall(ws, new_sid("MZ"), speed)
    await ws.send_message(
        orjson.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}).decode()
    )
    await call._send(
        {
            "event": "start",
            "start": {
                "accountSid": account_sid,
                "streamSid": call.stream_sid,
                "callSid": call_sid,
                "tracks": ["inbound"],
                "customParameters": parameters,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            },
        }
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(call._listen)
        nursery.start_soon(call._line)
        nursery.start_soon(call._speaker)
        try:
            yield call
            await call.hang_up()
        except ConnectionClosed:
            pass  # the relay closed first: the call says so in .closed
        finally:
            with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await ws.aclose(1000, None)
            nursery.cancel_scope.cancel()


async def fetch_twiml(
    http: httpx.AsyncClient,
    base_url: str,
    auth_token: str,
    *,
    call_sid: str,
    account_sid: str,
    caller: str,
) -> Twiml:
    """Ask the relay's voice webhook about a ringing call, signed as Twilio signs it."""
    url = base_url.rstrip("/") + "/twilio/voice"
    params = {
        "CallSid": call_sid,
        "AccountSid": account_sid,
        "From": caller,
        "To": "+15550100000",
        "CallStatus": "ringing",
        "Direction": "inbound",
    }
    signature = request_signature(auth_token, url, params.items())
    try:
        answer = await http.post(url, data=params, headers={"X-Twilio-Signature": signature})
    except httpx.HTTPError as exc:
        raise CallError(
            f"cannot reach the relay's voice webhook at {url}: {exc or type(exc).__name__}."
            " Is the relay running? Start one with `relay demo`."
        ) from None
    if answer.status_code != 200:
        hint = (
            " (is RELAY_TWILIO_AUTH_TOKEN the relay's? the demo's is built in)"
            if answer.status_code == 403
            else " (are the relay's Twilio routes on? set RELAY_TWILIO_AUTH_TOKEN)"
            if answer.status_code == 404
            else ""
        )
        raise CallError(
            f"the voice webhook answered HTTP {answer.status_code}: {answer.text.strip()}{hint}"
        )
    try:
        stream = ElementTree.fromstring(answer.content).find("./Connect/Stream")
    except ElementTree.ParseError:
        stream = None
    if stream is None or not stream.get("url"):
        raise CallError(
            f"the voice webhook's answer is not <Connect><Stream> TwiML: {answer.text!r}"
        )
    parameters = {
        p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter") if p.get("name")
    }
    return Twiml(stream.get("url", ""), parameters)


@asynccontextmanager
async def dial(twiml: Twiml, auth_token: str) -> AsyncIterator[Connection]:
    """The media stream's WebSocket, opened as Twilio opens it (the URL signed)."""
    parts = urlsplit(twiml.stream_url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise CallError(f"the TwiML's stream URL is not ws:// or wss://: {twiml.stream_url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    signature = request_signature(auth_token, twiml.stream_url)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream: trio.abc.Stream
            if parts.scheme == "wss":
                stream = await trio.open_ssl_over_tcp_stream(
                    parts.hostname, port, ssl_context=ssl.create_default_context()
                )
            else:
                stream = await trio.open_tcp_stream(parts.hostname, port)
    except (OSError, trio.TooSlowError) as exc:
        raise CallError(f"cannot connect to {twiml.stream_url}: {exc or 'timed out'}") from None
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            ws = await connect(
                stream,
                parts.netloc,
                parts.path or "/",
                subprotocols=None,
                headers=((b"x-twilio-signature", signature.encode()),),
                max_message_bytes=1 << 20,
            )
        yield ws
    except ConnectionRejected as exc:
        raise CallError(
            f"the relay refused the media stream (HTTP {exc.status_code}):"
            f" {(exc.body or b'').decode(errors='replace').strip()}"
        ) from None
    except (HandshakeFailed, trio.BrokenResourceError, trio.TooSlowError) as exc:
        raise CallError(
            f"the media stream's handshake failed: {exc or type(exc).__name__}"
        ) from None
    finally:
        await trio.aclose_forcefully(stream)


def _loud(chunk: bytes) -> bool:
    samples = [wav.MULAW_TO_PCM16[b] for b in chunk[::4]]
    return (
        bool(samples) and (sum(s * s for s in samples) / len(samples)) ** 0.5 > SPEECH_LEVEL * 32768
    )


def _closed_message(reason: CloseReason, errors: list[str]) -> str:
    text = f"the relay ended the call (close code {reason.code}"
    text += f", {reason.reason})" if reason.reason else ")"
    if errors:
        text += ": " + errors[-1]
    return text


# -- relay call -------------------------------------------------------------------------


@dataclass
class Options:
    url: str = DEFAULT_URL
    auth_token: str = DEMO_TWILIO_AUTH_TOKEN
    caller: str = "+15550100001"
    timeout: float = 60.0


async def call(ulaw: bytes, options: Options) -> PhoneCall:
    """Play ``ulaw`` as one call through the relay and return it once the reply was heard."""
    try:
        return await _call(ulaw, options)
    except BaseExceptionGroup as group:  # the call's nursery wraps what its body raised
        error = group.subgroup(CallError)
        if error is None:
            raise
        raise _leaves(error)[0] from None


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for inner in group.exceptions:
        found.extend(_leaves(inner) if isinstance(inner, BaseExceptionGroup) else [inner])
    return found


async def _call(ulaw: bytes, options: Options) -> PhoneCall:
    call_sid, account_sid = new_sid("CA"), new_sid("AC")
    with trio.move_on_after(options.timeout) as overall:
        async with httpx.AsyncClient(timeout=CONNECT_TIMEOUT) as http:
            twiml = await fetch_twiml(
                http,
                options.url,
                options.auth_token,
                call_sid=call_sid,
                account_sid=account_sid,
                caller=options.caller,
            )
        async with dial(twiml, options.auth_token) as ws:
            async with phone_call(ws, twiml, call_sid=call_sid, account_sid=account_sid) as phone:
                await phone.say(ulaw)
                await phone.until_quiet()
        return phone
    assert overall.cancelled_caught
    raise CallError(f"no reply was heard within {options.timeout:g} s; try a larger --timeout")


def report(phone: PhoneCall, out: TextIO) -> None:
    """The transcripts, each reply's latency and every barge-in."""
    for role, text in phone.handset.transcripts:
        print(f"{role + ':':<11}{text}", file=out)
    for index, reply in enumerate(phone.handset.replies, 1):
        if reply.latency_ms is not None:
            print(
                f"latency:   reply {index}: {reply.latency_ms:.0f} ms from end of speech to first"
                " reply audio",
                file=out,
            )
        if reply.cut_bytes is not None:
            print(
                f"barge-in:  reply {index} cut after {reply.heard_ms / 1000:.1f} s heard;"
                f" {reply.cut_bytes / BYTES_PER_MS / 1000:.1f} s not played",
                file=out,
            )


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """``relay call`` itself: returns the exit code, prints errors as one line on stderr."""
    out = out or sys.stdout
    err = err or sys.stderr
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request is noise here
    try:
        try:
            samples, fmt = wav.read_wav(args.input or SAMPLE)
        except wav.WavError as exc:
            raise CallError(str(exc), EXIT_INPUT) from None
        ulaw = wav.mulaw_bytes(wav.resample(samples, fmt.rate, RATE))
        options = Options(
            url=args.url,
            auth_token=os.environ.get("RELAY_TWILIO_AUTH_TOKEN") or DEMO_TWILIO_AUTH_TOKEN,
            timeout=args.timeout,
        )
        phone = trio.run(call, ulaw, options)
        report(phone, out)
        heard = bytes(phone.handset.heard)
        if not heard:
            raise CallError("the caller heard no reply")
        try:
            wav.write_wav(
                args.output, wav.pcm16_bytes([wav.MULAW_TO_PCM16[b] for b in heard]), RATE
            )
        except OSError as exc:
            raise CallError(
                f"cannot write {args.output}: {exc.strerror or exc}", EXIT_INPUT
            ) from None
        print(
            f"heard:     {len(heard) / BYTES_PER_MS / 1000:.1f} s of reply written to {args.output}"
            f" (8 kHz mono PCM16; sent {len(ulaw) / BYTES_PER_MS / 1000:.1f} s from"
            f" {fmt.describe()})",
            file=out,
        )
        return 0
    except CallError as exc:
        print(f"relay call: {exc}", file=err)
        return exc.exit_code
