"""A private ``redis-server`` on a free loopback port for tests, and the store fixtures.

No system service is used; tests that need Redis skip, naming the missing binary,
where it is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_MISSING = "redis-server not installed: apt-get install redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A redis-server subprocess on loopback, its data in ``directory``, killed on :meth:`stop`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start on ``port`` (or a free one, retried if another process takes it first)."""
        for _attempt in range(5):
            self.port = port or free_port()
            log = (self.directory / "redis.log").open("ab")
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            log.close()
            if self._wait_ready():
                return
        log_text = (self.directory / "redis.log").read_text()
        raise RuntimeError(f"redis-server did not start: {log_text}")

    def _wait_ready(self) -> bool:
        """Poll (bounded) until the server answers PING; False if it exited."""
        assert self.process is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if self.command("PING") == b"+PONG":
                    return True
            except OSError:
                pass
            time.sleep(0.01)
        self.stop()
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def command(self, *args: str) -> bytes:
        """Send one command; the first line of the reply."""
        request = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(request)
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        return reply.strip()

    def stop(self, *, save: bool = False) -> None:
        if self.process is None:
            return
        if save and self.process.poll() is None:
            self.command("SHUTDOWN", "SAVE")
        else:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip(REDIS_MISSING)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server for one test that restarts it."""
    if shutil.which("redis-server") is None:
        pytest.skip(REDIS_MISSING)
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty store; every store opened on it shares its data."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.db'}"
    server: RedisServer = request.getfixturevalue("redis_server")
    assert server.command("FLUSHALL") == b"+OK"
    return server.url
