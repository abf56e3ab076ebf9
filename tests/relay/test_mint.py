"""Minting short-lived client keys through the relay: authenticated, rate limited, policy baked in."""

from __future__ import annotations

import time

import httpx
import openai
import orjson
import trio

from relay.config import load_config
from relay.usage.accounting import utc_day
from relay.usage.auth import Identity, hash_key
from relay.usage.mint import Minter
from relay.usage.store import UsageDelta
from tests.clients.relays import relay_demo

from .harness import TEST_KEY, connect
from .test_accounting import ALICE, relays

TIMEOUT = 15
BEARER = {"authorization": f"Bearer {ALICE}"}
MINT = "/v1/realtime/client_secrets"


async def test_a_minted_key_opens_a_session_with_the_relays_session_and_hides_its_instructions() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:") as (relay,):
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                answer = await http.post(
                    "/v1/realtime/client_secrets",
                    headers=BEARER,
                    json={"expires_after": {"anchor": "created_at", "seconds": 60},
                          "session": {"type": "realtime", "instructions": "Be a pirate."}},
                )
            assert answer.status_code == 200
            minted = answer.json()
            assert minted["value"].startswith("ek_")
            assert "instructions" not in minted["session"]
            # The key works directly against the upstream, with the relay's instructions, not the caller's.
            upstream = relay.app.config.upstream_url + f"?model={relay.app.config.model}"
            async with connect(upstream, extra_headers=[(b"authorization", f"Bearer {minted['value']}".encode())]) as ws:
                created = orjson.loads(await ws.get_message())
            assert created["type"] == "session.created"
            assert created["session"]["instructions"] == relay.app.config.session_object()["instructions"]


async def test_minting_needs_a_relay_identity_and_is_rate_limited() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", mint_per_minute=2) as (relay,):
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                assert (await http.post("/v1/realtime/client_secrets")).status_code == 401
                codes = [(await http.post("/v1/realtime/client_secrets", headers=BEARER)).status_code for _ in range(3)]
                assert codes == [200, 200, 429]
                assert (await http.get("/v1/realtime/client_secrets", headers=BEARER)).status_code == 404


def test_the_sdk_mints_a_client_key_through_the_relay() -> None:
    with relay_demo() as demo:
        client = openai.OpenAI(api_key=demo.api_key, base_url=f"{demo.http_url}/v1", max_retries=0)
        secret = client.realtime.client_secrets.create()
        assert secret.value.startswith("ek_")
        assert secret.session.type == "realtime"


async def test_one_users_mint_rate_limit_leaves_another_user_alone() -> None:
    bob_key = "rk_bob_0123456789"
    keys = (f"alice:{hash_key(ALICE)}", f"bob:{hash_key(bob_key)}")
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", mint_per_minute=1, api_keys=keys) as (relay,):
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                alice = [(await http.post(MINT, headers=BEARER)).status_code for _ in range(2)]
                bob = await http.post(MINT, headers={"authorization": f"Bearer {bob_key}"})
            assert alice == [200, 429]
            assert bob.status_code == 200


async def test_a_user_whose_daily_budget_is_used_up_gets_no_client_key() -> None:
    with trio.fail_after(TIMEOUT):
        async with relays("sqlite:///:memory:", daily_token_budget=10) as (relay,):
            assert relay.app.accounting is not None
            await relay.app.accounting.store.add("alice", utc_day(time.time()), UsageDelta(output_audio_tokens=10))
            async with httpx.AsyncClient(base_url=relay.http_url) as http:
                answer = await http.post(MINT, headers=BEARER)
    assert answer.status_code == 429
    error = answer.json()["error"]
    assert error["code"] == "daily_budget_exhausted"
    assert "daily token budget of 10 is used up" in error["message"] and "00:00 UTC" in error["message"]


def minter(answer: httpx.Response) -> Minter:
    config = load_config({}, {"openai_api_key": TEST_KEY, "upstream_url": "wss://api.example/v1/realtime"})
    return Minter(config, transport=httpx.MockTransport(lambda request: answer))


async def test_an_upstream_error_quoting_the_relays_key_is_passed_on_scrubbed() -> None:
    quoting = {"error": {"type": "invalid_request_error", "code": "bad_expiry", "param": "expires_after",
                         "message": f"expires_after is invalid for key {TEST_KEY}"}}
    status, body = await minter(httpx.Response(400, json=quoting)).mint(Identity("alice", "api_key"), b"{}")
    assert status == 400
    assert body["error"]["message"] == "expires_after is invalid for key [redacted]"
    assert TEST_KEY not in orjson.dumps(body).decode()


async def test_an_upstream_error_page_that_is_not_json_gives_502() -> None:
    page = httpx.Response(500, text=f"<html>upstream trouble for {TEST_KEY}</html>")
    status, body = await minter(page).mint(Identity("alice", "api_key"), b"{}")
    assert status == 502 and body["error"]["code"] == "relay_upstream_error"
    assert TEST_KEY not in orjson.dumps(body).decode()


async def test_minting_while_the_usage_store_is_down_gives_503() -> None:
    from relay.usage.accounting import Accounting

    from .test_accounting import LeaseStore

    accounting = Accounting(LeaseStore(failing=frozenset({"tokens"}), failures=1), max_sessions=0, daily_budget=10)  # type: ignore[arg-type]
    never_asked = httpx.Response(200, json={"value": "ek_x"})
    status, body = await minter(never_asked).mint(Identity("alice", "api_key"), b"{}", accounting)
    assert status == 503 and body["error"]["code"] == "relay_store_unavailable"
