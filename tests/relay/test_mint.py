"""Minting short-lived client keys through the relay: authenticated, rate limited, policy baked in."""

from __future__ import annotations

import httpx
import openai
import orjson
import trio

from .harness import connect
from .test_accounting import ALICE, relays
from .test_openai_sdk_through_relay import DemoThread

TIMEOUT = 15
BEARER = {"authorization": f"Bearer {ALICE}"}


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
            upstream = relay.app.config.upstream_url + "?model=gpt-realtime"
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
    with DemoThread() as demo:
        http_url = demo.relay_url.replace("ws://", "http://")
        client = openai.OpenAI(api_key="sk-the-sdk-users-own-key", base_url=f"{http_url}/v1", max_retries=0)
        secret = client.realtime.client_secrets.create()
        assert secret.value.startswith("ek_")
        assert secret.session.type == "realtime"
