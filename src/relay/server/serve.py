"""Serving the relay with Hypercorn's Trio worker, from Python.

:func:`serve` is what ``relay serve`` and ``relay demo`` run. Hypercorn never
sends close frames on shutdown (it cancels the app after its graceful timeout,
and clients see 1006), so shutdown goes through the app first: the trigger drains
the relay (readiness 503, a ``relay_draining`` notice, ``RELAY_DRAIN_SECONDS`` for
sessions to finish, then 1012 and an ``error`` event for the rest), then lets
Hypercorn stop.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableSequence
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from ..config import RelayConfig
from ..wire.balance import Balance
from ..wire.takeover import balance_accepts
from ..wire.upstream import UpstreamDialer, os_reason, probe
from .app import RelayApp, client_frame_limit, create_app
from .signals import STOP_SIGNALS, catch_early, follow_parent, ignore, take_early

#: Seconds Hypercorn waits for connections after the relay closed its sessions.
GRACEFUL_TIMEOUT = 2.0
#: A stop signal this soon after the first is the same stop, not a second one cutting the drain
#: short: sent to a process group, SIGTERM reaches the relay and a launcher such as ``uv run``,
#: which passes it on.
SAME_STOP_SECONDS = 0.5

log = logging.getLogger("relay")


class CannotStart(Exception):
    """The relay cannot start serving; the message says why and what to do, in one line."""


def listen(config: RelayConfig, hc: HypercornConfig) -> Sockets:
    """Bind and listen on the relay's address now, so that a port in use is told in one line
    before anything else starts (Hypercorn would raise it from deep inside its nurseries)."""
    try:
        sockets = hc.create_sockets()
    except OSError as exc:
        raise CannotStart(_listen_error(config.host, config.port, exc)) from None
    for sock in _listening(sockets):
        sock.listen(hc.backlog)
    return sockets


def _listen_error(host: str, port: int, exc: OSError) -> str:
    where = f"cannot listen on {host}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return (
            f"{where}: the port is in use (another relay, or `relay demo`, may be running there)."
            " Stop it, or pick another port with --port."
        )
    if exc.errno == errno.EACCES:
        return (
            f"{where}: permission denied (ports below 1024 need privileges). Pick a port above"
            " 1023 with --port, and put a proxy in front for 80 or 443."
        )
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return (
            f"{where}: {host} is not an address of this machine. Use --host 127.0.0.1 (this"
            " machine only), 0.0.0.0 (every interface) or one of its own addresses."
        )
    return f"{where}: {exc.strerror or exc}."


async def check_upstream(config: RelayConfig) -> None:
    """Raise :class:`CannotStart` unless a connection to the upstream opens (TCP, and TLS for
    ``wss://``) within ``RELAY_DIAL_TIMEOUT``: a relay that cannot reach it serves nobody."""
    failure = await probe(UpstreamDialer(config).target(config.model), config.dial_timeout)
    if failure is None:
        return
    if isinstance(failure, trio.TooSlowError):
        why = f"no answer within {config.dial_timeout:g} s"
    elif isinstance(failure, OSError):
        why = os_reason(failure)
    else:
        why = str(failure) or failure.__class__.__name__
    raise CannotStart(
        f"cannot reach the upstream {config.upstream_url} ({why}). Check RELAY_UPSTREAM_URL"
        " and this machine's network (DNS, firewall); `relay demo` runs without an upstream."
    )


def hypercorn_config(config: RelayConfig) -> HypercornConfig:
    """The Hypercorn settings that follow from the relay's."""
    hc = HypercornConfig()
    hc.bind = [f"{config.host}:{config.port}"]
    if config.tls_cert:
        hc.certfile, hc.keyfile = config.tls_cert, config.tls_key
    hc.keep_alive_timeout = config.keep_alive_timeout
    # Pings keep proxies from timing out a quiet client; Hypercorn never checks pongs, but
    # a pong is data, so a client that sends nothing, not even pongs, for the peer timeout
    # is dropped by the read timeout.
    hc.websocket_ping_interval = config.ping_interval or None
    hc.read_timeout = config.peer_timeout or None
    # Above the relay's own limit, so the bridge sees an oversized message and
    # answers it with an error event and 1009 instead of Hypercorn's bare 1009.
    hc.websocket_max_message_size = client_frame_limit(config.max_message_bytes)
    hc.graceful_timeout = GRACEFUL_TIMEOUT
    hc.accesslog = None
    # Hypercorn's own records go through the standard logging tree like the relay's.
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def serve(
    config: RelayConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    app: RelayApp | None = None,
    sockets: Sockets | None = None,
) -> None:
    """Serve until ``shutdown_trigger`` returns (default: SIGINT or SIGTERM), then drain.

    ``task_status.started`` gets the bound URLs (``["http://127.0.0.1:8000"]``). With
    signals, a second signal during the drain (half a second or more after the first) cuts
    the drain time short.
    ``sockets`` are listening sockets made by the parent of several workers.
    """
    app = app or create_app(config)
    drain_bound = config.drain_seconds + config.close_timeout + 1
    if shutdown_trigger is not None:

        async def triggered() -> None:
            await shutdown_trigger()
            with trio.move_on_after(drain_bound):
                await app.drain(config.drain_seconds)

        await _serve(app, config, triggered, task_status, sockets)
        return
    # Listening from before start-up to after the drain: a signal sent meanwhile is acted on
    # once serving (or ignored once draining), never fatal (see relay.server.signals).
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:

        async def signalled() -> None:
            early = take_early()  # (any number: they came before serving, one stop)
            signum = early[0] if early else None
            if signum is None:
                async for signum in signals:  # noqa: B007
                    break
            log.info("got %s: draining", signal.Signals(signum).name)
            first = trio.current_time()
            async with trio.open_nursery() as nursery:

                async def hurry() -> None:
                    async for _ in signals:
                        if trio.current_time() - first < SAME_STOP_SECONDS:
                            continue  # the same stop, sent to the process group and passed on
                        log.info("second signal: closing the remaining sessions now")
                        app.hurry_drain()

                nursery.start_soon(hurry)
                with trio.move_on_after(drain_bound):
                    await app.drain(config.drain_seconds)
                nursery.cancel_scope.cancel()

        await _serve(app, config, signalled, task_status, sockets)


async def _serve(
    app: RelayApp,
    config: RelayConfig,
    trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[list[str]],
    sockets: Sockets | None,
) -> None:
    hc = hypercorn_config(config)
    await worker_serve(
        wrap_app(app, HypercornConfig.wsgi_max_body_size, None),  # type: ignore[arg-type]
        hc,
        sockets=sockets if sockets is not None else listen(config, hc),
        shutdown_trigger=trigger,
        task_status=task_status,
    )


def run_workers(config: RelayConfig, metrics_dir: str) -> int:
    """Run ``config.workers`` worker processes on one port; return an exit status.

    Called by :func:`relay.server.workers.serve_workers`, which has set PROMETHEUS_MULTIPROC_DIR
    to ``metrics_dir`` before this module (and prometheus-client) was imported.

    The parent binds one listening socket and hands it to every worker, a whole relay with
    its own event loop; each accepts its share of the connections (:mod:`relay.wire.balance`:
    a worker holding more connections than another leaves the next one to it), so the
    workers carry the sessions evenly, which the kernel's spread by hash (``SO_REUSEPORT``)
    does not. A worker that dies leaves the socket to the others. Workers are forked from
    this process, which has imported the relay already, so they serve at once instead
    of each importing it again (spawned where prometheus-client was imported before the
    metrics directory was set, since it reads that once). Each worker runs in its own
    process group, so a terminal's Ctrl-C reaches only the parent, which passes SIGINT
    and SIGTERM on to every worker exactly once; each then drains as a single relay does.

    A scrape of ``/metrics`` reaches whichever worker accepts it, so the workers keep
    their metrics in prometheus-client's multiprocess files (see :mod:`relay.ops.metrics`);
    a worker's live-session gauge stops counting when it exits.
    """
    from multiprocessing.connection import wait

    from hypercorn.utils import repr_socket_addr
    from prometheus_client import multiprocess

    from ..ops.metrics import multiprocess_mode

    hc = hypercorn_config(config)  # (one worker for Hypercorn: no SO_REUSEPORT)
    sockets = listen(config, hc)
    forking = multiprocess_mode()
    context = multiprocessing.get_context("fork" if forking else "spawn")
    counts = context.RawArray("q", config.workers)  # each worker's open connections
    stop = context.RawValue("i", 0)  # the stop signal passed on (see signals.follow_parent)
    workers = [
        context.Process(target=_worker, args=(config, sockets, os.getpid(), counts, index, stop))
        for index in range(config.workers)
    ]
    noted = take_early()  # (before forking: a worker acts on what it notes itself)
    for worker in workers:
        worker.start()
    scheme = "wss" if config.tls_cert else "ws"
    for sock in _listening(sockets):
        bound = repr_socket_addr(sock.family, sock.getsockname())  # the real port of --port 0
        print(f"relay: {config.workers} workers listening on {scheme}://{bound}/voice", flush=True)
    if forking:  # the workers have their copies; this process accepts nothing
        for sock in _listening(sockets):
            sock.close()

    forwarded: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        stop.value = signum
        for worker in workers:
            if worker.is_alive() and worker.pid is not None:
                # (gone all the same if reaped just now: a handler may run inside join())
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, forward)
    for signum in noted + take_early():  # came while the workers started: theirs too
        forward(signum, None)
    running = {worker.sentinel: index for index, worker in enumerate(workers)}
    while running:  # one worker leaves per pass at least
        for sentinel in wait(list(running)):
            index = running.pop(sentinel)  # type: ignore[call-overload]
            Balance.gone(counts, index)
            workers[index].join()
            multiprocess.mark_process_dead(workers[index].pid, metrics_dir)
    ignore()
    return max(_exit_status(worker.exitcode, forwarded) for worker in workers)


def _exit_status(exitcode: int | None, forwarded: set[int]) -> int:
    """A worker's exit as the shell would put it; ended by a stop signal this process passed
    on (one that came before its own handler was set), it did as asked: 0."""
    if exitcode is None or exitcode >= 0:
        return exitcode or 0
    return 0 if -exitcode in forwarded else 128 - exitcode


def _worker(
    config: RelayConfig,
    sockets: Sockets,
    parent: int,
    counts: MutableSequence[int],
    index: int,
    stop: Any,
) -> None:
    os.setpgid(0, 0)
    catch_early()  # (a spawned worker starts with the default action)
    follow_parent(stop)
    _drain_when_orphaned(parent)
    balance_accepts(Balance(counts, index))
    from ..ops.logs import configure_logging

    configure_logging(
        config.log_format,
        config.log_level,
        secrets=config.secrets,
        fields={"pid": os.getpid()},  # the workers' lines interleave
    )
    trio.run(partial(serve, config, sockets=sockets))
    ignore()


def _listening(sockets: Sockets) -> tuple[socket.socket, ...]:
    return (*sockets.secure_sockets, *sockets.insecure_sockets)


def _drain_when_orphaned(parent: int) -> None:
    """On Linux, have the kernel send this worker SIGTERM (so it drains and exits) when the
    ``relay serve`` process dies, even killed outright: a worker must not serve on alone."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)
