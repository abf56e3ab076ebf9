"""The processes under test: the echo upstream and the relay, started as subprocesses.

Both run with this interpreter (the project's virtualenv), so the pid is the server's
own (``uv run`` would put uv in between) and ``/proc/<pid>`` describes it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """A process and its children (``relay serve --workers N`` runs N worker processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # gone meanwhile
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return [pid, *children]


def rss_kb(pid: int) -> int:
    """VmRSS of a process and its children, in kB."""
    total = 0
    for one in tree(pid):
        try:
            for line in Path(f"/proc/{one}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process and its children have used so far."""
    total = 0
    for one in tree(pid):
        try:
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def fd_count(pid: int) -> int:
    """Open file descriptors of a process and its children."""
    return sum(len(os.listdir(f"/proc/{one}/fd")) for one in tree(pid))


def self_cpu_seconds() -> float:
    return time.process_time()


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


UPSTREAM_TLS = False
"""Whether the echo serves wss:// (a certificate from a throwaway test CA), as the real API
does: the relay dials it over TLS, and direct sessions speak TLS to it."""


def start_echo() -> Server:
    command = [sys.executable, "-m", "mockrealtime", "echo", "--port", "0"]
    extra: dict[str, str] = {}
    if UPSTREAM_TLS:
        import trustme  # a dev dependency, like uvloop

        workdir = Path(tempfile.mkdtemp(prefix="relay-bench-tls-"))
        ca = trustme.CA()
        cert = ca.issue_cert(HOST)
        cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "cert.pem"))
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
        command += ["--tls-cert", str(workdir / "cert.pem"), "--tls-key", str(workdir / "key.pem")]
        extra["ca"] = str(workdir / "ca.pem")
    return _started(command, "echo upstream", extra)


def _started(command: list[str], what: str, extra: dict[str, str] | None = None) -> Server:
    """Start a mockrealtime command and read the port from its "listening on ws…" line."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if "listening on ws" not in line:
        process.kill()
        raise RuntimeError(f"{what} did not start: {line!r}")
    port = urlsplit(line.split("listening on ", 1)[1].split()[0]).port
    assert port is not None
    return Server(process, port, extra=extra or {})


def start_mock(handshake_delay: float) -> Server:
    """``mockrealtime serve`` (the whole fake, not the echo), answering each WebSocket upgrade
    after ``handshake_delay`` seconds, as a distant Realtime API does."""
    command = [
        sys.executable, "-m", "mockrealtime", "serve", "--port", "0",
        "--handshake-delay", str(handshake_delay),
    ]  # fmt: skip
    return _started(command, "mockrealtime")


def client_ssl(echo: Server) -> ssl.SSLContext | None:
    """The context a direct session needs to speak to ``echo`` (None: plain)."""
    if "ca" not in echo.extra:
        return None
    return ssl.create_default_context(cafile=echo.extra["ca"])


#: ``relay serve --workers``: one event loop per core, as the relay is deployed.
WORKERS = os.cpu_count() or 1


def relay_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--allow-anonymous",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        str(WORKERS),
    ]


#: The relay's RELAY_PUMP (``--pump``).
PUMP = "auto"

RELAY_SRC: str | None = None
"""A directory holding another ``relay`` package to benchmark (e.g. a ``git archive`` of
an older commit's ``src``); None benchmarks the installed one."""


#: The relay's upstream key: as long as a real one (the relay looks for its key in upstream text
#: to redact it, and that search costs more the shorter the key).
API_KEY = "sk-bench-" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMN"


def relay_env(upstream_port: int, workdir: str, ca: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if RELAY_SRC:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (RELAY_SRC, env.get("PYTHONPATH")) if p)
    if ca is not None:
        env["SSL_CERT_FILE"] = ca  # the relay's default context trusts the test CA
    env.update(
        RELAY_UPSTREAM_URL=f"{'wss' if ca else 'ws'}://{HOST}:{upstream_port}/v1/realtime",
        RELAY_STORE=f"sqlite:///{workdir}/usage.db",
        OPENAI_API_KEY=API_KEY,
        RELAY_PUMP=PUMP,
    )
    return env


def spawn_relay(
    echo: Server, workdir: str | None = None, settings: dict[str, str] | None = None
) -> Server:
    """Start ``relay serve`` (with ``settings``, RELAY_* variables, on top of the bench's);
    returns at once (use :func:`wait_listening`)."""
    workdir = workdir or tempfile.mkdtemp(prefix="relay-bench-")
    port = free_port()
    log = Path(workdir) / "relay.log"
    env = relay_env(echo.port, workdir, echo.extra.get("ca"))
    env.update(settings or {})
    with log.open("ab") as out:
        process = subprocess.Popen(
            relay_command(port),
            env=env,
            stdout=out,
            stderr=out,
        )
    return Server(process, port, log, {"workdir": workdir})


async def wait_listening(server: Server, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while True:
        if not server.alive():
            tail = server.log.read_text()[-2000:] if server.log else ""
            raise RuntimeError(f"the relay exited ({server.process.returncode}):\n{tail}")
        try:
            _, writer = await asyncio.open_connection(HOST, server.port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.002)
            continue
        writer.close()
        return


async def wait_ready(server: Server, within: float = 30.0) -> None:
    """Until every worker serves: the parent listens before its workers have started, and a
    scenario measured meanwhile would share the cores with their start-up."""
    await wait_listening(server, within)
    deadline = time.monotonic() + within
    assert server.log is not None
    while server.log.read_bytes().count(b"Running on") < WORKERS:
        if not server.alive() or time.monotonic() > deadline:
            tail = server.log.read_text()[-2000:]
            raise RuntimeError(f"the relay's workers did not all start:\n{tail}")
        await asyncio.sleep(0.01)
    if PUMP != "off" and b"the pump is off" in server.log.read_bytes():
        print("bench: the relay runs without its pump (see its log): figures are pump=off's",
              file=sys.stderr, flush=True)  # fmt: skip


async def start_relay(echo: Server, settings: dict[str, str] | None = None) -> Server:
    server = spawn_relay(echo, settings=settings)
    await wait_ready(server)
    return server
