"""``conversation.item.truncate`` as the real server answers it, also while the reply streams."""

from __future__ import annotations

from typing import Any

from mockrealtime import audio as au
from mockrealtime.session import Session

from .helpers import FakeClock, make_session, only, send, types, user_text

AUDIO_DELTA = "response.output_audio.delta"


def streaming_reply(**options: Any) -> tuple[Session, FakeClock, str]:
    """A session whose audio reply (at real-time pace) has just started; returns its item id."""
    clock = FakeClock(0.0)
    options.setdefault("response_delay", 0.05)
    session, _ = make_session(clock=clock, pace=1.0, **options)
    send(session, user_text("Tell me a story"))
    out = send(session, {"type": "response.create"})
    assert AUDIO_DELTA not in types(out, deltas=True)  # nothing sent yet: it starts after 50 ms
    return session, clock, only(out, "response.output_item.added")["item"]["id"]


def advance(session: Session, clock: FakeClock, seconds: float) -> list[dict[str, Any]]:
    clock.now += seconds
    return session.tick()


def truncate(session: Session, item_id: str, end_ms: int) -> list[dict[str, Any]]:
    event = {"item_id": item_id, "content_index": 0, "audio_end_ms": end_ms}
    return send(session, {"type": "conversation.item.truncate", **event})


def retrieved(session: Session, item_id: str) -> dict[str, Any]:
    out = send(session, {"type": "conversation.item.retrieve", "item_id": item_id})
    return only(out, "conversation.item.retrieved")["item"]


def test_truncate_while_streaming_is_accepted_and_cancel_then_ends_the_response() -> None:
    session, clock, item_id = streaming_reply()
    sent = advance(session, clock, 0.45)
    sent_ms = sum(e["type"] == AUDIO_DELTA for e in sent) * au.CHUNK_MS
    assert sent_ms >= 300
    ok = truncate(session, item_id, 250)
    assert only(ok, "conversation.item.truncated")["audio_end_ms"] == 250
    assert session.has_active_response  # truncation alone does not stop the response
    more = advance(session, clock, 0.3)
    assert AUDIO_DELTA in types(more, deltas=True)
    cancelled = send(session, {"type": "response.cancel"})  # what the Agents SDK sends next
    done = only(cancelled, "response.done")["response"]
    assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "client_cancelled")
    transcript = only(cancelled, "response.output_audio_transcript.done")["transcript"]
    assert transcript  # the stream reports what was generated...
    for kind in ("conversation.item.done", "response.output_item.done"):
        assert (
            only(cancelled, kind)["item"]["content"][0]["transcript"] == ""
        )  # ...the item, the cut
    assert done["output"][0]["content"][0]["transcript"] == ""
    item = retrieved(session, item_id)
    assert item["content"][0]["transcript"] == ""
    heard = au.b64decode(item["content"][0]["audio"])
    assert len(heard) == 250 * au.bytes_per_ms("pcm16")


def test_truncate_before_the_first_audio_delta_is_refused() -> None:
    session, _, item_id = streaming_reply(response_delay=1.0)  # still "thinking"
    error = only(truncate(session, item_id, 0), "error")["error"]
    assert (error["code"], error["param"]) == ("unsupported_content_type", "item_id")
    assert error["message"] == "Only model output audio messages can be truncated"
    assert session.has_active_response


def test_truncate_of_a_text_reply_is_refused_even_once_it_has_streamed() -> None:
    clock = FakeClock(0.0)
    session, _ = make_session(clock=clock, pace=1.0)
    send(session, user_text("Hi"))
    out = send(session, {"type": "response.create", "response": {"output_modalities": ["text"]}})
    item_id = only(out, "response.output_item.added")["item"]["id"]
    assert "response.output_text.delta" in types(advance(session, clock, 0.2), deltas=True)
    assert only(truncate(session, item_id, 0), "error")["error"]["code"] == (
        "unsupported_content_type"
    )


def test_truncate_past_the_audio_sent_so_far_is_refused_though_more_is_planned() -> None:
    session, clock, item_id = streaming_reply()
    sent_ms = sum(e["type"] == AUDIO_DELTA for e in advance(session, clock, 0.25)) * au.CHUNK_MS
    assert sent_ms > 0
    error = only(truncate(session, item_id, sent_ms + 1), "error")["error"]
    assert (error["code"], error["param"]) == ("invalid_value", "audio_end_ms")
    assert f"{sent_ms}ms" in error["message"]
    assert types(truncate(session, item_id, sent_ms)) == ["conversation.item.truncated"]


def test_an_item_truncated_mid_stream_keeps_the_cut_when_its_response_completes() -> None:
    session, clock, item_id = streaming_reply()
    advance(session, clock, 0.35)
    truncate(session, item_id, 200)
    rest = advance(session, clock, 60)
    assert only(rest, "response.done")["response"]["status"] == "completed"
    item = retrieved(session, item_id)
    assert item["content"][0]["transcript"] == ""
    assert len(au.b64decode(item["content"][0]["audio"])) == 200 * au.bytes_per_ms("pcm16")
    error = only(truncate(session, item_id, 300), "error")["error"]  # past the cut now
    assert error["code"] == "invalid_value"
    assert types(truncate(session, item_id, 100)) == ["conversation.item.truncated"]


def test_a_second_truncate_while_streaming_cannot_go_past_the_first() -> None:
    session, clock, item_id = streaming_reply()
    advance(session, clock, 0.35)
    truncate(session, item_id, 200)
    advance(session, clock, 0.5)  # more audio goes out after the cut
    assert only(truncate(session, item_id, 250), "error")["error"]["code"] == "invalid_value"
    assert types(truncate(session, item_id, 150)) == ["conversation.item.truncated"]


def test_the_next_response_reads_only_the_audio_that_was_heard() -> None:
    def next_input_audio_tokens(cut_ms: int | None) -> int:
        session, clock, item_id = streaming_reply(seed=5)
        advance(session, clock, 1.0)
        if cut_ms is not None:
            truncate(session, item_id, cut_ms)
        advance(session, clock, 60)
        send(session, user_text("And then?"))
        out = advance(session, clock, 0) + send(session, {"type": "response.create"})
        out += advance(session, clock, 60)
        usage = only(out, "response.done")["response"]["usage"]
        return int(usage["input_token_details"]["audio_tokens"])

    assert next_input_audio_tokens(100) < next_input_audio_tokens(None)
