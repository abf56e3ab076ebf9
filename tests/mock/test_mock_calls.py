"""Calls on the fake: WebRTC SDP in and answer out, the ``?call_id=`` sideband as a party to
the call's session, accept/reject/hangup/refer, and the signed SIP webhook."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import h11
import httpx
import openai
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from mockrealtime.calls import stand_in_answer
from mockrealtime.webhooks import sign

from .helpers import connect, user_text

KEY = "sk-test-calls-0123456789"
SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGhlLW1vY2std2ViaG9va3M="
OFFER = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\n"
)
TIMEOUT = 10
AUTH = {"authorization": f"Bearer {KEY}"}


@asynccontextmanager
async def mock(**config: object) -> AsyncIterator[MockServer]:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            serve_mock_realtime, MockConfig(**{"api_keys": frozenset({KEY}), "pace": 0, **config})
        )
        yield server
        nursery.cancel_scope.cancel()


async def create_call(server: MockServer, **options: object) -> str:
    async with httpx.AsyncClient(base_url=server.http_url) as http:
        answer = await http.post(
            "/v1/realtime/calls",
            content=OFFER,
            headers={**AUTH, "content-type": "application/sdp"},
            **options,  # type: ignore[arg-type]
        )
    assert answer.status_code == 201, answer.text
    assert answer.headers["content-type"] == "application/sdp"
    call_id = answer.headers["location"].rsplit("/", 1)[1]
    assert answer.headers["location"] == f"/v1/realtime/calls/{call_id}"
    assert answer.text.startswith("v=0")
    return call_id


async def next_of(ws, kind: str) -> dict:  # type: ignore[no-untyped-def]
    while True:
        event = json.loads(await ws.get_message())
        if event["type"] == kind:
            return event


async def test_an_sdp_offer_opens_a_call_whose_peer_gets_session_created() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server:
            call_id = await create_call(server)
            call = server.calls[call_id]
            assert call.transport == "webrtc" and call.state == "active"
            assert call_id.startswith("rtc_")
            assert [e["type"] for e in call.peer_events] == ["session.created"]


async def test_a_quiet_call_sleeps_until_something_is_due() -> None:
    """With nothing due, the call's task waits for its next deadline. It once woke itself
    after every empty tick: a busy loop that held the GIL and starved the media thread."""
    with trio.fail_after(TIMEOUT):
        async with mock() as server:
            call = server.calls[await create_call(server)]
            assert call.state == "active" and call.session is not None
            ticks = 0
            tick = call.session.tick

            def counted(now: float | None = None) -> list:  # type: ignore[type-arg]
                nonlocal ticks
                ticks += 1
                return tick(now)

            call.session.tick = counted  # type: ignore[method-assign]
            call._wake.set()  # as an event from the peer would
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)  # never, while it spins
            assert ticks == 1


async def test_the_sdk_creates_a_call_with_a_session_in_multipart() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server:

            def create() -> str:
                client = openai.OpenAI(api_key=KEY, base_url=f"{server.http_url}/v1", max_retries=0)
                raw = client.realtime.calls.with_raw_response.create(
                    sdp=OFFER,
                    session={
                        "type": "realtime",
                        "model": "gpt-realtime-mini",
                        "instructions": "Be brief.",
                    },
                )
                assert raw.http_response.status_code == 201
                return raw.headers["location"].rsplit("/", 1)[1]

            call_id = await trio.to_thread.run_sync(create)
            call = server.calls[call_id]
            assert call.model == "gpt-realtime-mini"
            assert call.session is not None and call.session.config.instructions == "Be brief."


async def test_a_call_needs_a_key_and_an_sdp_offer() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server, httpx.AsyncClient(base_url=server.http_url) as http:
            sdp = {"content-type": "application/sdp"}
            assert (
                await http.post("/v1/realtime/calls", content=OFFER, headers=sdp)
            ).status_code == 401
            wrong = {"authorization": "Bearer sk-wrong-key-000", **sdp}
            refused = await http.post("/v1/realtime/calls", content=OFFER, headers=wrong)
            assert refused.json()["error"]["code"] == "invalid_api_key"
            json_body = await http.post("/v1/realtime/calls", json={"sdp": OFFER}, headers=AUTH)
            assert json_body.status_code == 400
            assert json_body.json()["error"]["code"] == "unsupported_content_type"
            assert not server.calls


async def test_the_sideband_sees_the_peers_events_and_its_updates_reach_the_peer() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server:
            call_id = await create_call(server)
            call = server.calls[call_id]
            async with connect(
                f"{server.url}?call_id={call_id}",
                extra_headers=[("Authorization", f"Bearer {KEY}")],
            ) as ws:
                call.peer_send(
                    {
                        "type": "session.update",
                        "session": {"type": "realtime", "instructions": "Be a pirate."},
                    }
                )
                updated = await next_of(ws, "session.updated")
                assert updated["session"]["instructions"] == "Be a pirate."
                await ws.send_message(
                    json.dumps(
                        {
                            "type": "session.update",
                            "session": {"type": "realtime", "instructions": "Be plain."},
                        }
                    )
                )
                updated = await next_of(ws, "session.updated")
                assert updated["session"]["instructions"] == "Be plain."
                assert [
                    e["session"]["instructions"]
                    for e in call.peer_events
                    if e["type"] == "session.updated"
                ] == ["Be a pirate.", "Be plain."]
                call.peer_send(user_text("Hello"))
                call.peer_send({"type": "response.create"})
                done = await next_of(ws, "response.done")
                assert done["response"]["usage"]["total_tokens"] > 0
                # The audio went to the peer as media, not as events.
                assert call.audio_out_bytes > 0
                assert not any(e["type"] == "response.output_audio.delta" for e in call.peer_events)


async def test_a_sideband_on_an_unknown_call_is_refused_with_404() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server:
            upgrade = {
                **AUTH,
                "upgrade": "websocket",
                "connection": "Upgrade",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                "sec-websocket-version": "13",
            }
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                refused = await http.get("/v1/realtime?call_id=rtc_nope", headers=upgrade)
            assert refused.status_code == 404
            assert refused.json()["error"]["code"] == "call_id_not_found"


async def test_hangup_ends_the_call_and_closes_its_sidebands() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock() as server:
            call_id = await create_call(server)
            async with connect(
                f"{server.url}?call_id={call_id}",
                extra_headers=[("Authorization", f"Bearer {KEY}")],
            ) as ws:
                async with httpx.AsyncClient(base_url=server.http_url) as http:
                    answer = await http.post(f"/v1/realtime/calls/{call_id}/hangup", headers=AUTH)
                    assert answer.status_code == 200
                    again = await http.post(f"/v1/realtime/calls/{call_id}/hangup", headers=AUTH)
                    assert again.status_code == 404
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await ws.get_message()
                assert closed.value.reason.code == 1000
            assert server.calls[call_id].end_reason == "hangup"


def test_a_stand_in_answer_answers_every_media_section_inactive() -> None:
    answer = stand_in_answer(OFFER, "rtc_x")
    assert answer.count("m=") == 2
    assert answer.count("a=inactive") == 2
    assert "a=mid:0" in answer and "a=mid:1" in answer


# --- SIP -------------------------------------------------------------------------------------


@asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A loopback HTTP endpoint that records each POST (headers, raw body) and answers 200."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        received.append((headers, body))
        await stream.send_all(
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            + conn.send(h11.EndOfMessage())
        )
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            trio.serve_tcp,
            handle,
            0,
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/webhook", received
        nursery.cancel_scope.cancel()


async def test_a_ringing_sip_call_posts_a_webhook_the_sdk_verifies() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock(webhook_secret=SECRET) as server, webhook_receiver() as (url, received):
            call, status = await server.ring(url, "+14155550123", "+18005550199")
            assert status == 200 and call.state == "ringing"
            ((headers, body),) = received
            event = openai.OpenAI(api_key=KEY, webhook_secret=SECRET).webhooks.unwrap(body, headers)
            assert event.type == "realtime.call.incoming"
            assert event.data.call_id == call.id
            assert {h.name for h in event.data.sip_headers} >= {"From", "To"}
            assert "+14155550123" in next(
                h.value for h in event.data.sip_headers if h.name == "From"
            )
            # A tampered body fails the same check.
            with pytest.raises(openai.InvalidWebhookSignatureError):
                openai.OpenAI(api_key=KEY, webhook_secret=SECRET).webhooks.unwrap(
                    body + b" ", headers
                )


def test_a_signature_is_hmac_sha256_of_id_timestamp_and_body() -> None:
    # Standard Webhooks' published example (svix): the same secret, id, timestamp and body.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


async def test_accept_starts_the_sip_call_with_the_given_session() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock(webhook_secret=SECRET) as server, webhook_receiver() as (url, _):
            call, _ = await server.ring(url, "+14155550123", "+18005550199")
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                path = f"/v1/realtime/calls/{call.id}"
                session = {
                    "type": "realtime",
                    "model": "gpt-realtime",
                    "instructions": "Answer the phone.",
                }
                assert (
                    await http.post(f"{path}/accept", json=session, headers=AUTH)
                ).status_code == 200
                assert (
                    await http.post(f"{path}/accept", json=session, headers=AUTH)
                ).status_code == 400
                assert call.state == "active" and call.accepted_with == session
                assert (
                    call.session is not None
                    and call.session.config.instructions == "Answer the phone."
                )
                refer = await http.post(
                    f"{path}/refer", json={"target_uri": "tel:+14155550000"}, headers=AUTH
                )
                assert refer.status_code == 200
            assert call.state == "ended" and call.end_reason == "referred"
            assert call.referred_to == "tel:+14155550000"


async def test_reject_declines_a_ringing_call_with_its_sip_status() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock(webhook_secret=SECRET) as server, webhook_receiver() as (url, _):
            call, _ = await server.ring(url, "+14155550123", "+18005550199")
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                answer = await http.post(
                    f"/v1/realtime/calls/{call.id}/reject", json={"status_code": 486}, headers=AUTH
                )
            assert answer.status_code == 200
            assert call.state == "rejected" and call.rejected_with == 486


async def test_the_rest_trigger_rings_a_sip_call() -> None:
    with trio.fail_after(TIMEOUT):
        async with mock(webhook_secret=SECRET) as server, webhook_receiver() as (url, received):
            async with httpx.AsyncClient(base_url=server.http_url) as http:
                answer = await http.post(
                    "/mock/sip/incoming",
                    json={"webhook_url": url, "from": "+15550001"},
                    headers=AUTH,
                )
            assert answer.status_code == 200
            assert answer.json()["webhook_status"] == 200
            assert server.calls[answer.json()["call_id"]].transport == "sip"
            assert len(received) == 1
