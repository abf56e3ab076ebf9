"""Reading and writing Realtime events on the hot path.

One reading of every event (the design's invariant 9): the type the relay acts on is the
type a JSON parser that keeps the last of duplicate keys reads. :func:`event_type` is that
parser's answer. Audio events are a few kilobytes of base64 in a small envelope, and
parsing them all would cost more than the rest of relaying them, so
:func:`is_audio_append` proves an append's type from its text instead: it checks the small
envelope and jumps over the audio with one ``memchr`` (base64 holds no quote), accepting
only the compact shapes the SDKs write, whose one ``"type"`` key comes first.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from typing import Any

import orjson


def event_type(text: str | bytes) -> str | None:
    """The top-level ``type`` a JSON parser reads, or None (not JSON, not an object, no
    string ``type``). Duplicate keys: the last one counts, as in orjson and Python's json."""
    event = parse_event(text)
    if event is None:
        return None
    kind = event.get("type")
    return kind if isinstance(kind, str) else None


#: The subprotocol a relay-aware client offers to make its session resumable, and (as
#: ``relay-resume.<token>.<count>``) to resume one (relay.server.resume).
RESUME_SUBPROTOCOL = "relay-resume"

#: An audio append as the SDKs write it: this head, an optional event_id, the audio last.
APPEND_AUDIO = '{"type":"input_audio_buffer.append","audio":"'
APPEND_EVENT_ID = '{"type":"input_audio_buffer.append","event_id":"'
_THEN_AUDIO = '","audio":"'


def is_audio_append(text: str) -> bool:
    """Whether every JSON parser that accepts ``text`` reads it as an ``input_audio_buffer.append``.

    True only for the shapes the SDKs write, ``{"type":"input_audio_buffer.append",
    "audio":"…"}`` with or without an ``"event_id":"…"`` between, compact: each value ends
    at the next quote, so it holds no second key, and the one top-level ``type`` is the
    first. Anything else is for the parser (False), at the cost of parsing.

    The values are jumped over, not read (``memchr`` to the next quote: base64 holds none),
    so what would make such a text invalid JSON inside a value goes unseen: a raw control
    character, a bad escape, a lone surrogate, an escaped closing quote. Strict parsers
    refuse such a text whole (no event at all); any parser that accepts it reads an
    append; none reads another type.
    """
    if text.startswith(APPEND_AUDIO):
        at = len(APPEND_AUDIO)
    elif text.startswith(APPEND_EVENT_ID):
        at = text.find('"', len(APPEND_EVENT_ID))  # where the event_id ends
        if not text.startswith(_THEN_AUDIO, at):
            return False
        at += len(_THEN_AUDIO)
    else:
        return False
    # The audio ends at the event's last quote, and the event right after it.
    return text.find('"', at) == len(text) - 2 and text[-1] == "}"


#: Standard base64's alphabet: what an audio event is made of, but for its small JSON envelope.
_BASE64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


#: Below this length :func:`finder`'s test is ``in`` (measured: about 20-50 ns for a small
#: event, where the jumps took 400 ns over three dots; ``in`` walks 6.5 KB of audio in 1.8 µs).
SHORT_TEXT = 1024


@functools.lru_cache(maxsize=64)
def finder(needle: str) -> Callable[[str], bool]:
    """A test for ``needle in text``, fast on audio events.

    ``in`` walks a 6.5 KB event nearly a character at a time (its skip table is
    full for a needle of letters and digits). If ``needle`` holds a character
    base64 never uses (an API key's ``-``), only the places where that character
    occurs can start a match, and ``find`` jumps to each with ``memchr``: over base64
    audio, one jump to the end.

    A text shorter than :data:`SHORT_TEXT` (most events that are not audio) is searched with
    ``in``: there each jump costs more than ``in`` walking all of it, and JSON is full of the
    ``.`` or ``-`` that a needle may be anchored on.

    One test per needle, shared (every session looks for the same key): a test of its own per
    session would be one more object to fetch, often from far in memory, per message.
    """
    at = next((i for i, char in enumerate(needle) if char not in _BASE64), -1)
    if at < 0:
        return lambda text: needle in text
    anchor = needle[at]

    def found_in(text: str) -> bool:
        if len(text) < SHORT_TEXT:
            return needle in text
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
