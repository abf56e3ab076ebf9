"""Spreading sessions evenly over the workers of ``relay serve --workers N``.

A voice session holds its connection for minutes, so the worker it lands on carries it
for as long, and the busiest worker is what limits the relay: it runs out of core first,
and its load guard refuses and sheds while the others still have room. Spread by the
kernel's hash (one ``SO_REUSEPORT`` socket per worker), sessions land at random: at 500
sessions on two workers the busier holds about 3.5 % more than the mean, and 9 % more in
one run in twenty; at 20 sessions, 18 % and 45 %.

So every worker accepts from one shared listening socket, and each keeps a count of its
open connections where the others can read it (:class:`Balance`). A worker that holds
more than another live worker lets that one take the next connection
(:class:`BalancedListener`): it waits up to :data:`DEFER` seconds, and takes the
connection only if it is still there then (the other is busy, draining or gone). Two
workers that hold equally many race for it, as the kernel's wake-up decides.
"""

from __future__ import annotations

import errno
import os
import select
import socket as stdlib_socket
from collections.abc import MutableSequence

import trio

#: How long a worker holding more connections leaves a new one to the others.
DEFER = 0.02
#: How often a worker leaving a connection to the others looks whether it is still there.
LOOK = 0.001
#: The count of a worker that has exited: never fewer than anyone's.
GONE = 2**62


class Balance:
    """Every worker's count of open connections, in memory the workers share (a
    ``multiprocessing`` ``RawArray``; any sequence of ints in a test), and which is ours."""

    __slots__ = ("counts", "index")

    def __init__(self, counts: MutableSequence[int], index: int) -> None:
        self.counts = counts
        self.index = index

    def opened(self) -> None:
        self.counts[self.index] += 1

    def closed(self) -> None:
        self.counts[self.index] -= 1

    def ahead(self) -> bool:
        """Whether another worker holds fewer connections than this one."""
        counts = self.counts
        return counts[self.index] > min(counts)

    @staticmethod
    def gone(counts: MutableSequence[int], index: int) -> None:
        """Worker ``index`` has exited: the others no longer leave connections to it."""
        counts[index] = GONE


class BalancedListener(trio.abc.Listener[trio.SocketStream]):
    """Accepts from a listening socket other workers accept from too, taking this worker's
    share of the connections (see the module docstring). Each connection it returns counts
    as open until :meth:`Balance.closed` is called for it."""

    def __init__(self, socket: trio.socket.SocketType, balance: Balance) -> None:
        self.socket = socket
        self.balance = balance
        # The same socket, for accepting without waiting: a connection another worker took
        # between the look and the accept must not leave this one waiting in accept() for the
        # next, which it would then take whatever the counts say by then.
        self._nonblocking = stdlib_socket.socket(fileno=os.dup(socket.fileno()))

    async def accept(self) -> trio.SocketStream:
        while True:
            await trio.lowlevel.wait_readable(self.socket)
            if not await self._left_to_us():
                continue  # another worker took it
            try:
                sock, _ = self._nonblocking.accept()
            except OSError as exc:
                if exc.errno in _CLOSED:
                    raise trio.ClosedResourceError from None
                if exc.errno not in _NOT_NOW:
                    raise
                continue  # taken meanwhile, or given up by the client: look again
            self.balance.opened()
            return trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    async def _left_to_us(self) -> bool:
        """Whether to take the waiting connection: at once unless another worker holds fewer;
        else once it has not been taken for :data:`DEFER` s, or this worker no longer holds
        more (looked at every :data:`LOOK` s, as no event says the connection is gone)."""
        balance = self.balance
        for _ in range(round(DEFER / LOOK)):
            if not balance.ahead():
                return True
            await trio.sleep(LOOK)
            if not _readable(self.socket):
                return False
        return True

    async def aclose(self) -> None:
        self._nonblocking.close()
        self.socket.close()
        await trio.lowlevel.checkpoint()


#: accept() errors that mean the listening socket is closed (as trio.SocketListener has them).
_CLOSED = {errno.EBADF, errno.ENOTSOCK}
#: accept() errors that only mean there is no connection to take now.
_NOT_NOW = {errno.EAGAIN, errno.EWOULDBLOCK, errno.ECONNABORTED, errno.EPERM, errno.EPROTO}


def _readable(sock: trio.socket.SocketType) -> bool:
    """Whether a connection waits on the listening socket now."""
    poll = select.poll()
    poll.register(sock.fileno(), select.POLLIN)
    return bool(poll.poll(0))
