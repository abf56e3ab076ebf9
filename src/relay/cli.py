"""``relay`` on the command line: ``relay serve`` and ``relay demo``.

Every setting of :data:`relay.config.SETTINGS` has a flag named after it
(``RELAY_DIAL_TIMEOUT`` → ``--dial-timeout``) except secrets, which are read from
the environment only so they never show up in a process list.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .server.app import RelayApp

from .config import SETTINGS, ConfigError, RelayConfig, coerce_setting, load_config
from .ops.logs import configure_logging


def _add_setting_flags(parser: argparse.ArgumentParser, *, only: Sequence[str] = ()) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (RELAY_CONFIG)")
    for setting in SETTINGS:
        if setting.secret or (only and setting.name not in only):
            continue
        help_text = f"{setting.help} [{setting.env}]".replace("%", "%%")
        if setting.is_flag:
            parser.add_argument(
                setting.flag, dest=setting.name, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(setting.flag, dest=setting.name, metavar="VALUE", help=help_text)


def _config_from(args: argparse.Namespace, environ: dict[str, str]) -> RelayConfig:
    overrides: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = getattr(args, setting.name, None)
        if raw is not None:
            overrides[setting.name] = coerce_setting(setting.name, raw, "command line")
    return load_config(environ, overrides, config_file=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Voice relay between clients and the OpenAI Realtime API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve the relay with Hypercorn (settings from env, RELAY_CONFIG and flags)",
        description="Serve the relay. OPENAI_API_KEY must be set in the environment.",
    )
    _add_setting_flags(serve)

    usage = commands.add_parser(
        "usage",
        help="print usage per user and day from the store (RELAY_STORE)",
        description="Print usage per user and UTC day: sessions, connected seconds, messages,"
        " bytes and tokens.",
    )
    usage.add_argument("--day", help="one UTC day, YYYY-MM-DD")
    usage.add_argument("--user", help="one user")
    usage.add_argument("--store", help="store URL (default: RELAY_STORE, else sqlite:///relay-usage.db)")
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")

    keygen = commands.add_parser(
        "keygen",
        help="make a client API key and the RELAY_API_KEYS entry that accepts it",
        description="Print a new client API key (give it to the client) and its"
        " RELAY_API_KEYS entry (give that to the relay; it holds only a hash).",
    )
    keygen.add_argument("user", help="the user this key authenticates")

    demo = commands.add_parser(
        "demo",
        help="run the relay against the bundled fake Realtime server; no key needed",
        description="Run mockrealtime and the relay in one process on loopback, no key needed.",
    )
    demo.add_argument("--port", type=int, default=8000, help="relay port (default 8000)")
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="relay address (default 127.0.0.1); one that is not loopback needs --allow-anonymous",
    )
    demo.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="serve the demo, which takes anyone without a token, on a non-loopback --host",
    )
    demo.add_argument(
        "--tls",
        action="store_true",
        help="serve wss:// and https:// with a certificate from a CA made for this run, and print"
        " how to make Node and Python trust it (for clients that only speak wss://)",
    )

    talk = commands.add_parser(
        "talk",
        help="say a WAV file through a relay; print the transcripts, save the reply audio",
        description="Stream a WAV file through the relay as one spoken turn, print the"
        " transcripts and latency, and write the reply audio to a WAV file."
        " Exit status: 0 on a reply, 1 if the connection or session failed,"
        " 2 if the input file cannot be used.",
    )
    talk.add_argument(
        "input",
        metavar="INPUT.wav",
        help="audio to say: WAV at any rate, mono or stereo, PCM 8/16/24/32-bit, float,"
        " G.711 mu-law or A-law",
    )
    talk.add_argument(
        "-o",
        "--output",
        metavar="REPLY.wav",
        default="reply.wav",
        help="where to write the reply audio, 24 kHz mono PCM16 (default reply.wav)",
    )
    talk.add_argument(
        "--url",
        default="ws://127.0.0.1:8000/voice",
        help="the relay's WebSocket URL (default ws://127.0.0.1:8000/voice)",
    )
    talk.add_argument("--token", help="client token, offered as subprotocol relay-token.TOKEN")
    talk.add_argument(
        "--realtime",
        action="store_true",
        help="pace the audio like a microphone (default: as fast as the connection takes it)",
    )
    talk.add_argument(
        "--transcribe",
        action="store_true",
        help="ask the session to transcribe the input too (billed separately by OpenAI)",
    )
    talk.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up if the reply is not complete after this long (default 60)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    environ = dict(os.environ)
    try:
        if args.command == "serve":
            config = _config_from(args, environ)
            configure_logging(
                config.log_format,
                config.log_level,
                secrets=(config.openai_api_key, config.jwt_secret, config.admin_token),
            )
            if not config.openai_api_key:
                raise ConfigError(
                    "OPENAI_API_KEY is not set: the relay needs it to open upstream sessions."
                    " Export it, or try `relay demo` to run against the bundled fake."
                )
            if config.workers > 1:
                from .server.workers import serve_workers

                return serve_workers(config)
            from .server.app import create_app

            trio.run(_serve, config, create_app(config))
        elif args.command == "usage":
            overrides = {"store": args.store} if args.store else {}
            config = load_config(environ, overrides)
            print(trio.run(_usage_report, config.store, args.day, args.user, args.json))
        elif args.command == "keygen":
            from .usage.auth import hash_key, new_api_key

            key = new_api_key()
            print(f"client key (give it to {args.user}): {key}")
            print(f"RELAY_API_KEYS entry (give it to the relay): {args.user}:{hash_key(key)}")
        elif args.command == "demo":
            from .server.demo import check_demo_host

            check_demo_host(args.host, args.allow_anonymous)
            trio.run(_demo, args.host, args.port, args.allow_anonymous, args.tls)
        elif args.command == "talk":
            from .clients.talk import run as run_talk

            return run_talk(args)
    except ConfigError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _serve(config: RelayConfig, app: RelayApp) -> None:
    from .server.serve import serve

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, config, app=app))
        for bind in binds:
            ws = bind.replace("http", "ws", 1)
            print(f"relay: listening on {ws}/voice and {ws}/v1/realtime", flush=True)


async def _demo(host: str, port: int, allow_anonymous: bool, tls: bool) -> None:
    from .server.demo import run_demo

    async with trio.open_nursery() as nursery:
        demo = await nursery.start(
            partial(run_demo, host, port, allow_anonymous=allow_anonymous, tls=tls)
        )
        url, page = demo.relay_url, "http" + demo.relay_url.removeprefix("ws")
        lines = [
            f"fake Realtime API on {demo.mock.url}",
            f"relay on {url}/voice and {url}/v1/realtime?model={demo.config.model}",
            f"page on {page}/",
        ]
        if demo.ca_file is not None:
            lines += [
                f"its certificate is signed by a CA made for this run: {demo.ca_file}",
                "trust it in the shell that runs your client:",
                f"  export NODE_EXTRA_CA_CERTS={demo.ca_file}   # Node",
                f"  export SSL_CERT_FILE={demo.ca_file}         # Python",
            ]
        lines.append("press Ctrl-C to stop")
        print("\n".join(f"relay demo: {line}" for line in lines), flush=True)


async def _usage_report(url: str, day: str | None, user: str | None, as_json: bool) -> str:
    import orjson

    from .usage.accounting import format_table, usage_json
    from .usage.store import open_store

    store = await open_store(url)
    try:
        rows = await store.rows(day=day, user=user)
    finally:
        await store.aclose()
    if as_json:
        return orjson.dumps({"rows": [usage_json(r) for r in rows]}, option=orjson.OPT_INDENT_2).decode()
    return format_table(rows)
