"""Calls: WebRTC and SIP sessions whose audio does not go over the WebSocket.

A call is one :class:`~mockrealtime.session.Session` with several parties around it:

* the **peer**: the browser's data channel (WebRTC) or the phone line (SIP), which sends
  client events and receives every server event but the audio deltas (its audio is media:
  :mod:`mockrealtime.media` plays them when real media is on);
* any number of **sidebands**: WebSockets on ``/v1/realtime?call_id=…`` with the server key,
  which see the same events and may send client events.

Every event the session emits goes to all of them, in order. The REST side:

* ``POST /v1/realtime/calls``: an SDP offer (``application/sdp``, or multipart ``sdp`` and
  ``session`` as the SDK sends it) → ``201``, the SDP answer, ``Location:
  /v1/realtime/calls/{call_id}``. The call is live at once;
* ``POST /v1/realtime/calls/{id}/accept`` (a SIP call, with the session), ``/reject``
  (``status_code``), ``/hangup``, ``/refer`` (``target_uri``);
* ``POST /mock/sip/incoming`` (mock only): a SIP call rings; the signed
  ``realtime.call.incoming`` webhook goes to ``webhook_url``.

Without real media, a call's SDP answer is a well-formed stand-in that no browser can
connect to, and tests play the peer with :meth:`MockCall.peer_send` and
:meth:`MockCall.feed_audio`.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

import orjson
import trio

from .handshake import mask_key
from .models import is_realtime_model
from .session import Event, Session
from .sessionconfig import SessionConfig, apply_ga_update
from .validation import ClientError, expect_int, expect_object, expect_str

if TYPE_CHECKING:
    from .media import MediaPeer
    from .server import MockServer

CALLS_PATH: Final = "/v1/realtime/calls"
SIP_TRIGGER_PATH: Final = "/mock/sip/incoming"
AUDIO_DELTA: Final = "response.output_audio.delta"
DEFAULT_MODEL: Final = "gpt-realtime"
WEBHOOK_TIMEOUT: Final = 10.0

CallState = Literal["ringing", "active", "ended", "rejected"]
Deliver = Callable[[list[Event]], None]
Closer = Callable[[int, str], None]


@dataclass(frozen=True)
class HttpReply:
    """One HTTP answer of the calls API: a JSON object, or a raw body (an SDP answer)."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Mapping[str, Any]) -> HttpReply:
        return cls(status, orjson.dumps(payload))


def _error(
    status: int, message: str, *, code: str | None = None, param: str | None = None
) -> HttpReply:
    return HttpReply.json(
        status,
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        },
    )


@dataclass(eq=False)
class MockCall:
    """One call and what it saw, for tests to inspect and drive.

    ``peer_events`` are the server events the peer received (the data channel's, no audio
    deltas); ``sideband_received`` the raw messages sidebands sent; ``audio_out_bytes`` the
    reply audio (PCM16 24 kHz) the peer was sent as media, or would have been.
    """

    id: str
    transport: Literal["webrtc", "sip"]
    model: str
    state: CallState = "ringing"
    session: Session | None = None
    sip_headers: list[dict[str, str]] = field(default_factory=list)
    created_with: dict[str, Any] | None = None
    accepted_with: dict[str, Any] | None = None
    rejected_with: int | None = None
    referred_to: str | None = None
    end_reason: str | None = None
    peer_events: list[Event] = field(default_factory=list)
    sideband_received: list[str | bytes] = field(default_factory=list)
    audio_out_bytes: int = 0
    ended: trio.Event = field(default_factory=trio.Event)
    media: MediaPeer | None = None
    _subscribers: list[tuple[Deliver, Closer]] = field(default_factory=list)
    _wake: trio.Event = field(default_factory=trio.Event)
    _playing_response: str | None = None
    _changed: trio.Event = field(default_factory=trio.Event)

    # --- the parties -----------------------------------------------------------------

    def peer_send(self, message: str | bytes | Event) -> None:
        """A client event from the peer (the browser over its data channel)."""
        if self.state != "active":
            return
        text = orjson.dumps(message).decode() if isinstance(message, dict) else message
        self._emit(self._live_session().handle(text))

    def feed_audio(self, pcm: bytes) -> None:
        """The peer's microphone: PCM16 mono 24 kHz, as the session's VAD hears it."""
        if self.state != "active" or not pcm:
            return
        append = {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
        self._emit(self._live_session().handle(orjson.dumps(append).decode()))

    def sideband_send(self, message: str | bytes) -> None:
        """A client event from a sideband WebSocket."""
        self.sideband_received.append(message)
        if self.state == "active":
            self._emit(self._live_session().handle(message))
        else:
            self._touch()

    def playback(self, what: str) -> None:
        """The media side started or stopped playing reply audio: the WebRTC-only
        ``output_audio_buffer.started``/``stopped`` events."""
        if self.state == "active":
            notice = self._live_session().notice(
                f"output_audio_buffer.{what}", response_id=self._playing_response
            )
            self._emit([notice])

    def subscribe(self, deliver: Deliver, close: Closer) -> Callable[[], None]:
        """A sideband: ``deliver`` gets every server event from now on, ``close`` is called
        when the call ends. Returns the unsubscribe."""
        entry = (deliver, close)
        self._subscribers.append(entry)
        self._touch()

        def unsubscribe() -> None:
            if entry in self._subscribers:
                self._subscribers.remove(entry)
                self._touch()

        return unsubscribe

    @property
    def sidebands(self) -> int:
        """Sideband WebSockets attached now."""
        return len(self._subscribers)

    async def wait_for(self, condition: Callable[[MockCall], bool]) -> None:
        """Wait until ``condition(call)`` holds; it is checked whenever the call changes
        (an event, a sideband coming or going, its end). Bound it with a timeout."""
        while not condition(self):
            await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- life ------------------------------------------------------------------------

    def activate(self, session: Session) -> None:
        """The call is answered: the session starts (its ``session.created`` goes to the peer)."""
        self.session = session
        self.state = "active"
        self._emit(session.open())

    def end(self, reason: str, code: int = 1000, close_reason: str = "call ended") -> None:
        """The call is over: the media stops and every sideband is closed (``code``)."""
        if self.state in ("ended", "rejected"):
            return
        self.state = "ended"
        self.end_reason = reason
        if self.media is not None:
            self.media.close()
        for _, close in list(self._subscribers):
            close(code, close_reason)
        self.ended.set()
        self._wake.set()
        self._touch()

    async def run(self) -> None:
        """Emit what becomes due with time (paced reply audio, expiry) while the call lives."""
        while self.state == "active":
            deadline = self._live_session().next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            if self.state == "active":
                self._emit(self._live_session().tick())

    def _live_session(self) -> Session:
        assert self.session is not None, "a call has a session once it is active"
        return self.session

    def _emit(self, events: list[Event]) -> None:
        session = self._live_session()
        events_out: list[Event] = []
        for event in events:
            kind = event.get("type")
            if kind == AUDIO_DELTA:
                audio = base64.b64decode(event.get("delta", ""))
                self.audio_out_bytes += len(audio)
                self._playing_response = event.get("response_id")
                if self.media is not None:
                    self.media.play(audio)
                continue
            if kind == "input_audio_buffer.speech_started" and self.media is not None:
                self.media.clear()  # the server stops its own playback on barge-in
            events_out.append(event)
        if events_out:
            self.peer_events.extend(events_out)
            if self.media is not None:
                self.media.send_events(events_out)
            for deliver, _ in list(self._subscribers):
                deliver(events_out)
        if events:  # (an empty tick changes nothing: waking for it would spin the run loop)
            self._wake.set()  # the schedule may have changed (a response started or ended)
            self._touch()
        if session.close_requested is not None:
            self.end("expired", *session.close_requested)


class SidebandSession:
    """What a sideband WebSocket's shell drives in place of a session of its own: every
    message goes to the call, and the call's events reach it by subscription."""

    close_requested: tuple[int, str] | None = None

    def __init__(self, call: MockCall) -> None:
        self.call = call

    def open(self, rejection: object = None) -> list[Event]:
        return []

    def handle(self, message: str | bytes) -> list[Event]:
        self.call.sideband_send(message)
        return []

    def tick(self, now: float | None = None) -> list[Event]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def server_error(self) -> Event:
        return self.call._live_session().server_error()


# --- requests ----------------------------------------------------------------------------

_CALL_ACTION: Final = re.compile(
    r"^/v1/realtime/calls/([A-Za-z0-9_\-]+)/(accept|reject|hangup|refer)$"
)


def is_call_route(path: str) -> bool:
    path = path.rstrip("/")
    return path in (CALLS_PATH, SIP_TRIGGER_PATH) or _CALL_ACTION.match(path) is not None


def bearer(headers: Mapping[str, str]) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def key_refusal(key: str | None, valid: bool) -> HttpReply | None:
    """The real API's 401 for a missing or wrong key, else None."""
    if key is None:
        return _error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization"
            " header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    if not valid:
        return _error(401, f"Incorrect API key provided: {mask_key(key)}.", code="invalid_api_key")
    return None


def read_offer(headers: Mapping[str, str], body: bytes) -> tuple[str, dict[str, Any] | None]:
    """The SDP offer and the ``session`` part of a create request; raises ClientError."""
    content_type = headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        parts: dict[str, bytes] = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                parts[name] = payload
        sdp = parts.get("sdp")
        if not sdp:
            raise ClientError(
                "missing_required_parameter", "Missing required parameter: 'sdp'.", "sdp"
            )
        raw_session = parts.get("session")
        session = None
        if raw_session:
            try:
                session = expect_object(orjson.loads(raw_session), "session")
            except orjson.JSONDecodeError:
                raise ClientError(
                    "invalid_json", "The 'session' part is not JSON.", "session"
                ) from None
        return sdp.decode("utf-8", "replace"), session
    if content_type.startswith("application/sdp"):
        if not body.strip():
            raise ClientError("missing_required_parameter", "The SDP offer is empty.", "sdp")
        return body.decode("utf-8", "replace"), None
    raise ClientError(
        "unsupported_content_type",
        "Send the SDP offer as application/sdp, or as multipart/form-data with 'sdp' and"
        " 'session' parts.",
        None,
    )


def session_config(raw: dict[str, Any] | None, base: SessionConfig | None = None) -> SessionConfig:
    """A call's session from a create/accept body (the client-secret shape); raises ClientError."""
    cfg = base.copy() if base is not None else SessionConfig()
    if raw:
        body = {key: value for key, value in raw.items() if key != "model"}
        body.setdefault("type", "realtime")
        cfg = apply_ga_update(cfg, body)
    return cfg


def requested_model(raw: dict[str, Any] | None, target: str) -> str:
    """The model a create or accept names (the session's, else ``?model=``); raises ClientError."""
    asked = (raw or {}).get("model") or parse_qs(urlsplit(target).query).get("model", [""])[0]
    model = expect_str(asked or DEFAULT_MODEL, "session.model")
    if not is_realtime_model(model):
        raise ClientError(
            "invalid_model", f'Model "{model}" is not supported in realtime mode.', "session.model"
        )
    return model


def stand_in_answer(offer: str, call_id: str) -> str:
    """A well-formed SDP answer for an offer when there is no real media: the offer's media
    sections, each answered inactive (nothing can connect to it)."""
    mids = re.findall(r"^a=mid:(\S+)", offer, flags=re.MULTILINE)
    kinds = re.findall(r"^m=(\w+) ", offer, flags=re.MULTILINE)
    lines = [
        "v=0",
        f"o=- {abs(hash(call_id)) % 10**12} 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        f"a=group:BUNDLE {' '.join(mids)}" if mids else "a=msid-semantic: WMS",
    ]
    for index, kind in enumerate(kinds):
        lines += [f"m={kind} 0 UDP/TLS/RTP/SAVPF 0", "c=IN IP4 0.0.0.0", "a=inactive"]
        if index < len(mids):
            lines.append(f"a=mid:{mids[index]}")
    return "\r\n".join(lines) + "\r\n"


def looks_real(offer: str) -> bool:
    """Whether an offer came from a real WebRTC stack (ICE credentials and a DTLS fingerprint)."""
    return "a=ice-ufrag:" in offer and "a=fingerprint:" in offer


async def handle_call_request(
    server: MockServer, method: str, target: str, headers: Mapping[str, str], body: bytes
) -> HttpReply:
    """Answer one request on a calls route (see :func:`is_call_route`)."""
    path = urlsplit(target).path.rstrip("/")
    if method != "POST":
        return _error(405, f"Invalid method for URL ({method} {path}): use POST.")
    key = bearer(headers)
    try:
        if path == CALLS_PATH:
            valid = key is not None and server.key_is_valid(key)
            refused = key_refusal(key, valid)
            return refused or await _create(server, target, headers, body, key)  # type: ignore[arg-type]
        refused = key_refusal(
            key, key is not None and not key.startswith("ek_") and server.key_is_valid(key)
        )
        if refused is not None:
            return refused
        request = orjson.loads(body) if body.strip() else {}
        request = expect_object(request, "body")
        if path == SIP_TRIGGER_PATH:
            return await _ring(server, request)
        matched = _CALL_ACTION.match(path)
        assert matched is not None
        call = server.calls.get(matched.group(1))
        if call is None:
            return _error(404, f"Call {matched.group(1)!r} not found.", code="call_id_not_found")
        return _act(server, call, matched.group(2), request)
    except orjson.JSONDecodeError:
        return _error(400, "We could not parse the JSON body of your request.")
    except ClientError as err:
        return _error(400, err.message, code=err.code, param=err.param)


async def _create(
    server: MockServer, target: str, headers: Mapping[str, str], body: bytes, key: str
) -> HttpReply:
    offer, raw_session = read_offer(headers, body)
    preset = server.rest.session_preset(key) if key.startswith("ek_") else None
    model = requested_model(raw_session, target)
    cfg = session_config(raw_session, preset)
    call = server.new_call("webrtc", model)
    call.created_with = raw_session
    answer = stand_in_answer(offer, call.id)
    if server.config.webrtc_media and looks_real(offer) and media_available():
        call.media, answer = await server.media_loop().answer(offer, call)
    server.start_call(call, cfg)
    return HttpReply(
        201,
        answer.encode(),
        "application/sdp",
        (("location", f"{CALLS_PATH}/{call.id}"),),
    )


def _act(server: MockServer, call: MockCall, action: str, request: dict[str, Any]) -> HttpReply:
    if action in ("accept", "reject") and call.state != "ringing":
        return _error(
            400, f"Call {call.id!r} is {call.state}, not ringing.", code="call_not_ringing"
        )
    if action in ("hangup", "refer") and call.state != "active":
        return _error(404, f"Call {call.id!r} is {call.state}.", code="call_id_not_found")
    if action == "accept":
        model = requested_model(request, "")
        cfg = session_config(request)
        call.model = model
        call.accepted_with = request
        server.start_call(call, cfg)
    elif action == "reject":
        status = request.get("status_code", 603)
        call.rejected_with = expect_int(status, "status_code", 300, 699)
        call.state = "rejected"
        call.end_reason = "rejected"
        call.ended.set()
        call._touch()
    elif action == "hangup":
        call.end("hangup")
    else:
        if call.transport != "sip":
            return _error(400, "Only SIP calls can be referred.", code="invalid_call_type")
        call.referred_to = expect_str(request.get("target_uri"), "target_uri")
        call.end("referred")
    return HttpReply(200)


async def _ring(server: MockServer, request: dict[str, Any]) -> HttpReply:
    """``POST /mock/sip/incoming``: ring a SIP call; answers with the webhook's outcome."""
    url = expect_str(request.get("webhook_url"), "webhook_url")
    caller = expect_str(request.get("from", "+15550100"), "from")
    callee = expect_str(request.get("to", "+15550199"), "to")
    call, status = await server.ring(url, caller, callee)
    return HttpReply.json(200, {"call_id": call.id, "webhook_status": status})


def media_available() -> bool:
    """Whether real media can be served: aiortc (``mockrealtime[media]``) is installed."""
    return importlib.util.find_spec("aiortc") is not None
