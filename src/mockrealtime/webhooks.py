"""OpenAI's webhooks as the fake sends them: Standard Webhooks signatures, and the
``realtime.call.incoming`` event of a SIP call.

A webhook is a JSON ``POST`` with three headers: ``webhook-id`` (the delivery's id),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature``: ``v1,`` and the base64
HMAC-SHA256, keyed with the secret, of ``"{id}.{timestamp}.{body}"``. The secret is
written ``whsec_<base64 key>``; the key is its decoded base64 part. The official SDK's
``client.webhooks.unwrap()`` verifies exactly this.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from typing import Any

import orjson

from .ids import IdFactory

USER_AGENT = "OpenAI/1.0 (+https://platform.openai.com/docs/webhooks)"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret (any other string is used as it is)."""
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode()


def sign(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header of one delivery."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(signing_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def incoming_call_event(
    rng: random.Random,
    call_id: str,
    sip_headers: list[dict[str, str]],
    now: int,
) -> dict[str, Any]:
    """The ``realtime.call.incoming`` event OpenAI posts when a SIP call arrives."""
    return {
        "object": "event",
        "id": IdFactory(rng).new("evt", 24),
        "type": "realtime.call.incoming",
        "created_at": now,
        "data": {"call_id": call_id, "sip_headers": sip_headers},
    }


def delivery(
    secret: str, rng: random.Random, event: dict[str, Any], now: int
) -> tuple[bytes, list[tuple[str, str]]]:
    """The body and headers of one signed delivery of ``event``."""
    body = orjson.dumps(event)
    webhook_id = IdFactory(rng).new("wh", 24)
    return body, [
        ("content-type", "application/json"),
        ("user-agent", USER_AGENT),
        ("webhook-id", webhook_id),
        ("webhook-timestamp", str(now)),
        ("webhook-signature", sign(secret, webhook_id, now, body)),
    ]


def sip_headers(caller: str, callee: str, call_id: str) -> list[dict[str, str]]:
    """The SIP INVITE headers of a call from the number ``caller`` to ``callee``, as a trunk
    such as Twilio's sends them."""
    return [
        {"name": "From", "value": f'"{caller}" <sip:{caller}@pstn.example.net>;tag=mock'},
        {"name": "To", "value": f"<sip:{callee}@sip.api.openai.com>"},
        {"name": "Call-ID", "value": f"{call_id}@mockrealtime"},
    ]
