"""The relays the official clients are tested through, each in a thread of its own.

The SDKs are blocking code or run their own asyncio loop, so the relay (Trio) cannot share a
thread with them. :class:`RelayThread` runs one in the background, with a watchdog: past
``TIMEOUT`` the relay shuts down, so a client stuck waiting fails instead of hanging.

* :func:`relay_demo` is ``relay demo`` (optionally ``--tls``), as a newcomer runs it.
* :func:`relay_serve` is a configured ``relay serve``: a config file whose ``[session]`` sets
  ``instructions`` and whose ``[policy]`` locks them, client API keys or JWTs, optionally TLS,
  in front of its own mockrealtime.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
import wave
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import orjson
import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.config import RelayConfig, load_config
from relay.server.demo import run_demo
from relay.server.localca import temporary_local_tls
from relay.server.serve import serve
from relay.usage.auth import hash_key, new_api_key

TIMEOUT = 60
#: "Hello, can you hear me?" (PCM16, 24 kHz, mono): the sample `relay talk` says.
HELLO_WAV = Path(__file__).parents[2] / "src" / "relay" / "clients" / "samples" / "hello.wav"

#: What the configured relay's [session] says; the clients send instructions of their own.
RELAY_INSTRUCTIONS = "You are the relay's voice assistant. Answer in one short sentence."
CLIENT_INSTRUCTIONS = "You are the client's assistant, who would rather not be steered."


@dataclass(frozen=True)
class Target:
    """A running relay, seen from a client."""

    name: str
    url: str  # ws://HOST:PORT or wss://HOST:PORT, no path
    api_key: str  # what the client presents as its key
    mock: MockServer
    config: RelayConfig
    ca_file: Path | None = None

    @property
    def http_url(self) -> str:
        return "http" + self.url.removeprefix("ws")

    @property
    def realtime_url(self) -> str:
        return f"{self.url}/v1/realtime?model={self.config.model}"


def speech_then_silence() -> bytes:
    """hello.wav (PCM16, 24 kHz, mono), then a second of silence so server VAD ends the turn."""
    with wave.open(str(HELLO_WAV)) as wav:
        assert (wav.getframerate(), wav.getsampwidth(), wav.getnchannels()) == (24000, 2, 1)
        return wav.readframes(wav.getnframes()) + bytes(48000)


Starter = Callable[[Callable[[], Awaitable[None]], trio.TaskStatus[Target]], Awaitable[None]]


class RelayThread:
    """Run a relay (``starter``) in a Trio loop on a thread of its own until the block ends."""

    def __init__(self, starter: Starter) -> None:
        self.target: Target | None = None
        self._starter = starter
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by __enter__ / __exit__
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.target = await nursery.start(self._starter, self._stop.wait)
            self._ready.set()

    def __enter__(self) -> Target:
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "the relay did not start"
        if self._error is not None:
            raise self._error
        assert self.target is not None
        self._watchdog = threading.Timer(TIMEOUT, self.stop)
        self._watchdog.start()
        return self.target

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
        if self._error is not None:
            raise self._error


@contextmanager
def relay_demo(*, tls: bool = False) -> Iterator[Target]:
    """``relay demo`` (``--tls``) on a free loopback port."""

    async def start(
        stop: Callable[[], Awaitable[None]], task_status: trio.TaskStatus[Target]
    ) -> None:
        async def demo(task_status: trio.TaskStatus[Any]) -> None:
            await run_demo("127.0.0.1", 0, tls=tls, shutdown_trigger=stop, task_status=task_status)

        async with trio.open_nursery() as nursery:
            d = await nursery.start(demo)
            # The demo takes anyone: a client's own key is as good as any.
            task_status.started(
                Target(
                    "relay demo", d.relay_url, "sk-the-clients-own-key", d.mock, d.config, d.ca_file
                )
            )

    with RelayThread(start) as target:
        yield target


@contextmanager
def relay_serve(directory: Path, *, tls: bool = False, auth: str = "key") -> Iterator[Target]:
    """A ``relay serve`` whose config file sets and locks ``instructions``, with client
    authentication by API key (``auth="key"``, what ``relay keygen`` makes) or by a JWT
    (``auth="jwt"``), in front of its own mockrealtime."""
    upstream_key = "sk-upstream-" + secrets.token_urlsafe(16)
    config_file = directory / "relay.toml"
    config_file.write_text(
        "[session]\n"
        f"instructions = {orjson.dumps(RELAY_INSTRUCTIONS).decode()}\n"
        "[policy]\n"
        'locked = ["model", "instructions"]\n',
        encoding="utf-8",
    )
    if auth == "key":
        client_key = new_api_key()
        auth_settings: dict[str, Any] = {"api_keys": (f"alice:{hash_key(client_key)}",)}
    else:
        secret = secrets.token_urlsafe(32)
        client_key = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, secret, "HS256")
        auth_settings = {"jwt_secret": secret}

    async def start(
        stop: Callable[[], Awaitable[None]], task_status: trio.TaskStatus[Target]
    ) -> None:
        async with temporary_local_tls() if tls else nullcontext() as local_tls:
            async with trio.open_nursery() as nursery:
                mock = await nursery.start(
                    serve_mock_realtime, MockConfig(api_keys=frozenset({upstream_key}))
                )
                settings = {
                    "openai_api_key": upstream_key,
                    "upstream_url": mock.url,
                    "host": "127.0.0.1",
                    "port": 0,
                    "store": "sqlite:///:memory:",
                    **auth_settings,
                }
                if local_tls is not None:
                    settings |= {
                        "tls_cert": str(local_tls.cert_file),
                        "tls_key": str(local_tls.key_file),
                    }
                # Like relay demo, RELAY_PUMP from the environment (CI's pump-off pass).
                environ = {k: v for k, v in os.environ.items() if k == "RELAY_PUMP"}
                config = load_config(environ, settings, config_file=str(config_file))

                async def relay(task_status: trio.TaskStatus[list[str]]) -> None:
                    await serve(config, shutdown_trigger=stop, task_status=task_status)
                    nursery.cancel_scope.cancel()  # the relay closed its sessions: stop the fake

                binds = await nursery.start(relay)
                url = "ws" + binds[0].removeprefix("http")
                ca_file = local_tls.ca_file if local_tls is not None else None
                task_status.started(Target("relay serve", url, client_key, mock, config, ca_file))

    with RelayThread(start) as target:
        yield target


def upstream_session_updates(target: Target) -> list[dict[str, Any]]:
    """The ``session`` of every session.update the fake received, in order (the relay's first)."""
    sessions = []
    for record in target.mock.connections:
        for message in record.received:
            if isinstance(message, str) and '"session.update"' in message:
                event = orjson.loads(message)
                if event.get("type") == "session.update":
                    sessions.append(event["session"])
    return sessions


def assert_locked_fields_kept(target: Target, client_sessions: list[dict[str, Any]]) -> None:
    """No locked field reached the upstream with another value than the relay's, and the
    sessions the client saw run the relay's model (and, unless redacted, its instructions)."""
    relay_session = target.config.session_object()
    relay_values = {"model": target.config.model, "instructions": relay_session.get("instructions")}
    locked = target.config.policy.locked & set(relay_values)
    assert locked, "the relay locks nothing this check knows"
    sent = upstream_session_updates(target)
    assert sent and sent[0].get("instructions") == relay_values["instructions"], (
        "the relay's own update"
    )
    for session in sent:
        for field in locked:
            if field in session:
                assert session[field] == relay_values[field], (field, session[field])
    assert client_sessions, "the client saw no session"
    for session in client_sessions:
        assert session.get("model", target.config.model) == target.config.model
        if "instructions" in session:
            assert session["instructions"] == relay_values["instructions"]


def assert_the_four_steps_went_through(target: Target, events: list[dict[str, Any]]) -> None:
    """What every client's run shows, whatever the client: ``session.created`` first and no
    error; the audio turn taken by server VAD; the interrupt's truncate and cancel sent and
    done; the client's tool reaching the model; the locked fields keeping the relay's values."""
    kinds = [event["type"] for event in events]
    assert kinds[0] == "session.created", kinds[:5]
    assert "error" not in kinds, [event for event in events if event["type"] == "error"]
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.truncated",
    ):
        assert kind in kinds, kind
    sent = [str(m) for record in target.mock.connections for m in record.received]
    assert any('"conversation.item.truncate"' in m for m in sent)
    assert any('"response.cancel"' in m for m in sent)
    assert any(
        any(tool.get("name") == "get_weather" for tool in session.get("tools", ()))
        for session in upstream_session_updates(target)
    )
    sessions = [e["session"] for e in events if e["type"] in ("session.created", "session.updated")]
    assert_locked_fields_kept(target, sessions)
