"""`relay serve --workers 2` as deployed: two processes on one port, scraped as one relay."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families

from mockrealtime import MockConfig, serve_mock_realtime

from .harness import TEST_KEY, connect
from .test_demo import events_until

TIMEOUT = 60
#: Sessions opened before looking where they landed; more follow (up to MAX_SESSIONS)
#: until both workers hold some.
SESSIONS = 8
MAX_SESSIONS = 40
#: Client messages each session sends.
MESSAGES = 3
#: Seconds for scrapes to agree: a worker publishes its live traffic every second.
AGREE_SECONDS = 10


class ProcessLog:
    """The JSON lines a process (and its children) write to stderr, read as they come."""

    def __init__(self, stderr: trio.abc.ReceiveStream) -> None:
        self._stderr = stderr
        self.raw = b""
        self.entries: list[dict] = []
        self._grew = trio.Event()

    async def read(self) -> None:
        """Collect lines until the stream closes."""
        buffered = b""
        while chunk := await self._stderr.receive_some(65536):
            self.raw += chunk
            buffered += chunk
            *lines, buffered = buffered.split(b"\n")
            self.entries += [orjson.loads(line) for line in lines if line.startswith(b"{")]
            self._grew.set()
            self._grew = trio.Event()

    async def until(self, done: Callable[[], bool]) -> None:
        """Wait for lines until ``done()`` holds (the caller bounds the wait)."""
        while not done():
            await self._grew.wait()

    def pids(self, msg: str) -> set[int]:
        """The processes that logged a line starting with ``msg``."""
        return {entry["pid"] for entry in self.entries if entry["msg"].startswith(msg)}

    def count(self, msg: str) -> int:
        return sum(entry["msg"] == msg for entry in self.entries)


class Workers:
    """A running `relay serve --workers 2` and what it has logged so far."""

    def __init__(self, proc: trio.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.http_url = url.replace("ws", "http", 1)
        self.log = ProcessLog(proc.stderr)

    async def scrape(self) -> dict[tuple[str, tuple], float]:
        return await scrape(self.http_url)


async def scrape(
    http_url: str, verify: ssl.SSLContext | bool = True
) -> dict[tuple[str, tuple], float]:
    """One scrape on a new connection, so it lands on whichever worker accepts it."""
    async with httpx.AsyncClient(base_url=http_url, verify=verify) as http:
        text = (await http.get("/metrics")).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[Workers]:
    async with trio.open_nursery() as nursery:
        mock = await nursery.start(serve_mock_realtime, MockConfig(api_keys=frozenset({TEST_KEY})))
        env = dict(
            os.environ, OPENAI_API_KEY=TEST_KEY, RELAY_LOG_FORMAT="json", TMPDIR=str(tmp_path)
        )
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        proc = await nursery.start(partial(
            trio.run_process,
            [sys.executable, "-m", "relay", "serve", "--allow-anonymous", "--workers", "2",
             "--port", "0", "--upstream-url", mock.url, "--store", "sqlite:///:memory:",
             "--drain-seconds", "1", "--overload-cpu", "0", "--overload-lag", "0",
             "--shed-cpu", "0", "--shed-lag", "0"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False,
        ))  # fmt: skip
        workers: Workers | None = None
        try:
            buffered = b""
            while b"listening on" not in buffered:
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, "relay serve exited before listening"
                buffered += chunk
            found = re.search(rb"2 workers listening on (ws://127\.0\.0\.1:\d+)/voice", buffered)
            assert found, buffered
            workers = Workers(proc, found.group(1).decode())
            nursery.start_soon(workers.log.read)
            await workers.log.until(lambda: len(workers.log.pids("Running on")) == 2)
            yield workers
        finally:
            if proc.returncode is None:
                proc.kill()
            with trio.move_on_after(5, shield=True):  # also when the test timed out
                await proc.wait()
            if workers is not None:
                stop_workers(workers.log.pids("Running on"))
        nursery.cancel_scope.cancel()


def stop_workers(pids: set[int]) -> None:
    """Kill workers a failed test left behind (they outlive a parent that died)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # gone, as it should be


def metrics_dirs(tmp_path: Path) -> list[Path]:
    return list(tmp_path.glob("relay-metrics-*"))


async def test_metrics_of_two_workers_on_one_port_add_up_to_the_whole_relay(tmp_path: Path) -> None:
    started = ("relay_sessions_started_total", ())
    active = ("relay_sessions_active", ())
    sent = ("relay_messages_total", (("direction", "client_to_upstream"),))
    ended = ("relay_sessions_ended_total", (("cause", "client_closed"), ("client_code", "none")))
    with trio.fail_after(TIMEOUT):
        async with two_workers(tmp_path) as relay:
            assert len(metrics_dirs(tmp_path)) == 1  # the parent's, in TMPDIR
            leave = trio.Event()

            async def session(task_status: trio.TaskStatus[None]) -> None:
                async with connect(relay.url + "/voice") as ws:
                    await events_until(ws, "session.created")
                    for _ in range(MESSAGES):
                        await ws.send_message('{"type":"input_audio_buffer.clear"}')
                    for _ in range(MESSAGES):
                        await events_until(ws, "input_audio_buffer.cleared")
                    task_status.started()
                    await leave.wait()

            async with trio.open_nursery() as clients:
                opened = 0
                while opened < SESSIONS or len(relay.log.pids("session started")) < 2:
                    assert opened < MAX_SESSIONS, "every session landed on one worker"
                    await clients.start(session)
                    opened += 1
                    await relay.log.until(lambda n=opened: relay.log.count("session started") == n)
                # Each worker alone holds fewer than `opened` sessions, so a scrape showing all
                # of them has summed both. Scrapes land on either worker, so several in a row
                # must agree. (That a worker publishes its live traffic every second without
                # being scraped is test_metrics.py's to check: here a scrape of each would do.)
                await agree(
                    relay.scrape, (started, active, sent), (opened, opened, opened * MESSAGES)
                )
                leave.set()

            await agree(
                relay.scrape, (started, active, ended, sent), (opened, 0, opened, opened * MESSAGES)
            )
            relay.proc.terminate()
            assert await relay.proc.wait() == 0
    assert metrics_dirs(tmp_path) == []  # removed at exit


async def test_sessions_are_spread_evenly_over_the_workers_and_fill_where_others_ended(
    tmp_path: Path,
) -> None:
    """Every session lands on the worker holding fewer connections (the kernel's hash would
    spread them at random), so one worker's ended sessions are replaced on that worker."""
    with trio.fail_after(TIMEOUT):
        async with two_workers(tmp_path) as relay, trio.open_nursery() as clients:
            held: list[tuple[int, trio.Event]] = []  # each open session: its worker, its end

            async def session(leave: trio.Event, task_status: trio.TaskStatus[None]) -> None:
                async with connect(relay.url + "/voice") as ws:
                    await events_until(ws, "session.created")
                    task_status.started()
                    await leave.wait()

            async def open_sessions(n: int) -> None:
                for _ in range(n):
                    leave = trio.Event()
                    await clients.start(session, leave)
                    opened = relay.log.count("session started")
                    await relay.log.until(lambda n=opened: relay.log.count("session started") == n)
                    pid = [e for e in relay.log.entries if e["msg"] == "session started"][-1]["pid"]
                    held.append((pid, leave))

            def per_worker() -> list[int]:
                return sorted(Counter(pid for pid, leave in held if not leave.is_set()).values())

            await open_sessions(12)
            assert per_worker() == [6, 6]
            first = held[0][0]
            for pid, leave in held:
                if pid == first:
                    leave.set()
            await relay.log.until(lambda: relay.log.count("session ended") == 6)
            await open_sessions(6)
            assert [pid for pid, _ in held[12:]] == [first] * 6
            assert per_worker() == [6, 6]
            for _, leave in held:
                leave.set()


async def test_workers_exit_when_relay_serve_is_killed(tmp_path: Path) -> None:
    """A parent killed outright (SIGKILL, OOM) cannot pass a signal on: the kernel sends each
    worker SIGTERM, so it drains (or, not yet serving, just ends) instead of serving on alone."""
    with trio.fail_after(TIMEOUT):
        async with two_workers(tmp_path) as relay:
            pids = relay.log.pids("Running on")
            relay.proc.kill()
            await relay.proc.wait()
            with trio.fail_after(10):
                while any(_running(pid) for pid in pids):  # not our children: no wait() for them
                    await trio.sleep(0.05)


async def test_when_a_worker_dies_the_other_takes_every_new_connection(tmp_path: Path) -> None:
    """The survivor accepts from the shared socket alone, and leaves nothing to the dead one."""
    with trio.fail_after(TIMEOUT):
        async with two_workers(tmp_path) as relay:
            victim, survivor = sorted(relay.log.pids("Running on"))
            os.kill(victim, signal.SIGKILL)
            # Until relay serve has reaped it, and so marked it gone (not our child, so no
            # wait() for it here).
            while Path(f"/proc/{victim}").exists():
                await trio.sleep(0.01)
            for n in range(20):
                with trio.fail_after(5):
                    async with connect(relay.url + "/voice") as ws:
                        await events_until(ws, "session.created")
                await relay.log.until(lambda n=n: relay.log.count("session ended") == n + 1)
            assert relay.log.pids("session started") == {survivor}


def _running(pid: int) -> bool:
    """Whether a process that nobody may reap (its parent died) has yet to exit."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False  # gone
    return state != "Z"


async def agree(
    scraped: Callable[[], Awaitable[dict]], keys: tuple, expected: tuple, times: int = 6
) -> None:
    """Scrape until ``times`` scrapes in a row show ``expected``, for up to AGREE_SECONDS."""
    in_a_row, seen = 0, None
    with trio.move_on_after(AGREE_SECONDS):
        while in_a_row < times:
            samples = await scraped()
            seen = tuple(samples.get(key) for key in keys)
            in_a_row = in_a_row + 1 if seen == expected else 0
            if in_a_row == 0:
                await trio.sleep(0.05)
    assert in_a_row == times, f"{keys}: the last scrape showed {seen}, not {expected}"


async def test_workers_are_forked_from_the_parent_so_they_serve_without_importing_again(
    tmp_path: Path,
) -> None:
    """A spawned worker imports the relay again (a quarter of a second each, before the first
    session) and shares none of the parent's pages; a forked one has the parent's command line."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("no /proc here to read the workers' command lines from")
    with trio.fail_after(TIMEOUT):
        async with two_workers(tmp_path) as relay:
            parent = Path(f"/proc/{relay.proc.pid}/cmdline").read_bytes()
            for pid in relay.log.pids("Running on"):
                assert Path(f"/proc/{pid}/cmdline").read_bytes() == parent
            relay.proc.terminate()
            assert await relay.proc.wait() == 0
