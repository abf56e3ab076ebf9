"""Command line: ``mockrealtime serve`` runs the fake Realtime API until Ctrl-C/SIGTERM."""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from typing import Any

import trio

from .faults import Faults
from .server import MockConfig, serve_mock_realtime

DEFAULT_PORT = 8765


def _close_spec(text: str) -> tuple[int, str]:
    code, sep, reason = text.partition(":")
    if not sep or not code.isdigit():
        raise argparse.ArgumentTypeError(f"expected CODE:REASON (e.g. 4001:bye), got {text!r}")
    return int(code), reason


def _tls_arguments(parser: argparse.ArgumentParser, effect: str) -> None:
    parser.add_argument("--tls-cert", metavar="FILE", help=f"certificate chain (PEM): {effect}")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")


def _tls_context(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> ssl.SSLContext | None:
    """The server TLS context of ``--tls-cert``/``--tls-key`` (None without them)."""
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not args.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        parser.error(f"cannot load the TLS certificate or key: {exc}")
    return context


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mockrealtime",
        description="An offline fake of the OpenAI Realtime API (WebSocket /v1/realtime and "
        "the REST client-secret endpoints) for tests, demos and benchmarks.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve until interrupted")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to bind, 0 for any free port (default {DEFAULT_PORT})",
    )
    serve.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted API key (repeatable); none given → any non-empty key",
    )
    serve.add_argument("--seed", type=int, default=0, help="seed for ids and replies (default 0)")
    serve.add_argument(
        "--pace",
        type=float,
        default=4.0,
        help="stream reply audio at N× real time; 0 = as fast as possible",
    )
    serve.add_argument(
        "--reject-beta",
        action="store_true",
        help="refuse the beta dialect like today's real server "
        "(error beta_api_shape_disabled, close 4000)",
    )
    serve.add_argument(
        "--max-session-seconds",
        type=float,
        default=3600.0,
        help="session length before the server closes it (default 3600)",
    )
    serve.add_argument(
        "--response-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="model 'thinking' time before each response's first delta",
    )
    serve.add_argument(
        "--reply-sentences",
        type=int,
        default=1,
        metavar="N",
        help="filler sentences after each reply's lead, ~1.5 s of audio each (default 1)",
    )
    serve.add_argument(
        "--obfuscation",
        action="store_true",
        help="add the GA 'obfuscation' padding field to delta events",
    )
    _tls_arguments(serve, "serve wss:// and https://")
    serve.add_argument(
        "--webhook-secret",
        default="",
        metavar="WHSEC",
        help="whsec_… secret that signs SIP calls' realtime.call.incoming webhooks"
        " (POST /mock/sip/incoming rings one)",
    )
    serve.add_argument(
        "--no-media",
        action="store_true",
        help="answer WebRTC offers with a stand-in SDP even when aiortc is installed",
    )
    serve.add_argument(
        "--ping-interval",
        type=float,
        default=20.0,
        help="seconds between server pings, 0 to disable (default 20)",
    )
    echo = commands.add_parser(
        "echo",
        help="serve a cheap echo upstream for benchmarks (handshake, session.created, "
        "session.updated, audio appends played back as output audio deltas, every other "
        "client message sent back unchanged)",
    )
    echo.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    echo.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port to bind, 0 for any free port (default {DEFAULT_PORT})",
    )
    _tls_arguments(echo, "serve wss://")
    echo.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="accepted API key (repeatable); none given → any non-empty key",
    )
    faults = serve.add_argument_group("fault injection (applies to every connection)")
    faults.add_argument(
        "--handshake-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait before answering the WebSocket upgrade",
    )
    faults.add_argument(
        "--refuse-status",
        type=int,
        default=None,
        metavar="HTTP_STATUS",
        help="answer the upgrade with this HTTP error status instead of 101",
    )
    faults.add_argument(
        "--close-after-open",
        type=_close_spec,
        default=None,
        metavar="CODE:REASON",
        help="send session.created, then close",
    )
    faults.add_argument(
        "--drop-after-events",
        type=int,
        default=None,
        metavar="N",
        help="drop TCP (no close frame) after sending N events",
    )
    faults.add_argument(
        "--stall", action="store_true", help="send session.created, then never read or send again"
    )
    faults.add_argument(
        "--send-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait before each server event",
    )
    faults.add_argument(
        "--inject-error-after",
        type=int,
        default=None,
        metavar="N",
        help="send a server_error event after the Nth client message",
    )
    faults.add_argument(
        "--transcription-failure",
        action="store_true",
        help="fail every input audio transcription "
        "(conversation.item.input_audio_transcription.failed)",
    )
    faults.description = (
        "Per connection, the request header x-mock-faults overrides these, "
        "e.g. 'x-mock-faults: drop_after_events=3, send_delay=0.01'."
    )
    return parser


async def _serve(
    config: MockConfig, host: str, port: int, ssl_context: ssl.SSLContext | None = None
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_mock_realtime, ssl_context=ssl_context), config, host, port
            )
            print(f"mockrealtime listening on {server.url} (REST: {server.http_url})", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError inside a (possibly nested) exception group, if that is all it holds."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        return _os_error(exc.exceptions[0])
    return None


def _echo(
    host: str, port: int, api_keys: frozenset[str], context: ssl.SSLContext | None = None
) -> int:
    import asyncio

    from .echo import serve_echo

    scheme = "ws" if context is None else "wss"

    async def run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)

        def started(_server: object, bound: int) -> None:
            url = f"{scheme}://{host}:{bound}/v1/realtime"
            print(f"mockrealtime echo listening on {url}", flush=True)

        await serve_echo(
            host, port, api_keys=api_keys, started=started, stop=stop, ssl_context=context
        )

    try:
        import uvloop  # a dev dependency: the echo costs less CPU on it

        loop_run: Callable[[Coroutine[Any, Any, None]], None] = uvloop.run
    except ImportError:  # pragma: no cover - depends on the environment
        loop_run = asyncio.run
    try:
        loop_run(run())
    except OSError as exc:
        print(f"mockrealtime: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    print("mockrealtime stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    context = _tls_context(parser, args)
    if args.command == "echo":
        return _echo(args.host, args.port, frozenset(args.api_key), context)
    try:
        faults = Faults(
            handshake_delay=args.handshake_delay,
            refuse_status=args.refuse_status,
            close_after_open=args.close_after_open,
            drop_after_events=args.drop_after_events,
            stall=args.stall,
            send_delay=args.send_delay,
            inject_error_after=args.inject_error_after,
            transcription_failure=args.transcription_failure,
        )
        config = MockConfig(
            api_keys=frozenset(args.api_key),
            seed=args.seed,
            pace=args.pace,
            reject_beta=args.reject_beta,
            faults=faults,
            max_session_seconds=args.max_session_seconds,
            ping_interval=args.ping_interval or None,
            record_messages=False,
            response_delay=args.response_delay,
            obfuscation=args.obfuscation,
            reply_sentences=args.reply_sentences,
            webhook_secret=args.webhook_secret,
            webrtc_media=not args.no_media,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        trio.run(_serve, config, args.host, args.port, context)
    except (OSError, BaseExceptionGroup) as exc:
        cause = _os_error(exc)
        if cause is None:
            raise
        print(f"mockrealtime: cannot listen on {args.host}:{args.port}: {cause}", file=sys.stderr)
        return 1
    print("mockrealtime stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
