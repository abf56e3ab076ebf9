"""Client identity: API keys and JWTs, from a header or a subprotocol, and the Origin check."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from relay.usage.auth import (
    Authenticator,
    Identity,
    Refusal,
    hash_key,
    parse_api_keys,
    safety_identifier,
    safety_key,
)

SECRET = "jwt-shared-secret-for-tests-0123456789abcdef"
KEY = "rk_alice_key"


def auth(**kwargs: object) -> Authenticator:
    values: dict[str, object] = {"api_keys": parse_api_keys([f"alice:{hash_key(KEY)}"]), "jwt_secret": SECRET}
    values.update(kwargs)
    return Authenticator(**values)  # type: ignore[arg-type]


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


def token(claims: dict, key: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode({"sub": "bob", "exp": int(time.time()) + 60, **claims}, key, algorithm=algorithm)


def refusal(fn) -> Refusal:
    with pytest.raises(Refusal) as caught:
        fn()
    return caught.value


def test_a_static_api_key_names_its_user() -> None:
    assert auth().authenticate(bearer(KEY), []).user == "alice"


def test_a_wrong_api_key_is_refused_with_401() -> None:
    refused = refusal(lambda: auth().authenticate(bearer("rk_guess"), []))
    assert (refused.status, refused.code) == (401, "invalid_credentials")


def test_no_token_is_refused_unless_anonymous_use_is_allowed() -> None:
    refused = refusal(lambda: auth().authenticate([], ["realtime"]))
    assert (refused.status, refused.code) == (401, "missing_credentials")
    assert auth(anonymous=True).authenticate([], ["realtime"]).method == "anonymous"


@pytest.mark.parametrize("prefix", ["relay-token.", "openai-insecure-api-key."])
def test_a_browser_token_comes_in_a_subprotocol(prefix: str) -> None:
    """``openai-insecure-api-key.`` is where the JS Agents SDK puts its key in a browser."""
    identity = auth().authenticate([], ["realtime", f"{prefix}{token({})}"])
    assert (identity.user, identity.method) == ("bob", "jwt")
    refused = refusal(lambda: auth().authenticate([], ["realtime", f"{prefix}rk_guess"]))
    assert (refused.status, refused.code) == (401, "invalid_credentials")


def test_jwt_claims_tighten_the_session() -> None:
    identity = auth().authenticate(
        bearer(token({"model": "gpt-realtime-mini", "max_session_seconds": 300, "budget": 5000})), []
    )
    assert (identity.model, identity.max_session_seconds, identity.budget) == ("gpt-realtime-mini", 300, 5000)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: token({}, key="another-secret-entirely-0123456789abcdef"), "invalid_credentials"),
        (lambda: token({"exp": int(time.time()) - 3600}), "token_expired"),
        (lambda: jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, None, algorithm="none"), "invalid_credentials"),
        (lambda: jwt.encode({"sub": "bob"}, SECRET, algorithm="HS256"), "invalid_credentials"),
        (lambda: token({"sub": ""}), "invalid_credentials"),
        (lambda: token({"budget": "lots"}), "invalid_credentials"),
    ],
    ids=["bad-signature", "expired", "alg-none", "no-exp", "empty-sub", "bad-claim-type"],
)
def test_bad_jwts_are_refused_with_401(make, code: str) -> None:
    refused = refusal(lambda: auth().authenticate(bearer(make()), []))
    assert (refused.status, refused.code) == (401, code)


def test_alg_none_tokens_have_the_jwt_shape_and_are_still_refused() -> None:
    unsigned = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert unsigned.count(".") == 2
    assert refusal(lambda: auth().authenticate(bearer(unsigned), [])).status == 401


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
def test_public_key_jwts_are_checked_with_the_public_key(algorithm: str) -> None:
    private = rsa.generate_private_key(65537, 2048) if algorithm == "RS256" else ec.generate_private_key(ec.SECP256R1())
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    authenticator = Authenticator(api_keys={}, jwt_public_key=pem)
    good = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, private, algorithm=algorithm)
    assert authenticator.authenticate(bearer(good), []).user == "carol"
    # The public key must not be usable as an HMAC secret (algorithm confusion).
    forged = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256")
    assert refusal(lambda: authenticator.authenticate(bearer(forged), [])).status == 401


def test_a_page_from_another_origin_is_refused_with_403() -> None:
    checked = auth(allowed_origins=["https://app.example"])
    headers = [(b"origin", b"https://evil.example"), *bearer(KEY)]
    refused = refusal(lambda: checked.authenticate(headers, []))
    assert (refused.status, refused.code) == (403, "origin_not_allowed")
    assert checked.authenticate([(b"origin", b"https://app.example"), *bearer(KEY)], []).user == "alice"
    assert checked.authenticate(bearer(KEY), []).user == "alice"  # servers send no Origin


@pytest.mark.parametrize("allowed", [["https://app.example"], []])
def test_two_origin_headers_are_refused_with_403_whatever_the_allow_list(allowed: list[str]) -> None:
    """Only one could be checked; a proxy that adds its own must not let a page pass."""
    checked = auth(allowed_origins=allowed)
    for order in ([b"https://evil.example", b"https://app.example"],
                  [b"https://app.example", b"https://evil.example"]):
        headers = [(b"origin", origin) for origin in order] + bearer(KEY)
        refused = refusal(lambda: checked.authenticate(headers, []))  # noqa: B023
        assert (refused.status, refused.code) == (403, "origin_not_allowed")
        assert "more than one Origin" in refused.message


def test_the_safety_identifier_is_a_stable_keyed_hash_of_the_user() -> None:
    import hashlib

    key = safety_key("sk-upstream-key-one")
    alice = safety_identifier(key, Identity("alice", "api_key"))
    assert alice == safety_identifier(safety_key("sk-upstream-key-one"), Identity("alice", "jwt"))
    assert len(alice) == 32 and int(alice, 16) >= 0
    assert alice != safety_identifier(key, Identity("bob", "api_key"))
    assert alice != safety_identifier(safety_key("sk-upstream-key-two"), Identity("alice", "api_key"))
    # Hashing a guessed name without the relay's key does not find it.
    assert alice not in (hashlib.sha256(b"alice").hexdigest()[:32], hashlib.sha256(b"user:alice").hexdigest()[:32])
    # Anonymous clients share one identifier, which a user named "anonymous" does not get.
    anonymous = safety_identifier(key, Identity("anonymous", "anonymous"))
    assert anonymous != safety_identifier(key, Identity("anonymous", "api_key"))


def test_api_key_entries_must_be_hashes() -> None:
    with pytest.raises(ValueError, match="USER:SHA256HEX"):
        parse_api_keys(["alice:rk_in_clear"])


def test_an_anonymous_relay_ignores_the_token_an_sdk_always_sends() -> None:
    anonymous_only = Authenticator(api_keys={}, anonymous=True)
    assert anonymous_only.authenticate(bearer("sk-the-sdk-users-own-key"), []).method == "anonymous"
    # With credentials configured, a token must be a valid one even if anonymous use is allowed.
    assert refusal(lambda: auth(anonymous=True).authenticate(bearer("rk_guess"), [])).status == 401
