"""The Redis usage store (coredis): shared by any number of relay instances."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import coredis
import coredis.exceptions
from coredis.tokens import PureToken
import trio

from .store import COUNTERS, FLOAT_COUNTERS, TOKEN_COUNTERS, UsageDelta, UsageRow, check_slot_args

#: Every key this store writes starts with this.
REDIS_PREFIX: Final = "relay:"
#: A day's counters stay this long after its last update, long enough for a monthly
#: report (the SQLite store keeps everything: a row per user and day is small).
REDIS_DAY_TTL_SECONDS: Final = 40 * 86400
#: How long opening the store may take to reach the server.
REDIS_CONNECT_TIMEOUT_SECONDS: Final = 5.0

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
    (the users with counters that day), ``relay:usage-days`` (the days),
    ``relay:slots:USER`` (a sorted set of session ids scored by lease expiry), and
    ``relay:claims:KEY`` (a single-use token's claim, expiring with the token).
    Day keys expire ``REDIS_DAY_TTL_SECONDS`` after their last update, a lease set
    some time after its longest lease.

    coredis's connection pool runs its connections' tasks in a task group that
    must stay open while the client is used. The store owns that group in a trio
    system task, so it can be opened and closed from any task, in any scope.
    """

    def __init__(
        self, client: coredis.Redis[str], host: _PoolHost, *, clock: Callable[[], float]
    ) -> None:
        self._client = client
        self._host = host
        self._clock = clock
        self._add_script = client.register_script(_REDIS_ADD)
        self._acquire_script = client.register_script(_REDIS_ACQUIRE)
        self._renew_script = client.register_script(_REDIS_RENEW)

    @classmethod
    async def open(cls, url: str, *, where: str, clock: Callable[[], float]) -> RedisUsageStore:
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
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await host.stop()
            if isinstance(exc, coredis.exceptions.RedisError | trio.TooSlowError):
                raise ConnectionError(f"RELAY_STORE: cannot use redis at {where}: {exc}") from exc
            raise
        return cls(client, host, clock=clock)

    def _check_open(self) -> None:
        if self._host.stopped:
            why = f" (its connection pool failed: {self._host.error!r})" if self._host.error else ""
            raise trio.ClosedResourceError(f"the usage store is closed{why}")

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
            if name in FLOAT_COUNTERS:
                args += ["HINCRBYFLOAT", name, repr(float(amount))]
            else:
                args += ["HINCRBY", name, int(amount)]
        keys = [self._usage_key(day, user), self._users_key(day), self._DAYS_KEY]
        await self._add_script(keys=keys, args=args)

    async def tokens(self, user: str, day: str) -> int:
        self._check_open()
        values = await self._client.hmget(self._usage_key(day, user), list(TOKEN_COUNTERS))
        return sum(int(value) for value in values if value is not None)

    async def cost(self, user: str, day: str) -> int:
        self._check_open()
        value = await self._client.hget(self._usage_key(day, user), "cost_nanodollars")
        return int(value) if value is not None else 0

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
        check_slot_args(limit, lease_seconds)
        self._check_open()
        now = self._clock()
        granted: object = await self._acquire_script(
            keys=[self._slots_key(user)],
            args=[repr(now), repr(now + lease_seconds), limit, session_id, _key_ttl(lease_seconds)],
        )
        return granted == 1

    async def renew_slot(self, user: str, session_id: str, *, lease_seconds: float) -> None:
        check_slot_args(None, lease_seconds)
        self._check_open()
        now = self._clock()
        await self._renew_script(
            keys=[self._slots_key(user)],
            args=[repr(now), repr(now + lease_seconds), session_id, _key_ttl(lease_seconds)],
        )

    async def release_slot(self, user: str, session_id: str) -> None:
        self._check_open()
        await self._client.zrem(self._slots_key(user), [session_id])

    async def claim_once(self, key: str, *, ttl_seconds: float) -> bool:
        check_slot_args(None, ttl_seconds)
        self._check_open()
        claimed = await self._client.set(
            f"{REDIS_PREFIX}claims:{key}",
            "1",
            px=math.ceil(ttl_seconds * 1000),
            condition=PureToken.NX,
        )
        return bool(claimed)

    async def check(self) -> str | None:
        """Nothing to look at beyond what each operation meets (an error it raises)."""
        return None

    async def aclose(self) -> None:
        await self._host.stop()


def _key_ttl(lease_seconds: float) -> int:
    """A lease set outlives its longest lease by a minute (the clock may be a little off)."""
    return math.ceil(lease_seconds) + 60


def _row_from_hash(day: str, user: str, counters: dict[str, str]) -> UsageRow:
    values: dict[str, Any] = {}
    for name in COUNTERS:
        raw = counters.get(name, "0")
        values[name] = float(raw) if name in FLOAT_COUNTERS else int(raw)
    return UsageRow(day=day, user=user, **values)


class _PoolHost:
    """Keeps a coredis client's pool open in a trio system task until :meth:`stop`."""

    def __init__(self) -> None:
        self._stop = trio.Event()
        self._done = trio.Event()
        self._ready = trio.Event()
        self.error: BaseException | None = None
        self.stopped = False

    @classmethod
    async def start(cls, client: coredis.Redis[str]) -> _PoolHost:
        host = cls()
        trio.lowlevel.spawn_system_task(host._run, client, name="relay.usage redis pool")
        try:
            await host._ready.wait()
        except BaseException:
            host._stop.set()  # cancelled before the pool was up: don't leave it running
            raise
        if host.error is not None:
            raise host.error
        return host

    async def _run(self, client: coredis.Redis[str]) -> None:
        try:
            async with client:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:
            if isinstance(exc, trio.Cancelled):  # trio.run is ending
                raise
            self.error = exc  # raised from a system task, it would crash trio.run
        finally:
            self.stopped = True
            self._ready.set()
            self._done.set()

    async def stop(self) -> None:
        self.stopped = True
        self._stop.set()
        await self._done.wait()
