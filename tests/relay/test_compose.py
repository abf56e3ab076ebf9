"""compose.yaml and the Dockerfile, checked without a Docker engine.

The files are parsed, every command line goes through the real argument parser,
every RELAY_* name must be a real setting, and the ports and URLs that tie the
services together must agree. Then the very command lines the files give are
started as processes on loopback (ports swapped for free ones, the Redis store
kept when a ``redis-server`` binary is at hand, else SQLite) and a text turn goes
through them; the health checks are run as the engine would run them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import trio
import yaml

from mockrealtime.cli import build_parser as mock_parser
from relay.cli import _config_from
from relay.cli import build_parser as relay_parser
from relay.config import SETTINGS, RelayConfig, load_config

from .harness import connect

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_TEXT = (ROOT / "compose.yaml").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)
SERVICES: dict[str, Any] = COMPOSE["services"]
#: Starting both processes and a turn takes a few seconds; this bounds a hang.
TIMEOUT = 60


# -- reading the Dockerfile ------------------------------------------------------------------


def final_stage() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's last stage, continuations joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [
        (match.group(1).upper(), match.group(2).strip())
        for match in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.MULTILINE)
    ]
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def instruction(name: str) -> str:
    [args] = [args for instr, args in final_stage() if instr == name]
    return args


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def image_cmd() -> list[str]:
    return exec_form(instruction("CMD"))


def image_healthcheck() -> list[str]:
    options, _, command = instruction("HEALTHCHECK").partition("CMD ")
    assert all(option.startswith("--") for option in options.split()), options
    return exec_form(command)


# -- reading compose.yaml ----------------------------------------------------------------------


def command(service: str) -> list[str]:
    """What the service runs: its own command, else the image's CMD."""
    return list(SERVICES[service].get("command") or image_cmd())


def healthcheck(service: str) -> list[str]:
    test = SERVICES[service]["healthcheck"]["test"]
    assert test[0] == "CMD", f"{service}: use the exec form, not a shell"
    return list(test[1:])


def interpolate(value: str, shell: Mapping[str, str]) -> str:
    """What compose makes of ``${NAME:-default}`` and ``${NAME}`` given the shell's variables."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        return shell.get(name) or (default or "")

    assert "$" not in re.sub(r"\$\{(\w+)(:-([^}]*))?\}", "", value), f"unsupported form: {value}"
    return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", substitute, value)


def environment(service: str, shell: Mapping[str, str] | None = None) -> dict[str, str]:
    """The service's environment as compose passes it, run from a shell with ``shell``'s
    variables set (none by default: what a fresh checkout gets)."""
    env = SERVICES[service].get("environment", {})
    assert isinstance(env, dict), "write environment as a mapping"
    return {str(k): interpolate(str(v), shell or {}) for k, v in env.items()}


def relay_config(
    env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None
) -> RelayConfig:
    """The config `relay serve` builds from the compose environment and its command line."""
    argv = list(argv or command("relay"))
    args = relay_parser().parse_args(argv[1:])
    return _config_from(args, dict(env if env is not None else environment("relay")))


def mock_port(argv: Sequence[str] | None = None) -> int:
    argv = list(argv or command("mock"))
    return int(mock_parser().parse_args(argv[1:]).port)


def swap(argv: Sequence[str], flag: str, value: str) -> list[str]:
    """argv with ``flag``'s value replaced (or the flag added)."""
    out = list(argv)
    if flag in out:
        out[out.index(flag) + 1] = value
    else:
        out += [flag, value]
    return out


# -- the files, statically -----------------------------------------------------------------------


def test_compose_runs_relay_mock_and_redis_each_with_a_healthcheck() -> None:
    # ... and the operator's view next to them (tests/relay/test_dashboard.py)
    assert set(SERVICES) == {"relay", "mock", "redis", "prometheus", "grafana", "jaeger"}
    assert SERVICES["redis"]["image"].startswith("redis:7")
    for name in SERVICES:
        assert healthcheck(name), name
    assert SERVICES["relay"]["build"] == SERVICES["mock"]["build"] == "."
    assert SERVICES["relay"]["image"] == SERVICES["mock"]["image"], "one image for both"


def test_the_relay_starts_only_once_the_mock_and_redis_are_healthy() -> None:
    assert SERVICES["relay"]["depends_on"] == {
        "mock": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_every_command_is_an_installed_script_and_parses_with_its_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    relay_argv, mock_argv = command("relay"), command("mock")
    assert relay_argv[:2] == ["relay", "serve"]
    assert mock_argv[:2] == ["mockrealtime", "serve"]
    for argv in (relay_argv, mock_argv):
        assert argv[0] in scripts
    relay_args = relay_parser().parse_args(relay_argv[1:])
    mock_args = mock_parser().parse_args(mock_argv[1:])
    assert relay_args.command == mock_args.command == "serve"
    assert mock_args.host == "0.0.0.0", "the mock must listen beyond its own loopback"


def test_every_relay_variable_in_compose_is_a_real_setting_and_loads() -> None:
    known = {setting.env for setting in SETTINGS}
    env = environment("relay")
    assert set(env) <= known, set(env) - known
    config = load_config(env)
    assert config.openai_api_key, "relay serve refuses to start without OPENAI_API_KEY"
    assert config.allow_anonymous, "the dev stack has no client auth configured"
    served = relay_config()
    assert served.host == "0.0.0.0"


def test_the_key_and_the_upstream_come_from_the_shell_for_the_real_api() -> None:
    real = load_config({}).upstream_url  # the default: the OpenAI Realtime API
    shell = {"OPENAI_API_KEY": "sk-from-the-shell", "RELAY_UPSTREAM_URL": real}
    config = relay_config(environment("relay", shell))
    assert (config.openai_api_key, config.upstream_url) == ("sk-from-the-shell", real)
    # What the comment at the top says to run is that very setting.
    [line] = [
        line for line in COMPOSE_TEXT.splitlines() if "docker compose up" in line and "=" in line
    ]
    assert f"RELAY_UPSTREAM_URL={real} " in line and "OPENAI_API_KEY=" in line


def test_compose_and_the_readme_agree_on_the_real_apis_url() -> None:
    readme = (ROOT / "README.md").read_text()
    real = load_config({}).upstream_url
    assert f"RELAY_UPSTREAM_URL={real} " in readme  # the compose line, as the README gives it
    assert "RELAY_UPSTREAM_URL" in readme.split("## Against the real API", 1)[1]


def test_the_relay_dials_the_mock_on_the_port_it_listens_on() -> None:
    upstream = urlsplit(relay_config().upstream_url)
    assert (upstream.scheme, upstream.hostname, upstream.path) == ("ws", "mock", "/v1/realtime")
    assert upstream.port == mock_port()
    [mock_url] = [arg for arg in healthcheck("mock") if "/healthz" in arg]
    assert f"http://127.0.0.1:{mock_port()}/healthz" in mock_url


def test_the_stop_grace_period_covers_the_relays_drain() -> None:
    config = relay_config()
    grace = SERVICES["relay"]["stop_grace_period"]
    assert grace.endswith("s")
    # The drain, then close handshakes, then Hypercorn's own graceful timeout.
    assert float(grace[:-1]) >= config.drain_seconds + config.close_timeout + 3


def test_the_store_is_the_redis_service() -> None:
    store = urlsplit(relay_config().store)
    assert (store.scheme, store.hostname, store.port or 6379) == ("redis", "redis", 6379)


def test_the_published_port_is_the_relays_port_on_loopback_only() -> None:
    port = relay_config().port
    [published] = SERVICES["relay"]["ports"]
    host_ip, host_port, container_port = str(published).split(":")
    assert host_ip == "127.0.0.1"
    assert int(container_port) == port
    assert int(host_port) == 8000
    assert instruction("EXPOSE") == str(port)
    for service in ("mock", "redis"):
        assert "ports" not in SERVICES[service], f"{service} is internal"
    for service in ("prometheus", "grafana", "jaeger"):
        for published in SERVICES[service]["ports"]:
            assert str(published).startswith("127.0.0.1:"), f"{service} on loopback only"


def test_the_image_runs_the_relay_unprivileged_and_checks_healthz() -> None:
    assert instruction("USER") not in ("root", "0", "")
    assert image_cmd()[:2] == ["relay", "serve"]
    check = image_healthcheck()
    assert check[:2] == ["python", "-c"]
    assert "/healthz" in check[2] and "RELAY_PORT" in check[2]
    assert healthcheck("relay") == check, "compose and the image check the relay the same way"


def test_the_images_usage_store_is_in_its_data_volume() -> None:
    """The default store is in the state directory, which the image puts in /data."""
    env = dict(re.findall(r"(\w+)=(\S+)", instruction("ENV")))
    assert instruction("WORKDIR") == "/data"
    assert load_config(env).store == "sqlite:////data/relay/usage.db"


def test_the_image_is_built_with_a_pinned_uv_from_the_lock_without_dev_dependencies() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"COPY --from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ /uv /uvx /bin/", text)
    assert "uv sync --frozen --no-dev" in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".venv", ".git", "tests"):
        assert path in ignored


# -- the files, run ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def installed(argv: Sequence[str]) -> list[str]:
    """argv with its script resolved in this test's environment (as PATH does in the image)."""
    found = shutil.which(
        argv[0],
        path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    assert found, f"{argv[0]} is not installed"
    return [found, *argv[1:]]


async def read_until(process: trio.Process, marker: bytes) -> bytes:
    """The process's stdout up to the line holding ``marker``; fails if it exits first."""
    assert process.stdout is not None
    seen = b""
    while marker not in seen:
        chunk = await process.stdout.receive_some(4096)
        if not chunk:
            raise AssertionError(
                f"exited before printing {marker!r}: {seen.decode(errors='replace')}"
            )
        seen += chunk
    return seen


@asynccontextmanager
async def started(
    argv: Sequence[str], marker: bytes, env: Mapping[str, str], log: Path
) -> AsyncIterator[trio.Process]:
    """Run ``argv`` until the block ends, once it printed ``marker``; then SIGTERM, else kill."""
    with log.open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            env=dict(env),
        )
    try:
        await read_until(process, marker)
        yield process
        process.send_signal(signal.SIGTERM)
        with trio.move_on_after(15):
            await process.wait()
        if process.returncode != 0:
            output = await trio.Path(log).read_text()
            raise AssertionError(f"{argv[0]} did not stop cleanly on SIGTERM: {output}")
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def health(check: Sequence[str], env: Mapping[str, str]) -> int:
    """Run a health check command as the engine would: its exit status."""
    result = await trio.run_process(
        installed(check), env=dict(env), check=False, capture_stderr=True
    )
    return result.returncode


async def events_until(ws: Any, last: str) -> list[dict[str, Any]]:
    events = []
    while True:
        events.append(orjson.loads(await ws.get_message()))
        if events[-1]["type"] == last:
            return events


async def text_turn(url: str) -> str:
    """Say hello in text through the relay at ``url``; the reply's status."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
    async with connect(url) as ws:
        opening = await events_until(ws, "session.created")
        assert [e["type"] for e in opening] == ["session.created"]
        await ws.send_message(
            orjson.dumps({"type": "conversation.item.create", "item": item}).decode()
        )
        await ws.send_message('{"type":"response.create"}')
        reply = await events_until(ws, "response.done")
        return str(reply[-1]["response"]["status"])


@asynccontextmanager
async def store(tmp_path: Path) -> AsyncIterator[str]:
    """The compose store, Redis (a private server on loopback) if installed, else SQLite."""
    if shutil.which("redis-server") is None:
        yield f"sqlite:///{tmp_path / 'usage.db'}"
        return
    port = free_port()
    redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]  # fmt: skip
    ready = b"Ready to accept connections"
    async with started(redis, ready, os.environ, tmp_path / "redis.log"):
        yield f"redis://127.0.0.1:{port}/0"


async def test_the_compose_command_lines_serve_a_text_turn(tmp_path: Path) -> None:
    mock_listen, relay_listen = free_port(), free_port()
    compose_mock_port = mock_port()
    mock_argv = swap(swap(command("mock"), "--host", "127.0.0.1"), "--port", str(mock_listen))
    relay_argv = swap(command("relay"), "--host", "127.0.0.1")

    upstream = urlsplit(environment("relay")["RELAY_UPSTREAM_URL"])
    env = dict(os.environ)
    env.update(environment("relay"))
    env["RELAY_UPSTREAM_URL"] = urlunsplit(upstream._replace(netloc=f"127.0.0.1:{mock_listen}"))
    env["RELAY_PORT"] = str(relay_listen)
    env.pop("RELAY_CONFIG", None)
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)  # the jaeger service is not run here
    mock_check = [
        arg.replace(f":{compose_mock_port}/", f":{mock_listen}/") for arg in healthcheck("mock")
    ]

    with trio.fail_after(TIMEOUT):
        async with store(tmp_path) as store_url:
            env["RELAY_STORE"] = store_url
            assert relay_config(env, relay_argv).port == relay_listen
            async with started(
                installed(mock_argv), b"listening", os.environ, tmp_path / "mock.log"
            ):
                assert await health(mock_check, os.environ) == 0
                async with started(
                    installed(relay_argv), b"listening", env, tmp_path / "relay.log"
                ):
                    assert await health(image_healthcheck(), env) == 0
                    assert await text_turn(f"ws://127.0.0.1:{relay_listen}/voice") == "completed"
                # The relay is gone: its health check must now fail, or it proves nothing.
                assert await health(image_healthcheck(), env) != 0
