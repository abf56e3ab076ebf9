"""``relay`` on the command line: ``relay serve``, ``relay demo`` and the clients.

Every setting of :data:`relay.config.SETTINGS` has a flag named after it
(``RELAY_DIAL_TIMEOUT`` → ``--dial-timeout``) except secrets, which are read from
the environment only so they never show up in a process list.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .server.app import RelayApp

from .config import (
    SETTINGS,
    ConfigError,
    RelayConfig,
    Setting,
    coerce_setting,
    deprecation_warning,
    load_config,
)
from .ops.logs import configure_logging

log = logging.getLogger("relay")

#: What a flag's value looks like in ``--help``, where its type alone would not say.
METAVARS: dict[str, str] = {
    "api_keys": "USER:SHA256,...",
    "allowed_origins": "ORIGIN,...",
    "browser_refusals": "{http,close}",
    "store": "URL",
    "upstream_url": "URL",
    "upstream_auth": "{header,subprotocol}",
    "model": "MODEL",
    "models": "MODEL,...",
    "host": "HOST",
    "port": "PORT",
    "tls_cert": "FILE",
    "tls_key": "FILE",
    "jwt_public_key": "PEM",
    "overload_cpu": "SHARE",
    "overload_behind": "SHARE",
    "shed_cpu": "SHARE",
    "shed_behind": "SHARE",
    "log_format": "{auto,json,text}",
    "log_level": "{debug,info,warning,error}",
    "voice": "VOICE",
    "binary_frames": "{audio,reject}",
    "safety_identifier": "{hash,off}",
}
_KIND_METAVARS = {"int": "N", "float": "SECONDS", "tuple[str, ...]": "A,B,..."}


def metavar(setting: Setting) -> str:
    """The flag's value in ``--help``: named where its type alone would not say what it is."""
    if setting.name in METAVARS:
        return METAVARS[setting.name]
    if setting.name.endswith("_bytes"):
        return "BYTES"
    return _KIND_METAVARS.get(setting.kind, "TEXT")


def _add_setting_flags(parser: argparse.ArgumentParser, *, only: Sequence[str] = ()) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file (RELAY_CONFIG)")
    for setting in SETTINGS:
        if setting.secret or (only and setting.name not in only):
            continue
        default = setting.shown_default().replace("`", "").removeprefix("(").removesuffix(")")
        help_text = f"{setting.help} (default: {default}) [{setting.env}]".replace("%", "%%")
        if setting.is_flag:
            parser.add_argument(
                setting.flag, dest=setting.name, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(
                setting.flag, dest=setting.name, metavar=metavar(setting), help=help_text
            )


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
    parser.add_argument("--version", action="version", version=f"relay {_version()}")
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
    usage.add_argument(
        "--store",
        metavar="URL",
        help="store URL (default: RELAY_STORE, else usage.db in the state directory)",
    )
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")

    keygen = commands.add_parser(
        "keygen",
        help="make a client API key and the RELAY_API_KEYS entry that accepts it",
        description="Print a new client API key (give it to the client) and its"
        " RELAY_API_KEYS entry (give that to the relay; it holds only a hash).",
    )
    keygen.add_argument("user", help="the user this key authenticates")

    sip_caller = commands.add_parser(
        "sip-caller",
        help="make the RELAY_SIP_CALLERS entry that lets a phone number's SIP calls in",
        description="Print the RELAY_SIP_CALLERS entry of a phone number: the user and the"
        " number's HMAC under RELAY_SIP_CALLER_KEY (read from the environment).",
    )
    sip_caller.add_argument("user", help="the user the number's calls are accounted to")
    sip_caller.add_argument("number", help="the caller's number, e.g. +14155550123")

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
        nargs="?",
        help="audio to say: WAV at any rate, mono or stereo, PCM 8/16/24/32-bit, float,"
        " G.711 mu-law or A-law (default: a bundled sample, \"Hello, can you hear me?\")",
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
    call = commands.add_parser(
        "call",
        help="play a WAV file as a phone call through the relay's Twilio route",
        description="Play a WAV file as a phone call through the relay's /twilio route, as"
        " Twilio would (signed with RELAY_TWILIO_AUTH_TOKEN, else relay demo's): print the"
        " transcripts, latency and barge-ins, and write what the caller heard."
        " Exit status: 0 when a reply was heard, 1 if the call failed, 2 if the input file"
        " cannot be used.",
    )
    call.add_argument(
        "input",
        metavar="INPUT.wav",
        nargs="?",
        help="what the caller says: WAV, any format relay talk takes (default: the bundled sample)",
    )
    call.add_argument(
        "-o",
        "--output",
        metavar="OUT.wav",
        default="call.wav",
        help="where to write what the caller heard, 8 kHz mono PCM16 (default call.wav)",
    )
    call.add_argument(
        "--url",
        default="http://127.0.0.1:8000",
        help="the relay's base URL; its voice webhook is URL/twilio/voice"
        " (default http://127.0.0.1:8000)",
    )
    call.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up if no reply was heard after this long (default 60)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return _run(args, dict(os.environ))
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        status = _start_failure(exc)
        if status is None:
            raise
        return status


def _start_failure(exc: BaseException) -> int | None:
    """Print a settings or start-up error as the one line it is; its exit status (None: the
    exception is not one). Trio's nurseries wrap what their tasks raise: look inside."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, ConfigError):
        status = 2
    else:
        from hypercorn.utils import LifespanFailureError

        from .server.serve import CannotStart

        # (LifespanFailureError: the app's start-up failed, e.g. its store, or RELAY_PUMP=on)
        if not isinstance(exc, CannotStart | LifespanFailureError):
            return None
        status = 1
    print(f"relay: {exc}", file=sys.stderr)
    return status


def _run(args: argparse.Namespace, environ: dict[str, str]) -> int:
    if args.command == "serve":
        from .server.signals import catch_early, ignore

        catch_early()  # a stop signal from here on drains and exits 0
        config = _config_from(args, environ)
        configure_logging(config.log_format, config.log_level, secrets=config.secrets)
        if warning := deprecation_warning(config):
            log.warning(warning)
        if not config.openai_api_key:
            raise ConfigError(
                "OPENAI_API_KEY is not set: the relay needs it to open upstream sessions."
                " Export it, or try `relay demo` to run against the bundled fake."
            )
        if config.workers > 1:
            from .server.workers import serve_workers

            return serve_workers(config, preflight=_check_upstream)
        from .server.app import create_app

        app = create_app(config)  # (it checks the client auth settings first)
        _check_upstream(config)
        trio.run(_serve, config, app)
        ignore()
    elif args.command == "usage":
        overrides = {"store": args.store} if args.store else {}
        config = load_config(environ, overrides)
        print(trio.run(_usage_report, config.store, args.day, args.user, args.json))
    elif args.command == "keygen":
        from .usage.auth import hash_key, new_api_key

        key = new_api_key()
        print(f"client key (give it to {args.user}): {key}")
        print(f"RELAY_API_KEYS entry (give it to the relay): {args.user}:{hash_key(key)}")
    elif args.command == "sip-caller":
        from .usage.sip import caller_digest, normalise

        key = environ.get("RELAY_SIP_CALLER_KEY", "")
        if len(key.encode()) < 16:
            raise ConfigError(
                "set RELAY_SIP_CALLER_KEY (at least 16 bytes; the relay needs the same) to"
                " make an entry, e.g. RELAY_SIP_CALLER_KEY=$(python -c 'import secrets;"
                " print(secrets.token_urlsafe(32))')"
            )
        if not normalise(args.number).lstrip("+"):
            raise ConfigError(f"{args.number!r} has no digits: give a phone number")
        print(f"RELAY_SIP_CALLERS entry: {args.user}:{caller_digest(key, args.number)}")
    elif args.command == "demo":
        from .server.demo import check_demo_host
        from .server.signals import catch_early, ignore

        catch_early()
        check_demo_host(args.host, args.allow_anonymous)
        # Hypercorn's "Running on http://…" would come before the page's URL and say it again.
        logging.getLogger("hypercorn.error").setLevel(logging.WARNING)
        trio.run(_demo, args.host, args.port, args.allow_anonymous, args.tls)
        ignore()
    elif args.command == "talk":
        from .clients.talk import run as run_talk

        return run_talk(args)
    elif args.command == "call":
        from .clients.call import run as run_call

        return run_call(args)
    return 0


def _check_upstream(config: RelayConfig) -> None:
    """Stop (CannotStart) unless the upstream answers; then say where the usage store is."""
    from .server.serve import check_upstream

    trio.run(check_upstream, config)
    print(f"relay: usage store {_store_shown(config.store)}", flush=True)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relay")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _store_shown(url: str) -> str:
    """Where the usage store is, for the start-up line (a Redis password stays out)."""
    if url == "sqlite:///:memory:":
        return "in memory (gone at exit)"
    if url.startswith("sqlite:///"):
        return url.removeprefix("sqlite:///")
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"redis://{parts.hostname}:{parts.port or 6379}{parts.path}"


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
        url = demo.relay_url
        lines = [
            f"open {demo.http_url}/ in a browser and press Connect",
            f"relay on {url}/voice and {url}/v1/realtime?model={demo.config.model}",
            f"upstream is the offline fake on {demo.mock.url}"
            " (made-up transcripts, replies in milliseconds; no key, no cost)",
            f"phone calls: relay call IN.wav --url {demo.http_url}",
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
