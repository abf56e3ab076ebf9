"""REST endpoints: minting ephemeral keys (GA and beta) that the WebSocket accepts until expiry."""

from __future__ import annotations

import json
import random

import httpx
import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from mockrealtime.rest import RestStore, handle_rest

from .helpers import connect

KEY = "sk-test-0123456789"


class WallClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def call(
    method: str,
    path: str,
    body: object = None,
    *,
    key: str | None = KEY,
    store: RestStore | None = None,
    now: float = 1000.0,
) -> tuple[int, dict]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    raw = b"" if body is None else json.dumps(body).encode()
    return handle_rest(
        method,
        path,
        headers,
        raw,
        store=store or RestStore(),
        key_is_valid=lambda k: k == KEY,
        now=now,
        rng=random.Random(0),
    )


def test_client_secrets_mints_an_ek_key_with_the_requested_expiry() -> None:
    store = RestStore()
    status, body = call(
        "POST",
        "/v1/realtime/client_secrets",
        {
            "expires_after": {"anchor": "created_at", "seconds": 120},
            "session": {
                "type": "realtime",
                "instructions": "Be terse.",
                "audio": {"output": {"voice": "cedar"}},
            },
        },
        store=store,
    )
    assert status == 200
    assert body["value"].startswith("ek_") and body["expires_at"] == 1120
    assert body["session"]["instructions"] == "Be terse."
    assert body["session"]["audio"]["output"]["voice"] == "cedar"
    assert body["session"]["id"].startswith("sess_") and body["session"]["type"] == "realtime"
    assert store.secret_is_valid(body["value"], 1119.0)
    assert not store.secret_is_valid(body["value"], 1120.0)


def test_a_minted_secret_carries_its_session_config_for_the_websocket() -> None:
    store = RestStore()
    session = {"type": "realtime", "instructions": "Be terse.", "output_modalities": ["text"]}
    _, body = call("POST", "/v1/realtime/client_secrets", {"session": session}, store=store)
    preset = store.session_preset(body["value"])
    assert preset is not None
    assert (preset.instructions, preset.modality, preset.kind) == ("Be terse.", "text", "realtime")
    assert store.session_preset("sk-not-minted") is None
    request = {"model": "gpt-4o-realtime-preview", "voice": "ash"}
    _, beta = call("POST", "/v1/realtime/sessions", request, store=store)
    beta_preset = store.session_preset(beta["client_secret"]["value"])
    assert beta_preset is not None and beta_preset.voice == "ash"


def test_client_secrets_defaults_to_ten_minutes_and_a_realtime_session() -> None:
    status, body = call("POST", "/v1/realtime/client_secrets", {})
    assert status == 200 and body["expires_at"] == 1600
    assert body["session"]["model"] == "gpt-realtime"


def test_client_secrets_validates_like_session_update() -> None:
    status, body = call(
        "POST", "/v1/realtime/client_secrets", {"session": {"type": "realtime", "bogus": 1}}
    )
    assert status == 400 and body["error"]["code"] == "unknown_parameter"
    assert body["error"]["param"] == "session.bogus"
    status, body = call("POST", "/v1/realtime/client_secrets", {"expires_after": {"seconds": 5}})
    assert status == 400 and body["error"]["code"] == "integer_below_min_value"


def test_rest_needs_a_real_api_key() -> None:
    assert call("POST", "/v1/realtime/client_secrets", {}, key=None)[0] == 401
    status, body = call("POST", "/v1/realtime/client_secrets", {}, key="sk-nope-1234")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call("POST", "/v1/realtime/client_secrets", {}, key="ek_minted")[0] == 401


def test_beta_sessions_endpoint_needs_a_model_and_returns_a_client_secret() -> None:
    status, body = call("POST", "/v1/realtime/sessions", {"voice": "verse"})
    assert status == 400 and body["error"]["param"] == "model"
    status, body = call(
        "POST", "/v1/realtime/sessions", {"model": "gpt-4o-realtime-preview", "voice": "verse"}
    )
    assert status == 200
    assert body["voice"] == "verse" and body["modalities"] == ["text", "audio"]
    assert body["client_secret"]["value"].startswith("ek_")
    assert body["client_secret"]["expires_at"] == 1060


def test_unknown_paths_and_methods() -> None:
    assert call("GET", "/v1/models")[0] == 404
    assert call("GET", "/v1/realtime/client_secrets")[0] == 405
    status, body = call("POST", "/v1/realtime/client_secrets", None)
    assert status == 200  # an empty body means all defaults
    status, body = handle_rest(
        "POST",
        "/v1/realtime/client_secrets",
        {"authorization": f"Bearer {KEY}"},
        b"{nope",
        store=RestStore(),
        key_is_valid=lambda k: True,
        now=0,
        rng=random.Random(0),
    )
    assert status == 400 and "could not parse the JSON body" in body["error"]["message"]


async def test_a_minted_key_opens_websockets_until_it_expires(nursery: trio.Nursery) -> None:
    clock = WallClock()
    server: MockServer = await nursery.start(
        serve_mock_realtime, MockConfig(api_keys=frozenset({KEY}), wall_clock=clock)
    )
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=server.http_url) as client:
            response = await client.post(
                "/v1/realtime/client_secrets",
                headers={"authorization": f"Bearer {KEY}"},
                json={"expires_after": {"anchor": "created_at", "seconds": 30}},
            )
        assert response.status_code == 200
        ek = response.json()["value"]
        url = f"{server.url}?model=gpt-realtime"
        async with connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{ek}"]) as ws:
            assert json.loads(await ws.get_message())["type"] == "session.created"
            clock.now += 31  # the key expires; an open session outlives it
            await ws.send_message('{"type": "input_audio_buffer.clear"}')
            assert json.loads(await ws.get_message())["type"] == "input_audio_buffer.cleared"
        async with connect(url, extra_headers=[(b"authorization", f"Bearer {ek}".encode())]) as ws:
            error = json.loads(await ws.get_message())
    assert error["error"]["code"] == "invalid_api_key"


def test_healthz_answers_ok_without_a_key() -> None:
    assert call("GET", "/healthz", key=None) == (200, {"status": "ok"})
