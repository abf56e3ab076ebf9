"""Phones on SIP: the relay as the webhook of ``realtime.call.incoming``. Deliveries are
checked against the Standard Webhooks signature; the caller's number (by keyed hash) names
the user; the call is accepted with the relay's session and watched from its sideband, or
declined. mockrealtime rings the calls and signs the webhooks."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from mockrealtime.calls import MockCall
from mockrealtime.webhooks import delivery, incoming_call_event, sip_headers
from relay.core.policy import Policy
from relay.usage.auth import Refusal
from relay.usage.sip import caller_digest, caller_number, normalise
from relay.usage.webhooks import secret_key, verify

from .harness import TEST_KEY, RunningRelay, running_relay

TIMEOUT = 15
SECRET = "whsec_" + "c2lwLXdlYmhvb2stc2VjcmV0LWZvci10aGUtcmVsYXk="
CALLER_KEY = "caller-key-0123456789abcdef"
ALICE_PHONE = "+1 (415) 555-0123"
STRANGER = "+14155550999"


@asynccontextmanager
async def sip_relay(**settings: object) -> AsyncIterator[tuple[RunningRelay, MockServer, str]]:
    """A relay taking SIP calls from alice's phone, in front of a mockrealtime that rings them;
    and the relay's webhook URL."""
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(
            serve_mock_realtime,
            MockConfig(api_keys=frozenset({TEST_KEY}), pace=0, webhook_secret=SECRET),
        )
        values = {
            "upstream_url": mock.url,
            "allow_anonymous": False,
            "api_keys": (),
            "openai_webhook_secret": SECRET,
            "sip_caller_key": CALLER_KEY,
            "sip_callers": (f"alice:{caller_digest(CALLER_KEY, ALICE_PHONE)}",),
            "store": "sqlite:///:memory:",
            **settings,
        }
        async with running_relay(**values) as relay:
            yield relay, mock, f"{relay.http_url}/webhooks/openai"
        nursery.cancel_scope.cancel()


async def test_a_known_caller_is_accepted_with_the_relays_session_and_watched() -> None:
    locked = Policy(locked=frozenset({"instructions", "tools", "model"}))  # the persona too
    with trio.fail_after(TIMEOUT):
        async with sip_relay(policy=locked) as (relay, mock, url):
            call, status = await mock.ring(url, "+14155550123", "+18005550199")
            assert status == 200
            assert call.state == "active"
            accepted = call.accepted_with
            assert accepted is not None
            session = relay.app.config.session_object()
            assert accepted["instructions"] == session["instructions"]
            assert accepted["audio"]["output"]["voice"] == session["audio"]["output"]["voice"]
            assert accepted["model"] == relay.app.config.model
            assert (
                call.session is not None
                and call.session.config.instructions == session["instructions"]
            )
            await call.wait_for(lambda c: c.sidebands == 1)
            watch = relay.app.calls.live[call.id]
            assert (watch.identity.user, watch.transport) == ("alice", "sip")
            # The caller's side changes a locked field: the sideband puts it back.
            call.peer_send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "instructions": "Sell timeshares."},
                }
            )
            await call.wait_for(
                lambda c: (
                    c.session is not None
                    and c.session.config.instructions == session["instructions"]
                )
            )
            call.end("peer_left")
            await watch.over.wait()
            (row,) = await rows_of(relay, "alice")
            assert row["sessions"] == 1


async def rows_of(relay: RunningRelay, user: str) -> list[dict]:
    assert relay.app.accounting is not None
    from relay.usage.accounting import usage_json

    return [usage_json(r) for r in await relay.app.accounting.store.rows(user=user)]


async def test_an_unknown_caller_is_declined() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay() as (relay, mock, url):
            call, status = await mock.ring(url, STRANGER, "+18005550199")
            assert status == 200
            assert call.state == "rejected" and call.rejected_with == 603
            assert not relay.app.calls.live


async def test_an_unknown_caller_comes_in_as_anonymous_on_an_anonymous_relay() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay(allow_anonymous=True) as (relay, mock, url):
            call, _ = await mock.ring(url, STRANGER, "+18005550199")
            assert call.state == "active"
            assert relay.app.calls.live[call.id].identity.user == "anonymous"


async def test_a_caller_over_the_cap_gets_busy_here() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay(max_sessions_per_user=1) as (relay, mock, url):
            first, _ = await mock.ring(url, "+14155550123", "+18005550199")
            second, _ = await mock.ring(url, "+14155550123", "+18005550199")
            assert first.state == "active"
            assert second.state == "rejected" and second.rejected_with == 486


def ringing(mock: MockServer) -> tuple[MockCall, dict[str, object], int]:
    """A SIP call ringing on the fake from alice's phone, and its webhook event (unsent)."""
    call = mock.new_call("sip", "gpt-realtime")
    now = int(time.time())
    headers = sip_headers("+14155550123", "+18005550199", call.id)
    return call, incoming_call_event(mock._rng, call.id, headers, now), now


async def test_a_bad_webhook_signature_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay() as (relay, mock, url):
            call, event, now = ringing(mock)
            body, headers = delivery(
                "whsec_" + "d3Jvbmctc2VjcmV0LXdyb25nLXNlY3JldA==", mock._rng, event, now
            )
            async with httpx.AsyncClient() as http:
                forged = await http.post(url, content=body, headers=headers)
                assert forged.status_code == 401
                assert forged.json()["code"] == "webhook_bad_signature"
                body, headers = delivery(SECRET, mock._rng, event, now - 3600)
                stale = await http.post(url, content=body, headers=headers)
                assert stale.status_code == 401 and stale.json()["code"] == "webhook_stale"
                unsigned = await http.post(
                    url, content=body, headers={"content-type": "application/json"}
                )
                assert unsigned.status_code == 400
            assert call.state == "ringing" and not relay.app.calls.live  # nothing was acted on


async def test_a_delivery_is_handled_once_and_other_events_are_acknowledged() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay() as (relay, mock, url):
            call, event, now = ringing(mock)
            body, headers = delivery(SECRET, mock._rng, event, now)
            async with httpx.AsyncClient() as http:
                first = await http.post(url, content=body, headers=headers)
                again = await http.post(url, content=body, headers=headers)  # OpenAI retrying
                other = {
                    "object": "event",
                    "id": "evt_1",
                    "type": "batch.completed",
                    "created_at": now,
                    "data": {},
                }
                body, headers = delivery(SECRET, mock._rng, other, now)
                ignored = await http.post(url, content=body, headers=headers)
            assert first.json() == {"call_id": call.id, "accepted": True}
            assert call.state == "active" and call.sidebands <= 1
            assert again.json() == {"status": "duplicate"}
            assert ignored.json() == {"status": "ignored"}


async def test_the_webhook_is_off_without_a_secret() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay(openai_webhook_secret="") as (relay, mock, url):
            async with httpx.AsyncClient() as http:
                assert (await http.post(url, content=b"{}")).status_code == 404


async def test_a_draining_relay_asks_for_the_delivery_again() -> None:
    with trio.fail_after(TIMEOUT):
        async with sip_relay() as (relay, mock, url):
            relay.app.draining = True
            call, status = await mock.ring(url, "+14155550123", "+18005550199")
            assert status == 503 and call.state == "ringing"
            relay.app.draining = False


# --- the pieces, without sockets ----------------------------------------------------------


def test_verify_takes_a_fresh_signed_delivery_and_returns_its_id() -> None:
    key = secret_key(SECRET)
    event = {"type": "realtime.call.incoming"}
    body, headers = delivery(SECRET, random.Random(1), event, 1_800_000_000)
    raw = [(name.encode(), value.encode()) for name, value in headers]
    webhook_id = dict(headers)["webhook-id"]
    assert verify(key, raw, body, 1_800_000_100) == webhook_id
    with pytest.raises(Refusal, match="signature"):
        verify(key, raw, body.replace(b"realtime", b"Realtime"), 1_800_000_100)
    with pytest.raises(Refusal, match="timestamp"):
        verify(key, raw, body, 1_800_000_000 + 301)
    with pytest.raises(Refusal, match="timestamp"):
        verify(key, raw, body, 1_800_000_000 - 301)  # from the future


def test_verify_accepts_any_of_several_signatures() -> None:
    key = secret_key(SECRET)
    body, headers = delivery(SECRET, random.Random(2), {"type": "x"}, 1_800_000_000)
    found = dict(headers)
    rotated = f"v1,bm90LXRoaXMtb25l {found['webhook-signature']}"
    raw = [
        (b"webhook-id", found["webhook-id"].encode()),
        (b"webhook-timestamp", b"1800000000"),
        (b"webhook-signature", rotated.encode()),
    ]
    assert verify(key, raw, body, 1_800_000_000) == found["webhook-id"]


def test_a_webhook_secret_must_be_whsec_base64() -> None:
    with pytest.raises(ValueError, match="whsec_"):
        secret_key("not-a-secret")
    with pytest.raises(ValueError, match="base64"):
        secret_key("whsec_!!!")


def test_the_caller_is_the_user_part_of_the_from_uri() -> None:
    assert (
        caller_number([{"name": "From", "value": '"Alice" <sip:+14155550123@pstn.example>;tag=1'}])
        == "+14155550123"
    )
    assert caller_number([{"name": "from", "value": "<tel:+1-415-555-0123>"}]) == "+14155550123"
    assert (
        caller_number([{"name": "From", "value": '"Anonymous" <sip:anonymous@anonymous.invalid>'}])
        is None
    )
    assert caller_number([{"name": "To", "value": "<sip:+1800@x>"}]) is None
    assert normalise(ALICE_PHONE) == "+14155550123"


def test_a_callers_entry_is_keyed_so_a_leaked_list_cannot_be_hashed_back() -> None:
    import hashlib

    digest = caller_digest(CALLER_KEY, ALICE_PHONE)
    assert digest == caller_digest(CALLER_KEY, "+14155550123")
    assert digest != hashlib.sha256(b"+14155550123").hexdigest()
    assert digest != caller_digest("another-key-0123456789", ALICE_PHONE)


async def test_the_sdks_accept_shape_is_what_the_relay_sends() -> None:
    """The relay's accept body is a session the SDK's ``calls.accept`` could have sent (the
    mock checks the keys, as the API does)."""
    with trio.fail_after(TIMEOUT):
        async with sip_relay() as (relay, mock, url):
            call, _ = await mock.ring(url, "+14155550123", "+18005550199")
            assert call.accepted_with is not None
            assert call.accepted_with["type"] == "realtime"
            assert set(call.accepted_with) <= {
                "type",
                "model",
                "instructions",
                "audio",
                "tools",
                "tool_choice",
                "max_output_tokens",
                "output_modalities",
                "prompt",
                "include",
                "tracing",
                "truncation",
            }


def test_relay_sip_caller_prints_an_entry_the_relay_takes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main
    from relay.config import load_config
    from relay.usage.sip import Callers

    monkeypatch.setenv("RELAY_SIP_CALLER_KEY", CALLER_KEY)
    assert main(["sip-caller", "alice", ALICE_PHONE]) == 0
    entry = capsys.readouterr().out.strip().rsplit(" ", 1)[1]
    config = load_config({"RELAY_SIP_CALLERS": entry, "RELAY_SIP_CALLER_KEY": CALLER_KEY})
    callers = Callers(config.sip_caller_key, config.sip_callers)
    assert callers.user_for("+14155550123") == "alice"
    assert callers.user_for(STRANGER) is None
    assert "4155550123" not in entry
    monkeypatch.delenv("RELAY_SIP_CALLER_KEY")
    assert main(["sip-caller", "alice", ALICE_PHONE]) == 2
    assert "RELAY_SIP_CALLER_KEY" in capsys.readouterr().err
