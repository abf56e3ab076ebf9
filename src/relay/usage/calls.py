"""Who is calling: stream tokens for Twilio calls and keyed caller ids, without I/O.

When a call comes in, Twilio asks the voice webhook what to do, and the relay answers with
TwiML that connects the call to ``/twilio`` and carries a **stream token** as a
``<Parameter>``: Twilio hands it back in the stream's ``start`` message. The token is signed
(HMAC-SHA256, with a key derived from the Twilio auth token, so every relay instance that
knows the auth token can check it), short-lived, and names the call, its caller and a random
id. That the id is used once only is the usage store's to say (``claim_once``), because the
stream may reach another worker or instance than the webhook did.

A caller is known by a keyed hash of their number (HMAC-SHA256 with another key derived from
the auth token), never the number: a plain hash of a phone number is undone by trying every
number. Rotating the auth token therefore starts every caller afresh.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

import orjson

#: How long a stream token lasts: Twilio opens the stream a moment after the webhook's answer.
STREAM_TOKEN_SECONDS: Final = 60
#: The token's format version, first in every token.
_PREFIX: Final = "rst1."
#: The relay user every call is also accounted to: the phone line itself.
ACCOUNT_USER: Final = "twilio"


@dataclass(frozen=True)
class StreamClaim:
    """What a valid stream token says."""

    call_sid: str
    caller: str  # the caller's keyed id, e.g. "phone:3f2a…"
    account_sid: str
    expires: float  # Unix time
    nonce: str  # used once only (the store says whether it was)


class TokenRefused(Exception):
    """A stream token that does not admit the stream: ``code`` and ``message`` say why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _derive(auth_token: str, purpose: bytes) -> bytes:
    return hmac.new(auth_token.encode(), b"relay " + purpose, hashlib.sha256).digest()


class CallKeys:
    """Stream tokens and caller ids under one Twilio auth token."""

    def __init__(self, auth_token: str) -> None:
        self._token_key = _derive(auth_token, b"stream token v1")
        self._caller_key = _derive(auth_token, b"caller id v1")

    def caller_id(self, number: str) -> str:
        """The id a caller's usage is kept under: a keyed hash of their number."""
        digest = hmac.new(self._caller_key, number.encode(), hashlib.sha256).hexdigest()
        return "phone:" + digest[:20]

    def mint(self, *, call_sid: str, caller: str, account_sid: str, now: float) -> str:
        """A stream token for this call, valid for :data:`STREAM_TOKEN_SECONDS`."""
        claims = {
            "call": call_sid,
            "caller": caller,
            "account": account_sid,
            "exp": int(now) + STREAM_TOKEN_SECONDS,
            "id": secrets.token_hex(16),
        }
        body = _PREFIX + _b64(orjson.dumps(claims))
        return body + "." + _b64(self._sign(body))

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._token_key, body.encode(), hashlib.sha256).digest()

    def verify(self, token: str | None, *, call_sid: str, now: float) -> StreamClaim:
        """The claim of a token minted here for this call and not expired, or
        :class:`TokenRefused`. Whether it was used before is the store's to say."""
        if not token:
            raise TokenRefused(
                "twilio_stream_token_missing",
                "The stream's start carries no 'token' parameter: connect calls through the"
                " relay's voice webhook (POST /twilio/voice), which adds one.",
            )
        body, _, signature = token.rpartition(".")
        try:
            given = _unb64(signature)
            claims = orjson.loads(_unb64(body[len(_PREFIX) :]))
        except (ValueError, orjson.JSONDecodeError):
            claims, given = None, b""
        if not body.startswith(_PREFIX) or not hmac.compare_digest(self._sign(body), given):
            raise TokenRefused("twilio_stream_token_invalid", "The stream token is not valid.")
        if (
            not isinstance(claims, dict)
            or not all(
                isinstance(claims.get(key), str) for key in ("call", "caller", "account", "id")
            )
            or not isinstance(claims.get("exp"), int)
        ):
            raise TokenRefused("twilio_stream_token_invalid", "The stream token is not valid.")
        if claims["exp"] <= now:
            raise TokenRefused(
                "twilio_stream_token_expired",
                f"The stream token expired: a stream must start within {STREAM_TOKEN_SECONDS} s"
                " of the webhook's answer.",
            )
        if claims["call"] != call_sid:
            raise TokenRefused(
                "twilio_stream_token_invalid", "The stream token was issued for another call."
            )
        return StreamClaim(
            claims["call"], claims["caller"], claims["account"], float(claims["exp"]), claims["id"]
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None
