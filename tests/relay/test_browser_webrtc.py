"""The demo page's WebRTC mode in a real browser: headless Chromium with a fake microphone
holds a call with mockrealtime (real media, aiortc) set up through the relay, which watches
it from its sideband. Needs Chromium (see test_browser.py) and aiortc (a dev dependency)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from urllib.request import urlopen

import pytest

from mockrealtime.calls import media_available
from relay.clients.talk import SAMPLE
from relay.server.demo import Demo, run_demo

from .test_browser import (
    Starter,
    Trigger,
    body_data,
    microphone_file,
    needs_chromium,
    open_browser,
    screenshot,
    served_in_thread,
    turns,
    wait_for,
)

needs_media = pytest.mark.skipif(
    not media_available(), reason="aiortc not installed: uv sync (dev) or mockrealtime[media]"
)


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    def starter(trigger: Trigger) -> Starter:
        return partial(run_demo, "127.0.0.1", 0, shutdown_trigger=trigger)

    with served_in_thread(starter) as running:
        yield running


def metrics(demo: Demo) -> str:
    with urlopen(demo.relay_url.replace("ws://", "http://") + "/metrics", timeout=10) as answer:
        return answer.read().decode()


@needs_chromium
@needs_media
def test_a_webrtc_call_through_the_relay_hears_the_user_and_plays_the_reply(
    demo: Demo, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    url = demo.relay_url.replace("ws://", "http://")
    mic = microphone_file(tmp_path / "mic.wav", 1.0, SAMPLE, 1.0)
    drv = open_browser(mic, tmp_path / "profile")
    try:
        drv.get(url + "/?transport=webrtc")
        drv.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        drv.find_element(By.ID, "echo").click()  # voice processing distorts the test signal
        drv.find_element(By.ID, "connect").click()
        wait_for(drv, "d.state === 'live'", timeout=15)
        wait_for(drv, "+d.turns >= 1 && +d.userTurns >= 1 && +d.playedMs >= 500")
        data = body_data(drv)
        screenshot(drv, "browser-demo-webrtc.png")
        assert data["transport"] == "webrtc" and "error" not in data
        assert data["upstream"] == "fake"  # session.created came over the data channel
        assert drv.find_element(By.ID, "status").text == "live · WebRTC"
        assert drv.execute_script("return window.openedSockets") == []  # no WebSocket at all
        call = demo.mock.calls[data["callId"]]
        assert call.transport == "webrtc" and call.media is not None
        # The server heard the microphone over the call, and the relay watched it: its
        # sideband sent the opening session.update and saw the reply's response.done.
        kinds = [event["type"] for event in call.peer_events]
        assert "input_audio_buffer.speech_started" in kinds and "response.done" in kinds
        assert call.sideband_received, "the relay's sideband never spoke"
        assert "relay_calls_active 1.0" in metrics(demo)
        assert int(data["sentMs"]) >= 2000 and 0 <= int(data["latencyMs"]) < 3000
        [user] = turns(drv, "user")
        assert user.endswith("s of speech")
        [assistant] = turns(drv, "assistant")
        assert assistant.startswith("I heard ")  # the fake, without transcription

        drv.find_element(By.ID, "connect").click()  # "Disconnect": the peer connection closes
        wait_for(drv, "d.state === 'closed'", timeout=10)
    finally:
        drv.quit()
