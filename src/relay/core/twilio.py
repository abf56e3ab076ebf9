"""Twilio Media Streams in, Realtime events out, and back: a phone call's translation, without I/O.

Twilio's ``<Connect><Stream>`` streams a call over a WebSocket as JSON messages: ``connected``,
``start`` (the call's ids and the TwiML's ``<Parameter>``s), ``media`` (base64 μ-law 8 kHz,
20 ms each), ``mark``, ``dtmf`` and ``stop``; the server answers with ``media``, ``mark`` and
``clear``, and nothing else (Twilio takes any other message for a protocol error).
:class:`TwilioStream` turns each message into what the relay does, message by message:

* caller → upstream: ``media`` becomes ``input_audio_buffer.append`` with the very same base64
  text (the session takes ``audio/pcmu`` both ways, so nothing is transcoded); ``dtmf`` becomes
  a user text item (``RELAY_TWILIO_DTMF=text``); ``stop`` ends the call; a mark's echo says how
  much of the reply the caller has heard;
* upstream → caller: each ``response.output_audio.delta`` becomes a ``media`` message and a
  ``mark``; ``input_audio_buffer.speech_started`` over audio not yet played becomes ``clear``
  for Twilio and ``conversation.item.truncate`` for the upstream, at the position the echoed
  marks confirmed (μ-law at 8 kHz is 8 bytes per millisecond); everything else is consumed.

It also says the call's last words when a limit ends it: a ``response.create`` with the
goodbye instructions once no response is under way, and the call is over when the mark after
the goodbye's last audio comes back. Other telephony providers (Telnyx, Vonage, Plivo) stream
calls the same way with other message shapes: each is one module like this one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from .events import dumps, event_type

#: μ-law at 8 kHz: one byte per sample.
BYTES_PER_MS: Final = 8
#: The stream parameter asking for the relay's ``relay.transcript`` messages. Twilio itself
#: never asks (they are not Twilio messages): it is for test phones such as ``relay call``.
TRANSCRIPTS_PARAMETER: Final = "relay_transcripts"
#: The relay's own error code that a session's length is nearly up (the goodbye's cue).
SESSION_ENDING_SOON: Final = "relay_session_ending_soon"
#: The event id of the goodbye's ``response.create``, and its response's metadata.
GOODBYE_ID: Final = "relay_goodbye"
DTMF_MODES: Final = ("off", "text")

_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_DIGITS = frozenset("0123456789*#ABCD")
_APPEND_HEAD = '{"type":"input_audio_buffer.append","audio":"'
_DELTA = "response.output_audio.delta"


def request_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    """``X-Twilio-Signature`` of a request: base64 HMAC-SHA1, keyed with the account's auth
    token, over the URL Twilio requested followed by each POST parameter's name and value,
    sorted by name (then value). A WebSocket upgrade signs the URL alone."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def signature_matches(
    auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str | None
) -> bool:
    """Whether ``signature`` is Twilio's for this request, compared in constant time. Twilio's
    own validators accept the URL with and without the scheme's default port, so does this."""
    if not signature or not auth_token:
        return False
    pairs = list(params)
    given = signature.encode()
    return any(  # every candidate is checked: no early exit to time
        [
            hmac.compare_digest(request_signature(auth_token, candidate, pairs).encode(), given)
            for candidate in _port_variants(url)
        ]
    )


def _port_variants(url: str) -> tuple[str, ...]:
    """The URL as given, without its port, and with the scheme's default port."""
    parts = urlsplit(url)
    default = {"https": 443, "wss": 443, "http": 80, "ws": 80}.get(parts.scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if default is None or parts.username or parts.password:
        return (url,)
    bare = parts._replace(netloc=host).geturl()
    return (url, bare, parts._replace(netloc=f"{host}:{default}").geturl())


class StreamError(Exception):
    """A message that is not Twilio Media Streams (or not at this point of the stream)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Start:
    """What Twilio's ``start`` says about the call."""

    stream_sid: str
    call_sid: str
    account_sid: str
    parameters: dict[str, str]


class End(Enum):
    """Why the call is over, as far as the phone leg can tell."""

    STOPPED = "stopped"  # Twilio's stop: the caller hung up or the call moved on
    GOODBYE_SAID = "goodbye_said"  # the last words asked for have played


@dataclass(slots=True)
class Out:
    """What one message leads to: Realtime events for the upstream, messages for Twilio,
    and whether the call is over."""

    upstream: list[str] = field(default_factory=list)
    twilio: list[str] = field(default_factory=list)
    end: End | None = None


class _Goodbye(Enum):
    NONE = 0
    WAITING = 1  # asked for; sent once no response is under way
    SENT = 2  # response.create sent
    DONE = 3  # its response is done: the call ends when its audio has played


class TwilioStream:
    """One call's translation between Twilio Media Streams and Realtime events (module docstring).

    ``dtmf`` is ``text`` (a key press becomes a user item) or ``off``; ``goodbye`` holds the
    instructions for the call's last words when a limit ends it (empty: none).
    """

    __slots__ = (
        "_dtmf",
        "_goodbye",
        "_goodbye_state",
        "_goodbye_mark",
        "start",
        "_sid_json",
        "transcripts",
        "_marks",
        "_next_mark",
        "_item",
        "_item_bytes",
        "_content_index",
        "_heard_item",
        "_heard_bytes",
        "_cut_item",
        "_responding",
        "barge_ins",
    )

    def __init__(self, *, dtmf: str = "text", goodbye: str = "") -> None:
        if dtmf not in DTMF_MODES:
            raise ValueError(f"dtmf must be one of {DTMF_MODES}, got {dtmf!r}")
        self._dtmf = dtmf
        self._goodbye = goodbye
        self._goodbye_state = _Goodbye.NONE
        self._goodbye_mark: int | None = None
        self.start: Start | None = None
        self._sid_json = '""'
        #: Whether the stream asked for ``relay.transcript`` messages.
        self.transcripts = False
        #: Marks sent and not echoed yet: (number, item id, bytes of that item up to the mark).
        self._marks: deque[tuple[int, str, int]] = deque()
        self._next_mark = 1
        self._item: str | None = None  # the item whose audio is being sent
        self._item_bytes = 0
        self._content_index = 0
        self._heard_item: str | None = None  # the item whose audio was last confirmed played
        self._heard_bytes = 0
        self._cut_item: str | None = None  # truncated at a barge-in: its late audio is dropped
        self._responding = False
        #: Barge-ins that cut a reply short.
        self.barge_ins = 0

    # -- Twilio → relay -------------------------------------------------------------

    def opening(self, data: str | bytes) -> Start | None:
        """A message before the call runs: None for ``connected``, the :class:`Start` for
        ``start``; anything else raises :class:`StreamError`."""
        message = _parse(data)
        kind = message["event"]
        if kind == "connected":
            return None
        if kind != "start":
            raise StreamError(
                f"a {kind!r} message came before 'start': a Twilio media stream begins with"
                " 'connected' and 'start'"
            )
        return self._start(message)

    def _start(self, message: dict[str, Any]) -> Start:
        start = message.get("start")
        if not isinstance(start, dict):
            raise StreamError("'start' has no 'start' object")
        fields = [start.get(name) for name in ("streamSid", "callSid", "accountSid")]
        if not fields[0]:
            fields[0] = message.get("streamSid")
        if not all(isinstance(value, str) and value for value in fields):
            raise StreamError("'start' must carry streamSid, callSid and accountSid")
        parameters = start.get("customParameters") or {}
        if not isinstance(parameters, dict) or not all(
            isinstance(value, str) for value in parameters.values()
        ):
            raise StreamError("'start.customParameters' must map names to strings")
        media = start.get("mediaFormat") or {}
        if not isinstance(media, dict) or (
            media.get("encoding", "audio/x-mulaw"),
            media.get("sampleRate", 8000),
            media.get("channels", 1),
        ) != ("audio/x-mulaw", 8000, 1):
            raise StreamError(f"this relay takes μ-law 8 kHz mono (audio/x-mulaw), not {media!r}")
        self.start = Start(fields[0], fields[1], fields[2], dict(parameters))
        self._sid_json = dumps(fields[0])  # type: ignore[arg-type]
        self.transcripts = parameters.get(TRANSCRIPTS_PARAMETER) in ("1", "true")
        return self.start

    def from_twilio(self, data: str | bytes) -> str | Out | None:
        """A message during the call: the append to send upstream (the common case, a str),
        an :class:`Out`, or None when it leads to nothing."""
        message = _parse(data)
        kind = message["event"]
        if kind == "media":
            media = message.get("media")
            payload = media.get("payload") if isinstance(media, dict) else None
            if not isinstance(payload, str) or not _BASE64.fullmatch(payload):
                raise StreamError("'media.payload' must be base64 audio")
            if media.get("track", "inbound") != "inbound":  # type: ignore[union-attr]
                return None  # a <Start><Stream> copy of what the caller hears
            if self._goodbye_state is not _Goodbye.NONE:
                return None  # the call is ending: the caller's audio no longer goes upstream
            return _APPEND_HEAD + payload + '"}'
        if kind == "mark":
            mark = message.get("mark")
            name = mark.get("name") if isinstance(mark, dict) else None
            if not isinstance(name, str):
                raise StreamError("'mark' must carry 'mark.name'")
            return self._echoed(name)
        if kind == "dtmf":
            return self._key(message.get("dtmf"))
        if kind == "stop":
            return Out(end=End.STOPPED)
        if kind in ("connected", "start"):
            raise StreamError(f"a second {kind!r} message: it may come only once, first")
        return None  # an event Twilio added after this was written: the call goes on

    def _echoed(self, name: str) -> Out | None:
        """Twilio played everything sent before mark ``name``."""
        number = int(name) if name.isdigit() else 0
        marks = self._marks
        if not marks or number < marks[0][0]:
            return None  # unknown, or dropped at a clear (Twilio echoes those at once)
        while marks and marks[0][0] <= number:
            _, self._heard_item, self._heard_bytes = marks.popleft()
        if self._goodbye_mark is not None and number >= self._goodbye_mark:
            return Out(end=End.GOODBYE_SAID)
        return None

    def _key(self, dtmf: object) -> Out | None:
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or digit not in _DIGITS:
            raise StreamError("'dtmf.digit' must be one key: 0-9, *, # or A-D")
        if self._dtmf == "off" or self._goodbye_state is not _Goodbye.NONE:
            return None
        item = {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": f"[The caller pressed {digit} on the keypad.]"}
                ],
            },
        }
        out = Out(upstream=[dumps(item)])
        if not self._responding:
            out.upstream.append('{"type":"response.create"}')
        return out

    # -- relay → Twilio ---------------------------------------------------------------

    def from_upstream(self, text: str | bytes) -> Out | None:
        """An upstream event (or one of the relay's own): what goes to Twilio and back upstream."""
        if text.__class__ is not str:
            return None
        kind = event_type(text)  # type: ignore[arg-type]
        if kind == _DELTA:
            return self._audio(text)  # type: ignore[arg-type]
        if kind == "input_audio_buffer.speech_started":
            return self._barge_in()
        if kind == "response.created":
            self._responding = True
            return None
        if kind == "response.done":
            return self._response_done(text)  # type: ignore[arg-type]
        if kind == "error":
            return self._error(text)  # type: ignore[arg-type]
        if self.transcripts and kind in (
            "response.output_audio_transcript.done",
            "conversation.item.input_audio_transcription.completed",
        ):
            event = orjson.loads(text)
            said = event.get("transcript")
            role = "assistant" if kind.startswith("response.") else "caller"
            message = {"event": "relay.transcript", "role": role, "text": said}
            return Out(twilio=[self._twilio(message)])
        return None

    def _twilio(self, message: dict[str, Any]) -> str:
        """A message to Twilio, with the stream's sid."""
        return '{"streamSid":' + self._sid_json + "," + dumps(message)[1:]

    def _audio(self, text: str) -> Out | None:
        event = orjson.loads(text)
        delta, item = event.get("delta"), event.get("item_id")
        if not isinstance(delta, str) or not isinstance(item, str) or not delta:
            return None
        if item == self._cut_item:
            return None  # sent before the upstream heard of the barge-in: never played
        if item != self._item:
            self._item, self._item_bytes = item, 0
            index = event.get("content_index")
            self._content_index = index if isinstance(index, int) else 0
        self._item_bytes += len(delta) * 3 // 4 - (delta[-2:].count("="))
        number = self._next_mark
        self._next_mark += 1
        self._marks.append((number, item, self._item_bytes))
        media = self._twilio({"event": "media", "media": {"payload": delta}})
        mark = self._twilio({"event": "mark", "mark": {"name": str(number)}})
        return Out(twilio=[media, mark])

    def _barge_in(self) -> Out | None:
        """The caller started speaking: cut what Twilio has not played yet, and tell the
        upstream how much of the reply was heard."""
        if not self._marks:
            return None  # everything sent has played: nothing to cut
        _, item, _ = self._marks[0]
        heard = self._heard_bytes if self._heard_item == item else 0
        self._marks.clear()  # Twilio echoes them at once after the clear: they were not heard
        self._cut_item = item
        self.barge_ins += 1
        truncate = {
            "type": "conversation.item.truncate",
            "item_id": item,
            "content_index": self._content_index,
            "audio_end_ms": heard // BYTES_PER_MS,
        }
        return Out(upstream=[dumps(truncate)], twilio=[self._twilio({"event": "clear"})])

    def _response_done(self, text: str) -> Out | None:
        self._responding = False
        if self._goodbye_state is _Goodbye.WAITING:
            return Out(upstream=[self._goodbye_request()])
        if self._goodbye_state is _Goodbye.SENT:
            response = orjson.loads(text).get("response")
            metadata = response.get("metadata") if isinstance(response, dict) else None
            if isinstance(metadata, dict) and metadata.get("relay") == GOODBYE_ID:
                self._goodbye_state = _Goodbye.DONE
                if not self._marks:
                    return Out(end=End.GOODBYE_SAID)  # it said nothing aloud: over now
                self._goodbye_mark = self._marks[-1][0]
        return None

    def _error(self, text: str) -> Out | None:
        error = orjson.loads(text).get("error")
        if not isinstance(error, dict):
            return None
        if error.get("code") == SESSION_ENDING_SOON:
            return self.goodbye()
        if error.get("event_id") == GOODBYE_ID and self._goodbye_state is _Goodbye.SENT:
            if error.get("code") == "conversation_already_has_active_response":
                self._goodbye_state = _Goodbye.WAITING  # again after that response
                return None
            return Out(end=End.GOODBYE_SAID)  # refused for good: end without it
        return None

    # -- the call's last words ---------------------------------------------------------

    @property
    def goodbye_asked(self) -> bool:
        """Whether the call's last words were asked for (it ends once they have played)."""
        return self._goodbye_state is not _Goodbye.NONE

    def goodbye(self) -> Out | None:
        """Have the model say goodbye: a ``response.create`` now, or once the response under
        way is done. From then on the caller's audio and keys no longer go upstream. None if
        no goodbye is configured."""
        if not self._goodbye:
            return None
        if self._goodbye_state is not _Goodbye.NONE:
            return Out()
        self._goodbye_state = _Goodbye.WAITING
        if self._responding:
            return Out()
        return Out(upstream=[self._goodbye_request()])

    def _goodbye_request(self) -> str:
        self._goodbye_state = _Goodbye.SENT
        return dumps(
            {
                "type": "response.create",
                "event_id": GOODBYE_ID,
                "response": {"instructions": self._goodbye, "metadata": {"relay": GOODBYE_ID}},
            }
        )

    @property
    def unplayed(self) -> int:
        """Marks sent whose audio Twilio has not confirmed playing."""
        return len(self._marks)


def _parse(data: str | bytes) -> dict[str, Any]:
    if data.__class__ is not str:
        raise StreamError("a binary frame: Twilio media streams send JSON text messages")
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise StreamError("a message that is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("event"), str):
        raise StreamError(
            "a message without an 'event': this is a Twilio Media Streams endpoint (connected,"
            " start, media, mark, dtmf, stop), not a Realtime API one (use /voice for that)"
        )
    return message
