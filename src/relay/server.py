"""Serving the relay with Hypercorn's Trio worker, from Python.

:func:`serve` is what ``relay serve`` and ``relay demo`` run. Hypercorn never
sends close frames on shutdown (it cancels the app after its graceful timeout,
and clients see 1006), so shutdown goes through the app first: the trigger ends
every live pair with 1001 and an ``error`` event, then lets Hypercorn stop.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .app import RelayApp, create_app
from .config import RelayConfig

#: Seconds Hypercorn waits for connections after the relay closed its sessions.
GRACEFUL_TIMEOUT = 2.0


def hypercorn_config(config: RelayConfig) -> HypercornConfig:
    """The Hypercorn settings that follow from the relay's."""
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    # Above the relay's own limit, so the bridge sees an oversized message and
    # answers it with an error event and 1009 instead of Hypercorn's bare 1009.
    hc.websocket_max_message_size = max(2 * config.max_message_bytes, config.max_message_bytes + 65536)
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.accesslog = None
    # Hypercorn's own records go through the standard logging tree like the relay's.
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


async def serve(
    config: RelayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] = wait_for_signal,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    app: RelayApp | None = None,
) -> None:
    """Serve until ``shutdown_trigger`` returns, then close every session with 1001.

    ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:8000"]``).
    """
    app = app or create_app(config)

    async def trigger() -> None:
        await shutdown_trigger()
        with trio.move_on_after(config.close_timeout + 1):
            await app.shutdown_pairs()

    await hypercorn_serve(
        app,  # type: ignore[arg-type]
        hypercorn_config(config),
        shutdown_trigger=trigger,
        task_status=task_status,
    )
