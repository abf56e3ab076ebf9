"""One task per worker moves the messages of every pair whose legs are plain sockets.

The app's lifespan runs it (:attr:`relay.app.RelayApp.pump`); without a lifespan,
pairs relay through their own tasks as before.

Relaying a message the ordinary way (:mod:`relay.pair`) wakes the pair's task for it:
Trio re-arms the socket in its epoll, schedules the task, resumes its coroutines,
and the task reads once more only to find the socket empty. For a 6.5 KB audio
event that is most of what the relay spends. The pump does what an event loop of
callbacks does instead: its own epoll, edge-triggered, with every pumped socket
registered once; one wake-up of one task reads every socket that became readable,
runs each message through the pair's sans-IO step (the same one the task would run)
and writes the result to the other leg's socket at once.

The pump only does what needs no waiting. Whatever does, it hands back to the
pair's task, which :meth:`Pump.lend` then returns to, in order and with nothing
skipped: a control frame, the end of the connection or a protocol error next on
the socket (:data:`READ`: read it the ordinary way), a message the other leg's
socket had no room for (the bridge's output, to send the ordinary way) or room for
only part of (:data:`~relay.websocket.PART`: finish the write), and any reply or
ending of the bridge's. Backpressure, send timeouts, closes and cancellation stay
the task's, exactly as without the pump.

TLS and in-memory streams are not pumped: their writes cannot be made without
waiting for the stream's own machinery.
"""

from __future__ import annotations

import select
from collections import deque
from collections.abc import Callable

import trio
from outcome import Error, Value

from .bridge import Bridge, Message, Reply
from .websocket import HELD, PART, WebSocket

#: Hand-back: the next thing on the socket is for the ordinary read (get_message).
READ = HELD
#: Messages one socket may have relayed in a row before others get their turn.
BUDGET = 16
#: Readiness events taken from the kernel per round.
MAX_EVENTS = 1024

_MORE = object()  # a drain stopped at its budget: the socket may have more
_FLAGS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

Step = Callable[[Message], "Message | Reply | object | None"]


class Leg:
    """One direction of a pair: messages read from ``src``, run through ``step``, written to
    ``dst``. Lent to the pump by the task that relays it (see :meth:`Pump.lend`)."""

    __slots__ = ("src", "dst", "step", "bridge", "fd", "task", "queued")

    def __init__(self, src: WebSocket, dst: WebSocket, step: Step, bridge: Bridge) -> None:
        self.src = src
        self.dst = dst
        self.step = step
        self.bridge = bridge
        self.fd = -1  # registered with the pump's epoll under this fd
        self.task: trio.lowlevel.Task | None = None  # the task parked in lend()
        self.queued = False  # in the pump's ready queue


class Pump:
    """See the module docstring. :meth:`run` serves; the pairs' tasks :meth:`lend` it legs."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._legs: dict[int, Leg] = {}
        self._ready: deque[Leg] = deque()
        self._stopped = False

    @property
    def watching(self) -> int:
        """Legs whose sockets the pump watches (lent now or earlier, and not yet forgotten)."""
        return len(self._legs)

    async def lend(self, leg: Leg) -> object:
        """Let the pump relay ``leg`` until it meets something only the task can do; return it.

        Returns :data:`READ`, :data:`~relay.websocket.PART` or what the leg's step returned
        and the pump could not send. A checkpoint, like any Trio I/O call.
        """
        await trio.lowlevel.checkpoint()
        src = leg.src
        if self._stopped or not src.hold_reading():
            return READ  # someone else is reading (a close in progress): the ordinary way
        try:
            if leg.fd < 0:
                self._register(leg)
            while (out := _drain(leg)) is _MORE:
                await trio.lowlevel.checkpoint()
        except BaseException:
            src.release_reading()
            raise
        if out is not None:
            src.release_reading()
            return out
        leg.task = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            leg.task = None
            src.release_reading()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def forget(self, leg: Leg) -> None:
        """The leg is done with: stop watching its socket (call before the socket closes)."""
        fd, leg.fd = leg.fd, -1
        if fd < 0 or self._legs.get(fd) is not leg:
            return
        del self._legs[fd]
        if leg.src.fileno() == fd:  # still open (a closed one left the epoll by itself)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    def _register(self, leg: Leg) -> None:
        fd = leg.src.fileno()
        try:
            self._epoll.register(fd, _FLAGS)
        except FileExistsError:  # a closed socket's number, still listed
            self._epoll.modify(fd, _FLAGS)
        leg.fd = fd
        self._legs[fd] = leg

    async def run(self) -> None:
        """Serve ready sockets until cancelled; then every lent leg goes back to its task."""
        epoll = self._epoll
        legs = self._legs
        ready = self._ready
        try:
            while True:
                if ready:
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                for fd, events in epoll.poll(0, MAX_EVENTS):
                    leg = legs.get(fd)
                    if leg is None:
                        continue
                    leg.src.readable(bool(events & _HANGUP))
                    if leg.task is not None and not leg.queued:
                        leg.queued = True
                        ready.append(leg)
                for _ in range(len(ready)):
                    leg = ready.popleft()
                    leg.queued = False
                    if leg.task is not None:
                        self._serve(leg)
        finally:
            self._stopped = True
            for leg in list(legs.values()):
                if leg.task is not None:
                    self._give_back(leg, Value(READ))
                leg.fd = -1
            legs.clear()
            epoll.close()

    def _serve(self, leg: Leg) -> None:
        try:
            out = _drain(leg)
        except Exception as exc:  # a bug in a step: it is the pair's to raise, not the process's
            self._give_back(leg, Error(exc))
            return
        if out is _MORE:
            leg.queued = True
            self._ready.append(leg)
        elif out is not None:
            self._give_back(leg, Value(out))

    def _give_back(self, leg: Leg, result: Value | Error) -> None:
        task = leg.task
        assert task is not None
        leg.task = None
        leg.src.release_reading()
        trio.lowlevel.reschedule(task, result)


def _drain(leg: Leg) -> object:
    """Relay what ``leg``'s socket has now. None: all of it; _MORE: the budget ran out first;
    anything else: what the task must do next."""
    src = leg.src
    dst = leg.dst
    step = leg.step
    bridge = leg.bridge
    poll = src.poll
    for _ in range(BUDGET):
        data = poll()
        if data is None:
            return None
        if data is HELD:
            return READ
        out = step(data)  # type: ignore[arg-type]
        if out is None:
            continue
        cls = out.__class__
        if (cls is str or cls is bytes) and not bridge.responses_done:
            sent = dst.send_now(out)  # type: ignore[arg-type]
            if sent is True:
                continue
            if sent is PART:
                return PART
        return out  # not sent: a reply, an ending, a full socket, or accounting to do first
    return _MORE

