"""The Trio shell around :class:`~relay.core.bridge.Bridge`: one nursery per client/upstream pair.

Two tasks live in the pair's nursery (plus a timer task when pings or time limits are on):

* the client task reads client messages and sends them upstream, or hands them
  to the bridge's queue while the upstream is still opening;
* the upstream task gets the upstream from its source (a dial, or a warm pooled session:
  :mod:`relay.server.pool`), flushes ``session.update`` and the queue, then reads
  upstream messages and sends them to the client.

Whichever side ends first asks the bridge for an :class:`~relay.core.bridge.Ending`
and :meth:`Pair._finish` carries it out: close frames (bounded by the close
timeout, shielded so an outer cancel cannot skip them), then the nursery is
cancelled. When :meth:`Pair.run` returns, no task, socket or queue of the pair
is left. A client that leaves while the upstream is still connecting cancels
the dial.

Backpressure: each task awaits its send before reading the next message, so a
slow upstream stops the relay reading the client, and a slow client stops it
reading the upstream. Nothing is buffered without bound, and a side that takes
longer than the send timeout to accept one message ends the pair (client 1008,
or 1014 for a stalled upstream). Each side enforces that timeout itself and raises
``trio.TooSlowError``: a WebSocket pays for a deadline only when a write has to wait,
which on the hot path it almost never does.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected

from ..core.bridge import Amended, Batch, Bridge, Ending, Message, Phase, Redial, Reply
from ..core.calllog import CallLog, VoiceClock
from ..core.closecodes import Code
from ..core.deadlines import Deadlines, Due
from ..core.ratelimit import InboundRate
from ..wire.pump import READ, Leg, Pump, log_safely
from ..wire.upstream import Opened, UpstreamSource
from ..wire.websocket import PART, HandshakeFailed, WebSocket


class ClientSide(Protocol):
    """The client's WebSocket as the pair sees it (ASGI in production, memory in tests)."""

    @property
    def websocket(self) -> WebSocket | None:
        """The client's own WebSocket where the relay reads its socket (so it can be pumped)."""
        ...

    async def receive(self) -> Message | None:
        """The next message, or None once the client has gone."""
        ...

    async def send(self, data: Message) -> None:
        """Send one message; raises trio.TooSlowError past the side's send timeout."""
        ...

    async def close(self, code: int, reason: str) -> None: ...

    async def keepalive(self) -> None:
        """Ping the client, where the relay rather than the server owns its socket."""
        ...

    @property
    def last_heard(self) -> float:
        """Trio time the client last sent anything (inf where the server reaps silent clients)."""
        ...

    def unread(self) -> int:
        """Bytes the client sent that the relay has not read yet (0 where it cannot tell)."""
        ...

    @property
    def writing(self) -> bool:
        """Whether a send to the client is under way (False where it cannot tell)."""
        ...


class Pair:
    """Runs one client/upstream pair to its end. See the module docstring."""

    # Slots: a pair is read for every message of its session, most of them cold in cache.
    __slots__ = (
        "client",
        "bridge",
        "_source",
        "_dial_timeout",
        "_close_timeout",
        "_send_timeout",
        "_on_responses_done",
        "_upstream",
        "_flushing",
        "_cancel_scope",
        "_deadlines",
        "_ping_interval",
        "_peer_timeout",
        "_pinging",
        "_on_voice_latency",
        "_on_upstream_opened",
        "_pump",
        "_up_leg",
        "_clock",
        "_voice",
        "_tap",
        "_step_client",
        "_rate",
        "last_activity",
        "_takeover",
        "_rollover_after",
        "_rollover_at",
        "_timer_sleep",
        "_upstream_scope",
        "_redial",
        "_in_hand",
        "_changed",
    )

    def __init__(
        self,
        client: ClientSide,
        bridge: Bridge,
        source: UpstreamSource,
        *,
        dial_timeout: float,
        close_timeout: float,
        send_timeout: float = 10.0,
        on_responses_done: Callable[[list[dict[str, object]]], Awaitable[str | None]] | None = None,
        deadlines: Deadlines | None = None,
        ping_interval: float = 0.0,
        peer_timeout: float = 0.0,
        on_voice_latency: Callable[[float], None] | None = None,
        on_upstream_opened: Callable[[float, int], None] | None = None,
        pump: Pump | None = None,
        tap: CallLog | None = None,
        tap_client: bool = False,
        max_rate: float = 0.0,
        takeover: Takeover | None = None,
    ) -> None:
        self.client = client
        self.bridge = bridge
        self._source = source
        self._dial_timeout = dial_timeout
        self._close_timeout = close_timeout
        self._send_timeout = send_timeout
        self._on_responses_done = on_responses_done
        self._upstream: WebSocket | None = None
        self._flushing = False  # the upstream gets the queue: its close waits (see _close_upstream)
        self._cancel_scope: trio.CancelScope | None = None
        self._deadlines = deadlines if deadlines is not None and deadlines.active else None
        self._ping_interval = ping_interval
        self._peer_timeout = peer_timeout
        self._pinging = bool(ping_interval and peer_timeout)  # the upstream must answer
        self._on_voice_latency = on_voice_latency
        self._on_upstream_opened = on_upstream_opened
        self._pump = pump
        self._up_leg: Leg | None = None  # client → upstream, once both legs can be pumped
        # The run's clock (trio.current_time() reads it with two calls more), one object that all
        # pairs share: a bound method of it per pair would be one more object to fetch per message.
        self._clock = trio.lowlevel.current_clock()
        #: What reads the upstream's events for the voice latency: the call's log where the call
        #: is recorded or traced (it times the turns anyway), else a bare VoiceClock.
        self._voice: VoiceClock | CallLog | None = tap
        if tap is None and on_voice_latency is not None:
            self._voice = VoiceClock(self._clock.current_time)
        self._tap = tap
        #: The client step, through the call's log only where the record needs client events.
        self._step_client = self._client_step
        if tap is not None and tap_client:
            self._step_client = self._client_step_tapped
        #: Trio time of the last message either way (for the idle timeout).
        self.last_activity = self._clock.current_time()
        self._rate = InboundRate(max_rate, self.last_activity) if max_rate else None
        #: How to move the session to a new upstream (the bridge has a ledger), or None.
        self._takeover = takeover
        self._rollover_after = takeover.rollover_seconds if takeover is not None else 0.0
        self._rollover_at = math.inf  # when the current upstream should be rolled over
        self._timer_sleep: trio.CancelScope | None = None  # the timer task's sleep
        self._upstream_scope: trio.CancelScope | None = None  # the current upstream's relaying
        self._redial: Redial | None = None  # a failover the timer decided (no pong)
        #: The upstream a client message is being written to (a takeover waits for it to come
        #: back unsent before the new upstream's flush); the client task, parked in _changed,
        #: waits for the upstream task to decide what follows an upstream's end; an upstream's
        #: close waits for its flush. One lot for these waits (each re-checks what it waits
        #: for), made when first needed: a lot is memory on every idle session.
        self._in_hand: WebSocket | None = None
        self._changed: trio.lowlevel.ParkingLot | None = None  # (made by the first to wait)

    async def run(self) -> Ending:
        """Relay until either side ends; return how the pair ended."""
        async with trio.open_nursery() as nursery:
            self._cancel_scope = nursery.cancel_scope
            nursery.start_soon(self._client_task)
            nursery.start_soon(self._upstream_task)
            if self._deadlines is not None or self._ping_interval or self._rollover_after:
                nursery.start_soon(self._timer_task)
        ending = self.bridge.ending
        assert ending is not None, "a pair's nursery only exits through an ending"
        return ending

    @property
    def pumped(self) -> bool:
        """Whether the pump (the fast path) relays this pair's messages."""
        return self._up_leg is not None

    def behind(self, limit: int) -> bool:
        """Whether either side has sent over ``limit`` bytes the relay has not read, while
        the other side is not what holds the relay back: then the relay itself is too slow."""
        upstream = self._upstream
        if upstream is None:
            return False
        if not upstream.writing and self.client.unread() > limit:
            return True
        return not self.client.writing and upstream.unread() > limit

    async def shutdown(self) -> None:
        """End the pair because the relay is going away (client 1012, upstream 1001)."""
        await self._finish(self.bridge.shutdown())

    async def shed(self) -> None:
        """End the pair to relieve an overloaded relay (client 1013)."""
        await self._finish(self.bridge.overloaded())

    async def notify(self, notice: Reply | Ending | None) -> None:
        """Send the client an event of the relay's own (bounded like any other send); the
        bridge holds it (None) until the client has its session.created."""
        if notice.__class__ is Ending:
            await self._finish(notice)  # type: ignore[arg-type]
        elif notice is not None:
            try:
                await self.client.send(notice.text)  # type: ignore[union-attr]
            except trio.TooSlowError:
                await self._finish(self.bridge.client_too_slow(self._send_timeout))

    async def send_upstream(self, data: str) -> None:
        """Send the upstream an event of the relay's own (a phone call's truncate at a barge-in,
        its goodbye), bounded like any other send. It is the relay's, not the client's, so the
        policy does not screen it; before the upstream opens there is nothing to send it to."""
        upstream = self._upstream
        if upstream is None:
            return
        if self._step_client == self._client_step_tapped:  # a record keeps the cut
            self._tap.client_event(data)  # type: ignore[union-attr]
        try:
            await upstream.send_message(data)
        except ConnectionClosed:
            pass  # the upstream task reads the close and ends the pair
        except trio.TooSlowError:
            await self._finish(self.bridge.upstream_too_slow(self._send_timeout))

    async def end(self, ending: Ending | None) -> None:
        """End the pair as the client side decided (a phone call whose goodbye has played)."""
        await self._finish(ending)

    def _client_step(self, data: Message) -> Message | Reply | Ending | None:
        """One client message through the rate limit and the bridge (the task's and the
        pump's step: see the rules for steps in :mod:`relay.core.bridge`)."""
        now = self.last_activity = self._clock.current_time()
        rate = self._rate
        if rate is not None and not rate.take(len(data), now):
            return self.bridge.too_fast(rate.rate)
        return self.bridge.client_message(data)

    def _client_step_tapped(self, data: Message) -> Message | Reply | Ending | None:
        """:meth:`_client_step`, and the call's log sees what went (or will go) upstream."""
        queued = self.bridge.queued
        out = self._client_step(data)
        # What goes upstream now, or later from the pre-open queue; not what was refused (a
        # refusal before session.created is held: None too, but nothing joined the queue).
        if out is None and self.bridge.queued > queued or out is not None and (
            out.__class__ is not Reply and out.__class__ is not Ending
        ):
            try:
                self._tap.client_event(data)  # type: ignore[union-attr]
            except Exception:  # a record must never end a session
                log_safely("recording a client event failed; the session goes on")
        return out

    async def _client_task(self) -> None:
        """Relay the client's messages to the upstream until the pair ends (in one frame: a
        frame is memory on every idle session)."""
        try:
            bridge = self.bridge
            receive = self.client.receive
            step = self._step_client
            while True:
                leg = self._up_leg
                try:
                    out = READ if leg is None else await self._pump.lend(leg)  # type: ignore[union-attr]
                except Exception:  # a bug, in the step the pump ran or in the pump
                    out = _failed(bridge)
                if out is READ:
                    data = await receive()
                    if data is None:
                        await self._finish(bridge.client_closed())
                        return
                    out = _stepped(step, data, bridge)
                if out is None:
                    continue
                notice = None
                if out.__class__ is Amended:  # the event goes upstream, then the client is told
                    out, notice = out.text, out.notice  # type: ignore[union-attr]
                if out.__class__ is str or out.__class__ is bytes or out is PART:
                    upstream: WebSocket = self._upstream  # type: ignore[assignment]
                    self._in_hand = upstream
                    try:
                        if out is PART:
                            await upstream.finish_send()
                        else:
                            await upstream.send_message(out)  # type: ignore[arg-type]
                    except ConnectionClosed:
                        # The upstream is closing; its task reads what is left and ends the pair,
                        # or (a takeover) the message goes to the next upstream, in its place.
                        if self._takeover is None:
                            return
                        if out is not PART and not await self._requeue(out):  # type: ignore[arg-type]
                            return  # (a frame cut part-way is lost with its upstream)
                        continue
                    except trio.TooSlowError:
                        await self._finish(bridge.upstream_too_slow(self._send_timeout))
                        return
                    finally:
                        self._in_hand = None
                        if self._changed:
                            self._changed.unpark_all()
                    if notice is None:
                        continue
                    out = Reply(notice)
                if out.__class__ is Reply:
                    try:
                        await self.client.send(out.text)  # type: ignore[union-attr]
                    except trio.TooSlowError:
                        await self._finish(bridge.client_too_slow(self._send_timeout))
                        return
                else:
                    await self._finish(out)  # type: ignore[arg-type]
                    return
        finally:
            if self._up_leg is not None:
                self._pump.forget(self._up_leg)  # type: ignore[union-attr]

    async def _wait_for_change(self) -> None:
        """Park until ``_in_hand`` or ``_upstream`` changes, or a flush ends (the caller checks
        which)."""
        if self._changed is None:
            self._changed = trio.lowlevel.ParkingLot()
        await self._changed.park()

    async def _requeue(self, data: Message) -> bool:
        """``data`` could not be sent: its upstream went away. Once the upstream task has
        decided (a takeover, or the end), give it back to the bridge for the next upstream.
        False: the pair is over."""
        upstream = self._in_hand
        while self._upstream is upstream and upstream is not None:
            await self._wait_for_change()
        ending = self.bridge.requeue(data)
        if ending is not None:
            await self._finish(ending)
            return False
        return self.bridge.phase is Phase.CONNECTING  # (else the pair ended)

    async def _upstream_task(self) -> None:
        """Open the upstream (from its source: a dial, or a warm pooled session) within the
        dial timeout, flush, then pump; when the bridge moves the session to a new upstream (a
        :class:`Redial`), open another, with the takeover's tries and backoff, until one takes
        it or the tries are spent."""
        bridge = self.bridge
        takeover = self._takeover
        failures = 0
        while True:
            dial_started = trio.current_time()
            opened, failure = await self._open()
            if opened is None:
                detail, status = failure  # type: ignore[misc]
                if not bridge.taking_over:
                    await self._finish(bridge.dial_failed(detail, status=status))
                    return
                failures += 1
                if failures >= takeover.attempts or status in (401, 403):  # type: ignore[union-attr]
                    await self._finish(bridge.takeover_failed(detail, status=status))
                    return
                await trio.sleep(takeover.backoff(failures))  # type: ignore[union-attr]
                continue
            was_taking_over, takeovers = bridge.taking_over or failures > 0, bridge.takeovers
            opened_at = trio.current_time()
            try:
                closed = await self._relay_upstream(opened, dial_started)
            finally:
                self._upstream = None
                await trio.aclose_forcefully(opened.stream)
                if self._changed:
                    self._changed.unpark_all()
            if closed is None:
                return  # the pair is over
            for text in closed.texts:  # the responses that died with it, failed
                try:
                    await self.client.send(text)
                except trio.TooSlowError:
                    await self._finish(bridge.client_too_slow(self._send_timeout))
                    return
            lasted = trio.current_time() - opened_at >= HEALTHY_SECONDS
            if closed.planned or not was_taking_over or bridge.takeovers > takeovers and lasted:
                failures = 0  # the session's first upstream, or one that held it a while
                continue
            # A takeover's upstream lost before it confirmed the session, or soon after: one
            # more try spent (an upstream that keeps dying is not dialled for ever).
            failures += 1
            if failures >= takeover.attempts:  # type: ignore[union-attr]
                await self._finish(bridge.takeover_failed(closed.why))
                return
            await trio.sleep(takeover.backoff(failures))  # type: ignore[union-attr]

    async def _open(self) -> tuple[Opened | None, tuple[str, int | None] | None]:
        """One upstream from the source within the dial timeout (the caller owns its stream),
        or why not: a description, and the HTTP status of a refusal."""
        with trio.move_on_after(self._dial_timeout):
            try:
                return await self._source.open(), None
            except ConnectionRejected as rejected:
                status = rejected.status_code
                return None, (f"HTTP {status}", status)
            except (OSError, trio.BrokenResourceError) as exc:
                return None, (_describe(exc), None)
        return None, ("timed out", None)

    async def _relay_upstream(self, opened: Opened, dial_started: float) -> Redial | None:
        """Flush, then relay one upstream until it ends: a :class:`Redial` if the session moves
        on to another, None if the pair is over (ended here or elsewhere)."""
        bridge = self.bridge
        first = bridge.queued_at_open is None and not bridge.taking_over
        upstream = opened.websocket
        upstream.send_timeout = self._send_timeout
        self._flushing = True
        self._upstream = upstream
        dial_seconds = trio.current_time() - dial_started
        while self._in_hand is not None:  # a message for the old one, on its way back
            await self._wait_for_change()
        down: Leg | None = None
        try:
            # (a takeover replays the session as it stood, on a pooled session too)
            await self._flush(upstream, opened.created)
            start = bridge.start_now()  # (a session set up in advance: it starts here)
            if start is not None and not await self._start_client(start):
                return None
            if first and self._on_upstream_opened is not None and bridge.queued_at_open is not None:
                self._on_upstream_opened(dial_seconds, bridge.queued_at_open)
            if self._rollover_after:  # (from when the upstream session began: a pooled one's
                # cap runs from before the hand-over)
                began = opened.since if opened.since is not None else trio.current_time()
                self._rollover_at = began + self._rollover_after
                if self._timer_sleep is not None:  # the timer sleeps: it wakes for it
                    self._timer_sleep.deadline = min(self._timer_sleep.deadline, self._rollover_at)
            client_ws = self.client.websocket
            if self._pump and client_ws is not None and client_ws.pumpable and upstream.pumpable:
                down = Leg(upstream, client_ws, self._upstream_step, bridge)
                if self._up_leg is None:
                    self._up_leg = Leg(client_ws, upstream, self._step_client, bridge)
                else:
                    self._up_leg.dst = upstream  # (steps queue client messages until now)
            with trio.CancelScope() as self._upstream_scope:
                closed = await self._upstream_to_client(upstream, down)
            if self._upstream_scope.cancelled_caught:  # no pong: the timer gave up on it
                closed, self._redial = self._redial, None
            if closed.__class__ is tuple:
                closed = bridge.upstream_closed(*closed)  # type: ignore[misc]
            if closed.__class__ is Redial:
                return closed  # type: ignore[return-value]
            await self._finish(closed)  # type: ignore[arg-type]
            return None
        finally:
            if down is not None:
                self._pump.forget(down)  # type: ignore[union-attr]

    async def _start_client(self, start: Batch) -> bool:
        """Give the client its session.created (and what waited for it) from an upstream the
        relay set up before it came; False if the pair ended."""
        try:
            for text in start.texts:
                await self.client.send(text)
        except ConnectionClosed:
            pass  # the client is gone; its task reads so and ends the pair
        except trio.TooSlowError:
            await self._finish(self.bridge.client_too_slow(self._send_timeout))
            return False
        return True

    async def _flush(self, upstream: WebSocket, created: str | None) -> None:
        """Send session.update and the queued client messages, in order; for a session the
        source set up already (``created``: see Bridge.upstream_opened), the queue alone."""
        bridge = self.bridge
        bridge.upstream_opened(created)
        try:
            while (data := bridge.next_to_flush()) is not None:
                try:
                    await upstream.send_message(data)
                except trio.TooSlowError:
                    self._flushed()
                    await self._finish(bridge.upstream_too_slow(self._send_timeout))
                    return
        except ConnectionClosed:
            pass  # the reads that follow still deliver what the upstream sent first
        finally:
            self._flushed()

    def _flushed(self) -> None:
        self._flushing = False
        if self._changed:
            self._changed.unpark_all()

    def _upstream_step(self, data: Message) -> Message | Reply | None:
        """One upstream message through the bridge (the task's and the pump's step: see the
        rules for steps in :mod:`relay.core.bridge`)."""
        self.last_activity = self._clock.current_time()
        voice = self._voice
        if voice is not None and data.__class__ is str:
            try:
                latency = voice.upstream_event(data)  # type: ignore[arg-type]
                if latency is not None and self._on_voice_latency is not None:
                    self._on_voice_latency(latency)
            except Exception:  # a metric must never end a session
                log_safely("timing a voice turn failed; the session goes on")
        return self.bridge.upstream_message(data)

    async def _upstream_to_client(
        self, upstream: WebSocket, leg: Leg | None
    ) -> tuple[int, str | None] | None:
        """Relay until the upstream ends (its close code and reason) or the pair does (None)."""
        bridge = self.bridge
        get_message = upstream.get_message
        client = self.client
        step = self._upstream_step
        while True:
            try:
                out = READ if leg is None else await self._pump.lend(leg)  # type: ignore[union-attr]
            except Exception:  # a bug, in the step the pump ran or in the pump
                out = _failed(bridge)
            if out is READ:
                try:
                    data = await get_message()
                except ConnectionClosed as exc:
                    reason = exc.reason
                    return (reason.code, reason.reason) if reason else (1006, None)
                out = _stepped(step, data, bridge)
            if out is None:
                continue
            if out.__class__ is Ending:
                await self._finish(out)  # type: ignore[arg-type]
                return
            try:
                if out is PART:
                    await client.websocket.finish_send()  # type: ignore[union-attr]
                elif out.__class__ is Batch:
                    for text in out.texts:  # type: ignore[union-attr]
                        await client.send(text)
                else:
                    await client.send(out.text if out.__class__ is Reply else out)  # type: ignore[union-attr,arg-type]
            except ConnectionClosed:
                pass  # the client is gone; its task reads so and ends the pair
            except trio.TooSlowError:
                await self._finish(bridge.client_too_slow(self._send_timeout))
                return
            out = text = None  # not held while the next is awaited: an idle session keeps none
            if bridge.responses_done:
                done, bridge.responses_done = bridge.responses_done, []
                if self._on_responses_done is not None:
                    used_up = await self._on_responses_done(done)
                    if used_up:
                        await self._finish(bridge.budget_exhausted(used_up))
                        return

    async def _timer_task(self) -> None:
        """Everything a pair does on a clock, in one task (a task per timer costs memory on
        every idle session): warnings and cuts at the session's maximum length and idle
        timeout, and pings on both legs, which also keep proxies and NATs from timing
        out a quiet session. A peer that sent nothing at all, not even a pong, for the peer
        timeout is taken for dead. The timer never waits for a pong (each leg's reader takes
        it, and it counts as anything heard): waiting on one peer, it would stop pinging the
        other and take it for dead in turn.
        """
        bridge = self.bridge
        deadlines = self._deadlines
        next_ping = trio.current_time() + self._ping_interval if self._ping_interval else math.inf
        peer_timeout = self._peer_timeout or math.inf
        while True:
            now = trio.current_time()
            if now >= self._rollover_at:
                await self._roll_over()
            if now - self.client.last_heard >= peer_timeout:
                # Gone without a word, like a dropped TCP connection: the end, unless the
                # session waits for its client to resume (relay.server.resume).
                hold = getattr(self.client, "hold", None)
                if hold is None or not hold():
                    await self._finish(bridge.client_closed())
                    return
            wake = self.client.last_heard + peer_timeout
            upstream = self._upstream  # None while dialling: the dial timeout covers that
            if upstream is not None and self._pinging and self._redial is None:
                if now - upstream.last_heard >= peer_timeout:
                    lost = bridge.upstream_unresponsive(self._peer_timeout)
                    if lost.__class__ is not Redial or self._upstream_scope is None:
                        await self._finish(lost)  # type: ignore[arg-type]
                        return
                    self._redial = lost  # type: ignore[assignment]
                    self._upstream_scope.cancel()  # the upstream task dials anew
                else:
                    wake = min(wake, upstream.last_heard + peer_timeout)
            if deadlines is not None:
                step = deadlines.step(now, self.last_activity)
                for due in step.due:
                    if due is Due.SESSION_END:
                        await self._finish(bridge.session_expired(deadlines.max_seconds))
                        return
                    if due is Due.IDLE_END:
                        await self._finish(bridge.idle_timeout(deadlines.idle_seconds))
                        return
                    left = deadlines.seconds_left(now, self.last_activity, due)
                    if due is Due.SESSION_WARNING:
                        await self.notify(bridge.session_warning(left, deadlines.max_seconds))
                    else:
                        await self.notify(bridge.idle_warning(left, deadlines.idle_seconds))
                wake = min(wake, step.wake_at)
            if now >= next_ping:
                try:
                    await self.client.keepalive()
                except trio.TooSlowError:
                    await self._finish(bridge.client_too_slow(self._send_timeout))
                    return
                upstream = self._upstream
                if upstream is not None and self._pinging and self._redial is None:
                    try:
                        await upstream.send_ping()  # its pong, read by the upstream's reader
                    except trio.TooSlowError:
                        await self._finish(bridge.upstream_too_slow(self._send_timeout))
                        return
                next_ping = trio.current_time() + self._ping_interval
            with trio.CancelScope(deadline=min(wake, next_ping, self._rollover_at)) as sleep:
                self._timer_sleep = sleep
                await trio.sleep_forever()
            self._timer_sleep = None

    async def _roll_over(self) -> None:
        """Move the session to a fresh upstream ahead of the Realtime API's cap, between turns:
        client messages wait for the new upstream, the old one is closed (its last events and
        its close come in through the upstream task, which then dials). Not between turns,
        look again in a second."""
        upstream = self._upstream
        if upstream is None or not self.bridge.begin_rollover():
            self._rollover_at = trio.current_time() + ROLLOVER_RETRY
            return
        self._rollover_at = math.inf  # until the new upstream is open
        with trio.move_on_after(self._close_timeout):
            await upstream.send_close(Code.NORMAL, "rollover")

    async def _finish(self, ending: Ending | None) -> None:
        """Carry out an ending: the client's error and close, the upstream's close, cancel.

        Only the first ending is carried out (the bridge returns None after it).
        Close handshakes are bounded by the close timeout and shielded, so an
        outer cancel cannot skip them; after that the nursery is cancelled.
        """
        if ending is None:
            return
        with trio.move_on_after(self._close_timeout, shield=True):
            async with trio.open_nursery() as closing:
                if ending.client_code is not None:
                    closing.start_soon(self._close_client, ending)
                if ending.upstream_code is not None and self._upstream is not None:
                    closing.start_soon(self._close_upstream, self._upstream, ending)
        assert self._cancel_scope is not None
        self._cancel_scope.cancel()

    async def _close_client(self, ending: Ending) -> None:
        if ending.error is not None:
            await self.client.send(ending.error)
        await self.client.close(ending.client_code, ending.client_reason)  # type: ignore[arg-type]

    async def _close_upstream(self, upstream: WebSocket, ending: Ending) -> None:
        while self._flushing:  # a client leaving mid-flush still gets its messages sent
            await self._wait_for_change()
        if upstream.broken:
            return  # a send was cut mid-frame: a close frame now would be garbage; drop the socket
        if ending.upstream_last is not None:
            with contextlib.suppress(ConnectionClosed):
                await upstream.send_message(ending.upstream_last)
        await upstream.aclose(ending.upstream_code, ending.upstream_reason or None)  # type: ignore[arg-type]


#: How often a rollover that is due looks again for a moment between turns (seconds).
ROLLOVER_RETRY = 1.0


@dataclass(frozen=True)
class Takeover:
    """How a pair moves its session to a new upstream (RELAY_FAILOVER_*, RELAY_ROLLOVER_SECONDS).

    ``attempts`` dials at most per takeover, the first at once, then after ``backoff`` seconds,
    doubling up to :data:`MAX_BACKOFF`; ``rollover_seconds`` after an upstream opened, the
    session moves to a fresh one at the next moment between turns (0: never).
    """

    attempts: int
    backoff_seconds: float
    rollover_seconds: float = 0.0

    def backoff(self, failures: int) -> float:
        """Seconds to wait before the try that follows ``failures`` failed ones."""
        return min(MAX_BACKOFF, self.backoff_seconds * 2 ** (failures - 1))


#: The longest wait between two tries of a takeover (seconds).
MAX_BACKOFF = 5.0
#: An upstream that held the session this long (seconds) ends its takeover's count of tries;
#: one lost sooner counts as a failed try of the same takeover.
HEALTHY_SECONDS = 30.0


def _stepped(step: Callable[[Message], Any], data: Message, bridge: Bridge) -> Any:
    """What ``step`` makes of ``data``, where a task (not the pump) runs it; a bug in the step
    (which awaits nothing: no Cancelled) ends this pair only (:func:`_failed`)."""
    try:
        return step(data)
    except (KeyboardInterrupt, SystemExit):
        raise  # (they end the run, as Trio delivers them)
    except BaseException:
        return _failed(bridge)


def _failed(bridge: Bridge) -> Ending | None:
    """A bug ended the pair (called while its exception is handled): logged, and the pair's
    ending (1011, ``relay_internal_error``); only this pair is affected."""
    log_safely("a bug ended a session: closing it with 1011 (relay_internal_error)")
    return bridge.internal_error()


def _describe(exc: BaseException) -> str:
    """A short, key-free description of why a connection could not be made."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, (HandshakeFailed, trio.BrokenResourceError)):
        return str(exc) or "TLS handshake failed"
    return exc.__class__.__name__
