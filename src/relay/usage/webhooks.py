"""Checking that a webhook comes from OpenAI: the Standard Webhooks signature.

OpenAI signs each delivery with the project's webhook secret (``whsec_<base64 key>``):
``webhook-signature`` holds one or more space-separated ``v1,<base64>`` entries, each the
HMAC-SHA256 under the key of ``"{webhook-id}.{webhook-timestamp}.{raw body}"``. A delivery
is taken only if one entry matches (compared in constant time) and its timestamp is within
:data:`TOLERANCE_SECONDS` of now either way, so a captured delivery cannot be replayed
later. The body is checked as received, byte for byte, before it is parsed.

Nothing here does I/O; the caller passes the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable

from .auth import Refusal

#: How far a delivery's timestamp may be from the relay's clock (the SDK's default too).
TOLERANCE_SECONDS = 300
SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_…`` secret; ValueError if it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("it must start with whsec_ (copy it from the webhook's page)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError("the part after whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("the key is shorter than 16 bytes")
    return key


def verify(
    key: bytes,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    now: float,
    tolerance: float = TOLERANCE_SECONDS,
) -> str:
    """The delivery's ``webhook-id`` if it is signed with ``key`` and fresh, else raise
    :class:`Refusal` (400 without the headers, 401 for a stale or wrong signature)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in (b"webhook-id", b"webhook-timestamp", b"webhook-signature"):
            found.setdefault(name, value)
    if len(found) < 3:
        raise Refusal(
            400,
            "webhook_unsigned",
            "A webhook needs the webhook-id, webhook-timestamp and webhook-signature headers.",
        )
    webhook_id, stamp = found[b"webhook-id"], found[b"webhook-timestamp"]
    if not stamp.isdigit():
        raise Refusal(401, "webhook_bad_timestamp", "webhook-timestamp is not Unix seconds.")
    if abs(now - int(stamp)) > tolerance:
        raise Refusal(
            401,
            "webhook_stale",
            f"The webhook's timestamp is more than {tolerance:g} s from the relay's clock: a"
            " replay, or a clock out of sync (check NTP).",
        )
    signed = webhook_id + b"." + stamp + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest())
    offered = [entry.partition(b",")[2] for entry in found[b"webhook-signature"].split()]
    # Every entry is compared (no early exit): the time taken says nothing about a match.
    matched = False
    for signature in offered:
        matched |= hmac.compare_digest(expected, signature)
    if not matched:
        raise Refusal(
            401,
            "webhook_bad_signature",
            "The webhook's signature does not match RELAY_OPENAI_WEBHOOK_SECRET.",
        )
    return webhook_id.decode("latin-1")
