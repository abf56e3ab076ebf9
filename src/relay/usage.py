"""The usage and limits store: per-user daily counters and concurrency-slot leases.

Every relay instance that shares a store (one SQLite file, or one Redis) sees the
same counters and the same leases, so a per-user cap holds across instances. Two
backends implement :class:`UsageStore`:

- SQLite (``sqlite:///PATH``): the stdlib driver in a worker thread, one
  connection serialised by a ``CapacityLimiter(1)``, WAL mode. Instances on one
  host share the file; SQLite's file locks make each operation atomic.
- Redis (``redis://HOST:PORT/DB``) through coredis, which runs on trio
  (redis-py's asyncio client does not). Each operation is a single Lua script,
  so it is atomic however many instances share the server.

Leases expire on the store's clock rather than the server's, so instances sharing
a store should keep their clocks in sync (NTP); a skew of a second only moves an
expiry by a second. A session's lease is renewed while it lives and lapses on its
own if its instance dies, so a crash never keeps a slot taken for good.
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import trio

#: Every key the Redis backend writes starts with this.
REDIS_PREFIX: Final = "relay:"
#: A day's counters stay in Redis this long after its last update, long enough for
#: a monthly report; SQLite keeps everything (a row per user and day is small).
REDIS_DAY_TTL_SECONDS: Final = 40 * 86400
#: How long an SQLite operation waits for another process's lock before failing.
SQLITE_BUSY_TIMEOUT_SECONDS: Final = 10.0
#: How long opening a Redis store may take to reach the server.
REDIS_CONNECT_TIMEOUT_SECONDS: Final = 5.0


@dataclass(frozen=True)
class UsageDelta:
    """What happened in part of a session; every field is added to the user's day."""

    sessions: int = 0
    connected_seconds: float = 0.0
    client_messages: int = 0
    client_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_cached_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0


#: The counters, in column order; all are integers except connected_seconds.
COUNTERS: Final = tuple(f.name for f in fields(UsageDelta))
_FLOAT_COUNTERS: Final = frozenset({"connected_seconds"})
#: The counters a budget is charged with (cached tokens are a subset of input tokens).
TOKEN_COUNTERS: Final = (
    "input_text_tokens",
    "input_audio_tokens",
    "output_text_tokens",
    "output_audio_tokens",
)


@dataclass(frozen=True)
class UsageRow:
    """One user's totals for one UTC day."""

    day: str  # "YYYY-MM-DD" (UTC)
    user: str
    sessions: int = 0
    connected_seconds: float = 0.0
    client_messages: int = 0
    client_bytes: int = 0
    upstream_messages: int = 0
    upstream_bytes: int = 0
    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    input_cached_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Input text+audio plus output text+audio: what the daily budget counts."""
        return sum(getattr(self, name) for name in TOKEN_COUNTERS)


def _count(block: object, key: str) -> int | None:
    """A non-negative token count from a usage block, or None if absent or malformed."""
    value = block.get(key) if isinstance(block, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return int(value)


def usage_from_response_done(event: dict[str, Any]) -> UsageDelta:
    """The tokens of a Realtime ``response.done`` event (zeros when usage is null).

    Reads the GA ``response.usage`` block: ``input_token_details`` (text, audio,
    cached) and ``output_token_details`` (text, audio). Anything missing counts as
    zero, except that a side with no text/audio breakdown at all is charged its
    ``input_tokens``/``output_tokens`` as text, so a budget cannot be escaped by
    an upstream that leaves the details out. Image tokens are not counted.
    """
    response = event.get("response") if isinstance(event, dict) else None
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return UsageDelta()
    sides: dict[str, tuple[int, int]] = {}
    for side in ("input", "output"):
        details = usage.get(f"{side}_token_details")
        text, audio = _count(details, "text_tokens"), _count(details, "audio_tokens")
        if text is None and audio is None:
            text = _count(usage, f"{side}_tokens")
        sides[side] = (text or 0, audio or 0)
    return UsageDelta(
        input_text_tokens=sides["input"][0],
        input_audio_tokens=sides["input"][1],
        input_cached_tokens=_count(usage.get("input_token_details"), "cached_tokens") or 0,
        output_text_tokens=sides["output"][0],
        output_audio_tokens=sides["output"][1],
    )


class UsageStore(Protocol):
    """Daily usage counters and concurrency leases, shared by every relay instance on the store.

    Operations do I/O and have no timeouts of their own: callers bound them. A
    cancelled ``add`` may or may not have been applied (it is never half applied).
    """

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        """Add ``delta`` to the user's counters for ``day``, atomically."""
        ...

    async def tokens(self, user: str, day: str) -> int:
        """The user's total tokens so far on ``day`` (0 if nothing was recorded)."""
        ...

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        """The recorded rows, optionally of one day and/or one user, sorted by day then user."""
        ...

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        """Take one of the user's ``limit`` slots for ``lease_seconds``, or return False.

        Expired leases are dropped first. A session that already holds a live
        lease keeps it (renewed) and gets True.
        """
        ...

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        """Push a live lease's expiry to ``lease_seconds`` from now; an expired one stays gone."""
        ...

    async def release_slot(self, user: str, session_id: str) -> None:
        """Give the slot back (nothing happens if it is not held)."""
        ...

    async def aclose(self) -> None:
        """Close the store; closing twice is harmless, using it afterwards is an error."""
        ...


_ACCEPTED_FORMS: Final = (
    "sqlite:///PATH (a relative path, or sqlite:////absolute/path.db),"
    " sqlite:///:memory: (private, for tests), or redis://HOST[:PORT][/DB]"
)


def _bad_url(url: str, why: str) -> ValueError:
    shown = re.sub(r"//[^/@]*@", "//***@", url)  # never echo a password
    return ValueError(f"RELAY_STORE {shown!r}: {why}; it must be {_ACCEPTED_FORMS}")


def _check_slot_args(limit: int | None, lease_seconds: float) -> None:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be positive, got {lease_seconds}")


async def open_store(url: str, *, clock: Callable[[], float] = time.time) -> UsageStore:
    """Open the store ``url`` names (the ``RELAY_STORE`` setting); ``clock`` times leases.

    A malformed URL raises ValueError naming RELAY_STORE and the accepted forms.
    An SQLite file (and its schema) is created if missing. A Redis store answers
    a PING before this returns, or ConnectionError is raised.
    """
    if url.startswith("sqlite:"):
        if not url.startswith("sqlite:///"):
            raise _bad_url(url, "an SQLite URL has three slashes before the path")
        path = url.removeprefix("sqlite:///")
        if not path:
            raise _bad_url(url, "the SQLite path is empty")
        return await SqliteUsageStore.open(path, clock=clock)
    if url.startswith("redis:"):
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise _bad_url(url, str(exc)) from None
        if not url.startswith("redis://") or not parts.hostname:
            raise _bad_url(url, "the Redis host is missing")
        if parts.path not in ("", "/") and not re.fullmatch(r"/\d+", parts.path):
            raise _bad_url(url, "the Redis database must be a number")
        if parts.query or parts.fragment:
            raise _bad_url(url, "a Redis URL takes no query or fragment")
        where = f"{parts.hostname}:{port or 6379}"
        return await RedisUsageStore.open(url, where=where, clock=clock)
    raise _bad_url(url, "unknown scheme")


# --- SQLite ---------------------------------------------------------------------------------

_SQLITE_COLUMNS: Final = ",\n    ".join(
    f"{name} {'REAL' if name in _FLOAT_COUNTERS else 'INTEGER'} NOT NULL DEFAULT 0"
    for name in COUNTERS
)
_SQLITE_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    user TEXT NOT NULL,
    {_SQLITE_COLUMNS},
    PRIMARY KEY (day, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS slots (
    user TEXT NOT NULL,
    session_id TEXT NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (user, session_id)
) WITHOUT ROWID;
"""

_SQLITE_ADD: Final = (
    f"INSERT INTO usage (day, user, {', '.join(COUNTERS)})"
    f" VALUES (?, ?, {', '.join('?' for _ in COUNTERS)})"
    f" ON CONFLICT (day, user) DO UPDATE SET"
    f" {', '.join(f'{name} = {name} + excluded.{name}' for name in COUNTERS)}"
)


class SqliteUsageStore:
    """The embedded store: one SQLite connection, used from worker threads one call at a time.

    The connection is in autocommit mode: ``add`` is one upsert statement, and a
    slot is taken inside ``BEGIN IMMEDIATE``, which holds the file's write lock
    from the expiry sweep to the insert, so two processes can't both take the
    last slot. Calls are not abandoned on cancellation, so the connection is
    never used by two threads at once.
    """

    def __init__(self, connection: sqlite3.Connection, *, clock: Callable[[], float]) -> None:
        self._connection = connection
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._closed = False

    @classmethod
    async def open(cls, path: str, *, clock: Callable[[], float]) -> SqliteUsageStore:
        def connect() -> sqlite3.Connection:
            connection = sqlite3.connect(
                path,
                timeout=SQLITE_BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
            try:
                if path != ":memory:":
                    connection.execute("PRAGMA journal_mode = WAL")
                    # In WAL mode NORMAL survives an application crash; only a power cut can
                    # lose the last commits, which is fine for usage counters.
                    connection.execute("PRAGMA synchronous = NORMAL")
                connection.executescript(_SQLITE_SCHEMA)
            except BaseException:
                connection.close()
                raise
            return connection

        return cls(await trio.to_thread.run_sync(connect), clock=clock)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._closed:
            raise trio.ClosedResourceError("the usage store is closed")
        return await trio.to_thread.run_sync(fn, self._connection, limiter=self._limiter)

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        values = (day, user, *(getattr(delta, name) for name in COUNTERS))
        await self._run(lambda db: db.execute(_SQLITE_ADD, values))

    async def tokens(self, user: str, day: str) -> int:
        query = f"SELECT {' + '.join(TOKEN_COUNTERS)} FROM usage WHERE day = ? AND user = ?"
        row = await self._run(lambda db: db.execute(query, (day, user)).fetchone())
        return int(row[0]) if row else 0

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        query = (
            f"SELECT day, user, {', '.join(COUNTERS)} FROM usage"
            " WHERE (?1 IS NULL OR day = ?1) AND (?2 IS NULL OR user = ?2) ORDER BY day, user"
        )
        found = await self._run(lambda db: db.execute(query, (day, user)).fetchall())
        return [UsageRow(*row) for row in found]

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        _check_slot_args(limit, lease_seconds)
        now = self._clock()

        def acquire(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM slots WHERE user = ? AND expires <= ?", (user, now))
                held = db.execute(
                    "SELECT 1 FROM slots WHERE user = ? AND session_id = ?", (user, session_id)
                ).fetchone()
                query = "SELECT count(*) FROM slots WHERE user = ?"
                (live,) = db.execute(query, (user,)).fetchone()
                granted = bool(held) or live < limit
                if granted:
                    db.execute(
                        "INSERT INTO slots (user, session_id, expires) VALUES (?, ?, ?)"
                        " ON CONFLICT (user, session_id) DO UPDATE SET expires = excluded.expires",
                        (user, session_id, now + lease_seconds),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return granted

        return bool(await self._run(acquire))

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        _check_slot_args(None, lease_seconds)
        now = self._clock()
        await self._run(
            lambda db: db.execute(
                "UPDATE slots SET expires = ? WHERE user = ? AND session_id = ? AND expires > ?",
                (now + lease_seconds, user, session_id, now),
            )
        )

    async def release_slot(self, user: str, session_id: str) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM slots WHERE user = ? AND session_id = ?", (user, session_id)
            )
        )

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._connection.close, limiter=self._limiter)


# --- Redis ----------------------------------------------------------------------------------

# KEYS: the day's counter hash, the day's set of users, the set of days.
# ARGV: user, day, ttl, then (command, field, amount) triples.
_REDIS_ADD: Final = """
for i = 4, #ARGV, 3 do
    redis.call(ARGV[i], KEYS[1], ARGV[i + 1], ARGV[i + 2])
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[2])
for i = 1, 3 do
    redis.call('EXPIRE', KEYS[i], ARGV[3])
end
"""

# Shared by both slot scripts: drop expired leases, keep the key alive for as long as
# its longest lease (never shortening a TTL another lease needs).
_REDIS_SWEEP: Final = """
local function sweep(key, now)
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
end
local function keep(key, ttl)
    if redis.call('TTL', key) < ttl then
        redis.call('EXPIRE', key, ttl)
    end
end
"""

# KEYS: the user's lease set. ARGV: now, expiry, limit, session id, key ttl. Returns 1 or 0.
_REDIS_ACQUIRE: Final = (
    _REDIS_SWEEP
    + """
sweep(KEYS[1], ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[4])
        or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
    keep(KEYS[1], tonumber(ARGV[5]))
    return 1
end
return 0
"""
)

# KEYS: the user's lease set. ARGV: now, expiry, session id, key ttl.
_REDIS_RENEW: Final = (
    _REDIS_SWEEP
    + """
sweep(KEYS[1], ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', ARGV[2], ARGV[3]) == 1 then
    keep(KEYS[1], tonumber(ARGV[4]))
end
return 0
"""
)


class RedisUsageStore:
    """The shared store: Redis through coredis, every write one Lua script (atomic server-side).

    Keys: ``relay:usage:DAY:USER`` (a hash of counters), ``relay:usage-users:DAY``
    (the users with counters that day), ``relay:usage-days`` (the days), and
    ``relay:slots:USER`` (a sorted set of session ids scored by lease expiry).
    Day keys expire ``REDIS_DAY_TTL_SECONDS`` after their last update, a lease set
    some time after its longest lease.

    coredis's connection pool runs its connections' tasks in a task group that
    must stay open while the client is used. The store owns that group in a trio
    system task, so it can be opened and closed from any task, in any scope.
    """

    def __init__(self, client: Any, host: _PoolHost, *, clock: Callable[[], float]) -> None:
        self._client = client
        self._host = host
        self._clock = clock
        self._add_script = client.register_script(_REDIS_ADD)
        self._acquire_script = client.register_script(_REDIS_ACQUIRE)
        self._renew_script = client.register_script(_REDIS_RENEW)

    @classmethod
    async def open(cls, url: str, *, where: str, clock: Callable[[], float]) -> RedisUsageStore:
        import coredis  # only Redis stores need it
        import coredis.exceptions

        hostname, _, port = where.rpartition(":")
        try:
            # Reach the server before coredis does: its failed connects log a traceback
            # each and leave streams unclosed.
            with trio.fail_after(REDIS_CONNECT_TIMEOUT_SECONDS):
                probe = await trio.open_tcp_stream(hostname, int(port))
            await probe.aclose()
        except (OSError, trio.TooSlowError) as exc:
            raise ConnectionError(f"RELAY_STORE: cannot reach redis at {where}: {exc}") from exc
        client = coredis.Redis.from_url(url, decode_responses=True)
        host = await _PoolHost.start(client)
        try:
            with trio.fail_after(REDIS_CONNECT_TIMEOUT_SECONDS):
                await client.ping()
        except (coredis.exceptions.RedisError, trio.TooSlowError) as exc:
            await host.stop()
            raise ConnectionError(f"RELAY_STORE: cannot use redis at {where}: {exc}") from exc
        except BaseException:
            await host.stop()
            raise
        return cls(client, host, clock=clock)

    def _check_open(self) -> None:
        if self._host.stopped:
            raise trio.ClosedResourceError("the usage store is closed")

    @staticmethod
    def _usage_key(day: str, user: str) -> str:
        return f"{REDIS_PREFIX}usage:{day}:{user}"

    @staticmethod
    def _users_key(day: str) -> str:
        return f"{REDIS_PREFIX}usage-users:{day}"

    _DAYS_KEY: Final = f"{REDIS_PREFIX}usage-days"

    @staticmethod
    def _slots_key(user: str) -> str:
        return f"{REDIS_PREFIX}slots:{user}"

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        self._check_open()
        args: list[str | int | float] = [user, day, REDIS_DAY_TTL_SECONDS]
        for name in COUNTERS:
            amount = getattr(delta, name)
            if name in _FLOAT_COUNTERS:
                args += ["HINCRBYFLOAT", name, repr(float(amount))]
            else:
                args += ["HINCRBY", name, int(amount)]
        keys = [self._usage_key(day, user), self._users_key(day), self._DAYS_KEY]
        await self._add_script(keys=keys, args=args)

    async def tokens(self, user: str, day: str) -> int:
        self._check_open()
        values = await self._client.hmget(self._usage_key(day, user), list(TOKEN_COUNTERS))
        return sum(int(value) for value in values if value is not None)

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        self._check_open()
        days = [day] if day is not None else sorted(await self._client.smembers(self._DAYS_KEY))
        found: list[UsageRow] = []
        for each_day in days:
            users = sorted(await self._client.smembers(self._users_key(each_day)))
            if not users and day is None:
                # The day's keys have expired; forget the day too.
                await self._client.srem(self._DAYS_KEY, [each_day])
            for each_user in users:
                if user is not None and each_user != user:
                    continue
                counters = await self._client.hgetall(self._usage_key(each_day, each_user))
                if counters:
                    found.append(_row_from_hash(each_day, each_user, counters))
        return found

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        _check_slot_args(limit, lease_seconds)
        self._check_open()
        now = self._clock()
        granted = await self._acquire_script(
            keys=[self._slots_key(user)],
            args=[repr(now), repr(now + lease_seconds), limit, session_id, _key_ttl(lease_seconds)],
        )
        return bool(granted)

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        _check_slot_args(None, lease_seconds)
        self._check_open()
        now = self._clock()
        await self._renew_script(
            keys=[self._slots_key(user)],
            args=[repr(now), repr(now + lease_seconds), session_id, _key_ttl(lease_seconds)],
        )

    async def release_slot(self, user: str, session_id: str) -> None:
        self._check_open()
        await self._client.zrem(self._slots_key(user), [session_id])

    async def aclose(self) -> None:
        await self._host.stop()


def _key_ttl(lease_seconds: float) -> int:
    """A lease set outlives its longest lease by a minute (the clock may be a little off)."""
    return math.ceil(lease_seconds) + 60


def _row_from_hash(day: str, user: str, counters: dict[str, str]) -> UsageRow:
    values: dict[str, Any] = {}
    for name in COUNTERS:
        raw = counters.get(name, "0")
        values[name] = float(raw) if name in _FLOAT_COUNTERS else int(raw)
    return UsageRow(day, user, **values)


class _PoolHost:
    """Keeps a coredis client's pool open in a trio system task until :meth:`stop`."""

    def __init__(self) -> None:
        self._stop = trio.Event()
        self._done = trio.Event()
        self._ready = trio.Event()
        self._error: BaseException | None = None
        self.stopped = False

    @classmethod
    async def start(cls, client: Any) -> _PoolHost:
        host = cls()
        trio.lowlevel.spawn_system_task(host._run, client, name="relay.usage redis pool")
        await host._ready.wait()
        if host._error is not None:
            raise host._error
        return host

    async def _run(self, client: Any) -> None:
        try:
            async with client:
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:  # an error here would otherwise crash trio.run
            self._error = exc
        finally:
            self.stopped = True
            self._ready.set()
            self._done.set()

    async def stop(self) -> None:
        self.stopped = True
        self._stop.set()
        await self._done.wait()
