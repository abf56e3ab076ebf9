"""The official OpenAI Python SDK, unchanged, talks to the relay's /v1/realtime."""

from __future__ import annotations

import threading

import openai
import trio

from relay.server.demo import Demo, run_demo

TIMEOUT = 20


class DemoThread:
    """``relay demo`` (relay + fake) in a thread of its own; the SDK's client is blocking code."""

    def __init__(self) -> None:
        self.demo: Demo | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=lambda: trio.run(self._main), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.demo = await nursery.start(
                lambda task_status: run_demo("127.0.0.1", 0, shutdown_trigger=self._stop.wait, task_status=task_status)
            )
            self._ready.set()

    def __enter__(self) -> Demo:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "relay demo did not start"
        assert self.demo is not None
        # Watchdog: past the timeout the relay shuts down, so a blocked SDK call fails, not hangs.
        self._watchdog = threading.Timer(TIMEOUT, self.stop)
        self._watchdog.start()
        return self.demo

    def stop(self) -> None:
        assert self._stop is not None and self._token is not None
        try:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def __exit__(self, *exc: object) -> None:
        self._watchdog.cancel()
        self.stop()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()


def test_the_sdk_pointed_at_the_relay_completes_a_text_turn() -> None:
    with DemoThread() as demo:
        http_url = demo.relay_url.replace("ws://", "http://")
        client = openai.OpenAI(api_key="sk-the-sdk-users-own-key", base_url=f"{http_url}/v1", max_retries=0)
        with client.realtime.connect(model="gpt-realtime-2.1") as conn:
            assert conn.recv().type == "session.created"
            conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}
            )
            conn.response.create()
            kinds = []
            while not kinds or kinds[-1] != "response.done":
                kinds.append(conn.recv().type)
        assert "response.output_audio_transcript.delta" in kinds
        # The SDK user's own key went nowhere: the fake only ever saw the relay's key.
        record = demo.mock.connections[-1]
        assert "sk-the-sdk-users-own-key" not in str(record.headers) + str(record.subprotocols)
