"""``relay demo``: the relay in front of the bundled fake Realtime API, in one process.

Nothing to install or configure: mockrealtime listens on a free loopback port
with a key made up for this run, and the relay uses that key upstream exactly as
it would use a real one. Its Twilio routes are on, with a built-in auth token that
``relay call`` knows, so a phone call needs no Twilio account. The demo takes anyone without
a token, so it listens on loopback only unless told otherwise (``--allow-anonymous``). Of the
relay's settings it reads only ``RELAY_PUMP`` from the environment (to compare the relay with
the pump off).

With ``tls`` (``relay demo --tls``) the relay serves ``wss://`` and ``https://`` with a
certificate from a CA made for this run (:mod:`relay.server.localca`), for clients that only
speak ``wss://``; ``Demo.ca_file`` is the CA file they must trust.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime

from ..config import DEMO_TWILIO_AUTH_TOKEN, ConfigError, RelayConfig, load_config
from .localca import temporary_local_tls
from .serve import serve


@dataclass(frozen=True)
class Demo:
    relay_url: str  # ws://HOST:PORT, or wss://HOST:PORT with TLS
    mock: MockServer
    config: RelayConfig
    ca_file: Path | None = None  # with TLS: the CA certificate clients must trust

    @property
    def http_url(self) -> str:
        """http(s)://HOST:PORT: the webhook of phone calls is at /twilio/voice."""
        return "http" + self.relay_url.removeprefix("ws")


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
    tls: bool = False,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Demo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake and the relay until ``shutdown_trigger`` returns.

    Raises ConfigError for a ``host`` that is not loopback, unless ``allow_anonymous``.
    """
    check_demo_host(host, allow_anonymous)
    key = "sk-demo-" + secrets.token_urlsafe(16)
    local_tls = temporary_local_tls() if tls else nullcontext()
    async with local_tls as tls_files, trio.open_nursery() as nursery:
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
                "tls_cert": str(tls_files.cert_file) if tls_files else "",
                "tls_key": str(tls_files.key_file) if tls_files else "",
            },
        )

        async def relay(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # the relay has closed its sessions: stop the fake

        binds = await nursery.start(relay)
        relay_url = "ws" + binds[0].removeprefix("http")  # http → ws, https → wss
        ca_file = tls_files.ca_file if tls_files else None
        task_status.started(Demo(relay_url, mock, config, ca_file))
