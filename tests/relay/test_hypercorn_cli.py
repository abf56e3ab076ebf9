"""docs/deployment.md's `hypercorn -k trio … 'relay.server.app:create_app()'` line, run as documented."""

from __future__ import annotations

import os
import re
import shlex
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
import trustme
from trio_websocket import WebSocketConnection

from mockrealtime import MockConfig, serve_mock_realtime
from relay.usage.auth import hash_key

from .harness import TEST_KEY, connect
from .test_demo import events_until
from .test_workers import ProcessLog, agree, scrape, stop_workers

TIMEOUT = 60
#: Seconds for a session's end to show in the log once its client has gone.
LOG_SECONDS = 10
#: Seconds Hypercorn may take to stop once it has no sessions.
STOP_SECONDS = 10
#: Sessions opened before looking where they landed, and the most opened for both
#: workers to hold some (Hypercorn's workers take connections unevenly).
SESSIONS = 8
MAX_SESSIONS = 60
CLIENT_KEY = "rk_test_client_key_abcdef"
README = (Path(__file__).parents[2] / "docs" / "deployment.md").read_text(encoding="utf-8")


def documented_line() -> tuple[list[str], list[str]]:
    """The Deployment section's hypercorn line: its environment names and its arguments."""
    block = re.search(
        r"```sh\n(OPENAI_API_KEY=\S+ RELAY_API_KEYS=\S+ hypercorn -k trio -w 2 .*?)\n```",
        README,
        re.S,
    )
    assert block, "the Deployment section's hypercorn line"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    split = words.index("hypercorn")
    return [word.split("=", 1)[0] for word in words[:split]], words[split + 1 :]


@dataclass
class Served:
    proc: trio.Process
    log: ProcessLog
    https_url: str
    wss_url: str
    client_context: ssl.SSLContext

    def session(self) -> AbstractAsyncContextManager[WebSocketConnection]:
        """A client session on /voice over wss, as the relay's user with the client key."""
        return connect(
            self.wss_url + "/voice",
            ssl_context=self.client_context,
            extra_headers=[(b"authorization", f"Bearer {CLIENT_KEY}".encode())],
        )


def worker_pids(log: ProcessLog) -> set[int]:
    """Hypercorn's workers, from its own lines (the relay's JSON ones may be missing)."""
    return {int(pid) for pid in re.findall(rb"\[(\d+)\] \[INFO\] Running on", log.raw)}


@asynccontextmanager
async def hypercorn_as_documented(
    tmp_path: Path, extra_env: Mapping[str, str] = {}
) -> AsyncIterator[Served]:
    """The line as the README gives it, but on loopback, with test certificates, an
    upstream of mockrealtime, a client key, and the store in memory."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    names, argv = documented_line()
    assert names == ["OPENAI_API_KEY", "RELAY_API_KEYS"]
    for flag, value in (
        ("--bind", "127.0.0.1:0"),
        ("--certfile", cert_file),
        ("--keyfile", key_file),
    ):
        argv[argv.index(flag) + 1] = str(value)
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
        env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("RELAY_", "PROMETHEUS_"))
        }
        env.update(
            OPENAI_API_KEY=TEST_KEY,
            RELAY_API_KEYS=f"alice:{hash_key(CLIENT_KEY)}",
            RELAY_UPSTREAM_URL=mock.url,
            RELAY_STORE="sqlite:///:memory:",
            # The load guard has its own tests; a busy test machine must not trip it here.
            RELAY_OVERLOAD_CPU="0", RELAY_OVERLOAD_LAG="0", RELAY_SHED_CPU="0", RELAY_SHED_LAG="0",
            **extra_env,
        )  # fmt: skip
        proc = await nursery.start(partial(
            trio.run_process, [sys.executable, "-m", "hypercorn", *argv],
            env=env, stderr=subprocess.PIPE, check=False,
        ))  # fmt: skip
        log = ProcessLog(proc.stderr)
        nursery.start_soon(log.read)
        try:
            running = re.compile(rb"Running on https://(127\.0\.0\.1:\d+) ")
            await log.until(lambda: running.search(log.raw) is not None)
            address = running.search(log.raw).group(1).decode()  # type: ignore[union-attr]
            yield Served(proc, log, f"https://{address}", f"wss://{address}", client_context)
        finally:
            # Hypercorn's workers outlive a parent that is killed, so stop it the polite way.
            with trio.move_on_after(STOP_SECONDS, shield=True):
                proc.send_signal(signal.SIGTERM)
                await proc.wait()
            stop_workers(worker_pids(log))
        assert proc.returncode == 0
        nursery.cancel_scope.cancel()


async def test_the_documented_hypercorn_line_serves_wss_and_logs_json_session_lines_without_secrets(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT):
        async with hypercorn_as_documented(tmp_path) as served:
            async with served.session() as ws:
                await events_until(ws, "session.created")
                await ws.send_message('{"type":"input_audio_buffer.clear"}')
                await events_until(ws, "input_audio_buffer.cleared")
            log = served.log
            with trio.move_on_after(LOG_SECONDS):
                await log.until(lambda: log.count("session ended") == 1)
            assert log.count("session ended") == 1, f"no JSON session line in {log.raw[-2000:]!r}"
    started = [entry for entry in log.entries if entry["msg"] == "session started"]
    ended = [entry for entry in log.entries if entry["msg"] == "session ended"]
    assert [entry["user"] for entry in started + ended] == ["alice", "alice"]
    assert ended[0]["logger"] == "relay" and ended[0]["client_messages"] == 1
    assert started[0]["session"] == ended[0]["session"]
    for secret in (TEST_KEY, CLIENT_KEY):
        assert secret.encode() not in log.raw


async def test_under_hypercorns_own_workers_a_shared_multiproc_dir_makes_metrics_whole(
    tmp_path: Path,
) -> None:
    """What the README tells Hypercorn's `-w` users to do for /metrics: with sessions on
    both workers, every scrape, whichever worker answers it, counts all of them."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    started = ("relay_sessions_started_total", ())
    active = ("relay_sessions_active", ())
    with trio.fail_after(TIMEOUT):
        async with (
            hypercorn_as_documented(
                tmp_path, {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
            ) as served,
            trio.open_nursery() as clients,
        ):
            leave = trio.Event()

            async def session(task_status: trio.TaskStatus[None]) -> None:
                async with served.session() as ws:
                    await events_until(ws, "session.created")
                    task_status.started()
                    await leave.wait()

            log, opened = served.log, 0
            while opened < SESSIONS or len(log.pids("session started")) < 2:
                assert opened < MAX_SESSIONS, "every session landed on one worker"
                await clients.start(session)
                opened += 1
                await log.until(lambda n=opened: log.count("session started") == n)
            # Each worker alone holds fewer than `opened`: a scrape showing all has summed both.
            await agree(
                partial(scrape, served.https_url, served.client_context),
                (started, active),
                (opened, opened),
            )
            leave.set()
