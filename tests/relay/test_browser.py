"""The demo page in a real browser: headless Chromium whose microphone plays a WAV file.

The page is driven against ``relay demo`` (the relay and the fake Realtime API, in a
thread of the test process) the way a person would use it: open it, click Connect, speak. The
assertions read the page's ``data-*`` attributes and its conversation, waiting with
the driver's own polling. A screenshot after the turn lands in ``artifacts/``.

Needs Debian's ``chromium`` and ``chromium-driver``; skipped (with that hint) without them.
"""

from __future__ import annotations

import queue
import re
import shutil
import threading
import wave
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest
import trio

from mockrealtime import MockConfig, serve_mock_realtime
from relay.clients.talk import SAMPLE
from relay.server.demo import run_demo

from .harness import TEST_KEY, closed_port_url, running_relay

Trigger = Callable[[], Awaitable[None]]
Starter = Callable[..., Awaitable[None]]  # for nursery.start: takes task_status

ROOT = Path(__file__).parents[2]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
TURN_TIMEOUT = 30  # seconds for one spoken turn and its reply to play out


def find_chromium() -> tuple[str, str] | None:
    """(browser binary, chromedriver) if both are installed.

    The real binary is preferred over Debian's /usr/bin/chromium wrapper, which
    sources /etc/chromium.d and re-enables remote extensions.
    """
    browser = next((p for p in map(shutil.which, CHROMIUM_CANDIDATES) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not installed: apt-get install chromium chromium-driver"
)


@contextmanager
def served_in_thread(starter: Callable[[Trigger], Starter]) -> Iterator[Any]:
    """Run a Trio server in a thread of the test process, for the synchronous driver.

    ``starter(shutdown_trigger)`` is given to ``nursery.start``; what it reports is
    yielded. On exit the trigger fires and the server must end within 15 s. (A thread
    rather than a subprocess: the server cannot be signalled by anything else.)
    """
    handoff: queue.Queue[Any] = queue.Queue()

    def run() -> None:
        async def main() -> None:
            stop = trio.Event()
            try:
                async with trio.open_nursery() as nursery:
                    started = await nursery.start(starter(stop.wait))
                    handoff.put((started, trio.lowlevel.current_trio_token(), stop))
            except BaseException as exc:
                handoff.put(exc)
                raise

        trio.run(main)

    thread = threading.Thread(target=run, name="server-under-test", daemon=True)
    thread.start()
    item = handoff.get(timeout=20)
    if isinstance(item, BaseException):
        raise item
    started, token, stop = item
    try:
        yield started
    finally:
        trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(timeout=15)
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    """``relay demo`` (the relay in front of the fake) on a free loopback port."""

    def starter(trigger: Trigger) -> Starter:
        return partial(run_demo, "127.0.0.1", 0, shutdown_trigger=trigger)

    with served_in_thread(starter) as demo:
        yield demo.relay_url.replace("ws://", "http://", 1)


def microphone_file(path: Path, *parts: Path | float) -> Path:
    """A 24 kHz WAV for the fake microphone: WAV files and seconds of silence, in order.

    It opens with silence because Chromium starts the file when the device opens,
    a little before the page starts listening.
    """
    frames = b""
    for part in parts:
        if isinstance(part, float):
            frames += bytes(2 * int(24000 * part))
        else:
            with wave.open(str(part)) as clip:
                assert (clip.getframerate(), clip.getnchannels(), clip.getsampwidth()) == (
                    24000,
                    1,
                    2,
                )
                frames += clip.readframes(clip.getnframes())
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(24000)
        out.writeframes(frames)
    return path


def open_browser(mic_wav: Path, profile: Path):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM is not None
    browser, driver = CHROMIUM
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        # An absolute path: a wrong one gives silence, not an error.
        f"--use-file-for-fake-audio-capture={mic_wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
        # WebRTC to the fake on this machine: loopback ICE candidates (off by default).
        "--allow-loopback-in-peer-connection",
        f"--user-data-dir={profile}",
        "--window-size=900,900",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # With the driver's path given, Selenium Manager (which would go online) is not run.
    drv = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    # Record what each page offers when it opens a WebSocket (URL and subprotocols).
    drv.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_WEBSOCKETS})
    return drv


RECORD_WEBSOCKETS = """
window.openedSockets = [];
const PageWebSocket = window.WebSocket;
window.WebSocket = class extends PageWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    window.openedSockets.push({ url: String(url), protocols: [].concat(protocols || []) });
  }
};
"""


def body_data(drv) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return drv.execute_script("return Object.assign({}, document.body.dataset)")


def wait_for(drv, condition: str, timeout: float = TURN_TIMEOUT):  # type: ignore[no-untyped-def]
    """Poll the page until the JS expression ``condition`` over ``d`` (body.dataset) holds."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    script = f"const d = document.body.dataset; return Boolean({condition});"
    try:
        WebDriverWait(drv, timeout, poll_frequency=0.1).until(lambda d: d.execute_script(script))
    except TimeoutException:
        logs = "\n".join(entry["message"] for entry in drv.get_log("browser"))
        pytest.fail(f"page never reached {condition!r}; state {body_data(drv)}\nconsole:\n{logs}")


def connect(drv, url: str, *, token: str = "", transcribe: bool = False) -> None:  # type: ignore[no-untyped-def]
    """Open the page, turn off voice processing (it distorts the test signal), connect."""
    from selenium.webdriver.common.by import By

    drv.get(url + "/")
    drv.find_element(By.CSS_SELECTOR, "details.settings summary").click()
    if token:
        drv.find_element(By.ID, "token").send_keys(token)
    drv.find_element(By.ID, "echo").click()
    if transcribe:
        drv.find_element(By.ID, "transcribe").click()
    drv.find_element(By.ID, "connect").click()
    wait_for(drv, "d.state === 'live'", timeout=10)


def screenshot(drv, name: str) -> Path:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    drv.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def turns(drv, role: str) -> list[str]:  # type: ignore[no-untyped-def]
    return drv.execute_script(
        "return [...document.querySelectorAll(`.turn[data-role='${arguments[0]}'] .text`)]"
        ".map(e => e.textContent)",
        role,
    )


def test_the_page_and_its_files_are_served(demo_url: str) -> None:
    with urlopen(demo_url + "/", timeout=10) as page:
        html = page.read().decode()
    assert 'id="connect"' in html and "/static/app.js" in html
    for name, kind in [
        ("app.js", "text/javascript"),
        ("capture-worklet.js", "text/javascript"),
        ("style.css", "text/css"),
        ("favicon.svg", "image/svg+xml"),
    ]:
        with urlopen(f"{demo_url}/static/{name}", timeout=10) as response:
            assert response.headers["content-type"].startswith(kind)
            assert response.read()


@needs_chromium
def test_speaking_to_the_page_shows_both_turns_and_plays_the_reply(
    demo_url: str, tmp_path: Path
) -> None:
    mic = microphone_file(tmp_path / "mic.wav", 1.0, SAMPLE, 1.0)
    drv = open_browser(mic, tmp_path / "profile")
    try:
        connect(drv, demo_url, transcribe=True)  # the fake transcribes with made-up words
        wait_for(drv, "+d.turns >= 1 && +d.receivedMs > 0 && +d.playedMs >= +d.receivedMs - 1")
        data = body_data(drv)
        screenshot(drv, "browser-demo-turn.png")
        [socket] = drv.execute_script("return window.openedSockets")
        assert socket == {
            "url": demo_url.replace("http://", "ws://") + "/voice",
            "protocols": ["realtime", "relay-resume"],  # resumable after a blip
        }
        assert data["state"] == "live" and "error" not in data
        assert data["upstream"] == "fake"  # mockrealtime's session.created says so

        from selenium.webdriver.common.by import By

        assert "offline fake" in drv.find_element(By.ID, "fake").text  # and the page shows it
        assert int(data["userTurns"]) == 1
        assert int(data["sentMs"]) >= 2000  # the microphone streamed the speech and then some
        assert int(data["playedMs"]) >= 500  # the fake's sentence, played out
        assert data["underruns"] == "0"  # back to back: no gap inside the reply
        assert 0 <= int(data["latencyMs"]) < 3000
        wait_for(
            drv,
            "!document.querySelector('.turn.user .text').classList.contains('placeholder')",
            timeout=5,
        )  # the transcript may come after the reply
        [user] = turns(drv, "user")
        assert re.fullmatch(r"[A-Z][a-z]*( [a-z]+)*\.", user), user
        [assistant] = turns(drv, "assistant")
        assert assistant.startswith("You said: " + user.rstrip(".")), assistant

        drv.find_element(By.ID, "connect").click()  # now "Disconnect"
        wait_for(drv, "d.state === 'closed'", timeout=10)
    finally:
        drv.quit()


@needs_chromium
def test_talking_over_the_reply_interrupts_it_and_truncates_what_was_not_heard(
    demo_url: str, tmp_path: Path
) -> None:
    # The second "hello" starts about 0.5 s into the first reply (which lasts about 2 s).
    mic = microphone_file(tmp_path / "mic.wav", 1.0, SAMPLE, SAMPLE, 1.0)
    drv = open_browser(mic, tmp_path / "profile")
    try:
        connect(drv, demo_url)
        wait_for(drv, "+d.turns >= 2 && +d.userTurns >= 2 && d.playing === 'false'")
        wait_for(
            drv,
            "document.querySelector('.turn.assistant .meta').textContent.includes('interrupted')",
            timeout=5,
        )  # the server's conversation.item.truncated came back
        screenshot(drv, "browser-demo-barge-in.png")
        data = body_data(drv)
        assert int(data["truncations"]) == 1
        assert "error" not in data
        # No transcription: each user turn shows how long the server heard speech. The same
        # file through `relay talk` gives 2.4 s, so the page's 44.1 → 24 kHz rate is right.
        spoken = [re.fullmatch(r"(\d\.\d) s of speech", t) for t in turns(drv, "user")]
        assert len(spoken) == 2 and all(spoken), spoken
        assert all(2.1 <= float(m.group(1)) <= 2.7 for m in spoken if m), spoken
        first, second = drv.execute_script(
            "return [...document.querySelectorAll('.turn.assistant')].map(e => e.className)"
        )
        assert "interrupted" in first and "interrupted" not in second
        heard = drv.execute_script(
            "return document.querySelector('.turn.assistant .meta').textContent"
        )
        seconds = float(re.search(r"interrupted after (\d+\.\d) s", heard).group(1))  # type: ignore[union-attr]
        assert 0.0 < seconds < 2.0
    finally:
        drv.quit()


@needs_chromium
def test_the_page_shows_why_the_relay_closed_the_session(tmp_path: Path) -> None:
    """A relay whose upstream is down sends an error event and closes 1014; the page says so."""
    from selenium.webdriver.common.by import By

    def starter(trigger: Trigger) -> Starter:
        async def run(task_status: trio.TaskStatus[str]) -> None:
            async with running_relay(upstream_url=closed_port_url(), dial_timeout=2.0) as relay:
                task_status.started(relay.http_url)
                await trigger()

        return run

    with served_in_thread(starter) as http_url:
        drv = open_browser(microphone_file(tmp_path / "mic.wav", 0.5), tmp_path / "profile")
        try:
            drv.get(http_url + "/")
            box = (
                "const pill = document.getElementById('status');"
                " return [document.querySelector('header').getBoundingClientRect().height,"
                " getComputedStyle(pill).paddingLeft, getComputedStyle(pill).marginBottom]"
            )
            idle = drv.execute_script(box)

            drv.find_element(By.ID, "connect").click()
            wait_for(drv, "d.state === 'error'", timeout=15)
            # The pill in its error state keeps its box: the dot clear of the text, the header
            # its height (the error message's rule once styled it too).
            assert drv.execute_script(box) == idle
            assert "upstream" not in body_data(drv)  # no fake here: a scripted dead upstream
            data = body_data(drv)
            assert data["error"] == "relay_upstream_unavailable"
            shown = drv.find_element(By.ID, "error").text
            assert shown.startswith("Connection closed (code 1014): relay_upstream_unavailable: ")
            assert drv.find_element(By.ID, "status").text == "closed 1014"
            assert drv.find_element(By.ID, "connect").text == "Connect"  # ready to try again
        finally:
            drv.quit()


@needs_chromium
def test_the_token_field_authenticates_the_page(tmp_path: Path) -> None:
    """A relay that takes client keys: the page's token (offered as ``relay-token.<token>``)
    gets it in, a wrong one is refused, and one that cannot be a subprotocol never leaves."""
    from selenium.webdriver.common.by import By

    from relay.usage.auth import hash_key, new_api_key

    key = new_api_key()

    def starter(trigger: Trigger) -> Starter:
        async def run(task_status: trio.TaskStatus[str]) -> None:
            async with trio.open_nursery() as nursery:
                mock = await nursery.start(
                    serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}))
                )
                async with running_relay(
                    upstream_url=mock.url,
                    api_keys=(f"alice:{hash_key(key)}",),
                    allow_anonymous=False,
                ) as relay:
                    task_status.started(relay.http_url)
                    await trigger()
                nursery.cancel_scope.cancel()

        return run

    def connect_with(token: str) -> None:
        drv.get(url + "/")
        drv.find_element(By.CSS_SELECTOR, "details.settings summary").click()
        drv.find_element(By.ID, "token").send_keys(token)
        drv.find_element(By.ID, "connect").click()

    with served_in_thread(starter) as url:
        drv = open_browser(microphone_file(tmp_path / "mic.wav", 0.1), tmp_path / "profile")
        try:
            connect_with(key)
            wait_for(drv, "d.state === 'live'", timeout=10)
            [socket] = drv.execute_script("return window.openedSockets")
            assert socket["protocols"] == ["realtime", f"relay-token.{key}", "relay-resume"]

            connect_with("rk_not-the-key")
            wait_for(drv, "d.state === 'error'", timeout=10)
            assert body_data(drv)["error"] == "connect_failed"  # browsers hide the 401
            assert "is the token right?" in drv.find_element(By.ID, "error").text

            connect_with("not a token")
            wait_for(drv, "d.error === 'invalid_token'", timeout=10)
            assert drv.execute_script("return window.openedSockets") == []
            assert body_data(drv)["state"] == "idle"
            assert "may only hold letters" in drv.find_element(By.ID, "error").text
        finally:
            drv.quit()


RESAMPLE_SCRIPT = """
const [rate, done] = [arguments[0], arguments[arguments.length - 1]];
(async () => {
  // One second of a 1 kHz tone at `rate`, through the page's capture worklet, offline.
  const ctx = new OfflineAudioContext(1, rate, rate);
  await ctx.audioWorklet.addModule("/static/capture-worklet.js");
  const node = new AudioWorkletNode(ctx, "pcm16-capture", {
    processorOptions: { targetRate: 24000, chunkSamples: 960 },
  });
  const expected = 25;  // 24000 samples in chunks of 960
  const chunks = [];
  const received = new Promise((resolve) => {
    node.port.onmessage = ({ data }) => {
      chunks.push(new Int16Array(data.pcm));
      if (chunks.length === expected) resolve();
    };
  });
  const tone = new OscillatorNode(ctx, { frequency: 1000 });
  const half = new GainNode(ctx, { gain: 0.5 });
  tone.connect(half).connect(node).connect(ctx.destination);
  tone.start();
  await ctx.startRendering();
  await received;
  const pcm = Int16Array.from(chunks.flatMap((c) => Array.from(c)));
  let crossings = 0, energy = 0;
  for (let i = 1; i < pcm.length; i++) if ((pcm[i - 1] < 0) !== (pcm[i] < 0)) crossings++;
  for (const s of pcm) energy += s * s;
  done({ samples: pcm.length, frequency: crossings / 2, rms: Math.sqrt(energy / pcm.length) });
})().catch((err) => done({ error: String(err) }));
"""


@needs_chromium
def test_the_capture_worklet_resamples_any_rate_to_24k(demo_url: str, tmp_path: Path) -> None:
    """44.1 kHz (headless Chromium's default, a non-integer ratio), 48 kHz and 24 kHz in."""
    drv = open_browser(microphone_file(tmp_path / "mic.wav", 0.1), tmp_path / "profile")
    try:
        drv.set_script_timeout(20)
        drv.get(demo_url + "/")
        for rate in (44100, 48000, 24000):
            result = drv.execute_async_script(RESAMPLE_SCRIPT, rate)
            assert "error" not in result, result
            assert result["samples"] == 24000, rate  # one second at 24 kHz
            assert result["frequency"] == pytest.approx(1000, abs=3), rate  # pitch kept
            assert result["rms"] == pytest.approx(0.5 * 32767 / 2**0.5, rel=0.02), rate
    finally:
        drv.quit()


@needs_chromium
def test_the_page_resumes_its_session_after_a_network_blip(tmp_path: Path) -> None:
    """The relay (RELAY_RESUME_SECONDS) loses the page's TCP connection without a close frame,
    as a network change does; the page comes back on its own to the same session."""

    def starter(trigger: Trigger) -> Starter:
        async def run(task_status: trio.TaskStatus[Any]) -> None:
            async with trio.open_nursery() as nursery:
                mock = await nursery.start(
                    serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY}))
                )
                async with running_relay(upstream_url=mock.url, resume_seconds=30.0) as relay:
                    token = trio.lowlevel.current_trio_token()
                    task_status.started((relay.http_url, relay.app, mock, token))
                    await trigger()
                nursery.cancel_scope.cancel()

        return run

    async def cut(app: Any) -> Any:
        """The page's connection drops: the relay's end of its socket goes, no close frame."""
        while not app.pairs or not next(iter(app.pairs)).client.token:  # (its relay.resume)
            await trio.sleep(0.01)
        (pair,) = app.pairs
        await trio.aclose_forcefully(pair.client._current.side.websocket._stream)
        return pair.client

    with served_in_thread(starter) as (http_url, app, mock, token):
        drv = open_browser(microphone_file(tmp_path / "mic.wav", 0.5), tmp_path / "profile")
        try:
            connect(drv, http_url)
            wait_for(drv, "window.openedSockets && document.body.dataset.state === 'live'")
            session = trio.from_thread.run(cut, app, trio_token=token)
            wait_for(drv, "d.state === 'live' && document.getElementById('status').textContent"
                     " === 'resumed'", timeout=15)
            opened = drv.execute_script("return window.openedSockets")
            assert len(opened) == 2
            assert "relay-resume" in opened[0]["protocols"]
            (resume,) = [p for p in opened[1]["protocols"] if p.startswith("relay-resume.")]
            assert resume.rsplit(".", 1)[1].isdigit()
            assert session.resumes == 1
            assert len(mock.connections) == 1  # the same upstream session
            assert "error" not in body_data(drv)
        finally:
            drv.quit()
