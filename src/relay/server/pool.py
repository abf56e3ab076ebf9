"""The warm pool (RELAY_WARM_POOL): upstream sessions opened and set up before any client
asks, so a client gets its ``session.created`` without waiting for a dial.

This is the Trio shell of :class:`relay.core.warmpool.PoolLedger`, which decides what to
dial, retire and hand over. One task per pooled session dials it (connect, handshake, the
upstream's ``session.created``, the relay's ``session.update`` and its answer, all within
RELAY_DIAL_TIMEOUT), then watches it while it waits: it reads (an upstream that closes, or
says anything at all, is no longer a clean session and is replaced) and pings as the pairs
do (no pong within RELAY_PEER_TIMEOUT: replaced). A client's pair takes one through
:meth:`WarmPool.source`: the ledger gives the session to that one client and forgets it,
the watching task stops reading and lets go of it, and the pair owns its socket from then
on, exactly as if it had dialled it. If none waits, the pair dials as without a pool.

The pool lives in one worker process: with ``relay serve --workers N`` each worker keeps
its own RELAY_WARM_POOL sessions. On drain (SIGTERM) it stops dialling and closes every
waiting session with 1001.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from ..core.bridge import SETUP_EVENT_ID
from ..core.closecodes import Code
from ..core.events import parse_event
from ..core.warmpool import PoolKey, PoolLedger, client_created
from ..ops.metrics import RelayMetrics
from ..wire.upstream import Opened, UpstreamSource, os_reason
from ..wire.websocket import HandshakeFailed, WebSocket

log = logging.getLogger("relay")


@dataclass(eq=False)
class Pooled:
    """One waiting session, and what its watching task is told."""

    key: PoolKey
    stream: trio.abc.Stream
    websocket: WebSocket
    created: dict[str, object]
    session: dict[str, object] | None
    #: Trio time the upstream sent its session.created (its 60-minute cap runs from then).
    since: float
    #: Cancelled to stop watching it: a client took it, it aged out, or the pool drains.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Set once the watching task has let go of it (after a take).
    released: trio.Event = field(default_factory=trio.Event)
    taken: bool = False
    #: Why it is no longer a clean session (None: it is).
    failure: str | None = None
    #: The close it gets when retired (aged out, drained).
    close: tuple[int, str] = (Code.NORMAL, "recycled")


class _NotReady(Exception):
    """A dialled session did not become a clean, set-up one (the message says why)."""


class WarmPool:
    """Keeps the ledger's sessions open and ready; see the module docstring."""

    def __init__(
        self,
        ledger: PoolLedger[Pooled],
        target: Callable[[PoolKey], UpstreamSource],
        metrics: RelayMetrics,
        *,
        dial_timeout: float,
        send_timeout: float,
        close_timeout: float,
        ping_interval: float,
        peer_timeout: float,
    ) -> None:
        self.ledger = ledger
        self._target = target
        self._metrics = metrics
        self._dial_timeout = dial_timeout
        self._send_timeout = send_timeout
        self._close_timeout = close_timeout
        self._ping_interval = ping_interval if peer_timeout else 0.0
        self._peer_timeout = peer_timeout
        self._changed = trio.Event()
        self._scope: trio.CancelScope | None = None
        self._done = trio.Event()

    # -- a client's side --------------------------------------------------------------

    def source(self, key: PoolKey, dial: UpstreamSource) -> UpstreamSource:
        """Where the pair of a session with ``key`` gets its upstream: a pooled session if
        one waits, else ``dial``. A session the pool could serve but for its safety
        identifier (a named user while the pool's sessions carry the anonymous one) is
        counted as a miss, and dials."""
        if self.ledger.pooled(key):
            return _PooledSource(self, key, dial)
        if any(k.model == key.model and k.setup == key.setup for k in self.ledger.keys):
            self._metrics.pool_missed(key.model, "identified")
        return dial

    async def take(self, key: PoolKey) -> Opened | None:
        """A waiting session of ``key``, now the caller's (its stream, WebSocket and the
        ``session.created`` the client gets); None if none waits."""
        while (entry := self.ledger.take(key)) is not None:
            self._changed.set()  # one less: the refill starts
            self._publish(key.model)
            entry.taken = True
            entry.scope.cancel()
            with trio.CancelScope(shield=True):  # at once: the watcher is at a checkpoint
                await entry.released.wait()
            ws = entry.websocket
            if entry.failure is None and ws.closed is None and not ws.broken:
                self._metrics.pool_hit(key.model)
                created = client_created(entry.created, entry.session)
                return Opened(entry.stream, ws, created, entry.since)
            self._metrics.pool_recycled(key.model, "failed")
            log.info("warm pool: a session failed as it was taken (%s)", entry.failure or "closed")
            await trio.aclose_forcefully(entry.stream)
        if not self.ledger.closed:
            self._metrics.pool_missed(key.model, "empty")
        return None

    # -- the pool's own tasks ---------------------------------------------------------

    async def run(self) -> None:
        """Dial, retire and replace sessions as the ledger says, until :meth:`drain` (or
        cancelled: then every session's socket is closed as its task unwinds)."""
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                for model in {key.model for key in self.ledger.keys}:
                    self._publish(model)
                while not self.ledger.closed:
                    self._changed = trio.Event()
                    plan = self.ledger.due(trio.current_time())
                    for key in plan.dial:
                        nursery.start_soon(self._session, key)
                    for key, entry in plan.retire:
                        self._metrics.pool_recycled(key.model, "age")
                        entry.scope.cancel()
                        self._publish(key.model)
                    with trio.move_on_at(plan.wake_at):
                        await self._changed.wait()
        finally:
            self._done.set()

    async def drain(self) -> None:
        """Stop dialling; close every waiting session with 1001 (within the close timeout,
        then their sockets are cut), and any dial still under way."""
        for key, entry in self.ledger.close():
            entry.close = (Code.GOING_AWAY, "relay shutting down")
            entry.scope.cancel()
            self._publish(key.model)
        self._changed.set()
        if self._scope is None:
            return  # never ran
        with trio.move_on_after(self._close_timeout):
            await self._done.wait()
        self._scope.cancel()
        await self._done.wait()

    async def _session(self, key: PoolKey) -> None:
        """Dial one session for ``key``, then watch it while it waits."""
        try:
            entry = await self._open(key)
        except _NotReady as why:
            self._metrics.pool_dial_failed(key.model)
            self.ledger.failed(key, trio.current_time())
            self._changed.set()
            log.warning("warm pool: a %s session could not be set up: %s", key.model, why)
            return
        if not self.ledger.ready(key, entry, trio.current_time()):  # drained meanwhile
            entry.close = (Code.GOING_AWAY, "relay shutting down")
            entry.scope.cancel()
        self._changed.set()
        self._publish(key.model)
        await self._keep(entry)

    async def _open(self, key: PoolKey) -> Pooled:
        """A session of ``key`` dialled and set up as a pair would have it, or _NotReady."""
        opened: Opened | None = None
        try:
            with trio.move_on_after(self._dial_timeout):
                opened = await self._target(key).open()
                ws = opened.websocket
                ws.send_timeout = self._send_timeout
                created = parse_event(await ws.get_message())
                since = trio.current_time()
                if created is None or created.get("type") != "session.created":
                    raise _NotReady(f"its first event was {_kind(created)}, not session.created")
                await ws.send_message(key.setup)
                answer = parse_event(await ws.get_message())
                if answer is None or answer.get("type") != "session.updated":
                    error = answer.get("error") if answer is not None else None
                    if isinstance(error, dict) and error.get("event_id") == SETUP_EVENT_ID:
                        # (the code only: an upstream's message may quote part of the key)
                        raise _NotReady(
                            f"the Realtime API refused the relay's session ({error.get('code')});"
                            " check the [session] table and RELAY_INSTRUCTIONS / RELAY_VOICE"
                        )
                    raise _NotReady(f"it answered the relay's session.update with {_kind(answer)}")
                session = answer.get("session")
                entry = Pooled(
                    key,
                    opened.stream,
                    ws,
                    created,
                    session if isinstance(session, dict) else None,
                    since,
                )
                opened = None  # the entry's now
                return entry
            raise _NotReady(f"not set up within {self._dial_timeout:g} s (RELAY_DIAL_TIMEOUT)")
        except ConnectionRejected as rejected:
            raise _NotReady(f"the upgrade was refused with HTTP {rejected.status_code}") from None
        except ConnectionClosed as closed:
            code = closed.reason.code if closed.reason else 1006
            raise _NotReady(f"the upstream closed ({code})") from None
        except trio.TooSlowError:
            raise _NotReady(
                f"the upstream took over {self._send_timeout:g} s (RELAY_SEND_TIMEOUT) to take"
                " the relay's session.update"
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            raise _NotReady(_describe(exc)) from None
        finally:
            if opened is not None:
                await trio.aclose_forcefully(opened.stream)

    async def _keep(self, entry: Pooled) -> None:
        """Watch a waiting session until it is taken, retired or fails."""
        try:
            with entry.scope:
                async with trio.open_nursery() as watch:
                    if self._ping_interval:
                        watch.start_soon(self._ping, entry)
                    entry.failure = await _watch(entry.websocket)
                    watch.cancel_scope.cancel()
            if entry.taken:
                return  # the client's pair has it now
            if entry.failure is not None:
                if self.ledger.lost(entry.key, entry, trio.current_time()):
                    self._metrics.pool_recycled(entry.key.model, "failed")
                    self._changed.set()
                    self._publish(entry.key.model)
                log.info(
                    "warm pool: replacing a waiting %s session: %s", entry.key.model, entry.failure
                )
            if entry.websocket.closed is None:
                with trio.move_on_after(self._close_timeout):
                    await entry.websocket.aclose(*entry.close)
        finally:
            if entry.taken:
                entry.released.set()
            else:
                await trio.aclose_forcefully(entry.stream)

    async def _ping(self, entry: Pooled) -> None:
        """Ping a waiting session; no pong within the peer timeout fails it (this task has
        nothing else to do while it waits, unlike a pair's timer)."""
        while True:
            await trio.sleep(self._ping_interval)
            with trio.move_on_after(self._peer_timeout) as waited:
                try:
                    await entry.websocket.ping()
                except ConnectionClosed:
                    return  # the watcher reads the close
            if waited.cancelled_caught:
                entry.failure = f"no answer to a ping within {self._peer_timeout:g} s"
                entry.scope.cancel()
                return

    def _publish(self, model: str) -> None:
        self._metrics.pool_size(
            model, sum(self.ledger.waiting(k) for k in self.ledger.keys if k.model == model)
        )


@dataclass(frozen=True)
class _PooledSource:
    """A pair's upstream from the pool, else from a dial."""

    pool: WarmPool
    key: PoolKey
    dial: UpstreamSource

    async def open(self) -> Opened:
        opened = await self.pool.take(self.key)
        return opened if opened is not None else await self.dial.open()


async def _watch(ws: WebSocket) -> str:
    """Read a waiting session until it says something: why it is no longer clean."""
    try:
        message = await ws.get_message()
    except ConnectionClosed as closed:
        return f"the upstream closed it ({closed.reason.code if closed.reason else 1006})"
    return f"the upstream sent {_kind(parse_event(message))} while it waited"


def _kind(event: dict[str, object] | None) -> str:
    kind = event.get("type") if event is not None else None
    return repr(kind) if isinstance(kind, str) else "something that is not an event"


def _describe(exc: BaseException) -> str:
    """Why a dial failed, in a few words (never the upstream's own text: it may quote the key)."""
    if isinstance(exc, OSError) and not isinstance(exc, HandshakeFailed):
        return os_reason(exc)
    return str(exc) or exc.__class__.__name__
