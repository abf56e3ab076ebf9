"""A phone call through the whole relay app, in memory, under Trio's MockClock.

The relay is its real ASGI app (routing, the webhook, the ``/twilio`` upgrade, admission,
the pair, the Twilio leg), called directly rather than under Hypercorn; the Realtime API is
mockrealtime over a memory stream; the phone is ``relay call``'s own (:mod:`relay.clients.call`):
20 ms μ-law media at real-time pace and marks echoed after simulated playback, which on the
virtual clock costs no real time. The usage store is a dict (a thread, as SQLite's, would let
the virtual clock jump while it works).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

from mockrealtime import MockConfig, MockServer
from relay.clients import wav
from relay.clients.call import RATE, PhoneCall, Twiml, fetch_twiml, new_sid, phone_call
from relay.config import load_config
from relay.core.twilio import request_signature
from relay.server.app import RelayApp, create_app
from relay.usage.accounting import Accounting
from relay.usage.store import TOKEN_COUNTERS, UsageDelta, UsageRow
from relay.wire.upstream import Dialed, UpstreamTarget
from relay.wire.websocket import WebSocket

from .harness import TEST_KEY

AUTH_TOKEN = "twilio-auth-token-for-tests-0123"
HOST = "relay.test"
FIXTURES = Path(__file__).parents[1] / "fixtures"


def hello() -> bytes:
    """The fixture's speech as a phone sends it: μ-law 8 kHz."""
    samples, fmt = wav.read_wav(FIXTURES / "hello-ulaw8k.wav")
    return wav.mulaw_bytes(wav.resample(samples, fmt.rate, RATE))


class MemoryStore:
    """The usage store's contract in a dict, with no thread (see the module docstring)."""

    def __init__(self) -> None:
        self.usage: dict[tuple[str, str], dict[str, float]] = {}
        self.slots: dict[str, dict[str, float]] = {}
        self.claims: dict[str, float] = {}

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        row = self.usage.setdefault((day, user), {})
        for name, value in vars(delta).items():
            row[name] = row.get(name, 0) + value

    async def tokens(self, user: str, day: str) -> int:
        row = self.usage.get((day, user), {})
        return int(sum(row.get(name, 0) for name in TOKEN_COUNTERS))

    async def cost(self, user: str, day: str) -> int:
        return int(self.usage.get((day, user), {}).get("cost_nanodollars", 0))

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        return [
            UsageRow(
                day=d, user=u, **{k: type(getattr(UsageDelta(), k))(v) for k, v in row.items()}
            )
            for (d, u), row in sorted(self.usage.items())
            if day in (None, d) and user in (None, u)
        ]

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        now = trio.current_time()
        held = {s: t for s, t in self.slots.get(user, {}).items() if t > now}
        if session_id not in held and len(held) >= limit:
            return False
        held[session_id] = now + lease_seconds
        self.slots[user] = held
        return True

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        if session_id in self.slots.get(user, {}):
            self.slots[user][session_id] = trio.current_time() + lease_seconds

    async def release_slot(self, user: str, session_id: str) -> None:
        self.slots.get(user, {}).pop(session_id, None)

    async def claim_once(self, key: str, *, ttl_seconds: float) -> bool:
        now = trio.current_time()
        if self.claims.get(key, -math.inf) > now:
            return False
        self.claims[key] = now + ttl_seconds
        return True

    async def aclose(self) -> None:
        pass


@dataclass
class MockDialer:
    """The relay's dialer, reaching mockrealtime over memory streams."""

    mock: MockServer
    nursery: trio.Nursery

    def target(self, model: str, safety_identifier: str | None = None) -> MockUpstream:
        return MockUpstream(self, model, safety_identifier)


@dataclass
class MockUpstream(Dialed):
    dialer: MockDialer
    model: str
    safety_identifier: str | None = None

    async def connect(self) -> trio.abc.Stream:
        return self.dialer.mock.memory_stream(self.dialer.nursery)

    async def handshake(self, stream: trio.abc.Stream) -> WebSocket:
        return await UpstreamTarget(
            host="mock.test",
            port=80,
            resource=f"/v1/realtime?model={self.model}",
            ssl_context=None,
            subprotocols=None,
            headers=((b"authorization", f"Bearer {TEST_KEY}".encode()),)
            + (((b"openai-safety-identifier", self.safety_identifier.encode()),)
               if self.safety_identifier else ()),
            max_message_bytes=1 << 24,
        ).handshake(stream)


@dataclass
class AsgiSocket:
    """A WebSocket client of the app's ASGI interface, in memory: the Connection a PhoneCall
    takes. A refused upgrade raises ConnectionRejected, as over a socket."""

    app: RelayApp
    path: str
    headers: list[tuple[bytes, bytes]]
    closed: CloseReason | None = None
    #: Set once the app has returned: the session is over and recorded.
    finished: trio.Event = field(default_factory=trio.Event)
    _to_app: Any = None
    _from_app: Any = None

    async def open(self, nursery: trio.Nursery) -> AsgiSocket:
        self._to_app, app_receive = trio.open_memory_channel[dict[str, Any]](math.inf)
        app_send, self._from_app = trio.open_memory_channel[dict[str, Any]](math.inf)
        scope = {
            "type": "websocket",
            "path": self.path,
            "query_string": b"",
            "scheme": "ws",
            "headers": [(b"host", HOST.encode()), *self.headers],
            "subprotocols": [],
            "extensions": {"websocket.http.response": {}},
        }

        async def run_app() -> None:
            try:
                async with app_send:
                    await self.app(scope, app_receive.receive, app_send.send)
            finally:
                self.finished.set()

        nursery.start_soon(run_app)
        await self._to_app.send({"type": "websocket.connect"})
        first = await self._from_app.receive()
        if first["type"] == "websocket.http.response.start":
            body = (await self._from_app.receive())["body"]
            raise ConnectionRejected(first["status"], first["headers"], body)
        assert first["type"] == "websocket.accept", first
        return self

    async def send_message(self, message: str) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        await self._to_app.send({"type": "websocket.receive", "text": message})

    async def get_message(self) -> str | bytes:
        while self.closed is None:
            try:
                event = await self._from_app.receive()
            except trio.EndOfChannel:
                self.closed = CloseReason(1006, None)
                break
            if event["type"] == "websocket.send":
                return event.get("text") or event.get("bytes") or b""
            if event["type"] == "websocket.close":
                self.closed = CloseReason(event.get("code", 1000), event.get("reason") or None)
                await self._to_app.send({"type": "websocket.disconnect", "code": 1000})
        raise ConnectionClosed(self.closed)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed is None:
            self.closed = CloseReason(code, reason)
            await self._to_app.send({"type": "websocket.disconnect", "code": code})


@dataclass
class World:
    app: RelayApp
    mock: MockServer
    store: MemoryStore
    http: httpx.AsyncClient
    nursery: trio.Nursery
    calls: list[str] = field(default_factory=list)
    sockets: list[AsgiSocket] = field(default_factory=list)

    async def settled(self) -> None:
        """Wait until the app has finished every stream opened so far (sessions recorded)."""
        for socket in self.sockets:
            await socket.finished.wait()

    async def twiml(self, call_sid: str, caller: str = "+15550100001") -> Twiml:
        return await fetch_twiml(
            self.http,
            f"http://{HOST}",
            AUTH_TOKEN,
            call_sid=call_sid,
            account_sid="AC1",
            caller=caller,
        )

    async def stream(self, signature: str | None = "valid", path: str = "/twilio") -> AsgiSocket:
        """The media stream's WebSocket; ``signature`` "valid", None (none) or a given one."""
        if signature == "valid":
            signature = request_signature(AUTH_TOKEN, f"ws://{HOST}{path}")
        headers = [] if signature is None else [(b"x-twilio-signature", signature.encode())]
        socket = AsgiSocket(self.app, path, headers)
        self.sockets.append(socket)
        return await socket.open(self.nursery)

    @asynccontextmanager
    async def call(
        self, *, speed: float = 1.0, caller: str = "+15550100001"
    ) -> AsyncIterator[PhoneCall]:
        """A call as Twilio makes one: the webhook, the stream, connected and start."""
        call_sid = new_sid("CA")
        self.calls.append(call_sid)
        twiml = await self.twiml(call_sid, caller)
        ws = await self.stream()
        async with phone_call(
            ws, twiml, call_sid=call_sid, account_sid="AC1", speed=speed
        ) as phone:
            yield phone

    def upstream_events(self, index: int = -1) -> list[dict[str, Any]]:
        """What the fake Realtime API received on its ``index``-th connection (text events)."""
        import orjson

        return [
            orjson.loads(m) for m in self.mock.connections[index].received if isinstance(m, str)
        ]


@asynccontextmanager
async def world(mock: MockConfig | None = None, **settings: Any) -> AsyncIterator[World]:
    """The relay app (Twilio on) in front of mockrealtime, all in memory."""
    values: dict[str, Any] = {
        "openai_api_key": TEST_KEY,
        "allow_anonymous": True,
        "twilio_auth_token": AUTH_TOKEN,
        "ping_interval": 0.0,
        "peer_timeout": 0.0,
        "overload_cpu": 0.0,
        "overload_lag": 0.0,
        "shed_cpu": 0.0,
        "shed_lag": 0.0,
        "close_timeout": 2.0,
    }
    values.update(settings)
    config = load_config({}, values)
    app = create_app(config)
    store = MemoryStore()
    app.accounting = Accounting(  # what the lifespan would open (no pump, no load watch)
        store,  # type: ignore[arg-type]
        max_sessions=config.max_sessions_per_user,
        daily_budget=config.daily_token_budget,
    )
    server = MockServer(mock or MockConfig(api_keys=frozenset({TEST_KEY})))
    async with trio.open_nursery() as nursery:
        app.dialer = MockDialer(server, nursery)  # type: ignore[assignment]
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url=f"http://{HOST}") as http:
            yield World(app, server, store, http, nursery)
        nursery.cancel_scope.cancel()
