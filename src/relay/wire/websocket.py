"""One WebSocket connection over a Trio stream, for both legs of a pair.

The relay's two WebSockets carry every audio chunk, so this is a lean I/O shell
around :mod:`relay.wire.frames`:

* **No reader task.** The task that wants the next message reads the stream
  itself, so a message costs no task switch and no channel. Pings are answered
  and pongs noted as they are read. One task reads at a time; :meth:`aclose`
  waits for that task to see the peer's close reply rather than reading beside it.
* **Plain sockets skip Trio's stream layer.** On a :class:`trio.SocketStream` the
  socket is read and written directly while it has data or room, and Trio is
  asked to wait only when it has not (``wait_readable``/``wait_writable``).
  A task that never has to wait still reaches a checkpoint every
  :data:`CHECKPOINT_EVERY` reads, so it can be cancelled and others run. So does the
  relay's own TLS over a socket (:class:`relay.wire.tls.TLSSocketStream`, the upstream leg
  to ``wss://``): what is read is decrypted, what is written encrypted, in the same
  places. Other streams (Trio's TLS, in-memory ones) go through their ordinary
  ``receive_some``/``send_all``.
* **Send timeout.** A write that cannot finish within :attr:`send_timeout` raises
  ``trio.TooSlowError``. The deadline is set only when a write has to wait.
* **A write cut part-way breaks the connection.** After that, a close frame would
  be garbage, so the socket is dropped instead.

Errors use trio-websocket's types (:class:`~trio_websocket.ConnectionClosed` with
a :class:`~trio_websocket.CloseReason`), so code written against it reads the same.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import math
import os
import socket
import ssl
import sys
import termios

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

from . import frames
from .frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Close, Ping, Pong, ProtocolError
from .tls import TLSSocketStream

#: Bytes asked of the socket per read: several 6.5 KB audio events when they queue up.
RECEIVE_BYTES = 64 * 1024
#: Reads in a row that found data at once before the reading task yields to others.
CHECKPOINT_EVERY = 16
#: The largest handshake response head or refusal body the relay reads from an upstream.
MAX_HANDSHAKE_BYTES = 64 * 1024

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class _Marker:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: :meth:`WebSocket.poll`: a control frame, the connection's end or a protocol error is next.
HELD = _Marker("HELD")
#: :meth:`WebSocket.send_now`: part of the message was written; :meth:`WebSocket.finish_send`.
PART = _Marker("PART")
_EOF = _Marker("EOF")
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError)


class HandshakeFailed(OSError):
    """The upstream answered the WebSocket handshake with something that is not one."""


class WebSocket:
    """A WebSocket over ``stream``; ``client`` is True for the end that dialled (it masks).

    :attr:`last_heard` is when the peer last sent anything (pongs included), for a
    caller that reaps silent peers: a clock read per read costs less than a deadline.
    """

    __slots__ = (
        "_stream",
        "_sock",
        "_tls",
        "_client",
        "_reader",
        "_writing",
        "_write_queue",
        "_broken",
        "_close_sent",
        "_closed",
        "_reading",
        "_reader_left",
        "_close_seen",
        "_pings",
        "_streak",
        "_held",
        "_maybe_more",
        "_hangup",
        "_woken_at",
        "_pending",
        "_clock",
        "last_heard",
        "subprotocol",
        "send_timeout",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        max_message_bytes: int,
        buffered: bytes = b"",
        subprotocol: str | None = None,
    ) -> None:
        self._stream = stream
        self._sock = _raw_socket(stream)
        self._tls = stream if isinstance(stream, TLSSocketStream) else None
        self._client = client
        self._reader = frames.FrameReader(masked=not client, max_message_bytes=max_message_bytes)
        if self._tls is not None:  # decrypted past the HTTP upgrade: no read brings it again
            buffered += self._tls.take_buffered()
        if buffered:
            self._reader.feed(buffered)
        self._writing = False  # a write is under way (frames must not interleave)
        # What waits is made by the first to wait: a lot, an event or a dict is memory on
        # every idle connection, and most connections never wait for any of them.
        self._write_queue: trio.lowlevel.ParkingLot | None = None  # writers waiting for it
        self._broken = False  # a write was cut part-way
        self._close_sent = False
        self._closed: CloseReason | None = None
        self._reading = False
        #: Who waits for the reader to leave or the close to be seen (each checks again).
        self._reader_left: trio.lowlevel.ParkingLot | None = None
        self._close_seen = False  # the peer's side is over (its close, its end, or ours failed)
        self._pings: dict[bytes, trio.Event] | None = None  # pongs awaited, by payload
        self._streak = 0
        self._held: frames.Event | ProtocolError | _Marker | None = None  # poll() stopped at it
        self._maybe_more = True  # the socket may have unread bytes (poll() reads only then)
        self._hangup = True  # the peer's end may be queued too: read on to EAGAIN or EOF
        self._woken_at = 0.0  # Trio time poll() was last given the turn or an edge (see readable)
        self._pending: tuple[bytes, int] | None = None  # send_now()'s unwritten rest
        self._clock = trio.lowlevel.current_clock()  # shared, see relay.server.pair.Pair._clock
        #: Trio time the peer last sent anything.
        self.last_heard = self._clock.current_time()
        self.subprotocol = subprotocol
        #: Seconds one write may take (0: no limit); past it, trio.TooSlowError.
        self.send_timeout = 0.0

    @property
    def closed(self) -> CloseReason | None:
        """Why the connection closed (or is closing), or None while it is open."""
        return self._closed

    @property
    def writing(self) -> bool:
        """Whether a write is under way (waiting for the peer to take it, as a rule)."""
        return self._writing

    def unread(self) -> int:
        """Bytes the peer sent that no message has been made of yet: in the OS's receive
        buffer (plain sockets only) and in the frame reader."""
        queued = 0
        if self._sock is not None:
            try:
                queued = int.from_bytes(
                    fcntl.ioctl(self._sock.fileno(), termios.FIONREAD, b"\0\0\0\0"), sys.byteorder
                )
            except OSError:
                pass  # closed meanwhile
        return queued + self._reader.buffered

    @property
    def broken(self) -> bool:
        """Whether a write was cut part-way (the peer may have seen half a frame)."""
        return self._broken

    # -- reading ------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next text (str) or binary (bytes) message.

        Raises :class:`ConnectionClosed` once the peer closed (its close is answered),
        the connection dropped (1006), the peer broke the protocol (the relay closes
        with the code RFC 6455 gives), or the connection was closed here.
        """
        if self._reading:
            if not self._close_sent:
                raise trio.BusyResourceError("another task is already reading this WebSocket")
            while not self._close_seen:  # aclose is reading for the peer's close reply
                await self._wait_reader_left()
            raise ConnectionClosed(self._closed)
        self._reading = True
        try:
            while True:
                event = await self._next_event()
                cls = event.__class__
                if cls is str or cls is bytes:
                    return event  # type: ignore[return-value]
                await self._control(event)  # type: ignore[arg-type]
        finally:
            self._reading = False
            if self._reader_left:
                self._reader_left.unpark_all()

    async def _next_event(self) -> frames.Event:
        reader = self._reader
        while True:
            if self._closed is not None and self._close_seen:
                raise ConnectionClosed(self._closed)
            held = self._held
            if held is not None:
                self._held = None
                if held is _EOF:
                    self._lost()
                    raise ConnectionClosed(self._closed)
                if held.__class__ is ProtocolError:
                    await self._fail(held.code, held.reason)  # type: ignore[union-attr]
                    raise ConnectionClosed(self._closed)
                return held  # type: ignore[return-value]
            try:
                event = reader.next()
            except ProtocolError as exc:
                await self._fail(exc.code, exc.reason)
                raise ConnectionClosed(self._closed) from None
            if event is not None:
                return event
            data = await self._receive()
            if not data:
                self._lost()
                raise ConnectionClosed(self._closed)
            reader.feed(data)

    async def _control(self, event: Close | Ping | Pong) -> None:
        cls = event.__class__
        if cls is Ping:
            if not self._close_sent:
                try:
                    await self._write(frames.frame(OP_PONG, event.payload, mask=self._client))  # type: ignore[union-attr]
                except _GONE:
                    pass  # the read that follows sees the connection end
        elif cls is Pong:
            pings = self._pings
            if pings is not None:
                waiter = pings.pop(event.payload, None)  # type: ignore[union-attr]
                if not pings:
                    self._pings = None
                if waiter is not None:
                    waiter.set()
        else:
            close: Close = event  # type: ignore[assignment]
            if self._closed is None:
                self._closed = CloseReason(close.code, close.reason or None)
            reply = b"" if close.code == 1005 else frames.close_payload(close.code, close.reason)
            await self._write_close(reply)
            self._ended()
            raise ConnectionClosed(self._closed)

    async def _receive(self) -> bytes:
        """Bytes from the peer; b"" once it is gone (EOF, reset, closed here, peer timeout)."""
        sock = self._sock
        if sock is None:
            try:
                data = await self._stream.receive_some(RECEIVE_BYTES)
            except _GONE:
                return b""
            self.last_heard = self._clock.current_time()
            return data  # type: ignore[return-value]
        self._streak += 1
        if self._streak >= CHECKPOINT_EVERY:
            self._streak = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(RECEIVE_BYTES)
            except BlockingIOError:
                pass
            except OSError:
                return b""
            else:
                self.last_heard = self._clock.current_time()
                if self._tls is None or not data:
                    return data
                try:
                    data = self._tls.decrypt(data)
                except ssl.SSLError:  # not a genuine record: the connection is lost
                    return b""
                if data:
                    return data
                continue  # no whole record of data yet (or a session ticket): read on
            self._streak = 0
            try:
                await trio.lowlevel.wait_readable(sock)
            except _GONE:
                return b""

    def _lost(self) -> None:
        if self._closed is None:
            self._closed = CloseReason(1006, None)
        self._ended()

    def _ended(self) -> None:
        """The peer's side is over: wake whoever waits for the close or for a pong."""
        self._close_seen = True
        if self._reader_left:
            self._reader_left.unpark_all()
        pings, self._pings = self._pings, None
        if pings is not None:
            for waiter in pings.values():
                waiter.set()

    async def _fail(self, code: int, reason: str) -> None:
        """The peer broke the protocol: close with ``code`` and stop reading."""
        if self._closed is None:
            self._closed = CloseReason(code, reason)
        await self._write_close(frames.close_payload(code, reason))
        self._ended()

    # -- writing ------------------------------------------------------------------

    async def send_message(self, message: str | bytes) -> None:
        """Send one text (str) or binary (bytes) message.

        Raises :class:`ConnectionClosed` if the connection is closed or closing, and
        ``trio.TooSlowError`` past :attr:`send_timeout`. Cut part-way (timeout or
        cancel), the connection is broken (:attr:`broken`).
        """
        if self._close_sent or self._closed is not None:
            raise ConnectionClosed(self._closed or CloseReason(1006, None))
        try:
            await self._write(self._frame(message))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()
            raise ConnectionClosed(self._closed) from None

    def _frame(self, message: str | bytes) -> bytes:
        if message.__class__ is str:
            return frames.frame(OP_TEXT, message.encode(), mask=self._client)  # type: ignore[union-attr]
        return frames.frame(OP_BINARY, message, mask=self._client)  # type: ignore[arg-type]

    # -- for relay.wire.pump: reading and writing without waiting ----------------------

    @property
    def pumpable(self) -> bool:
        """Whether :mod:`relay.wire.pump` can move this connection's messages (a plain socket, or
        the relay's own TLS over one)."""
        return self._sock is not None

    @property
    def reader(self) -> frames.FrameReader:
        """The connection's frame reader (for :attr:`~relay.wire.frames.FrameReader.frame`)."""
        return self._reader

    def fileno(self) -> int:
        """The socket's file descriptor (-1 once closed, or for a stream that is not a socket)."""
        return self._sock.fileno() if self._sock is not None else -1

    def hold_reading(self) -> bool:
        """Take the reading turn for :meth:`poll` (False, and nothing taken, if a task reads)."""
        if self._reading:
            return False
        self._reading = True
        self._maybe_more = self._hangup = True  # whatever came meanwhile, its edge is gone
        self._woken_at = self._clock.current_time()
        return True

    def release_reading(self) -> None:
        """Give the reading turn back (a close waiting for it may now read)."""
        self._reading = False
        if self._reader_left:
            self._reader_left.unpark_all()

    def readable(self, hangup: bool, now: float) -> None:
        """The socket has new bytes (an edge the pump's epoll saw at Trio time ``now``: what
        :attr:`last_heard` becomes when :meth:`poll` reads them, a clock read per round of the
        pump rather than per read); ``hangup``: and the peer's end (or an error) is among them."""
        self._maybe_more = True
        self._woken_at = now
        if hangup:
            self._hangup = True

    def poll(self) -> str | bytes | _Marker | None:
        """The next message if it is here now, without waiting; the caller holds the reading turn.

        None: nothing until the socket is readable again. :data:`HELD`: a control frame, the
        connection's end or a protocol error comes next; the next :meth:`get_message` deals
        with it, as if it had read it itself.
        """
        if self._held is not None or self._closed is not None:
            return HELD
        reader = self._reader
        while True:
            if reader.buf:  # (else there is nothing to parse: skip the call)
                try:
                    event = reader.next()
                except ProtocolError as exc:
                    self._held = exc
                    return HELD
                if event is not None:
                    cls = event.__class__
                    if cls is str or cls is bytes:
                        return event  # type: ignore[return-value]
                    self._held = event
                    return HELD
            if not self._maybe_more:
                return None
            try:
                data = self._sock.recv(RECEIVE_BYTES)  # type: ignore[union-attr]
            except BlockingIOError:
                self._maybe_more = self._hangup = False
                return None
            except OSError:
                data = b""
            if not data:
                self._held = _EOF
                return HELD
            # A short read emptied the socket of data, so whatever comes next raises a new edge;
            # but an end that came with the data raised its edge already: read on to see it.
            self._maybe_more = len(data) == RECEIVE_BYTES or self._hangup
            self.last_heard = self._woken_at
            if self._tls is not None:
                try:
                    data = self._tls.decrypt(data)
                except ssl.SSLError:
                    self._held = _EOF
                    return HELD
                if not data:
                    continue
            reader.feed(data)

    def send_now(
        self, message: str | bytes, frame: bytes | memoryview | None = None
    ) -> bool | _Marker:
        """Write ``message`` as far as the socket takes it now. True: all of it. False: none
        (send it with :meth:`send_message`). :data:`PART`: some; :meth:`finish_send` must
        follow, and no one else writes until it has. ``frame``: ``message`` as one unmasked
        frame already (another connection's :attr:`FrameReader.frame`), written as it is
        where this side does not mask."""
        sock = self._sock
        if self._writing or self._close_sent or self._closed is not None or sock is None:
            return False
        data = frame if frame is not None and not self._client else self._frame(message)
        if self._tls is not None:
            try:
                data = self._tls.encrypt(data)
            except ssl.SSLError:
                return False  # send_message meets the same error and reports it
        try:
            sent = sock.send(data)
        except OSError:  # no room at all, or an error that send_message reports properly
            if self._tls is None:
                return False
            sent = 0  # encrypted already: these records must go out as they are, next
        if sent == len(data):
            return True
        self._writing = True
        self._pending = (data, sent)
        return PART

    async def finish_send(self) -> None:
        """Write what :meth:`send_now` left; raises as :meth:`send_message` does."""
        assert self._pending is not None, "finish_send() without a part-sent message"
        data, sent = self._pending
        self._pending = None
        try:
            await self._write_held(data, sent)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._lost()
            raise ConnectionClosed(self._closed) from None

    # -- control ------------------------------------------------------------------

    async def ping(self) -> None:
        """Send a ping and wait for its pong. Raises :class:`ConnectionClosed` if the
        connection ends first. The pong is read by the task reading messages."""
        if self._close_sent or self._closed is not None:
            raise ConnectionClosed(self._closed or CloseReason(1006, None))
        payload = os.urandom(4)
        if self._pings is None:
            self._pings = {}
        answered = self._pings[payload] = trio.Event()
        try:
            await self._write(frames.frame(OP_PING, payload, mask=self._client))
        except _GONE:
            self._lost()
        await answered.wait()
        if self._closed is not None:
            raise ConnectionClosed(self._closed)

    async def send_ping(self) -> None:
        """Send a ping and return at once (keepalive; any data from the peer counts).

        Skipped while another write is under way: traffic keeps the connection alive.
        Raises ``trio.TooSlowError`` past :attr:`send_timeout`.
        """
        if self._close_sent or self._closed is not None or self._writing:
            return
        try:
            await self._write(frames.frame(OP_PING, b"", mask=self._client))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send_close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once) and return; see :meth:`aclose` to also wait for the reply."""
        if self._close_sent or self._broken:
            return
        if self._closed is None:
            self._closed = CloseReason(code, reason or None)
        if not await self._write_close(frames.close_payload(code, reason)):
            self._lost()

    async def _write_close(self, payload: bytes) -> bool:
        """Send our close frame: once, and never after a write cut part-way (the peer would
        read it as the rest of the half frame). False if the peer is gone."""
        if self._close_sent or self._broken:
            return True
        self._close_sent = True
        try:
            await self._write(frames.frame(OP_CLOSE, payload, mask=self._client))
        except _GONE:
            return False
        return True

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Close: our close frame, the peer's reply (or its end), then the stream.

        Bound it with a timeout; cancelled, the stream is closed all the same.
        """
        try:
            if self._broken:
                return
            await self.send_close(code, reason or "")
            await self.wait_closed()
        finally:
            await trio.aclose_forcefully(self._stream)

    async def wait_closed(self) -> None:
        """Wait until the peer answered our close frame or went away, discarding its messages.

        While another task is reading, that task sees the reply; if it stops reading first
        (it took a message and went on with it), this one reads on in its place.
        """
        while not self._close_seen:
            if self._reading:
                await self._wait_reader_left()  # woken when the close is seen or the reader goes
                continue
            self._reading = True
            try:
                event = await self._next_event()
            except ConnectionClosed:
                return
            finally:
                self._reading = False
            if event.__class__ is Close:
                self._ended()

    async def _wait_reader_left(self) -> None:
        """Park until the reader leaves or the close is seen (the caller checks which)."""
        if self._reader_left is None:
            self._reader_left = trio.lowlevel.ParkingLot()
        await self._reader_left.park()

    async def _write(self, data: bytes) -> None:
        """Write ``data`` whole, one writer at a time (Broken- or ClosedResourceError if not)."""
        while self._writing:  # uncontended, this costs nothing: the usual case
            if self._write_queue is None:
                self._write_queue = trio.lowlevel.ParkingLot()
            await self._write_queue.park()
        if self._broken:  # an earlier write (maybe the one this waited behind) was cut part-way
            raise trio.BrokenResourceError("an earlier write was cut part-way")
        if self._tls is not None:  # encrypted in the order written: only with the turn
            try:
                data = self._tls.encrypt(data)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
        self._writing = True
        await self._write_held(data, 0)

    async def _write_held(self, data: bytes, sent: int) -> None:
        """Write ``data`` from ``sent`` on, this task holding the write turn; give it up after."""
        try:
            sock = self._sock
            timeout = self.send_timeout or math.inf
            if sock is None:
                try:
                    with trio.move_on_after(timeout) as waited:
                        await self._stream.send_all(data)
                except BaseException:
                    self._broken = True
                    raise
                if waited.cancelled_caught:
                    self._broken = True
                    raise trio.TooSlowError
                return
            view = memoryview(data)
            total = len(data)
            deadline = 0.0
            # Records encrypted and not all sent: the next record would not decrypt either.
            made = self._tls is not None
            while True:
                try:
                    sent += sock.send(view[sent:] if sent else view)
                except BlockingIOError:
                    pass
                except OSError as exc:
                    if sent or made:
                        self._broken = True
                    raise trio.BrokenResourceError(str(exc)) from exc
                if sent >= total:
                    return
                if not deadline:
                    deadline = trio.current_time() + timeout
                try:
                    with trio.CancelScope(deadline=deadline) as waited:
                        await trio.lowlevel.wait_writable(sock)
                except BaseException:
                    if sent or made:
                        self._broken = True
                    raise
                if waited.cancelled_caught:
                    if sent or made:
                        self._broken = True
                    raise trio.TooSlowError
        finally:
            self._writing = False
            if self._write_queue:
                self._write_queue.unpark()


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The non-blocking OS socket under a plain :class:`trio.SocketStream` (or under the
    relay's own TLS over one), else None."""
    if isinstance(stream, TLSSocketStream):
        stream = stream.transport
    if stream.__class__ is not trio.SocketStream:
        return None
    raw = getattr(stream.socket, "_sock", None)  # trio's socket wraps a stdlib one
    return raw if isinstance(raw, socket.socket) else None


def accept_key(key: bytes) -> bytes:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


async def connect(
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    subprotocols: tuple[str, ...] | None,
    headers: tuple[tuple[bytes, bytes], ...],
    max_message_bytes: int,
) -> WebSocket:
    """Open a WebSocket over a connected ``stream`` (the client's handshake).

    Raises :class:`~trio_websocket.ConnectionRejected` (with the status, headers and
    body) if the server answers with anything but 101, :class:`HandshakeFailed` if the
    answer is not a valid WebSocket handshake, and trio.BrokenResourceError if the
    connection drops.
    """
    key = base64.b64encode(os.urandom(16))
    lines = [
        b"GET " + resource.encode() + b" HTTP/1.1",
        b"Host: " + host.encode(),
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + key,
        b"Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(b"Sec-WebSocket-Protocol: " + ", ".join(subprotocols).encode())
    lines.extend(name + b": " + value for name, value in headers)
    await stream.send_all(b"\r\n".join(lines) + b"\r\n\r\n")
    buffer = bytearray()
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if len(buffer) > MAX_HANDSHAKE_BYTES:
            raise HandshakeFailed("the upstream's handshake response is too long")
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            raise trio.BrokenResourceError(
                "the upstream closed the connection during the handshake"
            )
        buffer += data
    status, response_headers = _parse_head(bytes(buffer[:end]))
    rest = bytes(buffer[end + 4 :])
    if status != 101:
        raise ConnectionRejected(
            status, response_headers, await _body(stream, response_headers, rest)
        )
    found = dict(response_headers)
    if found.get(b"sec-websocket-accept") != accept_key(key):
        raise HandshakeFailed("the upstream's Sec-WebSocket-Accept does not match the key sent")
    if found.get(b"sec-websocket-extensions"):
        raise HandshakeFailed("the upstream selected an extension the relay did not offer")
    chosen = found.get(b"sec-websocket-protocol")
    subprotocol = chosen.decode("latin-1") if chosen else None
    if subprotocol is not None and subprotocol not in (subprotocols or ()):
        raise HandshakeFailed("the upstream selected a subprotocol the relay did not offer")
    return WebSocket(
        stream,
        client=True,
        max_message_bytes=max_message_bytes,
        buffered=rest,
        subprotocol=subprotocol,
    )


def _parse_head(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    status_line, *header_lines = head.split(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise HandshakeFailed("the upstream's answer is not HTTP")
    headers = []
    for line in header_lines:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HandshakeFailed("a malformed header in the upstream's handshake response")
        headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers


async def _body(stream: trio.abc.Stream, headers: list[tuple[bytes, bytes]], rest: bytes) -> bytes:
    """A refusal's body, as far as Content-Length says and at most MAX_HANDSHAKE_BYTES."""
    length = next((value for name, value in headers if name == b"content-length"), None)
    want = min(int(length), MAX_HANDSHAKE_BYTES) if length and length.isdigit() else 0
    body = bytearray(rest)
    with trio.move_on_after(1.0):
        while len(body) < want:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                break
            body += data
    return bytes(body[:want])
