"""Reading and writing Realtime events on the hot path.

Audio events are a few kilobytes of base64 inside a small JSON envelope. The relay
only needs their ``type``, so :func:`event_type` reads it from the text without
decoding the payload whenever the event starts with ``{"type":"…"``, which is how
the official SDKs and the Realtime API write events. Anything else is parsed fully,
so the answer is always the type a JSON parser would see.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any

import orjson

_PREFIX = '{"type":"'
_PREFIX_LEN = len(_PREFIX)


def event_type(text: str) -> str | None:
    """The top-level ``type`` of a JSON event, or None if it has none or is not JSON.

    Fast path: ``{"type":"x", …}`` with no backslash and no second ``"type"`` string
    anywhere (a duplicate key would make a parser take the last one). It walks from
    one double quote to the next, each found with ``memchr``: base64 audio holds no
    quote, so a 6 KB event is a handful of short jumps rather than a substring
    search over all of it (several times slower).
    """
    if text.startswith(_PREFIX):
        find = text.find
        end = find('"', _PREFIX_LEN)
        if end > 0 and find("\\", _PREFIX_LEN) < 0:
            at = end + 1
            while (start := find('"', at)) >= 0:
                at = find('"', start + 1) + 1
                if not at or (at - start == 6 and text.startswith("type", start + 1)):
                    break  # unbalanced (not JSON) or a second "type": the parser decides
            else:
                return text[_PREFIX_LEN:end]
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(event, dict):
        kind = event.get("type")
        return kind if isinstance(kind, str) else None
    return None


#: Standard base64's alphabet: what an audio event is made of, but for its small JSON envelope.
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@functools.lru_cache(maxsize=64)
def finder(needle: str) -> Callable[[str], bool]:
    """A test for ``needle in text``, fast on audio events.

    ``in`` walks a 6.5 KB event nearly a character at a time (its skip table is
    full for a needle of letters and digits). If ``needle`` holds a character
    base64 never uses (an API key's ``-``), only the places where that character
    occurs can start a match, and ``find`` jumps to each with ``memchr``: over base64
    audio, one jump to the end.

    One test per needle, shared (every session looks for the same key): a test of its own per
    session would be one more object to fetch, often from far in memory, per message.
    """
    at = next((i for i, char in enumerate(needle) if char not in _BASE64), -1)
    if at < 0:
        return lambda text: needle in text
    anchor = needle[at]

    def found_in(text: str) -> bool:
        find = text.find
        i = find(anchor, at)
        while i >= 0:
            if text.startswith(needle, i - at):
                return True
            i = find(anchor, i + 1)
        return False

    return found_in


def parse_event(text: str | bytes) -> dict[str, Any] | None:
    """A JSON object, or None if the text is not one."""
    try:
        event = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return event if isinstance(event, dict) else None


def dumps(event: dict[str, Any]) -> str:
    return orjson.dumps(event).decode()


def error_event(
    code: str,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    client_event_id: str | None = None,
) -> str:
    """An ``error`` event in the Realtime API's own shape, written by the relay."""
    return dumps(
        {
            "type": "error",
            "event_id": "event_relay" + secrets.token_hex(8),
            "error": {
                "type": kind,
                "code": code,
                "message": message,
                "param": param,
                "event_id": client_event_id,
            },
        }
    )
