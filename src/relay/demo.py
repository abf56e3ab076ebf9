"""``relay demo``: the relay in front of the bundled fake Realtime API, in one process.

Nothing to install or configure: mockrealtime listens on a free loopback port
with a key made up for this run, and the relay uses that key upstream exactly as
it would use a real one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from collections.abc import Awaitable, Callable

import trio
from mockrealtime import MockConfig, MockServer, serve_mock_realtime

from .config import RelayConfig, load_config
from .server import serve


@dataclass(frozen=True)
class Demo:
    relay_url: str  # ws://HOST:PORT
    mock: MockServer
    config: RelayConfig


async def run_demo(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[Demo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the fake and the relay until ``shutdown_trigger`` returns."""
    key = "sk-demo-" + secrets.token_urlsafe(16)
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({key})))
        config = load_config(
            {},
            {
                "openai_api_key": key,
                "upstream_url": mock.url,
                "host": host,
                "port": port,
                "allow_anonymous": True,  # loopback only, for trying it out
                "store": "sqlite:///:memory:",
            },
        )

        async def relay(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # the relay has closed its sessions: stop the fake

        binds = await nursery.start(relay)
        task_status.started(Demo(binds[0].replace("http://", "ws://", 1), mock, config))
