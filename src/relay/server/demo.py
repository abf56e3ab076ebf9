"""``relay demo``: the relay in front of the bundled fake Realtime API, in one process.

Nothing to install or configure: mockrealtime listens on a free loopback port
with a key made up for this run, and the relay uses that key upstream exactly as
it would use a real one. Its Twilio routes are on, with a built-in auth token that
``relay call`` knows, so a phone call needs no Twilio account. The demo takes anyone without
a token, so it listens on loopback only unless told otherwise (``--allow-anonymous``). Of the
relay's settings it reads only ``RELAY_PUMP`` from the environment (to compare the relay with
the pump off).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime

from ..config import DEMO_TWILIO_AUTH_TOKEN, ConfigError, RelayConfig, load_config
from .serve import serve


@dataclass(frozen=True)
class Demo:
    relay_url: str  # ws://HOST:PORT
    mock: MockServer
    config: RelayConfig

    @property
    def http_url(self) -> str:
        """http://HOST:PORT: the webhook of phone calls is at /twilio/voice."""
        return self.relay_url.replace("ws://", "http://", 1)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``); names are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_demo_host(host: str, allow_anonymous: bool) -> None:
    """Refuse (ConfigError) to serve the anonymous demo beyond this machine unless told to."""
    if not allow_anonymous and not is_loopback(host):
        raise ConfigError(
            f"relay demo lets anyone in without a token, so it listens on loopback only, and"
            f" --host {host} is not a loopback address. Use --host 127.0.0.1 (the default), or"
            " add --allow-anonymous if you mean to let anyone who can reach this machine use it."
        )


async def run_demo(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    allow_anonymous: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Demo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake and the relay until ``shutdown_trigger`` returns.

    Raises ConfigError for a ``host`` that is not loopback, unless ``allow_anonymous``.
    """
    check_demo_host(host, allow_anonymous)
    key = "sk-demo-" + secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({key})))
        config = load_config(
            {name: value for name, value in os.environ.items() if name == "RELAY_PUMP"},
            {
                "openai_api_key": key,
                "upstream_url": mock.url,
                "host": host,
                "port": port,
                "allow_anonymous": True,  # loopback only (or as told), for trying it out
                "store": "sqlite:///:memory:",
                # Phone calls with `relay call`, which knows this token (no Twilio account).
                "twilio_auth_token": DEMO_TWILIO_AUTH_TOKEN,
            },
        )

        async def relay(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # the relay has closed its sessions: stop the fake

        binds = await nursery.start(relay)
        task_status.started(Demo(binds[0].replace("http://", "ws://", 1), mock, config))
