"""The load generator's WebSocket client: an ``asyncio.Protocol`` with a minimal framer.

No WebSocket library: each message costs one header, one C mask (``websockets.speedups``
when installed) and one ``transport.writelines``; received frames are cut by
:class:`mockrealtime.echo.FrameReader`. Echoes are matched by the ``event_id`` the client
put near the front of each message (``"b<seq>.<send ns>"``), so the 6 KB audio JSON is
never parsed.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random
import ssl as ssl_module
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import orjson

from mockrealtime.echo import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    apply_mask,
    frame_head,
)

_ID_MARK = b'"event_id":"b'
_random_bytes = random.Random(os.getpid()).randbytes


def _mask_keys() -> Iterator[bytes]:
    """Masking keys, cut 1,024 at a time from one draw (a draw per frame cost a third of
    what masking the frame does)."""
    while True:
        pool = _random_bytes(4096)
        yield from [pool[at : at + 4] for at in range(0, 4096, 4)]


_next_key = _mask_keys().__next__

#: A streamed audio event: type first (as the SDKs write it, and the relay reads it), then the
#: id the echo comes back with, ``b<seq>.<send ns>`` in fixed widths (read back by position).
AUDIO_HEAD = b'{"type":"input_audio_buffer.append","event_id":"b%010d.%020d","audio":"'
_AUDIO_TAIL = b'"}'
_SEQ_AT = len(_ID_MARK)
_SENT_AT = _SEQ_AT + 11


class AudioFrames:
    """The stream's audio events as masked frames, each chunk of ``pool`` masked once up front
    under a key of its own: a message masks only its head (~90 bytes, the id) and hands three
    pieces to ``writelines``, where masking and copying 6.5 KB per message cost the generator
    about a tenth of its CPU. The relay still unmasks every byte. (Reusing a key per chunk only
    matters to a browser's script; no one reads these frames on the way.)"""

    def __init__(self, pool: list[bytes]) -> None:
        head_size = len(AUDIO_HEAD % (0, 0))
        turn = head_size % 4  # the key as it stands where the audio starts
        self._keys = [_next_key() for _ in pool]
        self._headers: list[bytes] = []
        self._tails: list[bytes] = []
        for audio, key in zip(pool, self._keys, strict=True):
            tail = audio + _AUDIO_TAIL
            self._tails.append(apply_mask(tail, key[turn:] + key[:turn]))
            self._headers.append(frame_head(OP_TEXT, head_size + len(tail), key))

    def __len__(self) -> int:
        return len(self._keys)

    def pieces(self, chunk: int, seq: int, sent_ns: int) -> tuple[bytes, bytes, bytes]:
        """Frame header, masked head, masked audio of event ``seq`` carrying ``chunk``."""
        head = apply_mask(AUDIO_HEAD % (seq, sent_ns), self._keys[chunk])
        return self._headers[chunk], head, self._tails[chunk]


@dataclass
class StreamStats:
    """What one session saw of its echoed stream."""

    sent: int = 0
    received: int = 0
    out_of_order: int = 0
    last_seq: int = -1
    rtts_us: list[int] = field(default_factory=list)
    counted_from: int = 1 << 62
    """Sequence numbers below this are warm-up: echoed but not counted."""


class Client(asyncio.Protocol):
    """One WebSocket session to the relay or straight to the echo upstream."""

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.host, self.port, self.path, self.headers = host, port, path, headers
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.close_reason = ""
        self.upgraded = False
        self._head = bytearray()
        self._reader = FrameReader()
        self._parts: list[bytes] = []
        self.on_message: Callable[[bytes], None] = self._handshake_message
        self.stream = StreamStats()
        self.waiter: asyncio.Future[bytes] | None = None

    # --- asyncio ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{k}: {v}" for k, v in self.headers.items()),
        ]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"closed before ready ({self.close_code})"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("closed"))

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._head[:12])
            data = bytes(self._head[end + 4 :])
            self._head = bytearray()
            if not status.startswith(b"HTTP/1.1 101"):
                self.close_reason = status.decode(errors="replace")
                if not self.ready.done():
                    self.ready.set_exception(ConnectionError(f"refused: {self.close_reason}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
        for opcode, fin, payload in self._reader.feed(data):
            if opcode == OP_TEXT or opcode == OP_BINARY or opcode == 0:
                if not fin or self._parts:
                    self._parts.append(payload)
                    if not fin:
                        continue
                    payload = b"".join(self._parts)
                    self._parts = []
                self.on_message(payload)
            elif opcode == OP_PING:
                self._write(OP_PONG, payload)
            elif opcode == OP_CLOSE:
                if len(payload) >= 2:
                    self.close_code = int.from_bytes(payload[:2], "big")
                    self.close_reason = payload[2:].decode(errors="replace")
                else:
                    self.close_code = 1005
                self._write(OP_CLOSE, payload[:2])
                assert self.transport is not None
                self.transport.close()
            elif opcode == OP_PONG:
                pass

    # --- sending ----------------------------------------------------------------------

    def _write(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            key = _next_key()
            self.transport.writelines(  # header and payload, not joined first: one copy less
                (frame_head(opcode, len(payload), key), apply_mask(payload, key))
            )

    def send(self, payload: bytes) -> None:
        self._write(OP_TEXT, payload)

    def send_audio(self, frames: AudioFrames, chunk: int, seq: int, sent_ns: int) -> None:
        """One streamed audio event (see :class:`AudioFrames`)."""
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.writelines(frames.pieces(chunk, seq, sent_ns))

    def close(self, code: int = 1000) -> None:
        self._write(OP_CLOSE, code.to_bytes(2, "big"))

    # --- receiving modes ----------------------------------------------------------------

    def _handshake_message(self, payload: bytes) -> None:
        try:
            kind = orjson.loads(payload).get("type")
        except orjson.JSONDecodeError:
            return
        if self.ready.done():
            return
        if kind == "error":
            self.ready.set_exception(ConnectionError(f"error event: {payload[:200]!r}"))
        elif kind == "session.created":  # through the relay, its session is in effect by then
            self.ready.set_result(None)

    def request_mode(self) -> None:
        """Each message resolves ``waiter`` (for sequential round trips)."""
        self.on_message = self._request_message

    def _request_message(self, payload: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(payload)

    def stream_mode(self) -> None:
        """Echoes are matched by the ``event_id`` prefix; their round trip is recorded."""
        self.on_message = self._stream_message

    def _stream_message(self, payload: bytes) -> None:
        now = time.perf_counter_ns()
        at = payload.find(_ID_MARK, 0, 96)
        if at < 0:
            return
        seq = int(payload[at + _SEQ_AT : at + _SEQ_AT + 10])
        s = self.stream
        if seq < s.last_seq:
            s.out_of_order += 1
        else:
            s.last_seq = seq
        if seq >= s.counted_from:
            s.received += 1
            s.rtts_us.append((now - int(payload[at + _SENT_AT : at + _SENT_AT + 20])) // 1000)


async def open_client(
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    *,
    within: float = 15.0,
    ssl: ssl_module.SSLContext | None = None,
) -> Client:
    """A connected session whose ``session.created`` arrived."""
    loop = asyncio.get_running_loop()
    client: Client | None = None

    def factory() -> Client:
        nonlocal client
        client = Client(host, port, path, headers)
        return client

    async with asyncio.timeout(within):
        await loop.create_connection(factory, host, port, ssl=ssl)
        assert client is not None
        try:
            await client.ready
        except BaseException:
            if client.transport is not None:
                client.transport.abort()
            raise
    return client
