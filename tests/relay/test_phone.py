"""Phone calls end to end on a virtual clock: the relay app in memory, mockrealtime, and a
Twilio-like phone streaming 20 ms μ-law at real-time pace and echoing marks after playback."""

from __future__ import annotations

import base64

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionRejected

from relay.clients.call import CallError, new_sid, phone_call
from relay.core.twilio import BYTES_PER_MS, request_signature

from .harness import TEST_KEY
from .phone import AUTH_TOKEN, HOST, hello, world

VIRTUAL_TIMEOUT = 120  # seconds of MockClock time: a deadlock fails instead of hanging
CHUNK_MS = 100  # mockrealtime's reply chunks


def kinds(events: list[dict[str, object]]) -> list[object]:
    return [e.get("type") for e in events]


async def test_a_call_completes_two_turns(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            async with w.call() as phone:
                await phone.say(hello())
                await phone.until_quiet(replies=1)
                await phone.say(hello())
                await phone.until_quiet(replies=2)
            await w.settled()
            sent = w.upstream_events()
    first, second = phone.handset.replies
    assert first.heard_ms > 500 and second.heard_ms > 500  # the fake says a sentence each time
    assert first.cut_bytes is None and second.cut_bytes is None
    assert first.latency_ms is not None and 0 < first.latency_ms < 2000
    # The relay's own session.update comes first and sets μ-law both ways.
    update = sent[0]
    assert update["type"] == "session.update"
    audio = update["session"]["audio"]  # type: ignore[index]
    assert audio["input"]["format"] == audio["output"]["format"] == {"type": "audio/pcmu"}
    # The caller's media went up unchanged, as appends (no transcoding).
    appends = [e["audio"] for e in sent if e["type"] == "input_audio_buffer.append"]
    assert base64.b64encode(hello()[:160]).decode() in appends
    assert len(appends) > 2 * len(hello()) // 160
    assert "conversation.item.truncate" not in kinds(sent)  # nobody spoke over a reply
    assert phone.closed is not None and phone.closed.code == 1000  # the stop ended it
    assert not w.app.pairs


async def test_speaking_over_the_reply_clears_twilio_and_truncates_at_what_was_heard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            async with w.call() as phone:
                await phone.say(hello())
                reply = await phone.hear(0.5)
                await phone.say(hello())  # the caller talks over the reply
                await phone.until_quiet(replies=2)
            sent = w.upstream_events()
    assert reply.cut_bytes is not None and reply.cut_bytes > 0  # Twilio was told to clear
    [truncate] = [e for e in sent if e["type"] == "conversation.item.truncate"]
    heard_ms = reply.heard_bytes / BYTES_PER_MS
    # The marks the phone echoed confirm what was heard, to within one chunk of audio.
    assert heard_ms - CHUNK_MS <= truncate["audio_end_ms"] <= heard_ms  # type: ignore[operator]
    assert truncate["content_index"] == 0
    assert phone.handset.replies[1].heard_ms > 500  # and the new turn was answered


async def test_a_key_press_reaches_the_model_as_a_user_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            async with w.call() as phone:
                await phone.press("7")
                await phone.until_quiet(replies=1)
            sent = w.upstream_events()
    [item] = [e for e in sent if e["type"] == "conversation.item.create"]
    assert "pressed 7" in item["item"]["content"][0]["text"]  # type: ignore[index]
    assert kinds(sent).count("response.create") == 1
    assert phone.handset.replies[0].heard_ms > 0  # the model answered it


async def test_key_presses_are_ignored_with_dtmf_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(twilio_dtmf="off") as w:
            async with w.call() as phone:
                await phone.press("7")
                await phone.say(hello())  # behind the key press on the same stream
                await phone.until_quiet(replies=1)
            sent = w.upstream_events()
    assert "conversation.item.create" not in kinds(sent)
    assert len(phone.handset.replies) == 1  # the answer to the speech, and nothing else


async def test_the_session_limit_ends_a_call_after_the_models_goodbye(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(max_session_seconds=40, limit_warning_seconds=30) as w:
            started = trio.current_time()
            async with w.call() as phone:
                with pytest.raises(CallError, match="1001"):
                    await phone.until_quiet(replies=2)
            ended = trio.current_time() - started
            sent = w.upstream_events()
    # Warned 15 s before the limit (the phone's lead), the model said goodbye, then it ended.
    [goodbye] = [e for e in sent if e.get("event_id") == "relay_goodbye"]
    assert goodbye["response"]["metadata"] == {"relay": "relay_goodbye"}  # type: ignore[index]
    [said] = phone.handset.replies
    assert said.heard_ms > 500 and said.cut_bytes is None  # all of it played
    assert 25 < ended < 40
    assert phone.closed is not None and "maximum duration" in (phone.closed.reason or "")


async def test_a_spent_budget_ends_a_call_after_the_goodbye_with_4029(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(daily_token_budget=1) as w:
            async with w.call() as phone:
                await phone.say(hello())
                with pytest.raises(CallError, match="4029"):
                    await phone.until_quiet(replies=3)
            sent = w.upstream_events()
    assert [e.get("event_id") for e in sent if e["type"] == "response.create"] == ["relay_goodbye"]
    upstream_sent = w.mock.connections[-1].sent_types
    assert upstream_sent.count("response.done") == 2  # the answer, then the goodbye
    # Every bit of audio of both (100 ms chunks) played before the close.
    audio = upstream_sent.count("response.output_audio.delta") * CHUNK_MS * BYTES_PER_MS
    assert len(phone.handset.heard) == audio


async def test_without_a_goodbye_a_spent_budget_ends_the_call_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(daily_token_budget=1, twilio_goodbye="") as w:
            async with w.call() as phone:
                await phone.say(hello())
                with pytest.raises(CallError, match="4029"):
                    await phone.until_quiet(replies=2)
            sent = w.upstream_events()
    assert "response.create" not in kinds(sent)
    assert len(phone.handset.replies) == 1


async def test_the_phone_lines_own_cap_refuses_a_call_over_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(twilio_max_calls=1) as w:
            async with w.call(caller="+15550100001") as first:
                async with w.call(caller="+15550100002") as second:
                    with pytest.raises(CallError, match="4429.*too_many_sessions"):
                        await second.until_quiet()
                await first.say(hello())
                await first.until_quiet()
    assert first.handset.replies


async def test_usage_is_kept_per_caller_and_for_the_line(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            for caller in ("+15550100001", "+15550100002"):
                async with w.call(caller=caller) as phone:
                    await phone.say(hello())
                    await phone.until_quiet()
            await w.settled()
            rows = await w.store.rows()
    users = {row.user: row for row in rows}
    callers = sorted(u for u in users if u.startswith("phone:"))
    assert len(callers) == 2  # one id per number, and never the number itself
    assert not any("5550100" in u for u in users)
    assert users["twilio"].sessions == 2
    assert users["twilio"].total_tokens == sum(users[c].total_tokens for c in callers) > 0


async def test_the_upstream_ending_ends_the_stream_with_its_code(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            async with w.call() as phone:
                await phone.say(hello())
                await phone.until_quiet(replies=1)
                w.mock.connections[-1].close(4001, "upstream says bye")
                with pytest.raises(CallError, match="4001, upstream says bye"):
                    await phone.until_quiet(replies=2)
    assert phone.errors == []  # Twilio gets no error event, only the close


async def test_a_draining_relay_lets_the_call_run_then_closes_it_1012(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            async with w.call() as phone:
                await phone.say(hello()[:8000])
                drained_at = trio.current_time()
                w.nursery.start_soon(w.app.drain, 5.0)
                with pytest.raises(CallError, match="1012"):
                    await phone.until_quiet(replies=5)
                closed_after = trio.current_time() - drained_at
    assert 5.0 <= closed_after < 6.0  # the drain's grace, then the close
    assert phone.errors == []  # the relay_draining notice is not sent to Twilio


# -- refusals ---------------------------------------------------------------------------


async def test_a_replayed_stream_token_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            call_sid = new_sid("CA")
            twiml = await w.twiml(call_sid)
            async with phone_call(
                await w.stream(), twiml, call_sid=call_sid, account_sid="AC1"
            ) as first:
                await first.say(hello()[:1600])
            async with phone_call(
                await w.stream(), twiml, call_sid=call_sid, account_sid="AC1"
            ) as again:
                with pytest.raises(CallError, match="4403.*twilio_stream_token_used"):
                    await again.until_quiet()
    assert first.closed is not None and first.closed.code == 1000
    assert len(w.mock.connections) == 1  # the replay never reached the upstream


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, "twilio_stream_token_missing"),
        ("rst1.e30.AAAA", "twilio_stream_token_invalid"),
        ("for another call", "twilio_stream_token_invalid"),
    ],
)
async def test_a_stream_without_a_valid_token_is_refused(
    token: str | None, code: str, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            call_sid = new_sid("CA")
            twiml = await w.twiml(call_sid)
            if token == "for another call":
                twiml = await w.twiml(new_sid("CA"))
            elif token is None:
                twiml.parameters.pop("token")
            else:
                twiml.parameters["token"] = token
            async with phone_call(
                await w.stream(), twiml, call_sid=call_sid, account_sid="AC1"
            ) as phone:
                with pytest.raises(CallError, match=f"4403.*{code}"):
                    await phone.until_quiet()
    assert not w.mock.connections


async def test_an_expired_stream_token_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            call_sid = new_sid("CA")
            claim = w.app.phone.keys.mint(  # type: ignore[union-attr]
                call_sid=call_sid, caller="phone:x", account_sid="AC1", now=0.0
            )
            twiml = await w.twiml(call_sid)
            twiml.parameters["token"] = claim
            async with phone_call(
                await w.stream(), twiml, call_sid=call_sid, account_sid="AC1"
            ) as phone:
                with pytest.raises(CallError, match="twilio_stream_token_expired"):
                    await phone.until_quiet()


@pytest.mark.parametrize("signature", [None, "d3Jvbmc="])
async def test_an_upgrade_without_twilios_signature_is_refused_with_403(
    signature: str | None, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            with pytest.raises(ConnectionRejected) as refused:
                await w.stream(signature=signature)
    assert refused.value.status_code == 403
    assert orjson.loads(refused.value.body)["code"] == "twilio_signature_invalid"


@pytest.mark.parametrize(
    ("message", "says"),
    [
        ('{"type":"input_audio_buffer.append","audio":""}', "not a Realtime API one"),
        ("hello", "not JSON"),
        ('{"event":"media","media":{"payload":"AAAA"}}', "came before 'start'"),
    ],
)
async def test_a_peer_not_speaking_twilio_gets_one_error_and_1008(
    message: str, says: str, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            ws = await w.stream()
            await ws.send_message(message)
            error = orjson.loads(await ws.get_message())
            with pytest.raises(Exception, match="1008"):
                await ws.get_message()
    assert error["type"] == "error"
    assert error["error"]["code"] == "twilio_protocol_error"
    assert says in error["error"]["message"]
    assert ws.closed is not None and ws.closed.reason == "twilio_protocol_error"


async def test_malformed_media_mid_call_ends_the_call_with_1008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            call_sid = new_sid("CA")
            twiml = await w.twiml(call_sid)
            ws = await w.stream()
            async with phone_call(ws, twiml, call_sid=call_sid, account_sid="AC1") as phone:
                await phone.say(hello()[:1600])
                await ws.send_message('{"event":"media","media":{"payload":"not base64!"}}')
                with pytest.raises(CallError, match="1008"):
                    await phone.until_quiet()
    assert phone.errors and "twilio_protocol_error" in phone.errors[0]


# -- the webhook ------------------------------------------------------------------------


async def test_the_webhook_answers_twiml_with_a_stream_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            twiml = await w.twiml(new_sid("CA"))
    assert twiml.stream_url == f"ws://{HOST}/twilio"
    assert twiml.parameters["token"].startswith("rst1.")


@pytest.mark.parametrize("signature", [None, "d3Jvbmc=", "tampered"])
async def test_the_webhook_refuses_a_request_twilio_did_not_sign(
    signature: str | None, autojump_clock: trio.testing.MockClock
) -> None:
    params = {"CallSid": "CA1", "From": "+15550100001", "AccountSid": "AC1"}
    headers = {}
    if signature == "tampered":  # signed, then a parameter changed
        headers["X-Twilio-Signature"] = request_signature(
            AUTH_TOKEN, f"http://{HOST}/twilio/voice", params.items()
        )
        params["From"] = "+15550100002"
    elif signature is not None:
        headers["X-Twilio-Signature"] = signature
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world() as w:
            answer = await w.http.post("/twilio/voice", data=params, headers=headers)
    assert answer.status_code == 403
    assert "rst1." not in answer.text


async def test_the_twilio_routes_are_off_without_an_auth_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(twilio_auth_token="") as w:
            answer = await w.http.post("/twilio/voice", data={"CallSid": "CA1"})
            with pytest.raises(ConnectionRejected) as refused:
                await w.stream()
    assert answer.status_code == 404
    assert refused.value.status_code == 404


async def test_the_public_url_is_what_twilio_signs_and_where_the_stream_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Behind a proxy that serves the relay at https://phone.example.com/relay/.
    public = "https://phone.example.com/relay"
    params = [("CallSid", "CA1"), ("From", "+15550100001")]
    with trio.fail_after(VIRTUAL_TIMEOUT):
        async with world(public_url=public) as w:
            answers = [
                await w.http.post(
                    "/twilio/voice",
                    data=dict(params),
                    headers={"X-Twilio-Signature": request_signature(AUTH_TOKEN, url, params)},
                )
                for url in (f"{public}/twilio/voice", f"http://{HOST}/twilio/voice")
            ]
    public_answer, local_answer = answers
    assert public_answer.status_code == 200
    assert '<Stream url="wss://phone.example.com/relay/twilio">' in public_answer.text
    assert local_answer.status_code == 403  # signed for a URL Twilio does not call


def test_the_key_leak_check_covers_what_is_sent_to_twilio() -> None:
    from relay.server.phone import TwilioLeg

    from ..leaks import CLIENT_LEAKS

    assert TwilioLeg._to_twilio.__name__ == "checked_send"
    assert TwilioLeg._close_twilio.__name__ == "checked_close"

    class Sink:
        async def send(self, text: str) -> None:
            pass

    seen = len(CLIENT_LEAKS)
    leg = TwilioLeg(Sink(), None, playout_seconds=0)  # type: ignore[arg-type]
    trio.run(leg._to_twilio, f'{{"event":"media","media":{{"payload":"{TEST_KEY}"}}}}')
    assert len(CLIENT_LEAKS) == seen + 1 and "to Twilio" in CLIENT_LEAKS[-1]
    del CLIENT_LEAKS[seen:]  # planted: it must not fail this test at its end
