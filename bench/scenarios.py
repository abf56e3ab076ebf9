"""The benchmark scenarios. Each returns one line of figures."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import random
import ssl
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass

from . import procs
from .wsclient import AudioFrames, Client, open_client

PATH = "/v1/realtime?model=gpt-realtime-2.1"
PERIOD = 0.020
"""Each streaming session sends one 20 ms audio chunk per PERIOD."""
SLOTS = 10
"""Sessions are spread over this many phases of PERIOD (one timer tick per phase)."""
CHUNK_BYTES = 4800
"""Audio bytes per message (100 ms of PCM16 at 24 kHz; sent every 20 ms, ~6.5 KB of JSON)."""
POOL_CHUNKS = 512
P99_LIMIT_MS = 60.0
CONNECT_CONCURRENCY = 64


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cores() -> int:
    return len(os.sched_getaffinity(0))


# --- targets -------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    headers: dict[str, str]
    pid: int | None = None
    """The relay's pid, when the target is the relay."""
    ssl: ssl.SSLContext | None = None


def relay_target(relay: procs.Server) -> Target:
    return Target("relay", relay.port, {}, relay.pid)


def direct_target(echo: procs.Server) -> Target:
    headers = {"Authorization": f"Bearer {procs.API_KEY}"}
    return Target("direct", echo.port, headers, ssl=procs.client_ssl(echo))


#: A 503 refusal (the relay shedding a burst of connects) is retried like a real client would.
RETRIES_ON_503 = 20
RETRY_DELAY = 0.2


async def open_many(
    target: Target, n: int, retried: list[int] | None = None
) -> tuple[list[Client], list[str]]:
    """Open ``n`` sessions (bounded concurrency); returns the ready ones and the failures.

    A session refused with HTTP 503 is retried after a pause, up to RETRIES_ON_503 times;
    ``retried`` (if given) gets one entry per retry.
    """
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)
    clients: list[Client] = []
    failures: list[str] = []

    async def one() -> None:
        for attempt in range(RETRIES_ON_503 + 1):
            async with gate:
                try:
                    clients.append(
                        await open_client(
                            procs.HOST,
                            target.port,
                            PATH,
                            target.headers,
                            ssl=target.ssl,
                        )
                    )
                    return
                except (OSError, ConnectionError, TimeoutError) as exc:
                    if " 503" not in str(exc) or attempt == RETRIES_ON_503:
                        failures.append(f"{type(exc).__name__}: {exc}"[:120])
                        return
            if retried is not None:
                retried.append(1)
            await asyncio.sleep(RETRY_DELAY)

    await asyncio.gather(*(one() for _ in range(n)))
    return clients, failures


async def close_many(clients: list[Client], within: float = 5.0) -> None:
    for c in clients:
        c.close()
    pending = [c.closed for c in clients if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=within)
    for c in clients:
        if c.transport is not None and not c.closed.done():
            c.transport.abort()


# --- figures -------------------------------------------------------------------------


def pct(sorted_values: list[int], p: float) -> int:
    if not sorted_values:
        return -1
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def ms(us: int) -> str:
    return f"{us / 1000:.1f}"


# --- audio ---------------------------------------------------------------------------

_POOL: list[bytes] = []


def audio_pool() -> list[bytes]:
    """Distinct base64 chunks of random PCM16 (no two alike, nothing compressible)."""
    if not _POOL:
        rng = random.Random(1234)
        for _ in range(POOL_CHUNKS):
            _POOL.append(base64.b64encode(rng.randbytes(CHUNK_BYTES)))
    return _POOL


# --- latency ---------------------------------------------------------------------------


#: Round trips per turn when the latency scenario alternates between relay and direct.
LATENCY_BLOCK = 100


async def latency(relay: procs.Server, echo: procs.Server, count: int = 3000) -> str:
    """Relay and direct round trips in alternating blocks, so that a drift of the machine
    (another process waking, a core changing speed) shows in both and not in their difference."""
    loop = asyncio.get_running_loop()
    targets = (direct_target(echo), relay_target(relay))
    clients = [
        await open_client(procs.HOST, t.port, PATH, t.headers, ssl=t.ssl)
        for t in targets
    ]
    figures: dict[str, list[int]] = {t.name: [] for t in targets}
    sent = 0

    async def trips(client: Client, n: int, into: list[int] | None) -> None:
        nonlocal sent
        for _ in range(n):
            message = b'{"type":"conversation.item.retrieve","item_id":"item_%08d"}' % sent
            sent += 1
            client.waiter = loop.create_future()
            t0 = time.perf_counter_ns()
            client.send(message)
            echoed = await asyncio.wait_for(client.waiter, 10)
            t1 = time.perf_counter_ns()
            if echoed != message:
                raise RuntimeError(f"unexpected echo {echoed[:100]!r}")
            if into is not None:
                into.append((t1 - t0) // 1000)

    try:
        for client in clients:
            client.request_mode()
            await trips(client, 200, None)  # warm-up, not counted
        progress(f"latency: {count} round trips each, relay and direct in turns of {LATENCY_BLOCK}")
        for done in range(0, count, LATENCY_BLOCK):
            for target, client in zip(targets, clients, strict=True):
                await trips(client, min(LATENCY_BLOCK, count - done), figures[target.name])
    finally:
        await close_many(clients)
    d, r = sorted(figures["direct"]), sorted(figures["relay"])

    def row(v: list[int]) -> str:
        return f"p50={pct(v, 50)} p90={pct(v, 90)} p99={pct(v, 99)} max={v[-1]}"

    return (
        f"latency: n={count} cores={cores()} µs relay {row(r)} | direct {row(d)} | "
        f"added p50={pct(r, 50) - pct(d, 50)} p90={pct(r, 90) - pct(d, 90)} "
        f"p99={pct(r, 99) - pct(d, 99)} "
        f"(targets: added p50<=150 p99<=1500)"
    )


# --- stream ------------------------------------------------------------------------


@dataclass
class StreamResult:
    target: str
    sessions: int
    connect_failures: int
    seconds: float
    sent: int
    received: int
    lost: int
    out_of_order: int
    closed_by_server: Counter[int | None]
    p50_us: int
    p99_us: int
    max_us: int
    max_lag_ms: float
    cpu: dict[str, float]
    peak_rss_kb: int = 0

    @property
    def ok(self) -> bool:
        return (
            self.connect_failures == 0
            and self.lost == 0
            and self.out_of_order == 0
            and not self.closed_by_server
            and self.received > 0
            and self.p99_us <= P99_LIMIT_MS * 1000
            # The generator kept its schedule: a chunk sent late is as late as a slow echo (a
            # late generator still reads, so its lag shows here, not in the round trips).
            and self.max_lag_ms <= P99_LIMIT_MS
        )

    def line(self) -> str:
        cpu = " ".join(f"{k}={v:.0f}%" for k, v in self.cpu.items())
        closed = (
            ",".join(f"{k}x{v}" for k, v in sorted(self.closed_by_server.items(), key=str)) or "0"
        )
        return (
            f"{self.target} N={self.sessions} {self.received / self.seconds:.0f} msg/s "
            f"(offered {self.sent / self.seconds:.0f}) "
            f"rtt p50={ms(self.p50_us)}ms p99={ms(self.p99_us)}ms "
            f"max={ms(self.max_us)}ms lost={self.lost} ooo={self.out_of_order} "
            f"connect_fail={self.connect_failures} closed={closed} cpu[{cpu}] "
            f"gen_lag_max={self.max_lag_ms:.1f}ms"
        )


async def stream_run(
    target: Target,
    n: int,
    seconds: float,
    *,
    warmup: float = 1.0,
    echo_pid: int | None = None,
    sample_rss: bool = False,
) -> StreamResult:
    loop = asyncio.get_running_loop()
    clients, failures = await open_many(target, n)
    frames = AudioFrames(audio_pool())
    for c in clients:
        c.stream_mode()
    groups = [clients[i::SLOTS] for i in range(SLOTS)]
    offsets = {id(c): (i * 37) % len(frames) for i, c in enumerate(clients)}
    tick = PERIOD / SLOTS
    warm_ticks = round(warmup / tick)
    total_ticks = warm_ticks + round(seconds / tick)
    t0 = loop.time() + 0.01
    max_lag = 0.0
    peak_rss = 0
    pids = {"gen": None, "relay": target.pid, "echo": echo_pid}
    cpu0: dict[str, float] = {}
    wall0 = 0.0
    perf = time.perf_counter_ns
    for k in range(total_ticks):
        due = t0 + k * tick
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
        else:
            if k >= warm_ticks:
                max_lag = max(max_lag, now - due)
            # Late: catch up, but let the loop read first. A generator that only sends while
            # behind stops reading its sockets, and the relay's writes to it then stall.
            await asyncio.sleep(0)
        if k == warm_ticks:
            for c in clients:
                c.stream.counted_from = c.stream.sent
            cpu0 = {
                name: (procs.cpu_seconds(pid) if pid else procs.self_cpu_seconds())
                for name, pid in pids.items()
                if name == "gen" or pid
            }
            wall0 = time.monotonic()
        if sample_rss and target.pid and k % 25 == 0:
            peak_rss = max(peak_rss, procs.rss_kb(target.pid))
        for c in groups[k % SLOTS]:
            s = c.stream
            if c.closed.done():
                continue
            c.send_audio(frames, (offsets[id(c)] + s.sent) % len(frames), s.sent, perf())
            s.sent += 1
    wall = time.monotonic() - wall0
    cpu = {
        name: 100
        * ((procs.cpu_seconds(pids[name]) if name != "gen" else procs.self_cpu_seconds()) - v)
        / wall
        for name, v in cpu0.items()
    }
    # drain: wait (bounded) for the echoes still in flight
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        if all(
            c.stream.received >= c.stream.sent - c.stream.counted_from or c.closed.done()
            for c in clients
        ):
            break
        await asyncio.sleep(0.02)
    if sample_rss and target.pid:
        peak_rss = max(peak_rss, procs.rss_kb(target.pid))
    closed_by_server = Counter(c.close_code for c in clients if c.closed.done())
    await close_many(clients)
    rtts = sorted(x for c in clients for x in c.stream.rtts_us)
    sent = sum(max(0, c.stream.sent - c.stream.counted_from) for c in clients)
    received = sum(c.stream.received for c in clients)
    return StreamResult(
        target=target.name,
        sessions=n,
        connect_failures=len(failures),
        seconds=seconds,
        sent=sent,
        received=received,
        lost=sent - received,
        out_of_order=sum(c.stream.out_of_order for c in clients),
        closed_by_server=closed_by_server,
        p50_us=pct(rtts, 50),
        p99_us=pct(rtts, 99),
        max_us=rtts[-1] if rtts else -1,
        max_lag_ms=max_lag * 1000,
        cpu=cpu,
        peak_rss_kb=peak_rss,
    )


async def stream(relay: procs.Server, echo: procs.Server, n: int, seconds: float = 10.0) -> str:
    progress(f"stream: {n} sessions through the relay for {seconds:.0f} s")
    result = await stream_run(relay_target(relay), n, seconds, echo_pid=echo.pid)
    return f"stream: cores={cores()} {result.line()}"


async def stream_direct(echo: procs.Server, n: int, seconds: float = 10.0) -> str:
    progress(f"stream: {n} sessions straight to the upstream for {seconds:.0f} s")
    result = await stream_run(direct_target(echo), n, seconds, echo_pid=echo.pid)
    return f"stream: cores={cores()} {result.line()}"


# --- capacity ------------------------------------------------------------------------


#: The search stops once the largest N that held and the smallest that failed are this close
#: (a share of the former).
PRECISION = 1 / 10
#: A run that misses the p99 or schedule limit by this factor or more is not run again.
FAR_OFF = 4


class Search:
    """The largest N that holds (p99 <= 60 ms, nothing lost, the generator on schedule) for
    one target: doubling from ``start``, then bisection to :data:`PRECISION`. :meth:`next_n`
    says what to try; :meth:`record` takes the outcome. Stepped by :func:`search_pair`."""

    def __init__(self, target: Target, *, start: int, cap: int = 4096) -> None:
        self.target = target
        self.good = 0  # largest N that held
        self.bad = 0  # smallest N that failed (0: none yet)
        self._n = start
        self._cap = cap

    def next_n(self) -> int | None:
        """The N to try next, or None when the search is done."""
        if not self.bad:
            return self._n if self._n <= self._cap else None
        if self.bad - self.good > max(1, int(self.good * PRECISION)):
            return (self.good + self.bad) // 2
        return None

    def record(self, n: int, result: StreamResult | None) -> None:
        """The outcome at ``n``: the passing run, or None if it failed."""
        if result is not None:
            self.good = n
            self._n = n * 2
        else:
            self.bad = n


async def capacity_run(
    target: Target, echo: procs.Server, n: int, seconds: float, label: str
) -> StreamResult:
    """One run of the capacity scenario at ``n``, its line on stderr after ``label``."""
    result = await stream_run(target, n, seconds, echo_pid=echo.pid)
    progress(f"{label} {target.name}: {result.line()} -> {'ok' if result.ok else 'FAIL'}")
    await asyncio.sleep(1.0)  # the relay's end-of-session work is not the next run's load
    return result


async def attempt(
    target: Target, echo: procs.Server, n: int, seconds: float
) -> StreamResult | None:
    """One run at ``n``; a failure is run again once (a neighbour's burst can fail a run),
    unless it missed by :data:`FAR_OFF` times a limit or more (such a run has not been seen to
    pass the second time, and the time is the bisection's). Returns the passing run, or None."""
    for _ in range(2):
        result = await capacity_run(target, echo, n, seconds, "capacity")
        if result.ok:
            return result
        if max(result.p99_us / 1000, result.max_lag_ms) >= FAR_OFF * P99_LIMIT_MS:
            return None
    return None


def failed(bad: int) -> str:
    return f" (fails at {bad})" if bad else "+ (never failed)"


async def search_pair(
    relay: procs.Server, echo: procs.Server, budget: float, seconds: float, start: int = 64
) -> tuple[Search, Search]:
    """Search the relay's and the direct capacity in turns, one run each, so that a drift of
    the machine over the minutes a search takes shows in both figures, not in their ratio."""
    deadline = time.monotonic() + budget
    searches = (
        Search(relay_target(relay), start=start),
        Search(direct_target(echo), start=start),
    )
    while time.monotonic() < deadline:
        stepped = False
        for search in searches:
            n = search.next_n()
            if n is not None and time.monotonic() < deadline:
                search.record(n, await attempt(search.target, echo, n, seconds))
                stepped = True
        if not stepped:
            break
    return searches


class Staircase:
    """Where one target's runs hold 71 % of the time, by Levitt's transformed up-down
    method: one step down after a run that fails, one step up after two in a row that hold.

    Near its edge a 4 s run holds or fails by the luck of a neighbour's burst, so the edge
    is a probability, not a number, and a bisection takes one draw of it at each N (one
    unlucky run early caps the search below the edge for good). The staircase keeps
    drawing around the edge and averages: the estimate is the mean of the N tried from its
    first turn on (or a later run), with the N it would try next. Until that turn it walks
    twice as fast (two steps at a time, up after every run that holds), to reach the edge
    sooner."""

    def __init__(self, target: Target, start: int, step: int) -> None:
        self.target = target
        self.n = start
        self.step = max(1, step)
        self.runs: list[StreamResult] = []  # in order; each knows its N and whether it held
        self._streak = 0
        self._direction = 0
        self._first_reversal: int | None = None

    def record(self, result: StreamResult) -> None:
        """The outcome of a run (at ``result.sessions``, the N :attr:`n` asked for)."""
        self.runs.append(result)
        walking = self._first_reversal is None
        if result.ok:
            self._streak += 1
            move = 1 if self._streak == 2 or walking else 0
        else:
            move = -1
        if not move:
            return
        self._streak = 0
        if walking and self._direction and move != self._direction:
            self._first_reversal = len(self.runs) - 1
            walking = False
        self._direction = move
        self.n = max(1, self.n + move * self.step * (2 if walking else 1))

    @property
    def settled_from(self) -> int:
        """The index of the run where the walk first turned (all runs if it never did)."""
        return self._first_reversal or 0

    def estimate(self, since: int) -> int:
        """The mean of the N tried from run ``since`` on, with the N it would try next."""
        return round(statistics.fmean([r.sessions for r in self.runs[since:]] + [self.n]))

    def best_near(self, n: int) -> StreamResult | None:
        """The run that held nearest ``n`` (for its CPU figures)."""
        held = (r for r in self.runs if r.ok)
        return min(held, key=lambda r: abs(r.sessions - n), default=None)

    def summary(self) -> str:
        held = sum(r.ok for r in self.runs)
        lo = min((r.sessions for r in self.runs), default=0)
        hi = max((r.sessions for r in self.runs), default=0)
        return f"{held}/{len(self.runs)} runs held, N {lo}-{hi} step {self.step}"


#: Runs of each target in the staircases (after the search that finds where to start them).
RUNS = 24
#: The staircase's step, as a share of the N the search found.
STEP = 1 / 25


async def capacity_figures(
    relay: procs.Server,
    echo: procs.Server,
    runs: int = RUNS,
    seconds: float = 4.0,
    search_budget: float = 180.0,
) -> tuple[int, str]:
    """The relay's and the direct capacity: a bisection finds roughly where each is, then
    a :class:`Staircase` for each, run in turns (one run each), measures it.

    This VM's speed drifts by 10-30 % over minutes: interleaved runs put the drift in both
    figures, not in their ratio, and both figures are the mean over the same runs (from the
    later of the two first turns on), so that neither is measured at another time than the
    other. ``runs=0`` stops after the bisection."""
    t0 = time.monotonic()
    r0, d0 = await search_pair(relay, echo, search_budget, seconds)
    progress(
        f"capacity search: relay N={r0.good}{failed(r0.bad)} direct N={d0.good}{failed(d0.bad)}"
    )
    if not runs:
        return r0.good, ""
    stairs = (
        Staircase(relay_target(relay), r0.good, round(r0.good * STEP)),
        Staircase(direct_target(echo), d0.good, round(d0.good * STEP)),
    )
    for k in range(runs):
        for stair in stairs:
            label = f"capacity {k + 1}/{runs}"
            stair.record(await capacity_run(stair.target, echo, stair.n, seconds, label))
    r, d = stairs
    since = max(r.settled_from, d.settled_from)
    rn, dn = r.estimate(since), d.estimate(since)
    # Cut, not rounded, so that no figure reads as a target it missed (44.96 % shows 44.9 %;
    # figures with an upper target are rounded up for the same reason).
    ratio = math.floor(1000 * rn / dn) / 10 if dn else 0.0
    times = math.floor(100 * dn / rn) / 100 if rn else 0.0
    r_run, d_run = r.best_near(rn), d.best_near(dn)
    line = (
        f"capacity: cores={cores()} p99<={P99_LIMIT_MS:.0f}ms lost=0 "
        f"relay N={rn} direct N={dn} relay/direct={ratio:.1f}% (target >=45%) "
        f"direct/relay={times:.2f}x (>=2x) mean of runs {since + 1}-{runs} "
        f"(relay {r.summary()}; direct {d.summary()}; search {r0.good}/{d0.good}) "
        f"gen_cpu_at_direct={d_run.cpu.get('gen', 0) if d_run else 0:.0f}% "
        f"relay_cpu_at_relay={r_run.cpu.get('relay', 0) if r_run else 0:.0f}% "
        f"measured in {time.monotonic() - t0:.0f}s"
    )
    return rn, line


async def capacity(relay: procs.Server, echo: procs.Server) -> str:
    return (await capacity_figures(relay, echo))[1]


# --- overload ------------------------------------------------------------------------


async def overload(relay: procs.Server, echo: procs.Server, n: int, seconds: float = 10.0) -> str:
    progress(f"overload: {n} sessions through the relay for {seconds:.0f} s")
    rss0 = procs.rss_kb(relay.pid)
    result = await stream_run(relay_target(relay), n, seconds, echo_pid=echo.pid, sample_rss=True)
    await asyncio.sleep(1.0)
    alive = relay.alive()
    after = procs.rss_kb(relay.pid) if alive else -1
    return (
        f"overload: cores={cores()} relay_up={'yes' if alive else 'NO'} "
        f"rss_before={rss0 // 1024}MB "
        f"rss_peak={result.peak_rss_kb // 1024}MB rss_after={after // 1024}MB {result.line()}"
    )


# --- idle ----------------------------------------------------------------------------


async def idle(relay: procs.Server, echo: procs.Server, n: int = 1000) -> str:
    target = relay_target(relay)
    warm, _ = await open_many(target, 10)
    await close_many(warm)
    await asyncio.sleep(0.5)
    before = procs.rss_kb(relay.pid)
    fds0 = procs.fd_count(relay.pid)
    progress(f"idle: opening {n} sessions through the relay")
    t0 = time.monotonic()
    retried: list[int] = []
    clients, failures = await open_many(target, n, retried)
    opened = time.monotonic() - t0
    await asyncio.sleep(1.0)
    after = procs.rss_kb(relay.pid)
    fds = procs.fd_count(relay.pid) - fds0
    still = sum(1 for c in clients if not c.closed.done())
    await close_many(clients)
    per = (after - before) / max(1, len(clients))
    return (
        f"idle: cores={cores()} N={n} open={len(clients)} failed={len(failures)} "
        f"retried_after_503={len(retried)} "
        f"still_open_after_1s={still} "
        f"relay rss {before // 1024}MB -> {after // 1024}MB = "
        f"{math.ceil(10 * per) / 10:.1f} kB/session (target <=40) "
        f"fds/session={fds / max(1, len(clients)):.1f} "
        f"opened in {opened:.1f}s ({len(clients) / opened:.0f}/s)"
    )


# --- coldstart -----------------------------------------------------------------------


async def coldstart(echo: procs.Server, runs: int = 5) -> str:
    totals: list[float] = []
    listens: list[float] = []
    for i in range(runs):
        t0 = time.perf_counter()
        relay = procs.spawn_relay(echo)
        try:
            await procs.wait_listening(relay)
            t_listen = time.perf_counter()
            client = await open_client(procs.HOST, relay.port, PATH, {})
            client.request_mode()
            client.waiter = asyncio.get_running_loop().create_future()
            client.send(b'{"type":"conversation.item.retrieve","item_id":"cold"}')
            await asyncio.wait_for(client.waiter, 10)
            t_done = time.perf_counter()
            await close_many([client])
        finally:
            relay.stop()
        totals.append((t_done - t0) * 1000)
        listens.append((t_listen - t0) * 1000)
        progress(
            f"coldstart run {i + 1}: listening {listens[-1]:.0f} ms, "
            f"first round trip {totals[-1]:.0f} ms"
        )
    return (
        f"coldstart: cores={cores()} runs={runs} start->first relayed round trip "
        f"median={math.ceil(statistics.median(totals))}ms min={min(totals):.0f} "
        f"max={max(totals):.0f} "
        f"(start->listening median={statistics.median(listens):.0f}ms) "
        f"(target <=700ms)"
    )


# --- connect -------------------------------------------------------------------------

#: mockrealtime's handshake latency in the connect scenario, seconds: TCP, TLS and the upgrade
#: to the Realtime API from a cloud region take 100-400 ms.
HANDSHAKE = 0.3
#: One new session every this many seconds, for each target.
CONNECT_EVERY = 0.1
#: Sessions per target in a turn; the targets take turns, so a drift of the machine shows in all.
CONNECT_BLOCK = 20
#: RELAY_WARM_POOL of the pooled relay (per worker): sessions come every CONNECT_EVERY and a
#: refill takes a handshake, so about three are out at once across the workers.
CONNECT_POOL = 4
#: A named user's client key for the pooled relay: under RELAY_SAFETY_IDENTIFIER=hash (the
#: default) its sessions carry its own identifier and cannot take pooled ones.
NAMED_KEY = "rk_bench-named-user-0123456789abcdefghij"


async def connect_times(target: Target, n: int, every: float) -> tuple[list[float], int]:
    """``n`` sessions, one begun every ``every`` s (each closed once it has its
    ``session.created``): ms from the TCP connect to ``session.created``, and the failures."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        t0 = time.perf_counter()
        try:
            client = await open_client(
                procs.HOST, target.port, PATH, target.headers, ssl=target.ssl
            )
        except (OSError, ConnectionError, TimeoutError):
            failed += 1
            return
        times.append((time.perf_counter() - t0) * 1000)
        await close_many([client])

    start = loop.time()
    tasks = []
    for k in range(n):
        if (wait := start + k * every - loop.time()) > 0:
            await asyncio.sleep(wait)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    return times, failed


async def relay_metric(relay: procs.Server, name: str) -> float:
    """The sum of a metric's samples (all labels, all workers) from the relay's /metrics."""
    reader, writer = await asyncio.open_connection(procs.HOST, relay.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    total = 0.0
    for line in body.decode(errors="replace").splitlines():
        head, _, value = line.rpartition(" ")
        if head == name or head.startswith(name + "{"):
            total += float(value)
    return total


async def connect(count: int = 200) -> str:
    """Time to ``session.created`` against mockrealtime with a HANDSHAKE-long upgrade: direct,
    through the relay, through the relay with its warm pool, and a named user's sessions
    through that relay (its own safety identifier: no pooled session fits)."""
    import hashlib

    mock = procs.start_mock(HANDSHAKE)
    relays: list[procs.Server] = []
    try:
        plain = await procs.start_relay(mock)
        relays.append(plain)
        named = f"bench:{hashlib.sha256(NAMED_KEY.encode()).hexdigest()}"
        pooled = await procs.start_relay(
            mock, {"RELAY_WARM_POOL": str(CONNECT_POOL), "RELAY_API_KEYS": named}
        )
        relays.append(pooled)
        full = CONNECT_POOL * procs.WORKERS
        deadline = time.monotonic() + 20
        while await relay_metric(pooled, "relay_warm_pool_sessions") < full:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the relay's warm pool did not fill to {full} within 20 s")
            await asyncio.sleep(0.1)
        targets = (
            Target("direct", mock.port, {"Authorization": f"Bearer {procs.API_KEY}"}),
            Target("relay", plain.port, {}, plain.pid),
            Target("relay+pool", pooled.port, {}, pooled.pid),
            Target("relay+pool named", pooled.port, {"Authorization": f"Bearer {NAMED_KEY}"}),
        )
        for target in targets:  # warm-up, not counted (the pool refills after)
            await connect_times(target, 3, 0.5)
        await asyncio.sleep(1.0)
        progress(
            f"connect: {count} sessions per target, one every {CONNECT_EVERY * 1000:.0f} ms, in"
            f" turns of {CONNECT_BLOCK}; mockrealtime's handshake takes {HANDSHAKE * 1000:.0f} ms"
        )
        figures: dict[str, list[float]] = {t.name: [] for t in targets}
        failures = Counter[str]()
        hits0 = await relay_metric(pooled, "relay_warm_pool_hits_total")
        misses0 = await relay_metric(pooled, "relay_warm_pool_misses_total")
        for done in range(0, count, CONNECT_BLOCK):
            for target in targets:
                times, failed = await connect_times(
                    target, min(CONNECT_BLOCK, count - done), CONNECT_EVERY
                )
                figures[target.name] += times
                failures[target.name] += failed
        hits = await relay_metric(pooled, "relay_warm_pool_hits_total") - hits0
        misses = await relay_metric(pooled, "relay_warm_pool_misses_total") - misses0
    finally:
        for relay in relays:
            relay.stop()
        mock.stop()

    def p50_p99(name: str) -> tuple[float, float]:
        v = sorted(figures[name]) or [math.nan]
        return statistics.median(v), v[min(len(v) - 1, max(0, math.ceil(0.99 * len(v)) - 1))]

    def row(name: str) -> str:
        p50, p99 = p50_p99(name)
        return f"{name} p50={p50:.1f} p99={p99:.1f} failed={failures[name]}"

    faster = p50_p99("relay+pool")[1] < p50_p99("direct")[0]
    return (
        f"connect: cores={cores()} n={count} per target, handshake={HANDSHAKE * 1000:.0f}ms,"
        f" pool={CONNECT_POOL}x{procs.WORKERS} workers; ms to session.created: "
        + " | ".join(row(t.name) for t in targets)
        + f" | pool hits={hits:.0f} misses={misses:.0f} (anonymous and named sessions)"
        + f" (target: relay+pool p99 < direct p50: {'yes' if faster else 'NO'})"
    )
