"""``python -m bench all | latency | stream N | capacity | overload [N] | idle [N] | coldstart |
connect``.

Each scenario prints one line of figures on stdout (progress goes to stderr). The echo
upstream and the relay run as subprocesses on 127.0.0.1; the load generator is this
process (asyncio on uvloop, a minimal WebSocket framer).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

import uvloop

from . import procs, scenarios


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--relay-src",
        metavar="DIR",
        help="benchmark the relay package found in DIR (e.g. `git archive REV src | tar -x -C D`"
        " then D/src) instead of the installed one",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=procs.WORKERS,
        help=f"relay serve --workers (default: the core count, {procs.WORKERS})",
    )
    parser.add_argument(
        "--pump",
        choices=("auto", "on", "off"),
        default=procs.PUMP,
        help="the relay's RELAY_PUMP (default auto: the pump, where it proves it works); off"
        " relays every session through its own tasks, for figures beside the pump's",
    )
    parser.add_argument(
        "--upstream-tls",
        action="store_true",
        help="the echo serves wss:// (test CA): the relay dials it over TLS, as it does the"
        " real API, and direct sessions speak TLS to it",
    )
    sub = parser.add_subparsers(dest="scenario", required=True)
    sub.add_parser(
        "all", help="every scenario below, in order (overload at 2x the measured capacity)"
    )
    lat = sub.add_parser("latency", help="sequential round trips of a small event, relay vs direct")
    lat.add_argument("count", type=int, nargs="?", default=3000)
    st = sub.add_parser("stream", help="N sessions streaming audio-sized events every 20 ms")
    st.add_argument("n", type=int)
    st.add_argument("--seconds", type=float, default=10.0)
    st.add_argument("--direct", action="store_true", help="straight to the upstream, no relay")
    sub.add_parser("capacity", help="largest N holding p99<=60ms with no loss, relay and direct")
    ov = sub.add_parser("overload", help="stream at N sessions (default 2x the relay's capacity)")
    ov.add_argument("n", type=int, nargs="?", default=0)
    ov.add_argument("--seconds", type=float, default=10.0)
    idle = sub.add_parser("idle", help="relay RSS per idle session")
    idle.add_argument("n", type=int, nargs="?", default=1000)
    cold = sub.add_parser("coldstart", help="relay process start to first relayed round trip")
    cold.add_argument("--runs", type=int, default=5)
    conn = sub.add_parser(
        "connect",
        help="time to session.created with a 300 ms upstream handshake: direct, relay, relay"
        " with its warm pool",
    )
    conn.add_argument("count", type=int, nargs="?", default=200)
    return parser


def show(line: str) -> None:
    """A scenario's line of figures, naming the relay's RELAY_PUMP where it is not the default."""
    print(line if procs.PUMP == "auto" else f"{line} pump={procs.PUMP}", flush=True)


async def run(args: argparse.Namespace) -> None:
    if args.scenario == "connect":  # against mockrealtime itself, not the echo
        show(await scenarios.connect(args.count))
        return
    echo = procs.start_echo()
    relay: procs.Server | None = None
    try:
        if args.scenario == "coldstart":
            show(await scenarios.coldstart(echo, args.runs))
            return

        async def fresh_relay() -> procs.Server:
            nonlocal relay
            if relay is not None:
                relay.stop()
            relay = await procs.start_relay(echo)
            return relay

        if args.scenario == "latency":
            show(await scenarios.latency(await fresh_relay(), echo, args.count))
        elif args.scenario == "stream" and args.direct:
            show(await scenarios.stream_direct(echo, args.n, args.seconds))
        elif args.scenario == "stream":
            show(await scenarios.stream(await fresh_relay(), echo, args.n, args.seconds))
        elif args.scenario == "capacity":
            show(await scenarios.capacity(await fresh_relay(), echo))
        elif args.scenario == "overload":
            r = await fresh_relay()
            n = args.n
            if not n:
                n = 2 * (await scenarios.capacity_figures(r, echo, runs=0, search_budget=90.0))[0]
                r = await fresh_relay()
            show(await scenarios.overload(r, echo, n, args.seconds))
        elif args.scenario == "idle":
            show(await scenarios.idle(await fresh_relay(), echo, args.n))
        elif args.scenario == "all":
            show(await scenarios.latency(await fresh_relay(), echo))
            show(await scenarios.idle(await fresh_relay(), echo))
            r = await fresh_relay()
            cap, line = await scenarios.capacity_figures(r, echo)
            show(line)
            show(await scenarios.stream(await fresh_relay(), echo, max(1, cap)))
            show(await scenarios.overload(await fresh_relay(), echo, 2 * max(1, cap)))
            if relay is not None:
                relay.stop()
            show(await scenarios.coldstart(echo))
            show(await scenarios.connect())
    finally:
        if relay is not None:
            relay.stop()
        echo.stop()


def main() -> int:
    args = build_parser().parse_args()
    if args.relay_src:
        procs.RELAY_SRC = os.path.abspath(args.relay_src)
    procs.WORKERS = args.workers
    procs.PUMP = args.pump
    procs.UPSTREAM_TLS = args.upstream_tls
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
