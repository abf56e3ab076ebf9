"""Client resume: a session that outlives its client's connection (RELAY_RESUME_SECONDS).

A relay-aware client (the page, ``relay talk``, ``relay call``) offers the subprotocol
``relay-resume`` beside ``realtime``. Its session's client leg is then a :class:`Resumable`:

* every event sent to the client is numbered (1, 2, …) and the most recent are kept, at most
  RELAY_RESUME_BYTES of them; right after ``session.created`` (and after each resume) the client
  gets ``{"type":"relay.resume","token":…,"seconds":…}``, an event only clients that asked for
  it see;
* when the connection drops (lost without a close frame; a client that closes is done), the
  pair runs on: the upstream stays open, its events are numbered
  and kept, and the client task waits, up to RELAY_RESUME_SECONDS, for the client to come back;
* the client comes back with a new WebSocket offering ``relay-resume.<token>.<count>`` (count:
  the events it got), authenticated as before. The token is single-use, kept by this worker
  only, bound to the client's user, and travels in the handshake's subprotocol header, never in
  a URL. The relay sends every event after ``count``, in order, then a new token, and the
  session goes on;
* the window passes, or the events the client missed outgrow the bound: the session ends as if
  the client had closed (the upstream gets 1000, the lease and the day's usage are settled).

A resumable session is relayed by its tasks, not the pump: the pump writes to the client's
socket where no task sees it, and resume must number every event.
"""

from __future__ import annotations

import math
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from ..core.bridge import Message
from ..core.events import RESUME_SUBPROTOCOL, dumps
from ..usage.auth import Identity

if TYPE_CHECKING:
    from .pair import ClientSide

    class ClientConnection(ClientSide, Protocol):
        """One of the client's WebSockets (relay.server.legs), which after its end can tell a
        connection lost on the way from one the client closed."""

        @property
        def dropped(self) -> bool: ...



class ResumeRefused(Exception):
    """A resume that cannot be: the message says why and what to do (code: a word for logs)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def asks_to_resume(offered: tuple[str, ...] | list[str]) -> tuple[str, int] | None:
    """The token and count of a ``relay-resume.<token>.<count>`` subprotocol, if offered.
    Raises :class:`ResumeRefused` for one that is malformed."""
    prefix = RESUME_SUBPROTOCOL + "."
    for protocol in offered:
        if protocol.startswith(prefix):
            token, _, count = protocol[len(prefix) :].rpartition(".")
            if not token or not count.isdigit():
                raise ResumeRefused(
                    "relay_resume_malformed",
                    "A resume offers the subprotocol relay-resume.<token>.<count>: the token of"
                    " the last relay.resume event and the number of events received.",
                )
            return token, int(count)
    return None


@dataclass(eq=False)
class _Connection:
    """One of the client's WebSockets, and when it is done with (replaced, gone, or the end)."""

    side: ClientConnection
    done: trio.Event = field(default_factory=trio.Event)


class Resumable:
    """The client's leg of a resumable session, as :class:`relay.server.pair.ClientSide`."""

    websocket = None  # never pumped: every event is numbered here
    writing = False

    def __init__(
        self,
        side: ClientConnection,
        *,
        registry: Resumes,
        identity: Identity,
        seconds: float,
        max_bytes: int,
    ) -> None:
        self._registry = registry
        self.identity = identity
        self._seconds = seconds
        self._max_bytes = max_bytes
        self._current: _Connection | None = _Connection(side)
        self._reading: trio.CancelScope | None = None  # the read on the current connection
        self._sent = 0  # events numbered so far
        self._kept: deque[Message] = deque()  # the most recent: numbered first_kept … _sent
        self._kept_bytes = 0
        #: Events numbered above this the client has surely not had (inf: it is here).
        self._floor: float = math.inf
        self._came_back = trio.Event()
        self._lost = False  # an event the client never had was dropped: it cannot resume
        self._catching_up = False  # a resume is sending what the client missed
        self.token: str | None = None
        self.resumes = 0

    @property
    def first_kept(self) -> int:
        return self._sent - len(self._kept) + 1

    # -- ClientSide ---------------------------------------------------------------------

    async def receive(self) -> Message | None:
        while True:
            current = self._current
            if current is not None:
                with trio.CancelScope() as self._reading:
                    data = await current.side.receive()
                    if data is not None:
                        return data
                    if self._current is current:
                        if not current.side.dropped:
                            return None  # closed by the client, not lost: it is done
                        self._went()
                continue  # gone (or replaced by a resume, which cancelled the read)
            if self.token is None or self._lost:
                return None  # the session had not begun, or cannot be resumed: the end
            with trio.move_on_after(self._seconds):
                await self._came_back.wait()
            if self._current is None:
                return None  # not back in time, or it missed too much: the end

    async def send(self, data: Message) -> None:
        self._sent += 1
        self._kept.append(data)
        self._kept_bytes += len(data)
        while self._kept_bytes > self._max_bytes and len(self._kept) > 1:
            if self.first_kept > self._floor:  # the client never had it, and it must go
                self._lose()
            self._kept_bytes -= len(self._kept.popleft())
        current = self._current
        if current is None or self._catching_up:
            return
        await current.side.send(data)
        if self._sent == 1:
            await self._offer_token(current.side)  # right after session.created

    async def close(self, code: int, reason: str) -> None:
        if self._current is not None:
            await self._current.side.close(code, reason)

    async def keepalive(self) -> None:
        if self._current is not None:
            await self._current.side.keepalive()

    @property
    def last_heard(self) -> float:
        return self._current.side.last_heard if self._current is not None else math.inf

    def unread(self) -> int:
        return self._current.side.unread() if self._current is not None else 0

    async def wait_closed(self, timeout: float) -> None:
        if self._current is not None:
            await self._current.side.wait_closed(timeout)  # type: ignore[attr-defined]

    def hold(self) -> bool:
        """The connection went silent (the peer timeout): drop it and wait for a resume (True),
        unless the session cannot be resumed (False: it ends as if the client had closed)."""
        if self.token is None or self._lost or self._current is None:
            return False
        self._went()
        return True

    # -- resuming -----------------------------------------------------------------------

    def _went(self) -> None:
        """The client's connection is gone: what follows waits for it, numbered and kept."""
        current, self._current = self._current, None
        self._floor = self._sent
        self._came_back = trio.Event()
        if self._reading is not None:
            self._reading.cancel()
        if current is not None:
            current.done.set()

    def _lose(self) -> None:
        """The client missed an event no longer kept: it cannot resume; the session ends."""
        self._lost = True
        self._registry.forget(self)
        if self._current is not None and self._catching_up:
            self._went()
        self._came_back.set()  # (a waiting receive ends the session)

    async def _offer_token(self, side: ClientSide) -> None:
        self.token = self._registry.issue(self)
        event = {"type": "relay.resume", "token": self.token, "seconds": self._seconds}
        await side.send(dumps(event))  # not numbered: a client keeps only the last

    async def resume(self, side: ClientConnection, received: int) -> _Connection:
        """Take the client's new connection: send what it missed after ``received`` events, in
        order, then a new token. Raises :class:`ResumeRefused` (the session then ends)."""
        if self._lost or not self.first_kept - 1 <= received <= self._sent:
            self._lose()
            raise ResumeRefused(
                "relay_resume_gap",
                f"The relay no longer holds every event after the {received} you received (it"
                f" keeps at most RELAY_RESUME_BYTES of them); start a new session.",
            )
        if self._current is not None:  # not known dead yet: the client says it is
            self._went()
        current = self._current = _Connection(side)
        self._catching_up = True
        try:
            self._floor = received
            while self._current is current and self._floor < self._sent:  # (new ones too)
                await side.send(self._kept[int(self._floor) - self.first_kept + 1])
                self._floor += 1
        finally:
            self._catching_up = False
            self._floor = math.inf
        if self._current is not current:
            raise ResumeRefused(
                "relay_resume_gap",
                "Events came faster than this resume could send them (RELAY_RESUME_BYTES); start"
                " a new session.",
            )
        self.resumes += 1
        self._came_back.set()
        await self._offer_token(side)
        return current

    def ended(self) -> None:
        """The session is over: its token goes, and its connection is released."""
        self._registry.forget(self)
        if self._current is not None:
            self._current.done.set()


class Resumes:
    """The resumable sessions of one worker, by token (single-use: a resume takes it)."""

    def __init__(self) -> None:
        #: Names this worker in its tokens, so that one reaching another worker is told so.
        self.prefix = secrets.token_hex(4)
        self._by_token: dict[str, Resumable] = {}

    def issue(self, session: Resumable) -> str:
        if session.token is not None:
            self._by_token.pop(session.token, None)
        token = self.prefix + secrets.token_urlsafe(24)
        self._by_token[token] = session
        return token

    def take(self, token: str, identity: Identity) -> Resumable:
        """The session ``token`` resumes, if it is ``identity``'s; no other resume can then
        take it. Raises :class:`ResumeRefused`."""
        session = self._by_token.get(token)
        if session is not None:
            if session.identity.user != identity.user or session.identity.method != identity.method:
                raise ResumeRefused(
                    "relay_resume_refused",
                    "This resume token belongs to another client; start a new session.",
                )
            del self._by_token[token]
            session.token = None
            return session
        if not token.startswith(self.prefix):
            raise ResumeRefused(
                "relay_resume_elsewhere",
                "This resume token was issued by another relay process (a worker or instance):"
                " a session resumes only on the process that holds it. Start a new session.",
            )
        raise ResumeRefused(
            "relay_resume_refused",
            "This resume token is unknown, used already, or its session has ended (the window"
            " is RELAY_RESUME_SECONDS); start a new session.",
        )

    def forget(self, session: Resumable) -> None:
        if session.token is not None:
            self._by_token.pop(session.token, None)
            session.token = None

    def __len__(self) -> int:
        return len(self._by_token)
