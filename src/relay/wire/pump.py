"""Relaying the messages of every pair whose legs are plain sockets, while Trio waits for I/O.

Relaying a message the ordinary way (:mod:`relay.server.pair`) wakes the pair's task for it:
Trio re-arms the socket in its epoll, goes round its run loop, schedules the task,
resumes its coroutines, and the task reads once more only to find the socket empty.
For a 6.5 KB audio event that is most of what the relay spends, and one session's
round trip through the relay costs two such wake-ups.

A running :class:`Pump` puts the run's *driver* (one per Trio run, shared by every
pump in it) where Trio's run loop waits for I/O: its I/O manager's ``get_events``.
The driver has an epoll of its own, holding every pumped socket (edge-triggered,
registered once) and Trio's own epoll (level-triggered). Where Trio would block,
the driver blocks instead, and for no longer than Trio would have; when pumped
sockets turn readable it reads them, runs each message through the pair's sans-IO
step (the same one the task would run) and writes the result to the other leg's
socket, waking no task at all. It returns to Trio as soon as Trio's epoll has
events, a task is runnable (one the pump handed work, or any other), or Trio's
timeout is up, and gives Trio exactly the events Trio would have seen. When Trio has
tasks to run (a timeout of 0), the driver serves one round without waiting. Trio's
timers, its other sockets and its clocks behave as before; ``wait_all_tasks_blocked``
sees the pump's work as no task's. The app's lifespan runs one pump per worker
(:attr:`relay.server.app.RelayApp.pump`).

Before it sleeps, an idle driver polls for a while (``RELAY_BUSY_POLL`` at most): waking
a sleeping process costs tens of µs on a VM, and a session's round trip wakes the relay
twice. It gives its core to any process waiting for one at each turn of the poll, learns
from every idle spell how long polling pays off (:class:`PollWindow`), and reports the
time it polled (:attr:`Pump.polled`), which the load guard does not count as load. A
worker using half a core or more does not poll (:meth:`Pump.set_busy`).

The pump only does what needs no waiting. Whatever does, it hands back to the
pair's task, which :meth:`Pump.lend` then returns to, in order and with nothing
skipped: a control frame, the end of the connection or a protocol error next on
the socket (:data:`READ`: read it the ordinary way), a message the other leg's
socket had no room for (the bridge's output, to send the ordinary way) or room for
only part of (:data:`~relay.wire.websocket.PART`: finish the write), and any reply or
ending of the bridge's. Backpressure, send timeouts, closes and cancellation stay
the task's, exactly as without the pump.

The driver uses what Trio does not publish: the run's epoll I/O manager (its epoll
and its ``get_events``) and its queue of runnable tasks (every name is in
:mod:`relay.wire.internals`). Where they are not there (no epoll, guest mode, a Trio whose
insides moved), no pump runs; :func:`prove` relays one message through a new pump before a
worker reports ready, so a change no name check can see (Trio no longer waiting through the
attribute the driver replaces) turns the pump off too, and pairs relay through their own tasks.

The driver keeps Trio's rules where it stands in for Trio's wait. Nothing a step raises leaves
``get_events``: the error goes to the task that lent the leg, so only its pair fails (a
KeyboardInterrupt or SystemExit is raised in that task as it is, as Trio delivers them; any
other exception that is not an Exception as :class:`StepFailed`). A failure of the driver itself
is logged and gives every leg back. ``get_events`` returns something truthy whenever it moved
data, so that Trio does not take a round in which only the pump worked for idle time
(``wait_all_tasks_blocked``, the autojump clock), and it goes back to Trio once Trio's timeout is
up, whether or not sockets still have data. A leg over the relay's own TLS
(:mod:`relay.wire.tls`, the upstream's ``wss://``) is pumped like a plain one; Trio's TLS (a
client leg Hypercorn serves over TLS) and in-memory streams are not: their writes cannot be
made without waiting for the stream's own machinery.
"""

from __future__ import annotations

import logging
import select
import time
from collections import deque
from collections.abc import Callable
from os import sched_yield
from typing import Any

import trio
from outcome import Error, Value

from ..core.bridge import Bridge, Limits, Message, Reply
from . import frames
from .internals import PUMP, problems
from .websocket import HELD, PART, WebSocket

#: Hand-back: the next thing on the socket is for the ordinary read (get_message).
READ = HELD
#: Messages one socket may have relayed in a row before others get their turn.
BUDGET = 16
#: Readiness events taken from the kernel per round.
MAX_EVENTS = 1024
#: The first poll window an idle driver tries (see :class:`PollWindow`).
GROW_START = 10e-6

#: Seconds :func:`prove` gives one message to cross a pump before it takes the pump for broken.
PROOF_SECONDS = 2.0

_MORE = object()  # a drain stopped at its budget: the socket may have more
#: Whether this platform has epoll (read once: the relay imports and runs without it).
HAVE_EPOLL = hasattr(select, "epoll") and hasattr(select, "EPOLLIN")
_FLAGS = (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET) if HAVE_EPOLL else 0
_HANGUP = (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR) if HAVE_EPOLL else 0

log = logging.getLogger("relay")

Step = Callable[[Message], "Message | Reply | object | None"]


class StepFailed(Exception):
    """A step raised something that is neither an Exception nor KeyboardInterrupt/SystemExit
    (its ``__cause__``): its pair fails with this instead."""


class _Moved(list):  # type: ignore[type-arg]
    """No event for Trio, but truthy: the pump moved data in the round (see get_events)."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


_MOVED = _Moved()


class Leg:
    """One direction of a pair: messages read from ``src``, run through ``step``, written to
    ``dst``. Lent to the pump by the task that relays it (see :meth:`Pump.lend`)."""

    __slots__ = ("src", "dst", "step", "bridge", "fd", "task", "queued")

    def __init__(self, src: WebSocket, dst: WebSocket, step: Step, bridge: Bridge) -> None:
        self.src = src
        self.dst = dst
        self.step = step
        self.bridge = bridge
        self.fd = -1  # registered with the driver's epoll under this fd
        self.task: trio.lowlevel.Task | None = None  # the task parked in lend()
        self.queued = False  # in the pump's ready queue


class PollWindow:
    """How long an idle driver polls its sockets before it sleeps: the rule of Linux's
    guest halt-polling governor.

    Waking a process that sleeps costs tens of µs on a VM, twice in a session's round trip
    through the relay (an idle core halts and is woken through the host); a message that comes
    while the driver polls costs none. The window doubles (from :data:`GROW_START`, up to
    ``limit``) after an idle spell that ended within ``limit`` but after the window, stays after
    one it caught, and halves (to 0 below :data:`GROW_START`) after one that outlasted
    ``limit``: a relay whose messages come ms apart soon polls not at all.
    """

    __slots__ = ("limit", "now")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.now = 0.0  # seconds to poll before the next sleep

    def idled(self, seconds: float) -> None:
        """Learn from an idle spell of ``seconds`` (from the first poll to the first event)."""
        if seconds <= self.now:
            return
        if seconds <= self.limit:
            self.now = min(self.limit, max(GROW_START, self.now * 2))
        else:
            half = self.now / 2
            self.now = half if half >= GROW_START else 0.0


class Pump:
    """See the module docstring. :meth:`run` serves; the pairs' tasks :meth:`lend` it legs.

    ``busy_poll``: at most how long (s) the driver polls before it sleeps (:class:`PollWindow`).
    """

    def __init__(self, busy_poll: float = 0.0) -> None:
        self.busy_poll = busy_poll
        self.busy = False  # see set_busy
        self._legs: dict[int, Leg] = {}
        self._driver: _Driver | None = None
        #: Why the pump is not running, once :meth:`run` found it cannot (None: it can, or it
        #: has not tried yet).
        self.unavailable: str | None = None

    def set_busy(self, busy: bool) -> None:
        """A busy worker does not poll: its next message is seldom far off, and the core it
        would poll on is one that the other processes of a loaded machine need."""
        self.busy = busy
        if self._driver is not None:
            self._driver.limit_polling()

    @property
    def running(self) -> bool:
        """Whether legs lent now are relayed by the pump (else :meth:`lend` returns READ)."""
        return self._driver is not None

    @property
    def polled(self) -> float:
        """Seconds the run's driver has spent polling rather than sleeping: idle time, not load."""
        return self._driver.polled if self._driver is not None else 0.0

    @property
    def watching(self) -> int:
        """Legs whose sockets the pump watches (lent now or earlier, and not yet forgotten)."""
        return len(self._legs)

    async def lend(self, leg: Leg) -> object:
        """Let the pump relay ``leg`` until it meets something only the task can do; return it.

        Returns :data:`READ`, :data:`~relay.wire.websocket.PART` or what the leg's step returned
        and the pump could not send. A checkpoint, like any Trio I/O call.
        """
        await trio.lowlevel.checkpoint()
        src = leg.src
        if self._driver is None or not src.hold_reading():
            return READ  # no pump, or someone else reads (a close in progress): the ordinary way
        try:
            if leg.fd < 0:
                self._driver.watch(leg)
                self._legs[leg.fd] = leg
            while True:
                try:
                    out = _drain(leg)
                except BaseException as exc:  # the step's: raised here as from the pump's driver
                    raise _for_task(exc)  # noqa: B904 (its own cause, if any)
                if out is not _MORE:
                    break
                await trio.lowlevel.checkpoint()
        except BaseException:
            src.release_reading()
            raise
        if self._driver is None:  # stopped meanwhile
            out = READ
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
        if self._driver is not None:
            self._driver.unwatch(fd, leg)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then every lent leg goes back to its task.

        Started (``nursery.start``) once the pump serves, or has found it cannot: then it
        returns at once, with :attr:`unavailable` saying why (it never raises for that).
        """
        try:
            self._driver = _Driver.attach(self)
        except Exception as exc:  # e.g. Trio refused the driver in its I/O manager's place
            self.unavailable = f"the pump could not take Trio's wait: {exc!r}"
        else:
            if self._driver is None:
                self.unavailable = _unavailable() or "unknown"
        task_status.started()
        if self._driver is None:
            return
        try:
            await trio.sleep_forever()
        finally:
            self.stop()

    def stop(self) -> None:
        """Give every lent leg back to its task and leave the driver (idempotent)."""
        driver, self._driver = self._driver, None
        if driver is None:
            return
        for fd, leg in list(self._legs.items()):
            driver.unwatch(fd, leg)
            leg.fd = -1
            if leg.task is not None:
                driver.give_back(leg, Value(READ))
        self._legs.clear()
        driver.detach(self)


class _Driver:
    """The run's: waits for Trio's I/O and every pump's sockets at once (see the module
    docstring). Stands in for the I/O manager's ``get_events`` while any pump runs."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        io = runner.io_manager
        self._trio_wait: Callable[[float], Any] = io.get_events  # Trio's own
        self._trio_fd: int = io._epoll.fileno()
        self._epoll = select.epoll()
        self._epoll.register(self._trio_fd, select.EPOLLIN)  # level: readable while it has events
        self._legs: dict[int, Leg] = {}
        self._ready: deque[Leg] = deque()
        self._pumps: set[Pump] = set()
        self.window = PollWindow(0.0)
        self.polled = 0.0  # seconds spent polling, see Pump.polled
        self._moved = False  # this get_events served a leg
        try:
            _set_io_manager(runner, _WaitingThrough(io, self.get_events))  # until detach()
        except BaseException:
            self._epoll.close()
            raise

    @classmethod
    def attach(cls, pump: Pump) -> _Driver | None:
        """The run's driver (started now if none is), with ``pump`` among its users."""
        driver = _DRIVER.get()
        if driver is None:
            runner = _trio_runner()
            if runner is None:
                return None
            driver = cls(runner)
            _DRIVER.set(driver)
        driver._pumps.add(pump)
        driver.limit_polling()
        return driver

    def limit_polling(self) -> None:
        """Poll for as long as the pumps that are not busy allow."""
        limit = max((0.0 if p.busy else p.busy_poll for p in self._pumps), default=0.0)
        self.window.limit = limit
        self.window.now = min(self.window.now, limit)

    def detach(self, pump: Pump) -> None:
        self._pumps.discard(pump)
        self.limit_polling()
        if not self._pumps:
            _DRIVER.set(None)
            self._epoll.close()
            waiting = self._runner.io_manager
            if isinstance(waiting, _WaitingThrough):  # (else it never took: nothing to undo)
                _set_io_manager(self._runner, waiting.io)  # Trio waits on its own again

    def watch(self, leg: Leg) -> None:
        fd = leg.src.fileno()
        try:
            self._epoll.register(fd, _FLAGS)
        except FileExistsError:  # a closed socket's number, still listed
            self._epoll.modify(fd, _FLAGS)
        leg.fd = fd
        self._legs[fd] = leg

    def unwatch(self, fd: int, leg: Leg) -> None:
        if self._legs.get(fd) is not leg:
            return
        del self._legs[fd]
        if leg.src.fileno() == fd:  # still open (a closed one left the epoll by itself)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass

    @trio.lowlevel.enable_ki_protection  # (as all of Trio's run loop: KI goes to a task)
    def get_events(self, timeout: float) -> Any:
        """Trio's run loop waits here: serve pumped legs until Trio has something to do.

        Returns Trio's own events, or (none, but the pump moved data) something truthy, as
        Trio's contract is: falsey only if the timeout expired with nothing done.
        """
        self._moved = False
        try:
            self._serve_until(timeout)
        except Exception:  # the driver's own (a step's goes to its pair, see _serve)
            log_safely("the pump failed; its sessions go on through their own tasks")
            self._stop_all()
        except BaseException:
            self._stop_all()  # no leg left parked with a driver that is gone
            raise
        events = self._trio_wait(0)  # whatever Trio's epoll has now, without waiting
        return _MOVED if self._moved and not events else events

    def _stop_all(self) -> None:
        for pump in list(self._pumps):
            pump.stop()

    def _serve_until(self, timeout: float) -> None:
        """Serve ready legs for up to ``timeout`` s (one round if 0), until Trio's epoll has
        events or a task is runnable. The deadline is looked at every round, legs left over
        from the last round or not: a flood on one socket never holds up Trio's timers."""
        epoll = self._epoll
        legs = self._legs
        ready = self._ready
        trio_fd = self._trio_fd
        runnable = self._runner.runq
        clock = self._runner.clock
        deadline = time.perf_counter() + timeout
        first = True
        while True:
            wait = 0.0  # legs left over from the last round: serve them before waiting
            if timeout > 0:
                wait = deadline - time.perf_counter()
                if wait <= 0 and not first:
                    return
            first = False
            if wait > 0 and not ready:
                events = self._idle(wait)
            else:
                wait = 0.0
                events = epoll.poll(0, MAX_EVENTS)
            trio_ready = False
            now = clock.current_time() if events else 0.0
            for fd, flags in events:
                leg = legs.get(fd)
                if leg is None:
                    trio_ready = trio_ready or fd == trio_fd
                    continue
                leg.src.readable(bool(flags & _HANGUP), now)
                if leg.task is not None and not leg.queued:
                    leg.queued = True
                    ready.append(leg)
            for _ in range(len(ready)):
                leg = ready.popleft()
                leg.queued = False
                if leg.task is not None:
                    self._serve(leg)
            if trio_ready or runnable or timeout <= 0 or (not events and wait > 0):
                return  # Trio has work, or the time is up

    def _idle(self, wait: float) -> list[tuple[int, int]]:
        """Wait up to ``wait`` s for events: poll for the window's length first, then sleep."""
        epoll = self._epoll
        window = self.window
        start = time.perf_counter()
        events: list[tuple[int, int]] = []
        if window.now:
            until = start + min(window.now, wait)
            while not (events := epoll.poll(0, MAX_EVENTS)) and time.perf_counter() < until:
                sched_yield()  # a process waiting for this core gets it first
            self.polled += time.perf_counter() - start
        if not events:
            events = epoll.poll(max(0.0, start + wait - time.perf_counter()), MAX_EVENTS)
        window.idled(time.perf_counter() - start)
        return events

    def _serve(self, leg: Leg) -> None:
        self._moved = True
        try:
            out = _drain(leg)
        except BaseException as exc:  # a step's: its pair's to raise, not the run's
            self.give_back(leg, Error(_for_task(exc)))
            return
        if out is _MORE:
            leg.queued = True
            self._ready.append(leg)
        elif out is not None:
            self.give_back(leg, Value(out))

    def give_back(self, leg: Leg, result: Value | Error) -> None:
        task = leg.task
        assert task is not None
        leg.task = None
        leg.src.release_reading()
        trio.lowlevel.reschedule(task, result)


_DRIVER: trio.lowlevel.RunVar[_Driver | None] = trio.lowlevel.RunVar("relay.wire.pump", default=None)


class _WaitingThrough:
    """Trio's I/O manager as the run loop sees it while a driver runs: the same, but for
    where it waits."""

    __slots__ = ("io", "get_events", "process_events")

    def __init__(self, io: Any, get_events: Callable[[float], Any]) -> None:
        self.io = io
        self.get_events = get_events
        self.process_events = io.process_events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.io, name)


def _unavailable() -> str | None:
    """Why no pump can run in this Trio run (None: one can)."""
    if not HAVE_EPOLL:
        return "this platform has no epoll"
    backend = trio.lowlevel.current_statistics().io_statistics.backend
    if backend != "epoll":
        return f"this Trio run waits with {backend}, not epoll"
    missing = problems(PUMP)
    if missing:
        return "Trio's insides moved: " + "; ".join(missing)
    from trio._core._run import GLOBAL_RUN_CONTEXT

    if GLOBAL_RUN_CONTEXT.runner.is_guest:
        return "Trio runs in guest mode"
    return None


def _trio_runner() -> Any | None:
    """This run's Trio runner, if the driver can share its epoll I/O manager."""
    if _unavailable() is not None:
        return None
    from trio._core._run import GLOBAL_RUN_CONTEXT

    return GLOBAL_RUN_CONTEXT.runner


def _set_io_manager(runner: Any, io: Any) -> None:
    """Where the driver takes (and gives back) Trio's wait: the run loop calls
    ``runner.io_manager.get_events`` (see relay.wire.internals)."""
    runner.io_manager = io


def _for_task(exc: BaseException) -> BaseException:
    """What a step raised, as the task that lent its leg raises it: KeyboardInterrupt and
    SystemExit as they are (they must end the run, and Trio raises them in tasks too), an
    Exception as it is (its pair fails), anything else as StepFailed (no step may raise a
    Cancelled or GeneratorExit of its own: its pair fails, not the run)."""
    if isinstance(exc, (Exception, KeyboardInterrupt, SystemExit)):
        return exc
    failed = StepFailed(f"a step raised {exc!r}")
    failed.__cause__ = exc
    return failed


def log_safely(message: str) -> None:
    """Log an error with its traceback from inside Trio's wait: a handler that raises must
    not end the run."""
    try:
        log.exception(message)
    except Exception:
        pass


async def prove(pump: Pump, within: float | None = None) -> str | None:
    """Relay one message through ``pump`` (serving in this run) over a loopback pair, the way
    a session's is relayed; return why it could not (None: the pump works).

    The leg is lent first and the message written after, so only the driver can relay it:
    a pump whose driver Trio never calls relays nothing, and this says so after ``within``
    seconds (default :data:`PROOF_SECONDS`).
    """
    timeout = PROOF_SECONDS if within is None else within
    if not pump.running:
        return pump.unavailable or "the pump is not running"
    near_in, far_in = trio.socket.socketpair()
    near_out, far_out = trio.socket.socketpair()
    try:
        bridge = Bridge(session_update="{}", limits=Limits(1, 1 << 16, 1 << 16))
        bridge.upstream_opened()
        while bridge.next_to_flush() is not None:
            pass  # open: a client message goes through unchanged
        src = WebSocket(trio.SocketStream(near_in), client=False, max_message_bytes=1 << 16)
        dst = WebSocket(trio.SocketStream(near_out), client=False, max_message_bytes=1 << 16)
        if not (src.pumpable and dst.pumpable):
            return "Trio's sockets no longer show the OS socket under them"
        leg = Leg(src, dst, bridge.client_message, bridge)
        message = '{"type":"relay.pump.proof"}'
        lent: list[object] = []
        got: object = None
        with trio.move_on_after(timeout) as waited:
            async with trio.open_nursery() as nursery:

                async def lend() -> None:
                    lent.append(await pump.lend(leg))

                nursery.start_soon(lend)
                for _ in range(8):  # the task parks with the driver at its first checkpoint
                    if leg.task is not None or lent:
                        break
                    await trio.lowlevel.checkpoint()
                if leg.task is not None:
                    await far_in.send(frames.frame(frames.OP_TEXT, message.encode(), mask=True))
                    reader = frames.FrameReader(masked=False, max_message_bytes=1 << 16)
                    while (got := reader.next()) is None and not lent:
                        data = await far_out.recv(1 << 16)
                        if not data:
                            break
                        reader.feed(data)
                nursery.cancel_scope.cancel()
        pump.forget(leg)
        if got == message:
            return None
        if waited.cancelled_caught:
            return (
                f"no message crossed the pump in {timeout:g} s: Trio no longer waits through"
                " the I/O manager's get_events that the pump replaces"
            )
        if lent:
            return f"the pump gave the proof's leg back ({lent[0]!r}) instead of relaying it"
        return "the pump did not take the proof's leg"
    finally:
        for sock in (near_in, far_in, near_out, far_out):
            sock.close()


def _drain(leg: Leg) -> object:
    """Relay what ``leg``'s socket has now. None: all of it; _MORE: the budget ran out first;
    anything else: what the task must do next."""
    src = leg.src
    dst = leg.dst
    step = leg.step
    bridge = leg.bridge
    poll = src.poll
    reader = src.reader
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
            # Passed on unchanged: the frame it came in is the frame to send, if it can be.
            sent = dst.send_now(out, reader.frame if out is data else None)  # type: ignore[arg-type]
            if sent is True:
                continue
            if sent is PART:
                return PART
        return out  # not sent: a reply, an ending, a full socket, or accounting to do first
    return _MORE

