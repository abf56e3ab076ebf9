"""Echo mode: the cheapest upstream that still speaks the Realtime handshake, for benchmarks.

``mockrealtime echo`` accepts the WebSocket upgrade on ``/v1/realtime`` like the full
mock (any non-empty key, the same refusals via :func:`~mockrealtime.handshake.negotiate`),
sends ``session.created``, answers each ``session.update`` with ``session.updated``, plays
each ``input_audio_buffer.append`` back as the model's audio (a
``response.output_audio.delta`` carrying the same audio and ``event_id``, :func:`as_output_audio`)
and sends every other client message back unchanged (same bytes, same frame type),
immediately and in order. Nothing else: no replies of its own, no pings.

Playing audio back as output deltas puts the events a relay forwards most in production
(``response.output_audio.delta`` makes up nearly all of a live session's downstream) on the
benchmarked path, rather than client events no real upstream sends.

To leave as much CPU as possible to the system under test, it does not use Trio or a
WebSocket library: it is an ``asyncio.Protocol`` with a minimal RFC 6455 framer (no
extensions; permessage-deflate is never negotiated). Client messages are not decoded
or parsed, except ones that may be a ``session.update`` (the literal
``"session.update"`` within their first bytes). Backpressure: while the client is not
reading (the transport's write buffer is full) the echo stops reading from it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import ssl
import struct
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote

import orjson

from .handshake import negotiate

try:  # the C helper of the ``websockets`` package, when installed
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - depends on the environment
    _c_apply_mask = None

REALTIME_PATH: Final = "/v1/realtime"
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024
SNIFF_BYTES: Final = 512
"""A message that may be ``session.update`` names its type within this prefix..."""
SNIFF_WHOLE_BELOW: Final = 16 * 1024
"""...or anywhere, when it is smaller than this."""

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_SESSION_UPDATE: Final = b'"session.update"'
_APPEND: Final = b'{"type":"input_audio_buffer.append",'
_OUTPUT_AUDIO: Final = b'{"type":"response.output_audio.delta",'
_AUDIO_KEY: Final = b'"audio":'
_DELTA_KEY: Final = b'"delta":'


def as_output_audio(payload: bytes) -> bytes | None:
    """The ``response.output_audio.delta`` that plays an ``input_audio_buffer.append`` back (its
    ``audio`` becomes the ``delta``, every other byte stays), or None if ``payload`` is not an
    append written type first, as the SDKs write it (those are echoed unchanged)."""
    if not payload.startswith(_APPEND):
        return None
    rest = memoryview(payload)[len(_APPEND) :]
    at = payload.find(_AUDIO_KEY, len(_APPEND), SNIFF_BYTES)
    if at < 0:
        return _OUTPUT_AUDIO + rest
    at -= len(_APPEND)
    return b"".join((_OUTPUT_AUDIO, rest[:at], _DELTA_KEY, rest[at + len(_AUDIO_KEY) :]))


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` (RFC 6455 masking; its own inverse)."""
    if _c_apply_mask is not None:
        return _c_apply_mask(data, mask)
    n = len(data)
    if not n:
        return b""
    repeated = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )


_pack_short = struct.Struct("!BBH").pack
_pack_long = struct.Struct("!BBQ").pack


def frame_head(opcode: int, n: int, mask: bytes | None = None) -> bytes:
    """The header of one final frame of ``n`` payload bytes (with ``mask``, if given)."""
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = _pack_short(0x80 | opcode, bit | 126, n)
    else:
        head = _pack_long(0x80 | opcode, bit | 127, n)
    return head if mask is None else head + mask


def frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final WebSocket frame; ``mask`` (4 bytes) for client-to-server frames."""
    head = frame_head(opcode, len(payload), mask)
    return head + (payload if mask is None else apply_mask(payload, mask))


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


class FrameReader:
    """Incremental frame parser for either side; yields ``(opcode, fin, payload)``, unmasked.

    A read is parsed where it lies, each payload copied once (unmasking is the copy); the
    bytes of a frame not yet whole are gathered until it is, and copied once more then.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_MESSAGE_BYTES) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[tuple[int, bool, bytes]]:
        gathered = self._buf
        if gathered:
            gathered += data
            if self._header(gathered, 0) is None:
                return []  # the frame is still not whole
            data = bytes(gathered)
            gathered.clear()
        view = memoryview(data)
        out: list[tuple[int, bool, bytes]] = []
        pos = 0
        while (header := self._header(data, pos)) is not None:
            b0, start, end = header
            if data[pos + 1] & 0x80:
                payload = apply_mask(view[start:end], data[start - 4 : start])
            else:
                payload = data[start:end]
            out.append((b0 & 0x0F, bool(b0 & 0x80), payload))
            pos = end
        if pos < len(data):
            gathered += view[pos:]
        return out

    def _header(self, buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
        """``(first byte, payload start, frame end)`` of the frame at ``pos`` if it is whole."""
        size = len(buf)
        if size - pos < 2:
            return None
        b1 = buf[pos + 1]
        n = b1 & 0x7F
        start = pos + 2
        if n == 126:
            if size - pos < 4:
                return None
            n = (buf[pos + 2] << 8) | buf[pos + 3]
            start = pos + 4
        elif n == 127:
            if size - pos < 10:
                return None
            (n,) = struct.unpack_from("!Q", buf, pos + 2)
            start = pos + 10
        if n > self.max_frame:
            raise ValueError(f"frame of {n} bytes is too big")
        if b1 & 0x80:
            start += 4
        end = start + n
        return (buf[pos], start, end) if end <= size else None


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and lower-cased headers (repeats joined with ", ") of an HTTP head."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key, text = name.strip().lower(), value.strip()
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return method, target, headers


def accept_token(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def _http_error(status: int, reason: str, message: str) -> bytes:
    body = orjson.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    )
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class EchoProtocol(asyncio.Protocol):
    """One echo connection: the upgrade, ``session.created``, then echo."""

    def __init__(self, server: EchoServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._reader: FrameReader | None = None
        self._parts: list[bytes] = []
        self._opcode = OP_TEXT
        self._size = 0
        self._closing = False
        self._session: dict[str, Any] = {}

    # --- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections -= 1

    def pause_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._reader is None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > MAX_HEAD_BYTES:
                    self._abort(
                        _http_error(431, "Request Header Fields Too Large", "Head too large")
                    )
                return
            rest = bytes(self._head[end + 4 :])
            head = bytes(self._head[: end + 4])
            self._head = bytearray()
            if not self._upgrade(head):
                return
            data = rest
            if not data:
                return
        assert self._reader is not None
        try:
            frames = self._reader.feed(data)
        except ValueError:
            self._close(1009, f"Exceeded maximum message size: {MAX_MESSAGE_BYTES} bytes")
            return
        for opcode, fin, payload in frames:
            if self._closing and opcode != OP_CLOSE:
                continue  # after our close frame only the peer's close matters
            if opcode >= OP_CLOSE:
                self._control(opcode, payload)
            elif opcode == OP_CONT or not fin or self._parts:
                self._fragment(opcode, fin, payload)
            else:
                self._message(opcode, payload)

    # --- handshake ------------------------------------------------------------------

    def _upgrade(self, head: bytes) -> bool:
        method, target, headers = parse_head(head)
        key = headers.get("sec-websocket-key", "")
        if method != "GET" or "websocket" not in headers.get("upgrade", "").lower() or not key:
            self._abort(_http_error(400, "Bad Request", "Expected a WebSocket upgrade"))
            return False
        path = target.split("?", 1)[0]
        if unquote(path).rstrip("/") != REALTIME_PATH:
            self._abort(_http_error(404, "Not Found", f"Invalid URL (GET {path})"))
            return False
        subprotocols = [
            p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()
        ]
        decision = negotiate(target, headers, subprotocols, key_is_valid=self.server.key_is_valid)
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_token(key)}",
        ]
        if decision.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {decision.subprotocol}")
        assert self.transport is not None
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._reader = FrameReader()
        self.server.accepted += 1
        if decision.rejection is not None:
            r = decision.rejection
            error = {
                "type": "error",
                "event_id": self.server.event_id(),
                "error": {
                    "type": "invalid_request_error",
                    "code": r.code,
                    "message": r.message,
                    "param": None,
                    "event_id": None,
                },
            }
            self._send(OP_TEXT, orjson.dumps(error))
            self._close(r.close_code, r.close_reason)
            return False
        self._session = self.server.base_session(decision.model or "gpt-realtime")
        created = {
            "type": "session.created",
            "event_id": self.server.event_id(),
            "session": self._session,
        }
        self._send(OP_TEXT, orjson.dumps(created))
        return True

    # --- messages -------------------------------------------------------------------

    def _fragment(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode != OP_CONT:
            if self._parts:
                self._close(1002, "expected a continuation frame")
                return
            self._opcode = opcode
        elif not self._parts:
            self._close(1002, "unexpected continuation frame")
            return
        self._parts.append(payload)
        self._size += len(payload)
        if self._size > MAX_MESSAGE_BYTES:
            self._close(1009, f"Exceeded maximum message size: {MAX_MESSAGE_BYTES} bytes")
            return
        if fin:
            message = b"".join(self._parts)
            self._parts, self._size = [], 0
            self._message(self._opcode, message)

    def _message(self, opcode: int, payload: bytes) -> None:
        self.server.messages += 1
        if opcode == OP_TEXT:
            played = as_output_audio(payload)
            if played is not None:
                self._send(OP_TEXT, played)
                return
            sniff = payload if len(payload) < SNIFF_WHOLE_BELOW else payload[:SNIFF_BYTES]
            if _SESSION_UPDATE in sniff and self._session_update(payload):
                return
        self._send(opcode, payload)

    def _session_update(self, payload: bytes) -> bool:
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(event, dict) or event.get("type") != "session.update":
            return False
        session = event.get("session")
        if isinstance(session, dict):
            self._session = {**self._session, **session}
        updated = {
            "type": "session.updated",
            "event_id": self.server.event_id(),
            "session": self._session,
        }
        self._send(OP_TEXT, orjson.dumps(updated))
        return True

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self._send(OP_PONG, payload)
        elif opcode == OP_CLOSE:
            assert self.transport is not None
            if not self._closing:
                self._closing = True
                self.transport.write(frame(OP_CLOSE, payload[:2]))
            self.transport.close()

    # --- sending --------------------------------------------------------------------

    def _send(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not transport.is_closing():  # a client that reset: drop, do not log each write
            transport.writelines((frame_head(opcode, len(payload)), payload))  # (no joined copy)

    def _close(self, code: int, reason: str) -> None:
        """Send our close frame; the client's answer (or its leaving) ends the connection."""
        if not self._closing:
            self._closing = True
            self._send(OP_CLOSE, close_payload(code, reason))

    def _abort(self, response: bytes) -> None:
        assert self.transport is not None
        self.transport.write(response)
        self.transport.close()


class EchoServer:
    """Settings and counters shared by the connections of one echo server."""

    def __init__(self, api_keys: frozenset[str] = frozenset()) -> None:
        self.api_keys = api_keys
        self.connections = 0
        """Open TCP connections."""
        self.accepted = 0
        """WebSocket upgrades answered with 101."""
        self.messages = 0
        """Client data messages received."""
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    def key_is_valid(self, key: str) -> bool:
        return key in self.api_keys if self.api_keys else bool(key)

    def event_id(self) -> str:
        return f"event_echo{self._prefix}{next(self._ids)}"

    def base_session(self, model: str) -> dict[str, Any]:
        pcm = {"type": "audio/pcm", "rate": 24000}
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": f"sess_echo{self._prefix}{next(self._ids)}",
            "model": model,
            "output_modalities": ["audio"],
            "instructions": "",
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": "inf",
            "audio": {
                "input": {"format": pcm, "turn_detection": None, "transcription": None},
                "output": {"format": pcm, "voice": "alloy", "speed": 1.0},
            },
        }

    def protocol(self) -> EchoProtocol:
        return EchoProtocol(self)


async def serve_echo(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_keys: frozenset[str] = frozenset(),
    started: Callable[[EchoServer, int], None] | None = None,
    stop: asyncio.Event | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve the echo upstream until ``stop`` is set (or forever); ``started(server, port)``.
    With ``ssl_context`` (a server context holding a certificate) it serves wss://."""
    loop = asyncio.get_running_loop()
    state = EchoServer(api_keys)
    server = await loop.create_server(
        state.protocol, host, port, backlog=4096, ssl=ssl_context
    )
    bound = server.sockets[0].getsockname()[1]
    if started is not None:
        started(state, bound)
    try:
        if stop is None:
            await asyncio.Future()
        else:
            await stop.wait()
    finally:
        server.close()
