"""Phone calls through the relay as served (Hypercorn on loopback) in front of mockrealtime, and
``relay call`` against ``relay demo``."""

from __future__ import annotations

import re
import sys
import wave
from array import array
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import orjson
import pytest
import trio
from trio_websocket import ConnectionRejected

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.clients import wav
from relay.clients.call import CallError, Twiml, dial, fetch_twiml, new_sid, phone_call
from relay.core.twilio import request_signature
from relay.server.demo import run_demo

from .harness import TEST_KEY, RunningRelay, connect, running_relay
from .phone import AUTH_TOKEN, FIXTURES, hello

TIMEOUT = 30


@asynccontextmanager
async def relay_with_phones(**settings: object) -> AsyncIterator[tuple[RunningRelay, MockServer]]:
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
        async with running_relay(
            upstream_url=mock.url, twilio_auth_token=AUTH_TOKEN, **settings
        ) as relay:
            yield relay, mock
        nursery.cancel_scope.cancel()


async def ring(relay: RunningRelay, http: httpx.AsyncClient) -> tuple[str, Twiml]:
    """A new call's sid and the TwiML the relay's webhook answers for it, as Twilio asks."""
    call_sid = new_sid("CA")
    twiml = await fetch_twiml(
        http, relay.http_url, AUTH_TOKEN, call_sid=call_sid, account_sid="AC1", caller="+1555"
    )
    return call_sid, twiml


async def test_a_call_through_the_served_relay_completes_two_turns() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_with_phones() as (relay, mock), httpx.AsyncClient() as http:
            call_sid, twiml = await ring(relay, http)
            async with dial(twiml, AUTH_TOKEN) as ws:
                # Four times real time, both ways: the fake's VAD counts audio, not seconds.
                async with phone_call(
                    ws, twiml, call_sid=call_sid, account_sid="AC1", speed=4
                ) as phone:
                    await phone.say(hello())
                    await phone.until_quiet(replies=1)
                    await phone.say(hello())
                    await phone.until_quiet(replies=2)
            sent = [orjson.loads(m) for m in mock.connections[0].received if isinstance(m, str)]
    assert [r.heard_ms > 500 for r in phone.handset.replies] == [True, True]
    assert [t for t in phone.handset.transcripts if t[0] == "assistant"][0][1].startswith("I heard")
    assert sent[0]["session"]["audio"]["output"]["format"] == {"type": "audio/pcmu"}
    assert phone.closed is not None and phone.closed.code == 1000


async def stream_upgrade(relay: RunningRelay, signature: str | None) -> int:
    """The status of a /twilio upgrade with this signature (101 if it was accepted)."""
    headers = [] if signature is None else [(b"x-twilio-signature", signature.encode())]
    try:
        async with connect(relay.url + "/twilio", extra_headers=headers):
            return 101
    except ConnectionRejected as refused:
        return refused.status_code


async def test_the_upgrade_needs_twilios_signature_of_the_stream_url() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_with_phones() as (relay, _):
            stream_url = relay.url + "/twilio"  # ws://127.0.0.1:PORT/twilio, as the TwiML says
            valid = await stream_upgrade(relay, request_signature(AUTH_TOKEN, stream_url))
            wrong = await stream_upgrade(relay, request_signature("another-token", stream_url))
            missing = await stream_upgrade(relay, None)
    assert (valid, wrong, missing) == (101, 403, 403)


@pytest.mark.parametrize("signature", ["valid", "wrong", "missing"])
async def test_the_webhook_needs_twilios_signature(signature: str) -> None:
    params = {"CallSid": "CA1", "AccountSid": "AC1", "From": "+15550100001"}
    with trio.fail_after(TIMEOUT):
        async with relay_with_phones() as (relay, _), httpx.AsyncClient() as http:
            url = relay.http_url + "/twilio/voice"
            token = {"valid": AUTH_TOKEN, "wrong": "another-token"}.get(signature)
            headers = (
                {"X-Twilio-Signature": request_signature(token, url, params.items())}
                if token
                else {}
            )
            answer = await http.post(url, data=params, headers=headers)
    if signature == "valid":
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/xml")
        assert re.search(
            r'<Stream url="ws://127\.0\.0\.1:\d+/twilio"><Parameter name="token"', answer.text
        )
    else:
        assert answer.status_code == 403
        assert "token" not in answer.text


async def test_a_replayed_stream_token_is_refused_by_the_served_relay() -> None:
    with trio.fail_after(TIMEOUT):
        async with relay_with_phones() as (relay, mock), httpx.AsyncClient() as http:
            call_sid, twiml = await ring(relay, http)
            for attempt in ("first", "replay"):
                async with dial(twiml, AUTH_TOKEN) as ws:
                    async with phone_call(
                        ws, twiml, call_sid=call_sid, account_sid="AC1", speed=4
                    ) as phone:
                        if attempt == "first":
                            await phone.say(hello()[:800])
                        else:
                            with pytest.raises(CallError, match="4403.*twilio_stream_token_used"):
                                await phone.until_quiet()
    assert len(mock.connections) == 1


async def test_relay_call_plays_a_wav_through_relay_demo(tmp_path: Path) -> None:
    out = tmp_path / "out.wav"
    with trio.fail_after(TIMEOUT):
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            demo = await nursery.start(
                partial(run_demo, "127.0.0.1", 0, shutdown_trigger=stop.wait)
            )
            result = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "call",
                    str(FIXTURES / "hello-ulaw8k.wav"),
                    "-o",
                    str(out),
                    "--url",
                    demo.http_url,
                ],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            stop.set()
    printed = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert re.search(r"^assistant: I heard \d\.\d seconds of audio\.", printed, re.M), printed
    assert re.search(r"^latency:   reply 1: \d+ ms from end of speech", printed, re.M), printed
    assert f"written to {out}" in printed
    assert result.stderr.decode() == ""  # nothing but the report
    with wave.open(str(out)) as heard:
        assert (heard.getframerate(), heard.getnchannels(), heard.getsampwidth()) == (8000, 1, 2)
        frames = heard.readframes(heard.getnframes())
    assert heard.getnframes() > 8000 // 2  # the fake said a sentence
    assert any(wav.pcm16_samples(frames))


async def test_relay_call_says_why_a_relay_without_phones_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with running_relay() as relay, httpx.AsyncClient() as http:
            with pytest.raises(CallError, match="HTTP 404.*RELAY_TWILIO_AUTH_TOKEN"):
                await fetch_twiml(
                    http, relay.http_url, AUTH_TOKEN, call_sid="CA1", account_sid="AC1", caller="+1"
                )
            with pytest.raises(CallError, match="refused the media stream \\(HTTP 404\\)"):
                async with dial(Twiml(relay.url + "/twilio", {}), AUTH_TOKEN):
                    pass


async def test_a_recorded_phone_call_keeps_the_mu_law_audio_and_what_the_caller_heard(
    tmp_path: Path,
) -> None:
    from relay.ops.records import Record

    with trio.fail_after(TIMEOUT):
        async with relay_with_phones(records=str(tmp_path), records_audio=True) as (relay, mock):
            recorder = relay.app.recorder
            assert recorder is not None
            written, seen = trio.open_memory_channel[Record](1)
            recorder.observe = lambda what, record: (
                written.send_nowait(record) if what == "written" else None
            )
            async with httpx.AsyncClient() as http:
                call_sid, twiml = await ring(relay, http)
            async with dial(twiml, AUTH_TOKEN) as ws:
                async with phone_call(
                    ws, twiml, call_sid=call_sid, account_sid="AC1", speed=2
                ) as phone:
                    await phone.say(hello())
                    await phone.hear(0.4)
                    await phone.say(hello())  # over the reply
                    await phone.until_quiet(replies=2)
            record = await seen.receive()
    sent = [orjson.loads(m) for m in mock.connections[0].received if isinstance(m, str)]
    [truncate] = [e for e in sent if e["type"] == "conversation.item.truncate"]
    summary = orjson.loads((tmp_path / record.summary["files"]["summary"]).read_bytes())
    assert summary["user"].startswith("phone:") and summary["turns"] == 2
    cut = next(line for line in summary["transcript"] if line["speaker"] == "assistant")
    assert cut["heard_ms"] == truncate["audio_end_ms"]  # the relay's own truncate is recorded
    with wave.open(str(tmp_path / record.summary["files"]["audio"])) as recorded:
        assert (recorded.getnchannels(), recorded.getframerate()) == (2, 8000)  # μ-law's rate
        stereo = array("h", recorded.readframes(recorded.getnframes()))
    caller, assistant = stereo[0::2], stereo[1::2]
    assert max(map(abs, caller)) > 4000 and max(map(abs, assistant)) > 4000  # both sides heard
