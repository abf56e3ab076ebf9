"""The first hour on the command line: what `relay` prints, and how it says what went wrong.

Each failure a newcomer meets first (a port in use, no key, an upstream out of reach) is one
line on stderr that says what to do, and a non-zero exit; `--help` names what each flag takes
and its default; the usage store lives in a state directory, never in the working directory.
"""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest
import trio

from mockrealtime import MockConfig, MockServer, serve_mock_realtime
from relay.cli import main
from relay.config import SETTINGS, load_config

from .harness import TEST_KEY, closed_port_url

ROOT = Path(__file__).parents[2]
TIMEOUT = 30


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a newcomer's shell: no relay settings, a home of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_", "XDG_"))}
    env["HOME"] = str(tmp_path / "home")
    env.update(extra)
    return env


async def relay(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """``python -m relay ARGS`` to its end (each of these exits by itself)."""
    return await trio.run_process(
        [sys.executable, "-m", "relay", *args],
        env=env,
        cwd=cwd,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


@contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@asynccontextmanager
async def mock() -> AsyncIterator[MockServer]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
        nursery.cancel_scope.cancel()


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert len(text.strip().splitlines()) == 1, text
    assert "Traceback" not in text
    return text.strip()


# -- failures: one line each ---------------------------------------------------------------------


async def test_a_busy_port_is_one_line_from_relay_demo(tmp_path: Path) -> None:
    with busy_port() as port, trio.fail_after(TIMEOUT):
        result = await relay(["demo", "--port", str(port)], clean_env(tmp_path))
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"relay: cannot listen on 127.0.0.1:{port}: the port is in use")
    assert "--port" in line


async def test_a_busy_port_is_one_line_from_relay_serve(tmp_path: Path) -> None:
    with busy_port() as port, trio.fail_after(TIMEOUT):
        async with mock() as fake:
            env = clean_env(tmp_path, OPENAI_API_KEY=TEST_KEY, RELAY_UPSTREAM_URL=fake.url)
            for workers in ("1", "2"):
                args = ["serve", "--allow-anonymous", "--port", str(port), "--workers", workers]
                result = await relay(args, env)
                assert result.returncode == 1, workers
                assert "the port is in use" in one_line(result.stderr), workers


async def test_an_unreachable_upstream_is_one_line_and_stops_relay_serve(tmp_path: Path) -> None:
    url = closed_port_url()
    env = clean_env(tmp_path, OPENAI_API_KEY=TEST_KEY, RELAY_UPSTREAM_URL=url)
    with trio.fail_after(TIMEOUT):
        result = await relay(["serve", "--allow-anonymous", "--port", "0"], env)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"relay: cannot reach the upstream {url} (connection refused).")
    assert "RELAY_UPSTREAM_URL" in line
    assert TEST_KEY not in line


async def test_a_missing_key_is_one_line(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        result = await relay(["serve", "--allow-anonymous", "--port", "0"], clean_env(tmp_path))
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "OPENAI_API_KEY is not set" in line and "relay demo" in line


# -- the state directory ---------------------------------------------------------------------------


def test_the_default_store_is_in_the_xdg_state_directory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = load_config({"XDG_STATE_HOME": str(state), "HOME": str(tmp_path / "home")})
    assert config.store == f"sqlite:///{state}/relay/usage.db"


@pytest.mark.parametrize("xdg", [None, "", "relative/state"])
def test_without_an_absolute_xdg_state_home_it_is_under_home(tmp_path: Path, xdg: str | None) -> None:
    environ = {"HOME": str(tmp_path)} | ({} if xdg is None else {"XDG_STATE_HOME": xdg})
    assert load_config(environ).store == f"sqlite:///{tmp_path}/.local/state/relay/usage.db"


def test_a_store_that_is_set_is_kept(tmp_path: Path) -> None:
    environ = {"XDG_STATE_HOME": str(tmp_path), "RELAY_STORE": "sqlite:///here.db"}
    assert load_config(environ).store == "sqlite:///here.db"
    assert load_config(environ, {"store": "redis://r:6379/0"}).store == "redis://r:6379/0"


async def test_relay_serve_keeps_its_store_in_the_state_directory_and_says_where(
    tmp_path: Path,
) -> None:
    """Started in a working directory, it leaves nothing there and prints where the store is."""
    work = tmp_path / "work"
    work.mkdir()
    async with mock() as fake:
        env = clean_env(tmp_path, OPENAI_API_KEY=TEST_KEY, RELAY_UPSTREAM_URL=fake.url)
        with trio.fail_after(TIMEOUT):
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "relay", "serve", "--allow-anonymous", "--port", "0"],
                env=env,
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert process.stdout is not None
            out = b""
            try:
                while b"listening on" not in out:
                    chunk = await process.stdout.receive_some(4096)
                    assert chunk, f"relay serve exited: {out.decode()}"
                    out += chunk
            finally:
                process.terminate()
                await process.wait()
                await process.stdout.aclose()
    store = tmp_path / "home" / ".local" / "state" / "relay" / "usage.db"
    assert f"relay: usage store {store}\n" in out.decode()
    assert store.is_file()
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("name", ["usage.db", "relay-usage.db", "usage.db-wal", "usage.db-shm"])
def test_git_ignores_sqlite_files(name: str) -> None:
    patterns = (ROOT / ".gitignore").read_text().split()
    assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


# -- help and version ----------------------------------------------------------------------------


def test_help_names_what_each_flag_takes_and_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "VALUE" not in text
    # argparse wraps the help; one option's text runs until the next option.
    options = dict(re.findall(r"^  (--[a-z-]+)(.*?)(?=^  -|\Z)", text, re.M | re.S))
    for setting in SETTINGS:
        if setting.secret:
            continue
        help_text = " ".join(options[setting.flag].split())
        assert "(default: " in help_text, setting.flag
        assert f"[{setting.env}]" in help_text, setting.flag
    assert options["--port"].split()[0] == "PORT"
    assert options["--dial-timeout"].split()[0] == "SECONDS"
    assert "(default: 10)" in " ".join(options["--dial-timeout"].split())
    assert "(default: 127.0.0.1)" in " ".join(options["--host"].split())
    assert options["--allow-anonymous"].split()[0] != "TEXT"  # a switch takes no value


def test_relay_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"relay {version('relay')}"
