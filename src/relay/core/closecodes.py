"""The close codes the relay sends, as data. The README's close-code table mirrors this file.

Two rules shape it. Codes 1005, 1006 and 1015 describe a close but may never be
sent in a close frame (wsproto silently turns them into 1000, which would read as
a clean ending), so an upstream that vanished is reported with a code that can be
sent. And every close the relay decides on itself is preceded by a JSON ``error``
event, so a client learns what happened even where close reasons are hidden.
"""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    #: The Realtime API's own code for a bad request at connect (model, dialect).
    INVALID_REQUEST = 4000
    #: No message either way for the idle timeout (cf. HTTP 408).
    IDLE_TIMEOUT = 4008
    #: The client sent faster than its inbound rate limit (RELAY_CLIENT_MAX_RATE).
    TOO_FAST = 4009
    #: The user's daily token budget ran out during the session (cf. HTTP 429).
    BUDGET_EXHAUSTED = 4029


#: Codes that exist only locally and must never go on the wire.
UNSENDABLE = frozenset({1004, 1005, 1006, 1015})

#: Longest close reason a frame can carry (125 bytes of payload minus the code).
MAX_REASON_BYTES = 123

#: The Realtime API closes with 3000 when it refuses the key the relay sent.
UPSTREAM_AUTH_REFUSED = 3000


def sendable(code: int) -> bool:
    """Whether a close frame may carry this code (RFC 6455 §7.4)."""
    if code in UNSENDABLE:
        return False
    return 1000 <= code <= 1014 or 3000 <= code <= 4999


def clip_reason(reason: str) -> str:
    """Cut a reason to what fits in a close frame, on a character boundary."""
    data = reason.encode()
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[:MAX_REASON_BYTES].decode(errors="ignore")
