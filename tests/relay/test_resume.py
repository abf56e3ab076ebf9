"""A relay-aware client that loses its connection resumes its session (RELAY_RESUME_SECONDS).

End to end in front of mockrealtime: the client offers ``relay-resume``, gets a token after
``session.created``, drops in the middle of a reply, and comes back with
``relay-resume.<token>.<count>``; what the upstream sent meanwhile arrives, in order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import orjson
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.usage.auth import hash_key

from .harness import TEST_KEY, RunningRelay, connect, running_relay
from .test_metrics import scrape

TIMEOUT = 20
ALICE, BOB = "relay-test-alice-key-0123456789", "relay-test-bob-key-0123456789"
TURN = orjson.dumps({"type": "conversation.item.create", "item": {
    "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me"}]}}).decode()


@asynccontextmanager
async def relay_and_mock(**settings: object) -> AsyncIterator[tuple[RunningRelay, MockServer]]:
    # pace 4: a reply's audio streams for a while, so some of it comes while the client is away
    config = MockConfig(api_keys=frozenset({TEST_KEY}), pace=4, reply_sentences=3)
    values: dict[str, object] = {
        "resume_seconds": 10.0,
        "api_keys": (f"alice:{hash_key(ALICE)}", f"bob:{hash_key(BOB)}"),
        "allow_anonymous": False,
    }
    values.update(settings)
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, config)
        async with running_relay(upstream_url=mock.url, **values) as relay:
            yield relay, mock
        nursery.cancel_scope.cancel()


def protocols(key: str, *more: str) -> list[str]:
    return ["realtime", f"relay-token.{key}", *more]


class Reader:
    """Counts the events a client got (relay.resume tokens aside) and keeps the last token."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.token: str | None = None

    async def until(self, ws: WebSocketConnection, kind: str) -> dict[str, Any]:
        while True:
            event = orjson.loads(await ws.get_message())
            if event["type"] == "relay.resume":
                self.token = event["token"]
            else:
                self.events.append(event)
            if event["type"] == kind:
                return event


async def refused(ws: WebSocketConnection) -> tuple[str, int]:
    error = orjson.loads(await ws.get_message())
    try:
        await ws.get_message()
    except ConnectionClosed as closed:
        return error["error"]["code"], closed.reason.code
    raise AssertionError("the refused resume was not closed")


async def drop(ws: WebSocketConnection) -> None:
    """The network drops the client's connection: its socket goes, with no close frame."""
    await trio.aclose_forcefully(ws._stream)


async def detached(relay: RunningRelay) -> None:
    """Until the relay has seen the client's connection go (bounded by the test's timeout)."""
    while not any(getattr(p.client, "_current", 1) is None for p in relay.app.pairs):
        await trio.sleep(0.01)


async def test_a_client_that_drops_mid_reply_resumes_and_gets_every_event_in_order() -> None:
    reader = Reader()
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, "relay-resume")) as ws:
                await reader.until(ws, "relay.resume")
                await ws.send_message(TURN)
                await ws.send_message('{"type":"response.create"}')
                await reader.until(ws, "response.output_audio.delta")
                await drop(ws)
            await detached(relay)  # the reply goes on upstream while nobody is connected
            token, count = reader.token, len(reader.events)
            resume = f"relay-resume.{token}.{count}"
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, resume)) as ws:
                await reader.until(ws, "response.done")
                sent = list(mock.connections[0].sent_types)
    got = [e["type"] for e in reader.events]
    sent.remove("session.updated")  # the answer to the relay's own update, never the client's
    assert got == sent[: len(got)]
    assert got[-1] == "response.done"
    assert len(mock.connections) == 1  # the same upstream session throughout
    assert reader.token != token  # a new token after the resume


async def test_a_client_that_closes_is_done_and_its_session_ends_at_once() -> None:
    """Resume is for a connection lost on the way (no close frame). A client that closes its
    WebSocket has ended the session: the upstream is closed now, not after the window."""
    reader = Reader()
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(resume_seconds=TIMEOUT * 10) as (relay, mock):
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, "relay-resume")) as ws:
                await reader.until(ws, "relay.resume")
            await mock.connections[0].closed.wait()  # (the test's timeout is a tenth of the window)
            resume = f"relay-resume.{reader.token}.{len(reader.events)}"
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, resume)) as ws:
                assert await refused(ws) == ("relay_resume_refused", 4410)


async def test_a_used_token_or_another_clients_token_is_refused() -> None:
    reader = Reader()
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, _):
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, "relay-resume")) as ws:
                await reader.until(ws, "relay.resume")
                await drop(ws)
            await detached(relay)
            token = f"relay-resume.{reader.token}.{len(reader.events)}"
            # Bob holds Alice's token: refused, and Alice's session still waits for her.
            async with connect(relay.url + "/voice", subprotocols=protocols(BOB, token)) as ws:
                assert await refused(ws) == ("relay_resume_refused", 4410)
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, token)) as ws:
                await reader.until(ws, "relay.resume")
            # The token is spent: the same resume again is refused.
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, token)) as ws:
                assert await refused(ws) == ("relay_resume_refused", 4410)
            # A token from another relay process is told apart.
            elsewhere = "relay-resume.ffffffff" + "x" * 32 + ".0"
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, elsewhere)) as ws:
                assert await refused(ws) == ("relay_resume_elsewhere", 4410)
            counted = {
                dict(labels)["outcome"]: value
                for (name, labels), value in scrape(relay.app.metrics).items()
                if name == "relay_resumes_total"
            }
    assert counted == {"resumed": 1, "relay_resume_refused": 2, "relay_resume_elsewhere": 1}


async def test_a_client_that_does_not_come_back_in_time_ends_its_session_cleanly() -> None:
    reader = Reader()
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(resume_seconds=0.5) as (relay, mock):
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, "relay-resume")) as ws:
                await reader.until(ws, "relay.resume")
            await mock.connections[0].closed.wait()  # the relay closed the upstream, after the window
            while relay.app.pairs:
                await trio.sleep(0.01)
            assert mock.connections[0].close_code == 1000
            assert len(relay.app.resumes) == 0
            store = relay.app.accounting.store  # type: ignore[union-attr]
            # The lease was given back: Alice's one slot is free again.
            assert await store.acquire_slot("alice", "probe", limit=1, lease_seconds=10)


async def test_resume_off_refuses_a_resume_clearly() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(resume_seconds=0.0) as (relay, _):
            resume = "relay-resume.abc.0"
            async with connect(relay.url + "/voice", subprotocols=protocols(ALICE, resume)) as ws:
                assert await refused(ws) == ("relay_resume_off", 4410)


async def test_relay_talk_resumes_on_its_own_after_its_connection_drops() -> None:
    """`relay talk` streams an utterance; its connection is cut (no close frame) after the
    relay gave it a token: it comes back to the same session and gets its reply."""
    from relay.clients import wav
    from relay.clients.talk import SAMPLE, Options, talk

    pcm = wav.load_for_api(SAMPLE)[0]
    result: list[Any] = []
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):

            async def run() -> None:
                result.append(await talk(pcm, Options(url=relay.url + "/voice", token=ALICE, realtime=True)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                while not any(getattr(p.client, "token", None) for p in relay.app.pairs):
                    await trio.sleep(0.01)
                (pair,) = relay.app.pairs
                # The network drops: the relay's end of the client's socket goes, no close frame.
                await trio.aclose_forcefully(pair.client._current.side.websocket._stream)
            resumes = pair.client.resumes
    (conversation,) = result
    assert resumes == 1
    assert conversation.responses_done >= 1
    assert len(mock.connections) == 1


class _Dropped:
    """A connection the network dropped: reads and writes fail as a lost connection does."""

    async def get_message(self) -> str:
        raise ConnectionClosed(CloseReason(1006, None))

    async def send_message(self, message: str | bytes) -> None:
        raise ConnectionClosed(CloseReason(1006, None))


class _Fresh:
    """The connection the resume opens: it takes what is sent."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def get_message(self) -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def send_message(self, message: str | bytes) -> None:
        self.sent.append(message)


async def test_a_send_that_fails_while_relay_talk_reconnects_goes_on_the_new_connection() -> None:
    """The reader spends the resume token as it starts reconnecting; a send that finds the
    old connection gone meanwhile waits for the new one instead of giving up (it did, as a
    race: the send raised 1006 and `relay talk` failed with the session still resumable)."""
    from relay.clients.talk import Resuming

    resuming = Resuming("ws://127.0.0.1:9/voice", None, AsyncExitStack())
    fresh = _Fresh()
    reconnecting, may_connect, sent = trio.Event(), trio.Event(), trio.Event()

    async def open(also: tuple[str, ...] = ()) -> None:  # the reconnect, held until allowed
        assert also == ("relay-resume.tok.0",)
        reconnecting.set()
        await may_connect.wait()
        resuming._ws = fresh  # type: ignore[assignment]

    resuming._ws = _Dropped()  # type: ignore[assignment]
    resuming._resume = ("tok", 10.0)
    resuming.open = open  # type: ignore[method-assign]

    async def send() -> None:
        await resuming.send_message("after the drop")
        sent.set()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(resuming.get_message)  # the reader finds the drop first
            await reconnecting.wait()
            nursery.start_soon(send)  # ... and the send finds it while the reader reconnects
            await trio.testing.wait_all_tasks_blocked()
            may_connect.set()
            await sent.wait()
            nursery.cancel_scope.cancel()
    assert fresh.sent == ["after the drop"]
    assert resuming.resumes == 1
