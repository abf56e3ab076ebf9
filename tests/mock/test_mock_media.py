"""Real WebRTC media on the fake, without a browser: an aiortc peer (in its own asyncio
thread, as a browser would be its own process) speaks a fixture into a call and hears the
reply, while the session runs on Trio. The browser version is
tests/relay/test_browser_webrtc.py."""

from __future__ import annotations

import array
import asyncio
import json
import math
from typing import Any

import httpx
import pytest
import trio

from mockrealtime.calls import MockCall, media_available

from .helpers import wav_pcm16
from .test_mock_calls import AUTH, mock

pytestmark = pytest.mark.skipif(not media_available(), reason="aiortc not installed")
TIMEOUT = 30
LOUD = 100  # RMS of a 20 ms frame of reply audio that counts as sound (Opus's silence is ~0)


class Peer:
    """A WebRTC caller: a microphone track playing ``pcm`` (PCM16 24 kHz) at real time, the
    ``oai-events`` data channel, and a count of the reply audio it receives."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pcm: bytes) -> None:
        from aiortc import RTCConfiguration, RTCPeerConnection

        from mockrealtime.media import ReplyTrack

        self.loop = loop
        self.events: list[dict[str, Any]] = []
        self.loud_frames = 0
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        microphone = ReplyTrack(lambda kind, payload: None)  # plays its buffer, as a mic would
        microphone.buffer += pcm
        self.pc.addTrack(microphone)
        channel = self.pc.createDataChannel("oai-events")
        channel.on("message", lambda message: self.events.append(json.loads(message)))
        self.pc.on("track", lambda track: asyncio.ensure_future(self._listen(track)))

    async def offer(self) -> str:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp  # type: ignore[no-any-return]

    async def answer(self, sdp: str) -> None:
        from aiortc import RTCSessionDescription

        await self.pc.setRemoteDescription(RTCSessionDescription(sdp, "answer"))

    async def _listen(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            samples = array.array(
                "h", bytes(frame.planes[0])[: frame.samples * 2 * len(frame.layout.channels)]
            )
            if samples and math.sqrt(sum(s * s for s in samples) / len(samples)) > LOUD:
                self.loud_frames += 1

    @classmethod
    async def create(cls, pcm: bytes) -> Peer:
        return cls(asyncio.get_running_loop(), pcm)  # aiortc's objects belong to their loop

    def run(self, coroutine: Any) -> Any:
        """Run one of this peer's coroutines on its loop, from a worker thread."""
        return on(self.loop, coroutine)


def on(loop: asyncio.AbstractEventLoop, coroutine: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result(TIMEOUT)


def replied_and_played(call: MockCall) -> bool:
    """The reply is done and its audio has played out (the last playback event is a stop)."""
    kinds = [e["type"] for e in call.peer_events]
    playback = [k for k in kinds if k.startswith("output_audio_buffer.")]
    return "response.done" in kinds and playback[-1:] == ["output_audio_buffer.stopped"]


async def test_a_webrtc_caller_is_heard_and_hears_the_reply() -> None:
    from mockrealtime.media import MediaLoop

    speech = bytes(2 * 24000 // 2) + wav_pcm16() + bytes(2 * 24000)
    with trio.fail_after(TIMEOUT):
        async with mock(pace=4.0) as server:
            caller = MediaLoop("127.0.0.1")  # the caller's own aiortc thread, loopback only
            try:
                peer = await trio.to_thread.run_sync(on, caller.loop, Peer.create(speech))
                offer = await trio.to_thread.run_sync(peer.run, peer.offer())
                async with httpx.AsyncClient(base_url=server.http_url) as http:
                    created = await http.post(
                        "/v1/realtime/calls",
                        content=offer,
                        headers={**AUTH, "content-type": "application/sdp"},
                    )
                assert created.status_code == 201
                call = server.calls[created.headers["location"].rsplit("/", 1)[1]]
                assert call.media is not None  # a real answer, not the stand-in
                await trio.to_thread.run_sync(peer.run, peer.answer(created.text))
                # The server's VAD heard the fixture over the call, and it answered.
                await call.wait_for(replied_and_played)
                kinds = [e["type"] for e in call.peer_events]
                assert kinds[0] == "session.created"
                for kind in (
                    "input_audio_buffer.speech_started",
                    "response.done",
                    "output_audio_buffer.started",
                ):
                    assert kind in kinds, kind
                # The caller got the same events on its data channel, and heard the reply.
                assert [e["type"] for e in peer.events][: len(kinds)] == kinds[: len(peer.events)]
                assert "response.done" in [e["type"] for e in peer.events]
                heard_ms = peer.loud_frames * 20
                sent_ms = call.audio_out_bytes / 48  # PCM16 24 kHz: 48 bytes a millisecond
                assert heard_ms >= 0.7 * sent_ms > 500  # the reply's own pauses are quiet
                await trio.to_thread.run_sync(peer.run, peer.pc.close())
                await call.wait_for(lambda c: c.state == "ended")
                assert call.end_reason == "peer_left"
            finally:
                caller.close()
