"""Reading the event type as a JSON parser does, and an audio append's without decoding it."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.events import SHORT_TEXT, error_event, event_type, finder, is_audio_append


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"input_audio_buffer.append","audio":"AAAA"}', "input_audio_buffer.append"),
        ('{"type":"a","type":"b"}', "b"),  # a parser takes the last duplicate key
        ('{"event_id":"e","type":"c"}', "c"),
        ('{"type": "spaced"}', "spaced"),
        ('{"type":"a\\u0062"}', "ab"),
        ('{"type":"conversation.item.create","item":{"type":"message"}}', "conversation.item.create"),
        ("not json", None),
        ("[1, 2]", None),
        ('{"type": 3}', None),
        ("{}", None),
    ],
)
def test_event_type_matches_what_a_parser_sees(text: str, expected: str | None) -> None:
    assert event_type(text) == expected


@pytest.mark.parametrize(
    ("text", "append"),
    [
        ('{"type":"input_audio_buffer.append","audio":"AAAA"}', True),
        ('{"type":"input_audio_buffer.append","event_id":"b1.2","audio":"AAAA"}', True),
        ('{"type":"input_audio_buffer.append","audio":""}', True),
        # A second key after the audio, a second type, spaces, a truncation: for the parser.
        ('{"type":"input_audio_buffer.append","audio":"AAAA","type":"session.update"}', False),
        ('{"type":"input_audio_buffer.append","type":"session.update","audio":"AAAA"}', False),
        ('{"type":"input_audio_buffer.append","event_id":"e","type":"x","audio":"AAAA"}', False),
        ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', False),
        ('{"type":"input_audio_buffer.append","audio":"AAAA"', False),
        ('{"type":"input_audio_buffer.append","audio":"AAAA"}}', False),
        ('{"type":"input_audio_buffer.append","audio":"AA","x":"AA"}', False),
        ('{"type":"input_audio_buffer.append"}', False),
    ],
)
def test_an_append_is_recognised_only_in_the_shapes_the_sdks_write(text: str, append: bool) -> None:
    assert is_audio_append(text) is append
    if append:
        assert orjson.loads(text)["type"] == "input_audio_buffer.append"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@given(st.text(max_size=12), st.dictionaries(st.sampled_from(["type", "audio", "x"]), json_values, max_size=3))
def test_event_type_agrees_with_orjson_on_any_object(kind: str, rest: dict) -> None:
    event = {"type": kind, **rest}
    text = orjson.dumps(event).decode()
    parsed = orjson.loads(text)["type"]
    assert event_type(text) == (parsed if isinstance(parsed, str) else None)


def test_error_events_have_the_realtime_api_shape() -> None:
    event = orjson.loads(error_event("relay_x", "Something happened.", client_event_id="c1"))
    assert event["type"] == "error"
    assert event["event_id"].startswith("event_relay")
    assert event["error"] == {
        "type": "invalid_request_error",
        "code": "relay_x",
        "message": "Something happened.",
        "param": None,
        "event_id": "c1",
    }


_KEYISH = st.text(alphabet="sk-proj_ABCabc0123456789+/=", min_size=1, max_size=12)


_PIECES = st.sampled_from(["sk-", "-", "proj", "+/=", "A", "sk-proj_"]) | _KEYISH


@given(
    needle=_KEYISH,
    parts=st.lists(_PIECES, max_size=12),
    padding=st.sampled_from([0, SHORT_TEXT - 8, SHORT_TEXT, SHORT_TEXT + 40]),
)
def test_finder_agrees_with_in(needle: str, parts: list[str], padding: int) -> None:
    """Near misses included: texts built from the needle's own pieces, short and long (the
    finder searches texts from SHORT_TEXT characters on its own way)."""
    text = "".join(parts) + "Q" * padding
    assert finder(needle)(text) == (needle in text)
    assert finder(needle)(text + needle) and finder(needle)(needle + text)


def test_finder_finds_a_key_inside_an_audio_event_and_not_elsewhere() -> None:
    key = "sk-proj-AbC123_xyz"
    audio = "QUJD" * 1500
    event = f'{{"type":"response.output_audio.delta","delta":"{audio}"}}'
    assert not finder(key)(event)
    assert finder(key)(event.replace("QUJD", key, 1))
    assert finder(key)(event[:-2] + key + '"}')
