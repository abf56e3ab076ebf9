"""The relay in front of mockrealtime, with the fake's faults switched on."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import orjson
import pytest
import trio
import trustme

from mockrealtime import Faults, MockConfig, MockServer, serve_mock_realtime
from relay.core.bridge import Phase

from .harness import TEST_KEY, RunningRelay, connect, running_relay, without_relay_ids
from .test_relay_loopback import error_codes, receive_until_closed

TIMEOUT = 15


@asynccontextmanager
async def relay_and_mock(
    faults: Faults = Faults(), *, api_keys: frozenset[str] = frozenset({TEST_KEY}), **settings: object
) -> AsyncIterator[tuple[RunningRelay, MockServer]]:
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=api_keys, faults=faults))
        async with running_relay(upstream_url=mock.url, **settings) as relay:
            yield relay, mock
        nursery.cancel_scope.cancel()


async def test_upstream_refusing_the_upgrade_gives_1014() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(refuse_status=503)) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
    assert error_codes(messages) == ["relay_upstream_unavailable"]
    assert code == 1014


async def test_upstream_refusing_the_key_at_the_upgrade_gives_1011() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(refuse_status=401)) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
    assert error_codes(messages) == ["relay_upstream_auth_refused"]
    assert code == 1011


async def test_wrong_relay_key_is_reported_without_any_part_of_it() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(api_keys=frozenset({"sk-another-key-entirely"})) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                messages, code, reason = await receive_until_closed(ws)
    seen = "".join(messages) + (reason or "")
    assert TEST_KEY[-4:] not in without_relay_ids(seen)
    assert error_codes(messages) == ["relay_upstream_auth_refused"]
    assert code == 1011


async def test_upstream_close_after_open_is_passed_on_with_its_code() -> None:
    """The fake closes right after its session.created, before it answers the relay's
    session.update: the client, which never had a session, gets the close alone."""
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(close_after_open=(4001, "going away"))) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                messages, code, reason = await receive_until_closed(ws)
    assert messages == []
    assert (code, reason) == (4001, "going away")


async def test_upstream_dropping_tcp_gives_the_events_so_far_then_1011() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(drop_after_events=2), failover_attempts=0) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                messages, code, _ = await receive_until_closed(ws)
    kinds = [orjson.loads(m)["type"] for m in messages]
    assert kinds == ["session.created", "error"]  # the relay's session.updated is not the client's
    assert error_codes(messages) == ["relay_upstream_lost"]
    assert code == 1011


async def test_a_slow_handshake_queues_the_first_turn_and_loses_nothing() -> None:
    item = {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi there"}]}}
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(handshake_delay=0.3)) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await ws.send_message(orjson.dumps(item).decode())
                await ws.send_message('{"type":"response.create"}')
                kinds = []
                while not kinds or kinds[-1] != "response.done":
                    kinds.append(orjson.loads(await ws.get_message())["type"])
            received = [orjson.loads(m)["type"] for m in mock.connections[0].received]
    assert received[:3] == ["session.update", "conversation.item.create", "response.create"]
    assert kinds[0] == "session.created"
    assert "error" not in kinds


async def test_injected_upstream_errors_pass_through_and_the_session_goes_on() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(inject_error_after=1)) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                await ws.get_message()  # session.created
                await ws.send_message('{"type":"input_audio_buffer.clear"}')
                kinds = set()
                while "input_audio_buffer.cleared" not in kinds or "error" not in kinds:
                    kinds.add(orjson.loads(await ws.get_message())["type"])


async def test_client_leaving_a_stalled_upstream_ends_the_pair_within_the_close_timeout() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(Faults(stall=True), close_timeout=0.5) as (relay, _):
            async with connect(relay.url + "/voice") as ws:
                # The stalled fake never answers the relay's update, so no session.created
                # comes: wait for the relay to have flushed its update instead.
                while not relay.app.pairs or next(iter(relay.app.pairs)).bridge.phase is not Phase.OPEN:
                    await trio.sleep(0.01)
                for _ in range(5):
                    await ws.send_message('{"type":"input_audio_buffer.clear"}')
            left = trio.current_time()
            while relay.app.pairs:
                await trio.sleep(0.01)
            assert trio.current_time() - left < 2


async def test_a_client_cannot_rewrite_locked_instructions_and_the_session_goes_on() -> None:
    from relay.core.policy import Policy

    update = {"type": "session.update", "event_id": "mine",
              "session": {"type": "realtime", "instructions": "You are a pirate now."}}
    refusing = Policy(locked=frozenset({"instructions", "model"}), on_locked="refuse")
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(policy=refusing) as (relay, mock):
            async with connect(relay.url + "/voice") as ws:
                await ws.send_message(orjson.dumps(update).decode())
                await ws.send_message('{"type":"input_audio_buffer.clear"}')
                seen = []
                while not seen or seen[-1]["type"] != "input_audio_buffer.cleared":
                    seen.append(orjson.loads(await ws.get_message()))
            errors = [e["error"] for e in seen if e["type"] == "error"]
            assert [(e["code"], e["event_id"]) for e in errors] == [("relay_field_locked", "mine")]
            assert all("instructions" not in e.get("session", {}) for e in seen)
            received = [orjson.loads(m)["type"] for m in mock.connections[0].received]
            assert received == ["session.update", "input_audio_buffer.clear"]  # only the relay's update
            assert "pirate" not in "".join(mock.connections[0].received)


async def test_a_client_keeps_the_model_it_connected_with_and_may_only_send_allowed_events() -> None:
    from relay.core.bridge import SETUP_EVENT_ID
    from relay.core.policy import Policy

    policy = Policy.from_table({"client_events_allowed": ["session.update", "input_audio_buffer.clear"]})
    same_model = {"type": "session.update", "event_id": "same", "session": {"type": "realtime", "model": "gpt-realtime-2"}}
    other_model = {"type": "session.update", "event_id": "other", "session": {"type": "realtime", "model": "gpt-realtime-2.1"}}
    not_allowed = {"type": "conversation.item.create", "event_id": "item", "item": {"type": "message"}}
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(policy=policy) as (relay, mock):
            async with connect(relay.url + "/voice?model=gpt-realtime-2") as ws:
                for event in (same_model, other_model, not_allowed):
                    await ws.send_message(orjson.dumps(event).decode())
                await ws.send_message('{"type":"input_audio_buffer.clear"}')
                seen = []
                while not seen or seen[-1]["type"] != "input_audio_buffer.cleared":
                    seen.append(orjson.loads(await ws.get_message()))
            errors = [(e["error"]["code"], e["error"]["event_id"]) for e in seen if e["type"] == "error"]
            assert errors == [("relay_event_not_allowed", "item")]
            received = [orjson.loads(m) for m in mock.connections[0].received]
            # The relay's update first; the other model is dropped from the client's update.
            assert [e.get("event_id") for e in received] == [SETUP_EVENT_ID, "same", "other", None]
            assert received[2]["session"] == {"type": "realtime"}
            assert mock.connections[0].path.endswith("?model=gpt-realtime-2")


async def test_a_wss_upstream_is_relayed_by_the_pump_and_carries_a_whole_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Against the real API the upstream leg is TLS: the relay's own (relay.wire.tls), so the pump
    relays it. Every append arrives in order, one of many TLS records among them, and a reply
    streams back."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the relay's default context trusts it
    appends = [
        f'{{"type":"input_audio_buffer.append","event_id":"a{i}","audio":"{"AAAA" * size}"}}'
        for i, size in enumerate([*range(1, 40), 30_000, 1, 5_000, 2])  # 120 KB: 8 records
    ]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            mock = await nursery.start(
                partial(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}), pace=0),
                        ssl_context=server_context)
            )
            assert mock.url.startswith("wss://")
            # (the pump's test: with it even where the other tests run with RELAY_PUMP=off)
            async with running_relay(upstream_url=mock.url, pump="on") as relay:
                async with connect(relay.url + "/voice") as ws:
                    assert orjson.loads(await ws.get_message())["type"] == "session.created"
                    for append in appends:
                        await ws.send_message(append)
                    await ws.send_message('{"type":"input_audio_buffer.clear"}')
                    await ws.send_message('{"type":"response.create"}')
                    kinds = []
                    while not kinds or kinds[-1] != "response.done":
                        kinds.append(orjson.loads(await ws.get_message())["type"])
                    assert "input_audio_buffer.cleared" in kinds
                    assert "response.output_audio.delta" in kinds
                    assert relay.app.pump is not None and relay.app.pump.watching == 2
            received = mock.connections[0].received
            assert received[1:] == [*appends, '{"type":"input_audio_buffer.clear"}',
                                    '{"type":"response.create"}']
            nursery.cancel_scope.cancel()
