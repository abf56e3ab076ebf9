"""The thin Trio shell around ``Session``: TCP, HTTP (h11) and WebSocket (wsproto).

One listening port serves both the WebSocket endpoint ``/v1/realtime`` and plain
HTTP (the REST endpoints). The shell owns the TCP stream directly, without a
WebSocket library in between, so fault injection can stall reading, delay
writes or drop the TCP connection without a close frame.

Per WebSocket connection there is one nursery with:

- a reader task that is *always* reading the socket (so pings and close frames
  are answered however slow the writer is) and feeds each message to the session;
- a ticker task that wakes at ``session.next_deadline()`` for paced reply audio;
- a writer task that serializes and sends events from an unbounded queue, in order;
- an optional pinger (the real server pings every ~20 s).

Cancelling ``serve_mock_realtime`` cancels every connection; clients then see the
TCP connection end without a close frame.
"""

from __future__ import annotations

import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import h11
import orjson
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from .calls import HttpReply, MockCall, SidebandSession, handle_call_request, is_call_route
from .faults import FAULTS_HEADER, Faults, parse_faults
from .handshake import negotiate
from .ids import IdFactory
from .rest import RestStore, handle_rest
from .session import Event, Session
from .sessionconfig import SessionConfig
from .webhooks import delivery, incoming_call_event, sip_headers

if TYPE_CHECKING:
    from .media import MediaLoop

logger = logging.getLogger("mockrealtime")

MAX_HEAD_BYTES: Final = 64 * 1024
MAX_BODY_BYTES: Final = 1024 * 1024
HEAD_TIMEOUT: Final = 30.0
CLOSE_TIMEOUT: Final = 5.0
"""How long to wait for the client's close frame after sending ours."""
RECEIVE_BYTES: Final = 65536
WRITE_BATCH_EVENTS: Final = 64
MAX_QUEUED_EVENTS: Final = 50_000
"""A client that lets this many events pile up unread is dropped (memory stays bounded)."""
"""At most this many queued events are framed into one socket write."""
REALTIME_PATH: Final = "/v1/realtime"


@dataclass(frozen=True)
class MockConfig:
    """Settings of one fake server. Frozen: a server's behaviour is fixed at start.

    ``api_keys`` empty means any non-empty key is accepted (except ``ek_`` keys, which
    must have been minted by this server and not be expired). ``pace`` streams reply
    audio at N× real time (0 → as fast as possible). ``record_messages`` keeps every
    raw client message in ``ConnectionRecord.received`` (turn it off for load tests).
    ``wall_clock`` gives Unix time for ``expires_at`` and ephemeral-key expiry.
    ``response_delay`` is the model's thinking time before the first delta of each
    response; ``obfuscation`` adds the GA ``obfuscation`` field to delta events;
    ``reply_sentences`` sets how long replies are (filler sentences after the lead).
    ``webhook_secret`` (``whsec_…``) signs the webhooks of incoming SIP calls;
    ``webrtc_media`` answers a real browser's SDP offer with real media (needs aiortc:
    ``mockrealtime[media]``; otherwise, or off, calls get a stand-in answer).
    """

    api_keys: frozenset[str] = frozenset()
    seed: int = 0
    pace: float = 4.0
    reject_beta: bool = False
    faults: Faults = Faults()
    max_session_seconds: float = 3600.0
    ping_interval: float | None = 20.0
    record_messages: bool = True
    max_message_size: int = 32 * 1024 * 1024
    wall_clock: Callable[[], float] = time.time
    response_delay: float = 0.0
    obfuscation: bool = False
    reply_sentences: int = 1
    webhook_secret: str = ""
    webrtc_media: bool = True

    def __post_init__(self) -> None:
        if not (self.pace >= 0 and math.isfinite(self.pace)):
            raise ValueError(f"pace must be a finite number >= 0, got {self.pace!r}")
        if not (self.response_delay >= 0 and math.isfinite(self.response_delay)):
            raise ValueError(f"response_delay must be >= 0 seconds, got {self.response_delay!r}")
        if not 0 <= self.reply_sentences <= 20:
            raise ValueError(f"reply_sentences must be 0-20, got {self.reply_sentences!r}")
        if self.max_session_seconds <= 0:
            raise ValueError("max_session_seconds must be > 0")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise ValueError("ping_interval must be > 0 or None")
        if not isinstance(self.api_keys, frozenset):
            object.__setattr__(self, "api_keys", frozenset(self.api_keys))


@dataclass(eq=False)
class ConnectionRecord:
    """What the server saw of one accepted WebSocket, for tests to inspect."""

    headers: dict[str, str]
    subprotocols: list[str]
    path: str
    dialect: str = "ga"
    selected_subprotocol: str | None = None
    call_id: str | None = None
    """The call this connection is a sideband of (``?call_id=``), else None."""
    received: list[str | bytes] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)
    close_code: int | None = None
    """Code of the close frame received from the client (None if none arrived)."""
    close_reason: str | None = None
    events_sent: int = 0
    sent_types: list[str] = field(default_factory=list)
    """Types of the server events sent, in order (only when recording)."""
    _conn: _Connection | None = field(default=None, repr=False)

    def _attach(self, conn: _Connection | None) -> None:
        self._conn = conn

    @property
    def live(self) -> bool:
        """True while the connection is being served (the test controls below work)."""
        return self._conn is not None

    def _live_conn(self) -> _Connection:
        if self._conn is None:
            raise RuntimeError("this connection has already ended")
        return self._conn

    def inject(self, event: dict[str, Any]) -> None:
        """Send an arbitrary server event now (after those already queued)."""
        self._live_conn()._send.send_nowait(("event", event))

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Close this connection from the server side with a close frame (code, reason)."""
        self._live_conn()._queue_close(code, reason)

    def drop(self) -> None:
        """Drop the TCP connection without a close frame, after the events already queued."""
        self._live_conn()._queue_drop()


class MockServer:
    """A running fake server: its address and what it has seen."""

    def __init__(
        self, config: MockConfig, host: str = "127.0.0.1", port: int = 0, *, tls: bool = False
    ) -> None:
        self.config = config
        self.host = host
        self.port = port
        self.url = f"{'wss' if tls else 'ws'}://{host}:{port}{REALTIME_PATH}"
        self.http_url = f"{'https' if tls else 'http'}://{host}:{port}"
        self.connections: list[ConnectionRecord] = []
        self.handshakes = 0
        """Every WebSocket upgrade request seen, including refused ones."""
        self.errors: list[BaseException] = []
        """Unexpected exceptions in connection handlers (a bug in the mock if non-empty)."""
        self.rest = RestStore()
        self._rng = random.Random(f"mockrealtime/{config.seed}/rest")
        self.calls: dict[str, MockCall] = {}
        """Every call by id (WebRTC and SIP, live or over), for tests to inspect and drive."""
        self._call_ids = IdFactory(random.Random(f"mockrealtime/{config.seed}/calls"))
        self._nursery: trio.Nursery | None = None
        self._media: MediaLoop | None = None
        #: Responses started so far over all connections (the ``kill_mid_response`` fault's count).
        self.responses_started = 0
        #: The faults of connections from now on (``config.faults`` at first; a test may change
        #: them between connections, e.g. to refuse the dial that follows a drop).
        self.faults = config.faults

    def close_all(self, code: int = 1001, reason: str = "server going away") -> None:
        """Close every live WebSocket with a close frame (after the events already queued)."""
        for record in self.connections:
            if record.live:
                record.close(code, reason)

    def key_is_valid(self, key: str) -> bool:
        """Accept configured keys (or any key if none configured) and unexpired ``ek_`` keys."""
        if key.startswith("ek_"):
            return self.rest.secret_is_valid(key, self.config.wall_clock())
        if not self.config.api_keys:
            return bool(key)
        return key in self.config.api_keys

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one already-connected byte stream (HTTP or WebSocket), then close it.

        ``serve_mock_realtime`` calls this per TCP connection; tests can call it with an
        in-memory stream (``trio.testing.memory_stream_pair``) to run the whole server,
        faults included, under ``MockClock`` without sockets.
        """
        await self._handle_stream(stream)

    def memory_stream(self, nursery: trio.Nursery) -> trio.abc.Stream:
        """A client-side in-memory stream to this server, served by a task in ``nursery``.

        For socket-free tests (e.g. under ``MockClock``): wrap it with trio-websocket's
        ``wrap_client_stream(nursery, stream, host, "/v1/realtime?model=...")``. The
        stream buffers without limit (``trio.testing.memory_stream_pair``).
        """
        client, server_side = trio.testing.memory_stream_pair()
        if self._nursery is None:
            self._nursery = nursery  # calls live on in it
        nursery.start_soon(self.serve_stream, server_side)
        return client

    # --- calls ------------------------------------------------------------------------

    def new_call(self, transport: Literal["webrtc", "sip"], model: str) -> MockCall:
        call = MockCall(self._call_ids.new("rtc", 32), transport, model)
        self.calls[call.id] = call
        return call

    def start_call(self, call: MockCall, config: SessionConfig) -> None:
        """Answer ``call`` with a session of ``config`` and keep it running."""
        if self._nursery is None:
            raise RuntimeError("calls need a running server (serve_mock_realtime or memory_stream)")
        call.activate(self._session(call.model, len(self.calls) + 100_000, preset=config))
        self._nursery.start_soon(call.run)
        if call.media is not None:
            self._nursery.start_soon(call.media.pump)

    async def ring(self, webhook_url: str, caller: str, callee: str) -> tuple[MockCall, int]:
        """A SIP call from ``caller`` rings: the signed ``realtime.call.incoming`` webhook is
        posted to ``webhook_url``. Returns the call and the webhook's HTTP status (0 if it
        could not be delivered); accept, reject and the sideband act on ``call.id``."""
        import httpx

        if not self.config.webhook_secret:
            raise RuntimeError("ringing a SIP call needs MockConfig.webhook_secret (whsec_…)")
        call = self.new_call("sip", "gpt-realtime")
        call.sip_headers = sip_headers(caller, callee, call.id)
        now = int(self.config.wall_clock())
        event = incoming_call_event(self._rng, call.id, call.sip_headers, now)
        body, headers = delivery(self.config.webhook_secret, self._rng, event, now)
        try:
            async with httpx.AsyncClient(timeout=10.0) as http:
                answer = await http.post(webhook_url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            logger.warning("mockrealtime: the SIP webhook to %s failed: %r", webhook_url, exc)
            return call, 0
        return call, answer.status_code

    def media_loop(self) -> MediaLoop:
        """aiortc's thread, started with the first call that has real media."""
        if self._media is None:
            from .media import MediaLoop

            self._media = MediaLoop(self.host)
        return self._media

    def _close_media(self) -> None:
        if self._media is not None:
            self._media.close()
            self._media = None

    def _session(
        self,
        model: str,
        index: int,
        *,
        dialect: Literal["ga", "beta"] = "ga",
        intent: str | None = None,
        preset: SessionConfig | None = None,
        faults: Faults | None = None,
    ) -> Session:
        return Session(
            dialect,
            model,
            trio.current_time,
            random.Random(f"mockrealtime/{self.config.seed}/{index}"),
            pace=self.config.pace,
            started_at=self.config.wall_clock(),
            max_duration=self.config.max_session_seconds,
            intent=intent,
            response_delay=self.config.response_delay,
            obfuscation=self.config.obfuscation,
            reply_sentences=self.config.reply_sentences,
            preset=preset,
            transcription_fails=(faults or self.config.faults).transcription_failure,
        )

    # --- TCP ------------------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        try:
            head = b""
            with trio.move_on_after(HEAD_TIMEOUT):
                try:
                    head = await _read_head(stream)
                except _HeadTooLarge:
                    body = _error_body("Request head too large")
                    await stream.send_all(_raw_response(431, body))
                    return
            if not head:
                return
            parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            parser.receive_data(head)
            try:
                request = parser.next_event()
            except h11.RemoteProtocolError as exc:
                await stream.send_all(_raw_response(400, _error_body(f"Bad HTTP request: {exc}")))
                return
            if not isinstance(request, h11.Request):
                return
            headers = _header_dict(request.headers)
            if "websocket" in headers.get("upgrade", "").lower():
                await self._serve_websocket(stream, head, headers)
            else:
                await self._serve_http(stream, parser, request, headers)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a bug in the mock: keep serving others, but record it
            logger.exception("mockrealtime: connection handler failed")
            self.errors.append(exc)
        finally:
            await trio.aclose_forcefully(stream)

    # --- HTTP -----------------------------------------------------------------------

    async def _serve_http(
        self,
        stream: trio.abc.Stream,
        parser: h11.Connection,
        request: h11.Request,
        headers: dict[str, str],
    ) -> None:
        body = bytearray()
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                await stream.send_all(_raw_response(400, _error_body(f"Bad HTTP request: {exc}")))
                return
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                parser.receive_data(bytes(data))
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    await stream.send_all(_raw_response(413, _error_body("Request body too large")))
                    return
            else:
                break
        target = request.target.decode("latin-1")
        if is_call_route(target.split("?", 1)[0]):
            reply = await handle_call_request(
                self, request.method.decode(), target, headers, bytes(body)
            )
            await stream.send_all(_raw_reply(reply))
            return
        status, payload = handle_rest(
            request.method.decode(),
            target,
            headers,
            bytes(body),
            store=self.rest,
            key_is_valid=self.key_is_valid,
            now=self.config.wall_clock(),
            rng=self._rng,
        )
        await stream.send_all(_raw_response(status, payload))

    # --- WebSocket --------------------------------------------------------------------

    async def _serve_websocket(
        self, stream: trio.abc.Stream, head: bytes, headers: dict[str, str]
    ) -> None:
        self.handshakes += 1
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.receive_data(head)
            request = next((e for e in ws.events() if isinstance(e, Request)), None)
        except RemoteProtocolError as exc:
            await stream.send_all(_raw_response(400, _error_body(f"Bad WebSocket upgrade: {exc}")))
            return
        if request is None:
            await stream.send_all(_raw_response(400, _error_body("Bad WebSocket upgrade")))
            return
        faults = self.faults
        if FAULTS_HEADER in headers:
            try:
                faults = parse_faults(headers[FAULTS_HEADER], faults)
            except ValueError as exc:
                await _reject(stream, ws, 400, _error_body(f"Bad {FAULTS_HEADER} header: {exc}"))
                return
        if faults.handshake_delay:
            await trio.sleep(faults.handshake_delay)
        path = request.target
        if path.split("?", 1)[0].rstrip("/") != REALTIME_PATH:
            await _reject(stream, ws, 404, _error_body(f"Invalid URL (GET {path.split('?')[0]})"))
            return
        if faults.refuse_status is not None:
            body = _error_body(
                f"Refused by fault injection (HTTP {faults.refuse_status}).", code="mock_refused"
            )
            await _reject(stream, ws, faults.refuse_status, body)
            return
        subprotocols = list(request.subprotocols)
        decision = negotiate(
            path,
            headers,
            subprotocols,
            key_is_valid=self.key_is_valid,
            reject_beta=self.config.reject_beta,
        )
        call: MockCall | None = None
        if decision.call_id is not None and decision.rejection is None:
            call = self.calls.get(decision.call_id)
            if call is None or call.state != "active":
                body = _error_body(
                    "No session found for the provided call_id", code="call_id_not_found"
                )
                await _reject(stream, ws, 404, body)
                return
        await stream.send_all(ws.send(AcceptConnection(subprotocol=decision.subprotocol)))
        record = ConnectionRecord(
            headers=headers,
            subprotocols=subprotocols,
            path=path,
            dialect=decision.dialect,
            selected_subprotocol=decision.subprotocol,
            call_id=decision.call_id,
        )
        index = len(self.connections)
        self.connections.append(record)
        session: Session | SidebandSession
        if call is not None:
            session = SidebandSession(call)
        else:
            session = self._session(
                decision.model,
                index,
                dialect=decision.dialect,
                intent=decision.intent,
                preset=self.rest.session_preset(decision.api_key) if decision.api_key else None,
                faults=faults,
            )
        unsubscribe = None
        try:
            conn = _Connection(self.config, faults, stream, ws, session, record, self)  # type: ignore[arg-type]
            if call is not None:
                unsubscribe = call.subscribe(conn._enqueue_events, conn._queue_close)
            await conn.run(session.open(decision.rejection))
        finally:
            if unsubscribe is not None:
                unsubscribe()
            await trio.aclose_forcefully(stream)
            record.closed.set()


class _Connection:
    """One accepted WebSocket: reader, ticker, writer, control and pinger tasks around a Session.

    Two send lanes share the socket under a lock: the ordered *event* lane (server
    events, then our close frame; subject to ``send_delay`` and ``drop_after_events``)
    and the *control* lane (pongs and pings, never delayed behind events).
    """

    def __init__(
        self,
        config: MockConfig,
        faults: Faults,
        stream: trio.abc.Stream,
        ws: WSConnection,
        session: Session,
        record: ConnectionRecord,
        server: MockServer | None = None,
    ) -> None:
        self.config = config
        self.server = server
        self.faults = faults
        self.stream = stream
        self.ws = ws
        self.session = session
        self.record = record
        self._send, self._queue = trio.open_memory_channel[tuple[str, Any]](math.inf)
        self._control_send, self._control = trio.open_memory_channel[Ping | Pong](math.inf)
        self._lock = trio.Lock()
        self._wake = trio.Event()
        self._deadline: float | None = None
        self._close_queued = False
        self._peer_closed = trio.Event()
        self._client_messages = 0
        self._deaf = False  # the deaf_after_response fault struck: read and send nothing more
        self._parts: list[str | bytes] = []
        self._size = 0
        self._done: trio.CancelScope | None = None

    async def run(self, first_events: list[Event]) -> None:
        self._enqueue_events(first_events)
        if self.session.close_requested is None and self.faults.close_after_open is not None:
            self._queue_close(*self.faults.close_after_open)
        self.record._attach(self)
        try:
            async with trio.open_nursery() as nursery:
                self._done = nursery.cancel_scope
                nursery.start_soon(self._guarded, self._writer)
                if self.faults.stall:
                    return  # nobody reads: the client's pings and close frames go unanswered
                nursery.start_soon(self._guarded, self._reader)
                nursery.start_soon(self._guarded, self._control_sender)
                nursery.start_soon(self._ticker)
                if self.config.ping_interval is not None:
                    nursery.start_soon(self._pinger, self.config.ping_interval)
        finally:
            self.record._attach(None)

    def _finish(self) -> None:
        """End the connection: cancel every task; the caller then closes TCP."""
        assert self._done is not None
        self._done.cancel()

    async def _guarded(self, task: Callable[[], Any]) -> None:
        """A peer that vanishes mid-read or mid-write just ends the connection."""
        try:
            await task()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._finish()

    async def _send_bytes(self, data: bytes) -> None:
        async with self._lock:
            await self.stream.send_all(data)

    # --- queueing (also used by ConnectionRecord's test controls) -------------------

    def _enqueue_events(self, events: list[Event]) -> None:
        if self._send.statistics().current_buffer_used + len(events) > MAX_QUEUED_EVENTS:
            logger.warning("mockrealtime: client is not reading; dropping the connection")
            self._finish()
            return
        for event in events:
            self._send.send_nowait(("event", event))
        if self.session.close_requested is not None:
            self._queue_close(*self.session.close_requested)

    def _queue_close(self, code: int, reason: str) -> None:
        if not self._close_queued:
            self._close_queued = True
            self._send.send_nowait(("close", (code, reason)))

    def _queue_drop(self) -> None:
        self._send.send_nowait(("drop", None))

    # --- tasks ----------------------------------------------------------------------

    async def _reader(self) -> None:
        ws = self.ws
        while True:
            # events first: bytes that arrived with the upgrade request are already buffered
            try:
                for event in ws.events():
                    if isinstance(event, TextMessage | BytesMessage):
                        self._on_frame(event)
                    elif isinstance(event, Ping):
                        self._control_send.send_nowait(event.response())
                    elif isinstance(event, CloseConnection):
                        self.record.close_code = event.code
                        self.record.close_reason = event.reason or None
                        self._peer_closed.set()
                        if ws.state == ConnectionState.REMOTE_CLOSING:
                            self._send.send_nowait(("reply", event.response()))
                        return
            except RemoteProtocolError as exc:
                self._queue_close(1002, f"Protocol error: {exc}"[:120])
                return
            data = await self.stream.receive_some(RECEIVE_BYTES)
            if self._deaf:
                await trio.sleep_forever()  # what came is never read: no pong, no close reply
            if not data:
                self._finish()  # TCP ended (with or without a close handshake)
                return
            ws.receive_data(data if isinstance(data, bytes) else bytes(data))

    def _on_frame(self, event: TextMessage | BytesMessage) -> None:
        self._parts.append(event.data if isinstance(event.data, str | bytes) else bytes(event.data))
        self._size += len(event.data)
        if self._size > self.config.max_message_size:
            self._parts, self._size = [], 0
            self._queue_close(
                1009, f"Exceeded maximum message size: {self.config.max_message_size} bytes"
            )
            return
        if not event.message_finished:
            return
        message: str | bytes
        if isinstance(event, TextMessage):
            message = "".join(self._parts)  # type: ignore[arg-type]
        else:
            message = b"".join(self._parts)  # type: ignore[arg-type]
        self._parts, self._size = [], 0
        if self.config.record_messages:
            self.record.received.append(message)
        if self._close_queued:
            return  # closing: recorded, but the session no longer answers
        self._client_messages += 1
        self._enqueue_events(self.session.handle(message))
        if self._client_messages == self.faults.inject_error_after:
            self._send.send_nowait(("event", self.session.server_error()))
        if self.session.next_deadline() != self._deadline:
            self._wake.set()  # the schedule changed (a response started or ended...)

    async def _ticker(self) -> None:
        while self.session.close_requested is None:
            deadline = self._deadline = self.session.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            self._enqueue_events(self.session.tick())

    async def _pinger(self, interval: float) -> None:
        count = 0
        while True:
            await trio.sleep(interval)
            count += 1
            self._control_send.send_nowait(Ping(payload=count.to_bytes(4, "big")))

    async def _control_sender(self) -> None:
        async for frame in self._control:
            if self.ws.state == ConnectionState.OPEN and not self._deaf:
                await self._send_bytes(self.ws.send(frame))

    async def _writer(self) -> None:
        ws, record = self.ws, self.record
        recording = self.config.record_messages
        drop_after = self.faults.drop_after_events
        delay = self.faults.send_delay
        kill_at = self.faults.kill_mid_response
        deaf_at = self.faults.deaf_after_response
        killing = False  # the response to cut has started: drop after its first delta
        counted = 0  # this connection's count of responses started, if it counts them
        batching = not delay and drop_after is None and kill_at is None and deaf_at is None
        if drop_after == 0:
            self._finish()
            return
        pending: tuple[str, Any] | None = None
        while True:
            if pending is not None:
                (kind, payload), pending = pending, None
            else:
                try:
                    kind, payload = await self._queue.receive()
                except trio.EndOfChannel:  # pragma: no cover - the send side is never closed
                    return
            if kind == "drop":
                self._finish()  # drop TCP: no close frame
                return
            if ws.state != ConnectionState.OPEN and kind != "reply":
                continue
            if kind == "event":
                if delay:
                    await trio.sleep(delay)
                    if ws.state != ConnectionState.OPEN:
                        continue
                events = [payload]
                # events queued together (a whole reply at pace 0) go out in one write
                while batching and len(events) < WRITE_BATCH_EVENTS:
                    try:
                        following = self._queue.receive_nowait()
                    except trio.WouldBlock:
                        break
                    if following[0] != "event":
                        pending = following
                        break
                    events.append(following[1])
                data = b"".join(ws.send(TextMessage(data=orjson.dumps(e).decode())) for e in events)
                await self._send_bytes(data)
                record.events_sent += len(events)
                if recording:
                    record.sent_types.extend(e["type"] for e in events)
                if drop_after is not None and record.events_sent >= drop_after:
                    self._finish()  # drop TCP: no close frame
                    return
                if (kill_at is not None or deaf_at is not None) and self.server is not None:
                    kind = payload["type"]
                    if kind == "response.created":
                        self.server.responses_started += 1
                        counted = self.server.responses_started
                        killing = counted == kill_at
                    elif killing and kind.endswith(".delta"):
                        self._finish()  # drop TCP mid-response: no close frame
                        return
                    elif kind == "response.done" and counted == deaf_at:
                        self._deaf = True  # the reader stops at its next read
                        await trio.sleep_forever()
            elif kind == "close":
                code, reason = payload
                await self._send_bytes(ws.send(CloseConnection(code=code, reason=reason)))
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await self._peer_closed.wait()
                self._finish()
                return
            elif kind == "reply":
                if ws.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_bytes(ws.send(payload))
                self._finish()
                return


# --- helpers ---------------------------------------------------------------------------


class _HeadTooLarge(Exception):
    pass


async def _read_head(stream: trio.abc.ReceiveStream) -> bytes:
    """Read until the end of the HTTP request head; returns b"" on EOF."""
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD_BYTES:
            raise _HeadTooLarge
        data = await stream.receive_some(RECEIVE_BYTES)
        if not data:
            return b""
        buf += data
    if end > MAX_HEAD_BYTES:
        raise _HeadTooLarge
    return bytes(buf)


def _header_dict(headers: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        key = bytes(name).decode("latin-1").lower()
        text = bytes(value).decode("latin-1")
        out[key] = f"{out[key]}, {text}" if key in out else text
    return out


def _error_body(message: str, *, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


_REASONS: Final = {
    200: "OK",
    201: "Created",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _raw_response(status: int, payload: dict[str, Any]) -> bytes:
    return _raw_reply(HttpReply.json(status, payload))


def _raw_reply(reply: HttpReply) -> bytes:
    reason = _REASONS.get(reply.status, "Error")
    extra = "".join(f"{name}: {value}\r\n" for name, value in reply.headers)
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\ncontent-type: {reply.content_type}\r\n"
        f"content-length: {len(reply.body)}\r\n{extra}connection: close\r\n\r\n"
    )
    return head.encode() + reply.body


async def _reject(
    stream: trio.abc.Stream, ws: WSConnection, status: int, payload: dict[str, Any]
) -> None:
    body = orjson.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    data = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
    data += ws.send(RejectData(data=body, body_finished=True))
    await stream.send_all(data)


async def serve_mock_realtime(
    config: MockConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[MockServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake Realtime API until cancelled.

    Calls ``task_status.started(MockServer)`` once listening, so use it as
    ``server = await nursery.start(serve_mock_realtime, MockConfig())``. Port 0 picks
    a free port (see ``server.port``). With ``ssl_context`` (a server context holding a
    certificate) it serves ``wss://`` and ``https://`` instead. On cancellation every
    connection is closed at the TCP level, without WebSocket close frames.
    """
    tcp_listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = tcp_listeners[0].socket.getsockname()[1]
    listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
    if ssl_context is not None:
        listeners = [
            trio.SSLListener(listener, ssl_context, https_compatible=True)
            for listener in tcp_listeners
        ]
    server = MockServer(config, host, bound_port, tls=ssl_context is not None)
    try:
        async with trio.open_nursery() as nursery:
            server._nursery = nursery
            await nursery.start(trio.serve_listeners, server._handle_stream, listeners)
            task_status.started(server)
    finally:
        server._close_media()
