"""Workers sharing one listening socket take their share of the connections (relay.wire.balance)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from relay.wire.balance import DEFER, Balance, BalancedListener


def test_a_worker_is_ahead_while_another_holds_fewer_connections() -> None:
    counts = [0, 0, 0]
    first, second = Balance(counts, 0), Balance(counts, 1)
    assert not first.ahead() and not second.ahead()  # equal: both may take the next
    first.opened()
    assert first.ahead() and not second.ahead()
    second.opened()
    assert first.ahead()  # the third worker still holds none
    counts[2] = 1
    assert not first.ahead() and not second.ahead()
    first.closed()
    assert counts == [0, 1, 1] and second.ahead()


def test_a_worker_that_has_exited_is_never_left_a_connection() -> None:
    counts = [5, 0]
    balance = Balance(counts, 0)
    assert balance.ahead()
    Balance.gone(counts, 1)
    assert not balance.ahead()


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


class Workers:
    """Two balanced listeners on one socket, as two workers have them, accepting in turn."""

    def __init__(self, counts: list[int], serving: tuple[int, ...]) -> None:
        self.sock = _listening_socket()
        self.port = self.sock.getsockname()[1]
        self.counts = counts
        self.listeners = {  # each on its own descriptor of the socket, as a forked worker is
            i: BalancedListener(trio.socket.from_stdlib_socket(self.sock.dup()), Balance(counts, i))
            for i in serving
        }
        self.accepted: list[tuple[int, float]] = []  # (worker, when)
        self.streams: list[trio.SocketStream] = []  # both ends, held open as sessions hold them

    async def _accept_forever(self, i: int, listener: BalancedListener) -> None:
        while True:
            self.streams.append(await listener.accept())
            self.accepted.append((i, trio.current_time()))

    async def connect(self) -> None:
        """Open a client connection; return once a worker has accepted it."""
        before = len(self.accepted)
        self.streams.append(await trio.open_tcp_stream("127.0.0.1", self.port))
        while len(self.accepted) == before:
            await trio.sleep(0.001)

    @property
    def takers(self) -> list[int]:
        return [i for i, _ in self.accepted]


@asynccontextmanager
async def workers_on_one_socket(
    counts: list[int], serving: tuple[int, ...] = (0, 1)
) -> AsyncIterator[Workers]:
    """Workers (those in ``serving``) accepting from one socket while the body runs."""
    workers = Workers(counts, serving)
    try:
        async with trio.open_nursery() as nursery:
            for i, listener in workers.listeners.items():
                nursery.start_soon(workers._accept_forever, i, listener)
            yield workers
            nursery.cancel_scope.cancel()
    finally:
        for stream in workers.streams:
            await stream.aclose()
        for listener in workers.listeners.values():
            await listener.aclose()
        workers.sock.close()


async def test_connections_opened_one_after_another_are_spread_evenly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with workers_on_one_socket([0, 0]) as workers:
        for _ in range(10):
            await workers.connect()
            assert max(workers.counts) - min(workers.counts) <= 1, workers.accepted
    assert workers.counts == [5, 5]
    # None waited for a worker that would not take it.
    assert all(when < DEFER for _, when in workers.accepted), workers.accepted


async def test_the_worker_holding_more_leaves_the_next_connection_to_the_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with workers_on_one_socket([3, 0]) as workers:
        for _ in range(3):
            await workers.connect()
    assert workers.takers == [1, 1, 1]
    assert workers.counts == [3, 3]


@pytest.mark.parametrize("other", ["busy", "gone"])
async def test_a_connection_the_other_worker_does_not_take_is_taken_after_a_wait_or_at_once(
    autojump_clock: trio.testing.MockClock, other: str
) -> None:
    """A worker leaves the next connection to one holding fewer for DEFER seconds, then takes
    it; one that has exited (the parent marks it gone) is not waited for at all."""
    counts = [3, 0]
    if other == "gone":
        Balance.gone(counts, 1)
    async with workers_on_one_socket(counts, serving=(0,)) as workers:  # 1 accepts nothing
        start = trio.current_time()
        await workers.connect()
    [(worker, when)] = workers.accepted
    assert worker == 0 and counts[0] == 4
    assert when - start == (pytest.approx(DEFER, abs=0.002) if other == "busy" else 0)


async def test_a_worker_that_lost_a_race_for_a_connection_looks_again_at_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Holding equally many, both workers go for a connection and one gets it. The other must
    not then wait in accept() and take the next one whatever the counts say by then."""
    counts = [0, 0]
    async with workers_on_one_socket(counts) as workers:
        for _ in range(6):
            counts[:] = [0, 0]
            await workers.connect()  # a tie: both go for it
            taker = workers.takers[-1]
            counts[1 - taker] = 5  # the one that lost now holds more
            await workers.connect()
            assert workers.takers[-1] == taker, workers.accepted
