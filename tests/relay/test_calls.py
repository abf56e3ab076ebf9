"""WebRTC calls through the relay: the SDP exchange (authenticated, admitted per cap), and the
sideband that keeps the call within the policy, accounts it, cuts it and hands it over on
drain. mockrealtime plays OpenAI and the browser (the peer of each call)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import openai
import orjson
import pytest
import trio

from mockrealtime import MockServer
from mockrealtime.calls import MockCall
from relay.core.policy import Policy
from relay.core.sideband import Sideband
from relay.server.sideband import CallEnd

from .harness import TEST_KEY, RunningRelay
from .test_accounting import ALICE, relays_and_mock, rows

TIMEOUT = 15
#: A policy that locks the persona too (by default only the model is locked).
LOCKED = Policy(locked=frozenset({"instructions", "tools", "model"}))
BEARER = {"authorization": f"Bearer {ALICE}"}
OFFER = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n"
)
HELLO = [
    {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Hi"}],
        },
    },
    {"type": "response.create"},
]


@asynccontextmanager
async def relay_and_mock(**settings: object) -> AsyncIterator[tuple[RunningRelay, MockServer]]:
    async with relays_and_mock("sqlite:///:memory:", **settings) as ((relay,), mock):
        yield relay, mock


async def create_call(
    relay: RunningRelay, headers: dict[str, str] | None = None, **request: object
) -> httpx.Response:
    async with httpx.AsyncClient(base_url=relay.http_url) as http:
        return await http.post(
            "/v1/realtime/calls",
            content=OFFER,
            headers={"content-type": "application/sdp", **(BEARER if headers is None else headers)},
            **request,  # type: ignore[arg-type]
        )


async def watched_call(relay: RunningRelay, mock: MockServer) -> MockCall:
    """A call created through the relay, once the relay's sideband is attached and has sent
    its opening session.update."""
    answer = await create_call(relay)
    assert answer.status_code == 201, answer.text
    call = mock.calls[answer.headers["location"].rsplit("/", 1)[1]]
    await call.wait_for(lambda c: c.sidebands == 1 and len(c.sideband_received) >= 1)
    return call


def instructions(call: MockCall) -> str:
    assert call.session is not None
    return call.session.config.instructions


async def test_a_call_needs_the_relays_auth_and_runs_the_relays_session_on_the_relays_key() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            assert (await create_call(relay, headers={})).status_code == 401
            wrong = await create_call(relay, headers={"authorization": "Bearer rk_not_a_key"})
            assert wrong.status_code == 401
            assert wrong.json()["error"]["code"] == "invalid_credentials"
            assert not mock.calls  # nothing reached OpenAI
            answer = await create_call(relay)
            assert answer.status_code == 201
            assert answer.headers["content-type"] == "application/sdp"
            assert answer.text.startswith("v=0")
            call_id = answer.headers["location"].removeprefix("/v1/realtime/calls/")
            call = mock.calls[call_id]
            assert TEST_KEY not in answer.text and TEST_KEY not in str(answer.headers)
            assert instructions(call) == relay.app.config.session_object()["instructions"]
            assert call.model == relay.app.config.model


async def test_the_sdk_creates_a_call_and_the_session_it_asks_for_is_the_relays() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):

            def create() -> str:
                client = openai.OpenAI(
                    api_key=ALICE, base_url=f"{relay.http_url}/v1", max_retries=0
                )
                raw = client.realtime.calls.with_raw_response.create(
                    sdp=OFFER,
                    session={
                        "type": "realtime",
                        "model": "gpt-realtime-2.1-mini",
                        "instructions": "Be a pirate.",
                    },
                )
                assert raw.http_response.status_code == 201
                return raw.headers["location"].rsplit("/", 1)[1]

            call = mock.calls[await trio.to_thread.run_sync(create)]
            assert call.model == "gpt-realtime-2.1-mini"  # a model of RELAY_MODELS may be picked
            assert instructions(call) == relay.app.config.session_object()["instructions"]


async def test_a_model_outside_the_relays_models_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            answer = await create_call(relay, params={"model": "gpt-4o-realtime-preview"})
            assert answer.status_code == 400
            assert answer.json()["error"]["code"] == "invalid_model"
            assert not mock.calls


async def test_a_call_over_the_users_cap_is_refused_until_one_ends() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(max_sessions_per_user=1) as (relay, mock):
            call = await watched_call(relay, mock)
            refused = await create_call(relay)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_sessions"
            assert len(mock.calls) == 1
            watch = relay.app.calls.live[call.id]
            call.end("peer_left")  # the browser hangs up
            await watch.over.wait()
            assert watch.cause is CallEnd.CALL_ENDED
            assert (await create_call(relay)).status_code == 201


async def test_a_call_is_accounted_from_its_sidebands_response_done() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            call = await watched_call(relay, mock)
            watch = relay.app.calls.live[call.id]
            for event in HELLO:
                call.peer_send(event)
            done = next(e for e in call.peer_events if e["type"] == "response.done")
            call.end("peer_left")
            await watch.over.wait()
            (row,) = await rows(relay)
            usage = done["response"]["usage"]
            assert row["sessions"] == 1
            assert row["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
            assert row["upstream_messages"] == watch.sideband.traffic.upstream_messages > 0


async def test_a_locked_field_the_browser_changes_is_put_back_by_the_sideband() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(policy=LOCKED) as (relay, mock):
            call = await watched_call(relay, mock)
            relays = relay.app.config.session_object()["instructions"]
            call.peer_send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "instructions": "Be a pirate."},
                }
            )
            await call.wait_for(lambda c: instructions(c) == relays)
            # The browser saw its change, then the relay's correction, on its data channel.
            seen = [
                e["session"]["instructions"]
                for e in call.peer_events
                if e["type"] == "session.updated"
            ]
            assert seen[-2:] == ["Be a pirate.", relays]
            correction = orjson.loads(call.sideband_received[-1])
            assert correction["session"]["instructions"] == relays
            # An unlocked field the browser changes stays as it set it.
            voice = {
                "type": "session.update",
                "session": {"type": "realtime", "audio": {"output": {"voice": "cedar"}}},
            }
            sent = len(call.sideband_received)
            call.peer_send(voice)
            assert call.session is not None and call.session.config.voice == "cedar"
            assert len(call.sideband_received) == sent
            assert relay.app.calls.live[call.id].sideband.corrected == {"instructions"}


async def test_the_budget_cut_hangs_up_the_call() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(daily_token_budget=10) as (relay, mock):
            call = await watched_call(relay, mock)
            watch = relay.app.calls.live[call.id]
            for event in HELLO:
                call.peer_send(event)
            await watch.over.wait()
            assert watch.cause is CallEnd.BUDGET_EXHAUSTED
            assert call.state == "ended" and call.end_reason == "hangup"
            refused = await create_call(relay)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "daily_budget_exhausted"


async def test_a_call_is_hung_up_at_the_longest_a_session_may_last() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(max_session_seconds=0.3, limit_warning_seconds=0) as (
            relay,
            mock,
        ):
            call = await watched_call(relay, mock)
            watch = relay.app.calls.live[call.id]
            await watch.over.wait()
            assert watch.cause is CallEnd.SESSION_EXPIRED
            assert call.end_reason == "hangup"


async def test_drain_hands_calls_over_without_hanging_up() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            call = await watched_call(relay, mock)
            watch = relay.app.calls.live[call.id]
            await relay.app.drain(0)
            assert watch.cause is CallEnd.HANDED_OVER
            await call.wait_for(lambda c: c.sidebands == 0)
            assert call.state == "active"  # it runs on at OpenAI
            (row,) = await rows(relay)
            assert row["sessions"] == 1


async def test_a_dropped_sideband_is_attached_again() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            call = await watched_call(relay, mock)
            first = next(r for r in mock.connections if r.call_id == call.id)
            first.drop()  # no close frame: the sideband was lost, not the call
            await call.wait_for(
                lambda c: sum(r.call_id == c.id for r in mock.connections) == 2 and c.sidebands == 1
            )
            assert call.id in relay.app.calls.live


async def test_calls_show_in_metrics() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            call = await watched_call(relay, mock)
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                live = (await http.get("/metrics")).text
                assert 'relay_calls_started_total{transport="webrtc"} 1.0' in live
                assert "relay_calls_active 1.0" in live
                assert (await create_call(relay, headers={})).status_code == 401
                watch = relay.app.calls.live[call.id]
                call.end("peer_left")
                await watch.over.wait()
                ended = (await http.get("/metrics")).text
            assert "relay_calls_active 0.0" in ended
            assert 'relay_calls_ended_total{cause="call_ended",transport="webrtc"} 1.0' in ended
            assert (
                'relay_calls_refused_total{reason="missing_credentials",transport="webrtc"} 1.0'
                in ended
            )


async def test_a_page_on_an_allowed_origin_gets_cors_headers_and_another_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock(allowed_origins=("https://app.example",)) as (relay, mock):
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                preflight = await http.options(
                    "/v1/realtime/calls",
                    headers={
                        "origin": "https://app.example",
                        "access-control-request-method": "POST",
                    },
                )
                assert preflight.status_code == 204
                assert "authorization" in preflight.headers["access-control-allow-headers"]
                other = await http.options(
                    "/v1/realtime/calls", headers={"origin": "https://evil.example"}
                )
                assert other.status_code == 403
            answer = await create_call(relay, headers={**BEARER, "origin": "https://app.example"})
            assert answer.status_code == 201
            assert answer.headers["access-control-allow-origin"] == "https://app.example"
            assert "location" in answer.headers["access-control-expose-headers"]
            refused = await create_call(relay, headers={**BEARER, "origin": "https://evil.example"})
            assert refused.status_code == 403
            assert len(mock.calls) == 1


async def test_a_bad_offer_is_refused_before_anything_reaches_openai() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                as_json = await http.post("/v1/realtime/calls", json={"sdp": OFFER}, headers=BEARER)
                assert as_json.status_code == 415
                empty = await http.post(
                    "/v1/realtime/calls",
                    content=b"",
                    headers={**BEARER, "content-type": "application/sdp"},
                )
                assert empty.status_code == 400
                huge = await http.post(
                    "/v1/realtime/calls",
                    content=b"v" * 70_000,
                    headers={**BEARER, "content-type": "application/sdp"},
                )
                assert huge.status_code == 413
                no_sdp = await http.post(
                    "/v1/realtime/calls",
                    files={"session": (None, json.dumps({"type": "realtime"}))},
                    headers=BEARER,
                )
                assert no_sdp.status_code == 400
            assert not mock.calls


async def test_a_sideband_that_fails_ends_its_call_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(self: Sideband, data: str | bytes) -> None:
        raise RuntimeError("a bug in the sideband")

    with trio.fail_after(TIMEOUT):
        async with relay_and_mock() as (relay, mock):
            monkeypatch.setattr(Sideband, "upstream_message", broken)
            answer = await create_call(relay)
            call = mock.calls[answer.headers["location"].rsplit("/", 1)[1]]
            watch = relay.app.calls.live[call.id]
            await watch.over.wait()  # the bug met the first message: the opening's answer
            assert watch.cause is CallEnd.SIDEBAND_LOST
            assert call.end_reason == "hangup"  # not left running unwatched
            monkeypatch.undo()
            assert (await watched_call(relay, mock)).sidebands == 1  # the relay serves on
