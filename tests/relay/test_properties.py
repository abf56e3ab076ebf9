"""The bridge keeps its invariants under any interleaving (in memory, virtual time).

Each test is one invariant of the design, checked over scenarios Hypothesis draws:
client messages (text and binary, empty to past the limits), the upstream's open
delay or refusal, upstream events interleaved with client sends, which side closes
when and how (including drops without a close frame), and slow readers on either
side. Every example is a fresh ``trio.run`` on a ``MockClock`` that jumps ahead
whenever all tasks wait, so timeouts cost nothing and a failure replays exactly.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import orjson
import trio
import trio.testing
from hypothesis import event, given
from hypothesis import strategies as st

from relay.core.bridge import Cause
from relay.core.closecodes import sendable

from .memory import (
    CLOSE_TIMEOUT,
    DIAL_TIMEOUT,
    POOLED_CREATED,
    SECRET,
    SEND_TIMEOUT,
    SESSION_UPDATE,
    ClientScript,
    Outcome,
    UpstreamScript,
    limits,
    run_pair,
)

LIMITS = limits()
GAPS = st.sampled_from([0.0, 0.0, 0.001, 0.01, 0.1, 0.5, 2.0])


def run_in_virtual_time(main: Callable[[], Awaitable[Any]]) -> Any:
    return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


# -- strategies ---------------------------------------------------------------------


@st.composite
def client_messages(draw: st.DrawFn, max_size: int = 14) -> tuple[Any, ...]:
    n = draw(st.integers(0, max_size))
    messages: list[str | bytes] = []
    for i in range(n):
        if draw(st.integers(0, 5)) == 0:
            size = draw(st.sampled_from([0, 1, 480, 960, 1500, 2001]))
            messages.append(bytes([i]) * size)
        else:
            pad = draw(st.sampled_from([0, 10, 500, 1900, 2100]))
            messages.append(f'{{"type":"conversation.item.create","n":{i},"pad":"{"x" * pad}"}}')
    return tuple(messages)


@st.composite
def client_scripts(draw: st.DrawFn, *, may_stay: bool = True) -> ClientScript:
    messages = draw(client_messages())
    gaps = tuple(draw(GAPS) for _ in messages)
    closes_after = draw(st.one_of(st.none(), GAPS) if may_stay else GAPS)
    read_delay = draw(st.sampled_from([0.0, 0.0, 0.01, 0.2, 10.0]))  # 10 s: a stalled reader
    return ClientScript(messages, gaps, closes_after, read_delay)


@st.composite
def upstream_events(draw: st.DrawFn) -> tuple[str, ...]:
    n = draw(st.integers(0, 10))
    events = []
    for i in range(n):
        leak = SECRET if draw(st.integers(0, 6)) == 0 else ""
        audio = "A" * draw(st.sampled_from([0, 100, 6400]))
        events.append(f'{{"type":"response.output_audio.delta","n":{i},"delta":"{audio}{leak}"}}')
    return tuple(events)


@st.composite
def upstream_scripts(draw: st.DrawFn) -> UpstreamScript:
    kind = draw(st.sampled_from(["normal"] * 6 + ["unreachable", "refused", "silent"]))
    if kind == "unreachable":
        return UpstreamScript(unreachable=True)
    if kind == "refused":
        return UpstreamScript(refuse_status=draw(st.sampled_from([401, 403, 500, 503])))
    if kind == "silent":
        return UpstreamScript(open_delay=DIAL_TIMEOUT + 1)
    events = draw(upstream_events())
    return UpstreamScript(
        open_delay=draw(GAPS),
        events=events,
        gaps=tuple(draw(GAPS) for _ in events),
        ending=draw(st.sampled_from(["stay", "close", "close", "drop"])),
        close_code=draw(st.sampled_from([1000, 1001, 1008, 1011, 1012, 3000, 4000, 4999])),
        close_reason=draw(st.sampled_from(["", "bye", "invalid_request_error.invalid_model"])),
        read_delay=draw(st.sampled_from([0.0, 0.0, 0.01, 0.2, 10.0])),
        tight=draw(st.booleans()),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ClientScript, UpstreamScript]:
    upstream = draw(upstream_scripts())
    # Someone has to end the pair: if the upstream stays, the client leaves.
    client = draw(client_scripts(may_stay=upstream.ending != "stay" or upstream.unreachable))
    return client, upstream


# -- the reference model ----------------------------------------------------------


def upstream_form(message: str | bytes) -> str:
    """What a client message looks like when it reaches the upstream."""
    if isinstance(message, bytes):
        return orjson.dumps(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(message).decode()}
        ).decode()
    return message


def acceptable_prefix(messages: tuple[str | bytes, ...]) -> list[str]:
    """The client messages the relay may forward: those before the first oversized one."""
    out = []
    for message in messages:
        if len(message) > LIMITS.max_message_bytes:
            break
        out.append(upstream_form(message))
    return out


def client_code_for(upstream_code: int) -> int:
    """The close-code table, written out independently of the relay's code."""
    if upstream_code == 3000:
        return 1011
    if upstream_code == 1005:
        return 1000
    if 1000 <= upstream_code <= 1003 or 1007 <= upstream_code <= 1014 or 3001 <= upstream_code <= 4999:
        return upstream_code
    return 1011


def relayed(received: list[str | bytes]) -> list[str | bytes]:
    """What the client got from the upstream, without the relay's own error events."""
    return [m for m in received if not (isinstance(m, str) and '"event_id":"event_relay' in m)]


def relay_errors(received: list[str | bytes]) -> list[str]:
    return [
        orjson.loads(m)["error"]["code"]
        for m in received
        if isinstance(m, str) and '"event_id":"event_relay' in m
    ]


def redacted(event: str) -> str:
    return event.replace(SECRET, "[redacted]")


def is_prefix(prefix: list[Any], full: list[Any]) -> bool:
    return full[: len(prefix)] == prefix


def time_bound(client: ClientScript, upstream: UpstreamScript) -> float:
    """How long closing the other side may take: the close budget, plus the time slow
    readers need for what is still in flight."""
    return (
        CLOSE_TIMEOUT
        + (len(client.messages) + 1) * upstream.read_delay
        + (len(upstream.events) + 2) * client.read_delay
        + 0.01
    )


def drains_in_time(client: ClientScript, upstream: UpstreamScript) -> bool:
    """Whether the upstream can take everything before the relay's close budget runs out.

    The relay bounds a close handshake by RELAY_CLOSE_TIMEOUT and then cuts the
    socket: what a slower upstream had not read by then is gone. Completeness is
    promised only where draining fits in that budget.
    """
    return (len(client.messages) + 2) * upstream.read_delay < CLOSE_TIMEOUT


def assert_closed(cl: Any, code: int, client: ClientScript) -> None:
    """The client got this close code, unless it had stopped reading: a stalled client
    cannot take the error event and close frame within the close budget either."""
    assert cl.close_code == code or (client.read_delay >= CLOSE_TIMEOUT and cl.close_code is None)


def check_common(
    outcome: Outcome, client: ClientScript, upstream: UpstreamScript, session_update: str = SESSION_UPDATE
) -> None:
    """What holds for every pair, however it ends."""
    up, cl = outcome.upstream, outcome.client
    if upstream.pooled:
        # A warm pooled upstream had the relay's session.update before the pair took it: none
        # goes again. Invariant 8: the client's first event is the session.created the pool
        # gave, once; nothing of the upstream's or of the relay's own comes before it.
        assert session_update not in up.received
        sent_up = up.received
        got = relayed(cl.received)
        assert cl.received.count(POOLED_CREATED) <= 1
        if got:
            assert cl.received[0] == POOLED_CREATED
            got = got[1:]
    else:
        # Invariant 2: the configured session.update is the first message upstream.
        if up.received:
            assert up.received[0] == session_update
        sent_up, got = up.received[1:], relayed(cl.received)
    # Invariant 1: in order, exactly once, nothing invented, both ways.
    assert is_prefix(sent_up, acceptable_prefix(client.messages))
    assert is_prefix(got, [redacted(e) for e in up.sent])
    # Invariant 6: the key never reaches the client.
    everything = "".join(m if isinstance(m, str) else m.decode("latin-1") for m in cl.received)
    assert SECRET not in everything + (cl.close_reason or "")
    # The relay never sends to a client it has closed, nor an unsendable code.
    assert cl.sends_after_close == 0
    assert cl.close_code is None or sendable(cl.close_code)
    # Every relay-initiated close comes with an error event first.
    if cl.close_code is not None and outcome.ending.cause is not Cause.UPSTREAM_CLOSED:
        assert relay_errors(cl.received), outcome.ending


# -- properties -------------------------------------------------------------------


@given(scenarios())
def test_order_completeness_and_close_codes_hold_for_any_interleaving(
    scenario: tuple[ClientScript, UpstreamScript],
) -> None:
    client, upstream = scenario

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        cause, up, cl = outcome.ending.cause, outcome.upstream, outcome.client
        event(f"ending: {cause.value}")
        forwardable = acceptable_prefix(client.messages)
        if cause is Cause.CLIENT_CLOSED:
            if "upstream_opened" in outcome.log and outcome.log.index("upstream_opened") < outcome.log.index("client_closed"):
                if upstream.ending == "stay" and drains_in_time(client, upstream):
                    # Everything the client sent before leaving reached the upstream, then 1000.
                    # (An upstream that closes by itself may be gone before the last ones.)
                    assert up.received[1:] == forwardable
                    assert up.close_code == 1000
            else:
                assert up.received == []  # left during the dial: the dial was cancelled
            assert cl.close_code is None
        elif cause is Cause.UPSTREAM_CLOSED:
            assert upstream.ending == "close"
            assert relayed(cl.received) == [redacted(e) for e in up.sent] == [redacted(e) for e in upstream.events]
            assert_closed(cl, client_code_for(upstream.close_code), client)
            assert cl.close_reason == upstream.close_reason
        elif cause is Cause.UPSTREAM_AUTH_REFUSED:
            assert upstream.close_code == 3000 or upstream.refuse_status in (401, 403)
            assert_closed(cl, 1011, client)
            assert relay_errors(cl.received) in (["relay_upstream_auth_refused"], [])
        elif cause is Cause.UPSTREAM_LOST:
            assert upstream.ending == "drop"
            assert_closed(cl, 1011, client)
            assert relay_errors(cl.received) in (["relay_upstream_lost"], [])
        elif cause is Cause.UPSTREAM_UNAVAILABLE:
            assert upstream.unreachable or upstream.refuse_status or upstream.open_delay > DIAL_TIMEOUT
            assert_closed(cl, 1014, client)
            assert up.received == []
        elif cause is Cause.MESSAGE_TOO_BIG:
            assert any(len(m) > LIMITS.max_message_bytes for m in client.messages)
            assert_closed(cl, 1009, client)
        elif cause is Cause.CLIENT_TOO_SLOW:
            assert client.read_delay > SEND_TIMEOUT
            stalled_too = upstream.read_delay >= CLOSE_TIMEOUT  # its close cannot get through either
            assert up.received == [] or up.close_code == 1000 or upstream.ending != "stay" or stalled_too
        elif cause is Cause.UPSTREAM_TOO_SLOW:
            assert upstream.tight and upstream.read_delay > SEND_TIMEOUT
            assert cl.close_code is None or cl.close_code == 1014
        elif cause is Cause.QUEUE_OVERFLOW:
            assert len(forwardable) > LIMITS.queue_messages or sum(map(len, forwardable)) > LIMITS.queue_bytes
            assert_closed(cl, 1013, client)
        else:
            raise AssertionError(f"unexpected ending {outcome.ending}")

    run_in_virtual_time(main)


@given(scenarios())
def test_a_pooled_upstream_keeps_order_and_completeness_and_starts_with_session_created(
    scenario: tuple[ClientScript, UpstreamScript],
) -> None:
    client, upstream = scenario
    upstream = replace(upstream, pooled=True)

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        cause, up, cl, log = outcome.ending.cause, outcome.upstream, outcome.client, outcome.log
        event(f"ending: {cause.value}")
        if cause is Cause.UPSTREAM_CLOSED:
            events = [redacted(e) for e in upstream.events]
            assert relayed(cl.received) == [POOLED_CREATED, *events]
        elif cause is Cause.CLIENT_CLOSED and "upstream_opened" in log:
            opened_first = log.index("upstream_opened") < log.index("client_closed")
            if opened_first and upstream.ending == "stay" and drains_in_time(client, upstream):
                # Everything the client sent, and nothing else: no session.update again.
                assert up.received == acceptable_prefix(client.messages)
                assert up.close_code == 1000

    run_in_virtual_time(main)


@given(scenarios())
def test_the_other_side_is_closed_within_a_bounded_time(
    scenario: tuple[ClientScript, UpstreamScript],
) -> None:
    client, upstream = scenario

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        bound = time_bound(client, upstream)
        up, cl = outcome.upstream, outcome.client
        if outcome.ending.cause is Cause.CLIENT_CLOSED and up.closed_at is not None:
            assert cl.left_at is not None
            assert up.closed_at - cl.left_at <= bound
        if outcome.ending.cause in (Cause.UPSTREAM_CLOSED, Cause.UPSTREAM_LOST) and cl.closed_at is not None:
            assert up.finished_sending_at is not None
            assert cl.closed_at - up.finished_sending_at <= bound
        if outcome.ending.cause is Cause.UPSTREAM_UNAVAILABLE and client.read_delay < CLOSE_TIMEOUT:
            assert cl.closed_at is not None
            assert cl.closed_at <= DIAL_TIMEOUT + client.read_delay + 0.01  # + sending the error
        # The pair's nursery itself is done soon after the ending.
        last = max(t for t in (cl.left_at, cl.closed_at, up.finished_sending_at, 0.0) if t is not None)
        assert outcome.ended_at - last <= bound + CLOSE_TIMEOUT

    run_in_virtual_time(main)


@given(scenarios())
def test_a_finished_pair_leaves_no_task_behind(scenario: tuple[ClientScript, UpstreamScript]) -> None:
    client, upstream = scenario

    async def main() -> None:
        baseline = trio.lowlevel.current_statistics().tasks_living
        await run_pair(client, upstream)
        assert trio.lowlevel.current_statistics().tasks_living == baseline

    run_in_virtual_time(main)


@given(
    messages=client_messages(max_size=20),
    open_delay=st.sampled_from([0.5, 1.0, 4.0]),
)
def test_pre_open_queue_flushes_in_order_or_overflows_with_1013(
    messages: tuple[str | bytes, ...], open_delay: float
) -> None:
    """All messages arrive before the upstream opens: the queue either holds them all
    and flushes them in order after session.update, or the first one over a limit
    ends the session with its documented code."""
    client = ClientScript(messages, tuple(0.0 for _ in messages), closes_after=open_delay + 1.0)
    upstream = UpstreamScript(open_delay=open_delay)

    expected_code: int | None = None
    count = size = 0
    for message in messages:
        if len(message) > LIMITS.max_message_bytes:
            expected_code = 1009
            break
        form = upstream_form(message)
        if count + 1 > LIMITS.queue_messages or size + len(form) > LIMITS.queue_bytes:
            expected_code = 1013
            break
        count, size = count + 1, size + len(form)

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        assert outcome.client.close_code == expected_code
        if expected_code is None:
            assert outcome.upstream.received == [SESSION_UPDATE, *map(upstream_form, messages)]
        else:
            assert outcome.upstream.received == []  # the dial was given up

    run_in_virtual_time(main)


HEALTHY_CLIENT = ClientScript(
    tuple(f'{{"type":"healthy","n":{n}}}' for n in range(6)), (0.01,) * 6, closes_after=None
)
HEALTHY_UPSTREAM = UpstreamScript(
    events=tuple(f'{{"type":"healthy.delta","n":{n}}}' for n in range(6)),
    gaps=(0.05,) * 6,
    ending="close",
    close_code=1000,
    close_reason="done",
)


@given(scenarios())
def test_a_faulty_pair_never_disturbs_a_healthy_one(scenario: tuple[ClientScript, UpstreamScript]) -> None:
    client, upstream = scenario

    async def main() -> None:
        results: dict[str, Outcome] = {}

        async def run(name: str, c: ClientScript, u: UpstreamScript) -> None:
            results[name] = await run_pair(c, u)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "faulty", client, upstream)
            nursery.start_soon(run, "healthy", HEALTHY_CLIENT, HEALTHY_UPSTREAM)
        healthy = results["healthy"]
        assert healthy.upstream.received == [SESSION_UPDATE, *HEALTHY_CLIENT.messages]
        assert healthy.client.received == list(HEALTHY_UPSTREAM.events)
        assert (healthy.client.close_code, healthy.client.close_reason) == (1000, "done")

    run_in_virtual_time(main)


@given(client=client_scripts(may_stay=False), open_delay=GAPS, events=upstream_events(), read_delay=GAPS)
def test_a_client_leaving_an_open_pair_closes_the_upstream_with_1000_after_all_it_sent(
    client: ClientScript, open_delay: float, events: tuple[str, ...], read_delay: float
) -> None:
    upstream = UpstreamScript(
        open_delay=open_delay, events=events, gaps=tuple(0.01 for _ in events), read_delay=read_delay
    )

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        if outcome.ending.cause is not Cause.CLIENT_CLOSED or outcome.log[0] != "upstream_opened":
            return  # a limit ended it, or the client left during the dial (other properties)
        if not drains_in_time(client, upstream):
            return  # the close budget ran out first: a prefix (checked above) is all it gets
        event("client left an open pair")
        assert outcome.upstream.received[1:] == acceptable_prefix(client.messages)
        assert outcome.upstream.close_code == 1000
        assert outcome.upstream.closed_at is not None and outcome.client.left_at is not None
        assert outcome.upstream.closed_at - outcome.client.left_at <= time_bound(client, upstream)

    run_in_virtual_time(main)


@given(
    events=upstream_events(),
    code=st.sampled_from([1000, 1001, 1008, 1011, 1012, 1013, 3000, 3001, 4000, 4999]),
    reason=st.sampled_from(["", "bye", "Your session hit the maximum duration of 60 minutes."]),
    client_read_delay=st.sampled_from([0.0, 0.01, 0.2]),
)
def test_an_upstream_close_reaches_the_client_with_the_mapped_code_after_all_its_events(
    events: tuple[str, ...], code: int, reason: str, client_read_delay: float
) -> None:
    client = ClientScript(closes_after=None, read_delay=client_read_delay)
    upstream = UpstreamScript(
        events=events, gaps=tuple(0.01 for _ in events), ending="close", close_code=code, close_reason=reason
    )

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        cl = outcome.client
        assert relayed(cl.received) == [redacted(e) for e in events]
        assert cl.close_code == client_code_for(code)
        if code == 3000:
            assert relay_errors(cl.received) == ["relay_upstream_auth_refused"]
        else:
            assert cl.close_reason == reason
        assert cl.closed_at is not None and outcome.upstream.finished_sending_at is not None
        assert cl.closed_at - outcome.upstream.finished_sending_at <= time_bound(client, upstream)

    run_in_virtual_time(main)


@given(events=upstream_events().filter(bool), gap=GAPS)
def test_a_stalled_client_is_cut_off_and_its_upstream_released(events: tuple[str, ...], gap: float) -> None:
    """Invariant 5: a client that stops reading gets backpressure, then a documented close;
    the relay holds at most the messages in flight, never an unbounded buffer."""
    client = ClientScript(closes_after=None, read_delay=100.0)
    upstream = UpstreamScript(events=events, gaps=tuple(gap for _ in events), tight=True)

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        assert outcome.ending.cause is Cause.CLIENT_TOO_SLOW
        assert outcome.upstream.close_code == 1000
        # Stalled after the first event: the relay stopped reading, the upstream kept the rest.
        assert outcome.ended_at <= gap + SEND_TIMEOUT + CLOSE_TIMEOUT + 0.01
        assert len(outcome.upstream.sent) <= 1 + 4 + 2  # in flight + trio-websocket queue + socket

    run_in_virtual_time(main)


@given(messages=client_messages(max_size=12).filter(lambda m: len(m) >= 4 and max(map(len, m)) <= 2000))
def test_a_stalled_upstream_ends_the_pair_with_1014(messages: tuple[str | bytes, ...]) -> None:
    client = ClientScript(messages, tuple(0.01 for _ in messages), closes_after=None)
    upstream = UpstreamScript(read_delay=100.0, tight=True)

    async def main() -> None:
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        assert outcome.ending.cause is Cause.UPSTREAM_TOO_SLOW
        assert outcome.client.close_code == 1014
        assert relay_errors(outcome.client.received) == ["relay_upstream_stalled"]
        assert outcome.ended_at <= 0.01 * len(messages) + SEND_TIMEOUT + CLOSE_TIMEOUT + 0.01

    run_in_virtual_time(main)


def test_no_close_frame_follows_an_upstream_send_cut_mid_frame() -> None:
    """Regression (found by the thorough profile): the client left while a flush was blocked
    on a stalled upstream; the send was then cut by the send timeout, and the relay wrote
    its close frame right after the partial frame."""
    client = ClientScript((b"",) * 4, (0.0, 0.0, 0.0, 0.001), closes_after=2.0)
    events = tuple(f'{{"type":"response.output_audio.delta","n":{n}}}' for n in range(7))
    upstream = UpstreamScript(events=events, gaps=(0.0,) * 7, read_delay=10.0, tight=True)

    async def main() -> None:
        baseline = trio.lowlevel.current_statistics().tasks_living
        outcome = await run_pair(client, upstream)
        check_common(outcome, client, upstream)
        assert outcome.upstream.close_code in (None, 1006)  # dropped, not closed with garbage before
        assert trio.lowlevel.current_statistics().tasks_living == baseline

    run_in_virtual_time(main)
