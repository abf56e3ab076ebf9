"""Real WebRTC media for the fake's calls, with aiortc (optional: ``mockrealtime[media]``).

aiortc runs on asyncio, the fake on Trio, so all of aiortc lives in one thread of its
own with its own event loop (:class:`MediaLoop`, one per server), and the call's session
stays on the Trio side, driven by the same sans-IO core as every other session. What
crosses between the two:

* Trio → asyncio (``loop.call_soon_threadsafe``): server events for the data channel, and
  reply audio (PCM16 24 kHz) for the outgoing track;
* asyncio → Trio (``TrioToken.run_sync_soon`` into a memory channel, read by a Trio task):
  the data channel's client events, the microphone's audio resampled to PCM16 24 kHz, the
  playback starting and stopping, and the peer going away.

The answer carries only loopback ICE candidates when the server listens on loopback (aioice
would otherwise offer every interface but loopback), and no STUN server is asked: nothing
leaves the machine. A browser on the same machine needs Chromium's
``--allow-loopback-in-peer-connection`` to offer loopback candidates of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import aioice.ice
import av
import ifaddr
import orjson
import trio
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

if TYPE_CHECKING:
    from .calls import MockCall

logger = logging.getLogger("mockrealtime")

RATE: Final = 24000
FRAME_SAMPLES: Final = 480  # 20 ms at 24 kHz
FRAME_SECONDS: Final = FRAME_SAMPLES / RATE
MIC_CHUNK_BYTES: Final = 2 * RATE // 10  # the microphone's audio goes to the session every 100 ms
ANSWER_TIMEOUT: Final = 10.0

#: The addresses ICE offers (None: aioice's own choice, every interface but loopback).
_ice_addresses: list[str] | None = None


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    if _ice_addresses is not None:
        return list(_ice_addresses)
    addresses = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and use_ipv4 and ip.ip != "127.0.0.1":
                addresses.append(ip.ip)
    return addresses


class MediaLoop:
    """aiortc's thread: an asyncio loop that hosts every call's peer connection."""

    def __init__(self, host: str) -> None:
        global _ice_addresses
        if host in ("127.0.0.1", "localhost", "::1"):
            _ice_addresses = ["127.0.0.1"]
        aioice.ice.get_host_addresses = _host_addresses  # gathering calls it at module level
        self.token = trio.lowlevel.current_trio_token()
        self.loop = asyncio.new_event_loop()
        self.peers: set[MediaPeer] = set()
        self.closing: set[asyncio.Task[None]] = set()  # peer connections being closed
        self._thread = threading.Thread(target=self._run, name="mockrealtime-media", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            while pending := asyncio.all_tasks(loop):  # cancelling one may start another
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def answer(self, offer: str, call: MockCall) -> tuple[MediaPeer, str]:
        """A peer connection for ``call`` and its SDP answer to ``offer``."""
        peer = MediaPeer(self, call)
        self.peers.add(peer)
        future = asyncio.run_coroutine_threadsafe(peer.answer(offer), self.loop)
        try:
            answer = await trio.to_thread.run_sync(future.result, ANSWER_TIMEOUT)
        except BaseException:
            peer.close()
            raise
        return peer, answer

    def close(self) -> None:
        """Close every peer connection and stop the thread."""
        for peer in list(self.peers):
            peer.close()

        async def stop() -> None:  # after every close scheduled before it (FIFO)
            await asyncio.gather(*self.closing, return_exceptions=True)
            self.loop.stop()

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop)
        self._thread.join(timeout=5)


class MediaPeer:
    """One call's peer connection. The methods without a leading underscore are called
    from the Trio thread; the others run on the media loop."""

    def __init__(self, media: MediaLoop, call: MockCall) -> None:
        self._media = media
        self._loop = media.loop
        self._call = call
        self._pc: Any = None
        self._channel: Any = None
        self._pending: list[str] = []  # events before the data channel opened
        self._track: ReplyTrack | None = None
        self._closed = False
        self.inbox, self._inbox_out = trio.open_memory_channel[tuple[str, Any]](math.inf)

    # --- Trio side -----------------------------------------------------------------------

    def send_events(self, events: list[dict[str, Any]]) -> None:
        texts = [orjson.dumps(event).decode() for event in events]
        self._loop.call_soon_threadsafe(self._send_texts, texts)

    def play(self, pcm: bytes) -> None:
        self._loop.call_soon_threadsafe(self._play, pcm)

    def clear(self) -> None:
        self._loop.call_soon_threadsafe(self._clear)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._media.peers.discard(self)
        with contextlib.suppress(RuntimeError):  # the loop has stopped already
            self._loop.call_soon_threadsafe(self._start_closing)
        self.inbox.close()

    async def pump(self) -> None:
        """Carry the media side's news to the call, until the call ends (a Trio task)."""
        call = self._call
        async with self._inbox_out:
            async for kind, payload in self._inbox_out:
                if kind == "event":
                    call.peer_send(payload)
                elif kind == "audio":
                    call.feed_audio(payload)
                elif kind == "playback":
                    call.playback(payload)
                elif kind == "gone":
                    call.end("peer_left")

    def _post(self, kind: str, payload: Any = None) -> None:
        """From the media loop to :meth:`pump` (never raises into Trio's run loop)."""

        def deliver() -> None:
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                self.inbox.send_nowait((kind, payload))

        with contextlib.suppress(RuntimeError):  # Trio's run is over
            self._media.token.run_sync_soon(deliver)

    # --- media loop side ------------------------------------------------------------------

    async def answer(self, offer: str) -> str:
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: nothing leaves
        self._pc = pc
        self._track = ReplyTrack(self._post)

        @pc.on("datachannel")
        def on_channel(channel: Any) -> None:
            self._channel = channel
            pending, self._pending = self._pending, []
            for text in pending:
                channel.send(text)

            @channel.on("message")
            def on_message(message: str | bytes) -> None:
                self._post("event", message)

            @channel.on("close")
            def on_close() -> None:
                self._post("gone")

        @pc.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "audio":
                asyncio.ensure_future(self._listen(track))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                self._post("gone")

        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        pc.addTrack(self._track)
        await pc.setLocalDescription(await pc.createAnswer())  # waits for ICE gathering
        return pc.localDescription.sdp  # type: ignore[no-any-return]

    async def _listen(self, track: Any) -> None:
        """The microphone: decoded frames, resampled to PCM16 mono 24 kHz, every 100 ms."""
        resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        chunk = bytearray()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            for out in resampler.resample(frame):
                chunk += bytes(out.planes[0])[: out.samples * 2]
            if len(chunk) >= MIC_CHUNK_BYTES:
                self._post("audio", bytes(chunk))
                chunk.clear()

    def _send_texts(self, texts: list[str]) -> None:
        channel = self._channel
        if channel is None or channel.readyState != "open":
            self._pending.extend(texts)
            return
        for text in texts:
            channel.send(text)

    def _play(self, pcm: bytes) -> None:
        if self._track is not None:
            self._track.buffer += pcm

    def _clear(self) -> None:
        if self._track is not None:
            self._track.buffer.clear()

    def _start_closing(self) -> None:
        task = asyncio.ensure_future(self._close())
        self._media.closing.add(task)
        task.add_done_callback(self._media.closing.discard)

    async def _close(self) -> None:
        if self._pc is not None:
            await self._pc.close()


class ReplyTrack(MediaStreamTrack):  # type: ignore[misc]
    """The call's outgoing audio: reply audio as it is queued, silence in between, paced
    at real time. Tells the call when playback starts and when the queue runs dry."""

    kind = "audio"

    def __init__(self, post: Callable[[str, Any], None]) -> None:
        super().__init__()
        self.buffer = bytearray()
        self._post = post
        self._started: float | None = None
        self._frames = 0
        self._playing = False

    async def recv(self) -> Any:
        if self._started is None:
            self._started = time.monotonic()
        wait = self._started + self._frames * FRAME_SECONDS - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        want = 2 * FRAME_SAMPLES
        data = bytes(self.buffer[:want])
        del self.buffer[:want]
        if data and not self._playing:
            self._playing = True
            self._post("playback", "started")
        elif not data and self._playing:
            self._playing = False
            self._post("playback", "stopped")
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(data.ljust(want, b"\0"))
        frame.sample_rate = RATE
        frame.pts = self._frames * FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, RATE)
        self._frames += 1
        return frame
