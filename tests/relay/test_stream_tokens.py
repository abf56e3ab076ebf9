"""Stream tokens and caller ids of phone calls (relay.usage.calls), without I/O."""

from __future__ import annotations

import pytest

from relay.usage.calls import STREAM_TOKEN_SECONDS, CallKeys, TokenRefused

NOW = 1_790_000_000.0


def test_a_token_admits_its_own_call_until_it_expires() -> None:
    keys = CallKeys("auth-token-a")
    token = keys.mint(call_sid="CA1", caller="phone:abc", account_sid="AC1", now=NOW)
    claim = keys.verify(token, call_sid="CA1", now=NOW + STREAM_TOKEN_SECONDS - 1)
    assert (claim.call_sid, claim.caller, claim.account_sid) == ("CA1", "phone:abc", "AC1")
    with pytest.raises(TokenRefused) as expired:
        keys.verify(token, call_sid="CA1", now=NOW + STREAM_TOKEN_SECONDS)
    assert expired.value.code == "twilio_stream_token_expired"


def test_each_token_has_its_own_id_for_the_store_to_claim_once() -> None:
    keys = CallKeys("auth-token-a")
    first, second = (keys.mint(call_sid="CA1", caller="c", account_sid="A", now=NOW) for _ in "12")
    assert (
        keys.verify(first, call_sid="CA1", now=NOW).nonce
        != keys.verify(second, call_sid="CA1", now=NOW).nonce
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda t: None, "twilio_stream_token_missing"),
        (
            lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),
            "twilio_stream_token_invalid",
        ),
        (lambda t: t.replace("rst1.", "rst2."), "twilio_stream_token_invalid"),
        (
            lambda t: "rst1.e30." + t.rsplit(".", 1)[1],
            "twilio_stream_token_invalid",
        ),  # claims swapped
        (lambda t: "garbage", "twilio_stream_token_invalid"),
    ],
)
def test_a_missing_or_altered_token_is_refused(change: object, code: str) -> None:
    keys = CallKeys("auth-token-a")
    token = keys.mint(call_sid="CA1", caller="c", account_sid="A", now=NOW)
    with pytest.raises(TokenRefused) as refused:
        keys.verify(change(token), call_sid="CA1", now=NOW)  # type: ignore[operator]
    assert refused.value.code == code


def test_a_token_is_refused_for_another_call_and_under_another_auth_token() -> None:
    token = CallKeys("auth-token-a").mint(call_sid="CA1", caller="c", account_sid="A", now=NOW)
    with pytest.raises(TokenRefused, match="another call"):
        CallKeys("auth-token-a").verify(token, call_sid="CA2", now=NOW)
    with pytest.raises(TokenRefused, match="not valid"):
        CallKeys("auth-token-b").verify(token, call_sid="CA1", now=NOW)


def test_caller_ids_are_stable_keyed_and_never_the_number() -> None:
    a, b = CallKeys("auth-token-a"), CallKeys("auth-token-b")
    number = "+15550100001"
    assert a.caller_id(number) == a.caller_id(number)
    assert a.caller_id(number) != a.caller_id("+15550100002")
    assert a.caller_id(number) != b.caller_id(number)  # keyed: no table of hashes undoes it
    assert "5550100001" not in a.caller_id(number)
    assert a.caller_id(number).startswith("phone:")
