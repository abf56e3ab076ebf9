"""A resumable client leg keeps the bridge's invariants across drops and resumes.

Each example is one session's events sent to a :class:`~relay.server.resume.Resumable` whose
client drops at drawn points, having lost a drawn number of the last events it was sent (in
flight when its connection died), and resumes with the count it really has. Properties: the
client ends up with every event exactly once and in order (order and completeness), unless a
resume is refused because the events it missed are no longer kept (then the relay said so, and
only then); the leg never keeps more than its byte bound (bounded memory); tokens are single-use
(no leak of a session to a second resume). Virtual time, no sockets.
"""

from __future__ import annotations

import math

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from relay.server.resume import Resumable, ResumeRefused, Resumes
from relay.usage.auth import Identity


class Side:
    """One of the client's connections: records what it is sent; ``gone`` ends its reads."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.tokens: list[str] = []
        self._gone = trio.Event()

    async def receive(self) -> str | None:
        await self._gone.wait()
        return None

    async def send(self, data: str) -> None:
        (self.tokens if data.startswith('{"type":"relay.resume"') else self.events).append(data)

    async def close(self, code: int, reason: str) -> None: ...

    async def keepalive(self) -> None: ...

    last_heard = math.inf
    websocket = None
    writing = False
    dropped = True  # (gone: lost on the way, not closed by the client)

    def unread(self) -> int:
        return 0

    def gone(self) -> None:
        self._gone.set()


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[str], dict[int, int], int]:
    n = draw(st.integers(1, 40))
    events = [f'{{"type":"e","n":{i},"pad":"{"x" * draw(st.sampled_from([0, 10, 200]))}"}}'
              for i in range(n)]
    drops = draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 4), max_size=4))
    return events, drops, draw(st.sampled_from([300, 1000, 100_000]))


@given(session=sessions())
def test_a_resumed_client_gets_every_event_once_in_order_or_is_told_it_cannot(
    session: tuple[list[str], dict[int, int], int],
) -> None:
    events, drops, max_bytes = session

    async def main() -> None:
        registry = Resumes()
        identity = Identity(user="alice", method="api_key")
        side = Side()
        leg = Resumable(side, registry=registry, identity=identity, seconds=60, max_bytes=max_bytes)
        have: list[str] = []
        refused = False
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                while await leg.receive() is not None:
                    pass

            nursery.start_soon(read)
            for i, event in enumerate(events):
                await leg.send(event)
                assert leg._kept_bytes <= max(max_bytes, max(map(len, events)))  # bounded
                if i not in drops:
                    continue
                lost = min(drops[i], len(side.events))
                have += side.events[: len(side.events) - lost]  # the rest died in flight
                side.gone()
                await trio.testing.wait_all_tasks_blocked()  # the relay sees it go
                token = leg.token
                assert token is not None
                side = Side()
                try:
                    await leg.resume(side, len(have))
                except ResumeRefused as refusal:
                    assert refusal.code == "relay_resume_gap"
                    assert len(have) < leg.first_kept - 1 or leg._lost
                    refused = True
                    break
                with_token = registry.take(token, identity) if token in registry._by_token else None
                assert with_token is None  # single-use: spent by the resume
            nursery.cancel_scope.cancel()
        if not refused:
            have += side.events
            assert have == events

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_token_is_refused_to_another_user_and_to_a_second_resume() -> None:
    async def main() -> None:
        registry = Resumes()
        alice, bob = Identity("alice", "api_key"), Identity("bob", "api_key")
        leg = Resumable(Side(), registry=registry, identity=alice, seconds=60, max_bytes=1000)
        await leg.send('{"type":"session.created"}')
        token = leg.token
        assert token is not None and token.startswith(registry.prefix)
        for who in (bob,):
            try:
                registry.take(token, who)
                raise AssertionError("another user took the token")
            except ResumeRefused as refusal:
                assert refusal.code == "relay_resume_refused"
        assert registry.take(token, alice) is leg
        try:
            registry.take(token, alice)
            raise AssertionError("a token was used twice")
        except ResumeRefused as refusal:
            assert refusal.code == "relay_resume_refused"

    trio.run(main)
