"""Client auth at the handshake, through Hypercorn: refused clients never cost an upstream dial."""

from __future__ import annotations

import time

import jwt
import orjson
import pytest
import trio
from trio_websocket import ConnectionRejected

from relay.usage.auth import hash_key

from .harness import connect, greet, running_relay, scripted_upstream
from .test_relay_loopback import error_codes, receive_until_closed

SECRET = "jwt-shared-secret-for-tests-0123456789abcdef"
API_KEY = "rk_test_client_key_abcdef"
TIMEOUT = 10


def settings(**extra: object) -> dict[str, object]:
    return {
        "allow_anonymous": False,
        "jwt_secret": SECRET,
        "api_keys": (f"alice:{hash_key(API_KEY)}",),
        "allowed_origins": ("https://app.example",),
        **extra,
    }


def signed(claims: dict, key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"sub": "bob", "exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


REFUSED = [
    ("no token", {}, 401),
    ("unknown api key", {"extra_headers": [(b"authorization", b"Bearer rk_guess")]}, 401),
    ("bad signature", {"extra_headers": [(b"authorization", b"Bearer " + signed({}, key="k" * 40).encode())]}, 401),
    ("expired", {"extra_headers": [(b"authorization", b"Bearer " + signed({"exp": int(time.time()) - 3600}).encode())]}, 401),
    ("alg none", {"extra_headers": [(b"authorization", b"Bearer " + jwt.encode({"sub": "bob", "exp": int(time.time()) + 600}, None, algorithm="none").encode())]}, 401),
    ("wrong origin", {"extra_headers": [(b"origin", b"https://evil.example"), (b"authorization", f"Bearer {API_KEY}".encode())]}, 403),
    ("token in a subprotocol, bad", {"subprotocols": ["realtime", "relay-token.rk_guess"]}, 401),
]


@pytest.mark.parametrize(("case", "kwargs", "status"), REFUSED, ids=[c[0] for c in REFUSED])
async def test_bad_credentials_are_refused_at_the_handshake_and_nothing_is_dialled(
    case: str, kwargs: dict, status: int
) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(upstream_url=up.url, **settings()) as relay:
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice", **kwargs):
                    pass
            assert refused.value.status_code == status
            body = orjson.loads(refused.value.body)
            assert body["error"] and body["code"]
            assert up.connections == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"extra_headers": [(b"authorization", f"Bearer {API_KEY}".encode())]},
        {"extra_headers": [(b"authorization", b"Bearer " + signed({}).encode())]},
        {"subprotocols": ["realtime", "relay-token." + signed({})],
         "extra_headers": [(b"origin", b"https://app.example")]},
        {"subprotocols": ["realtime", "openai-insecure-api-key." + API_KEY],
         "extra_headers": [(b"origin", b"https://app.example")]},
    ],
    ids=[
        "api key",
        "jwt header",
        "jwt subprotocol from an allowed page",
        "api key where the JS Agents SDK puts it in a browser",
    ],
)
async def test_a_valid_token_opens_a_session(kwargs: dict) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(upstream_url=up.url, **settings()) as relay:
            async with connect(relay.url + "/voice", **kwargs) as ws:
                assert await ws.get_message() == '{"type":"session.created"}'
                if "subprotocols" in kwargs:
                    assert ws.subprotocol == "realtime"  # the token-bearing one is never echoed
            assert len(up.connections) == 1
            sent = b"".join(v for _, v in up.connections[0].request.headers)
            assert API_KEY.encode() not in sent and b"relay-token" not in sent


async def test_a_token_limited_to_one_model_cannot_open_another() -> None:
    headers = [(b"authorization", b"Bearer " + signed({"model": "gpt-realtime-2"}).encode())]
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(upstream_url=up.url, **settings()) as relay:
            async with connect(relay.url + "/v1/realtime?model=gpt-realtime-2.1", extra_headers=headers) as ws:
                messages, code, _ = await receive_until_closed(ws)
            assert error_codes(messages) == ["invalid_model"] and code == 4000
            async with connect(relay.url + "/v1/realtime?model=gpt-realtime-2", extra_headers=headers) as ws:
                assert await ws.get_message() == '{"type":"session.created"}'
            assert len(up.connections) == 1


async def test_a_tokens_session_length_claim_shortens_the_session() -> None:
    headers = [(b"authorization", b"Bearer " + signed({"max_session_seconds": 0.6}).encode())]
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(
            upstream_url=up.url, max_session_seconds=3600, limit_warning_seconds=0.2, **settings()
        ) as relay:
            async with connect(relay.url + "/voice", extra_headers=headers) as ws:
                started = trio.current_time()
                messages, code, reason = await receive_until_closed(ws)
                lasted = trio.current_time() - started
            assert error_codes(messages) == ["relay_session_ending_soon", "session_expired"]
            assert code == 1001 and "0.6 s" in reason
            assert 0.5 < lasted < 3


BROWSER_REFUSED = [
    ("no token", [(b"origin", b"https://app.example")], 4401),
    ("wrong origin", [(b"origin", b"https://evil.example"), (b"authorization", f"Bearer {API_KEY}".encode())], 4403),
]


@pytest.mark.parametrize(("case", "headers", "code"), BROWSER_REFUSED, ids=[c[0] for c in BROWSER_REFUSED])
async def test_browsers_can_be_refused_with_a_close_code_they_can_read(case: str, headers: list, code: int) -> None:
    with trio.fail_after(TIMEOUT):
        async with scripted_upstream(greet) as up, running_relay(
            upstream_url=up.url, browser_refusals="close", **settings()
        ) as relay:
            async with connect(relay.url + "/voice", subprotocols=["realtime"], extra_headers=headers) as ws:
                messages, closed_with, reason = await receive_until_closed(ws)
            assert closed_with == code and error_codes(messages) == [reason]
            # Servers and SDKs, which send no Origin, still get the plain HTTP refusal.
            with pytest.raises(ConnectionRejected) as refused:
                async with connect(relay.url + "/voice"):
                    pass
            assert refused.value.status_code == 401
            assert up.connections == []
