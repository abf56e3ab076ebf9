"""The SQLite usage store: one file shared by the relay instances on one host.

The store keeps one connection open, so a file deleted or replaced under a running relay (a
clean-up job, a restored backup) would go on taking every record in the file it opened, which
no one else sees any more: no other instance shares its leases, and ``relay usage`` reads the
new file. So before every operation the store compares the file at its path with the one it
has open (device and inode: one ``stat``, in the worker thread); when they differ it logs an
error and opens the path again (creating the file and its schema if it is gone). The old
file's write-ahead log and shared-memory index are still at the path's ``-wal`` and ``-shm``
(SQLite leaves them when its file has moved) and would be replayed into the new file, so the
store removes them first, if they are still the ones it had open (another instance may have
opened the new file already). Where it cannot open the path (the directory is gone, say),
operations fail and :meth:`SqliteUsageStore.check` says why, which ``/readyz`` reports; the
next operation tries again.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio

from .store import COUNTERS, FLOAT_COUNTERS, TOKEN_COUNTERS, UsageDelta, UsageRow, check_slot_args

#: How long an operation waits for another process's lock before failing.
SQLITE_BUSY_TIMEOUT_SECONDS: Final = 10.0

log = logging.getLogger("relay")

_SQLITE_COLUMNS: Final = ",\n    ".join(
    f"{name} {'REAL' if name in FLOAT_COUNTERS else 'INTEGER'} NOT NULL DEFAULT 0"
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
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    expires REAL NOT NULL
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

    def __init__(
        self,
        connection: sqlite3.Connection,
        *,
        clock: Callable[[], float],
        path: str = ":memory:",
        files: dict[str, tuple[int, int] | None] | None = None,
    ) -> None:
        self._connection = connection
        self._clock = clock
        self._limiter = trio.CapacityLimiter(1)
        self._closed = False
        self._path = path
        # (device, inode) of the files open, by suffix ("": the database; -wal, -shm); {}: in
        # memory
        self._files = files or {}
        self._problem: str | None = None

    @classmethod
    async def open(cls, path: str, *, clock: Callable[[], float]) -> SqliteUsageStore:
        def connect() -> tuple[sqlite3.Connection, dict[str, tuple[int, int] | None]]:
            if path != ":memory:":  # the state directory, on a first start (not on a reopen:
                # a directory gone under a running relay is a fault to report, not to hide)
                Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            return _connect(path), _files_at(path)

        connection, files = await trio.to_thread.run_sync(connect)
        return cls(connection, clock=clock, path=path, files=files)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._closed:
            raise trio.ClosedResourceError("the usage store is closed")
        return await trio.to_thread.run_sync(self._on_the_file, fn, limiter=self._limiter)

    def _on_the_file(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` on the connection, reopened first if the file at the path changed (in the
        worker thread, holding the limiter)."""
        self._follow_the_file()
        if self._problem is not None:
            raise OSError(self._problem)
        return fn(self._connection)

    def _follow_the_file(self) -> None:
        if not self._files:
            return  # in memory
        now = _file_at(self._path)
        if now == self._files[""] and self._problem is None:
            return
        what = "deleted" if now is None else "replaced"
        if self._problem is None:
            log.error(
                "the usage store's file %s was %s while the relay ran: opening the path again"
                " (the other relay instances on it do the same on their next operation)",
                self._path,
                what,
            )
        try:
            # The old file's, not to be replayed into the new one. (Still open here, so no new
            # file can have their inode numbers; SQLite closes a moved file without them.)
            for suffix in ("-wal", "-shm"):
                if (ours := self._files.get(suffix)) and _file_at(self._path + suffix) == ours:
                    os.unlink(self._path + suffix)
            self._files = {"": self._files[""]}  # (not theirs to remove again, if this fails)
            self._connection.close()  # (its last records went into the file it had open)
            self._connection = _connect(self._path)
            self._files = _files_at(self._path)
        except (sqlite3.Error, OSError) as exc:
            problem = (
                f"the usage store's file {self._path} was {what} and cannot be opened again: {exc}"
            )
            if problem != self._problem:
                log.error("%s; usage is not recorded until it can", problem)
            self._problem = problem
            return
        if self._problem is not None:
            log.info("the usage store's file %s is open again", self._path)
        self._problem = None

    async def check(self) -> str | None:
        """Why the store cannot record usage now (None: it can); reopens a file that changed."""
        if self._closed:
            return "the usage store is closed"
        await trio.to_thread.run_sync(self._follow_the_file, limiter=self._limiter)
        return self._problem

    async def add(self, user: str, day: str, delta: UsageDelta) -> None:
        values = (day, user, *(getattr(delta, name) for name in COUNTERS))
        await self._run(lambda db: db.execute(_SQLITE_ADD, values))

    async def tokens(self, user: str, day: str) -> int:
        query = f"SELECT {' + '.join(TOKEN_COUNTERS)} FROM usage WHERE day = ? AND user = ?"
        row = await self._run(lambda db: db.execute(query, (day, user)).fetchone())
        return int(row[0]) if row else 0

    async def cost(self, user: str, day: str) -> int:
        query = "SELECT cost_nanodollars FROM usage WHERE day = ? AND user = ?"
        row = await self._run(lambda db: db.execute(query, (day, user)).fetchone())
        return int(row[0]) if row else 0

    async def rows(self, *, day: str | None = None, user: str | None = None) -> list[UsageRow]:
        query = (
            f"SELECT day, user, {', '.join(COUNTERS)} FROM usage"
            " WHERE (?1 IS NULL OR day = ?1) AND (?2 IS NULL OR user = ?2) ORDER BY day, user"
        )
        found = await self._run(lambda db: db.execute(query, (day, user)).fetchall())
        return [UsageRow(day=day, user=user, **dict(zip(COUNTERS, counters, strict=True))) for day, user, *counters in found]

    async def acquire_slot(
        self, user: str, session_id: str, *, limit: int, lease_seconds: float
    ) -> bool:
        check_slot_args(limit, lease_seconds)
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
        check_slot_args(None, lease_seconds)
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

    async def claim_once(self, key: str, *, ttl_seconds: float) -> bool:
        check_slot_args(None, ttl_seconds)
        now = self._clock()

        def claim(db: sqlite3.Connection) -> bool:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM claims WHERE expires <= ?", (now,))
                inserted = db.execute(
                    "INSERT OR IGNORE INTO claims (key, expires) VALUES (?, ?)",
                    (key, now + ttl_seconds),
                ).rowcount
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return inserted == 1

        return bool(await self._run(claim))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await trio.to_thread.run_sync(self._connection.close, limiter=self._limiter)


def _connect(path: str) -> sqlite3.Connection:
    """A connection to the file at ``path`` (created, with its schema, if missing)."""
    connection = sqlite3.connect(
        path,
        timeout=SQLITE_BUSY_TIMEOUT_SECONDS,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        _set_up(connection, path)
    except BaseException:
        connection.close()
        raise
    return connection


def _files_at(path: str) -> dict[str, tuple[int, int] | None]:
    """The database file at ``path`` and its WAL files (empty: in memory)."""
    if path == ":memory:":
        return {}
    return {suffix: _file_at(path + suffix) for suffix in ("", "-wal", "-shm")}


def _file_at(path: str) -> tuple[int, int] | None:
    """The device and inode of the file at ``path`` (None: none there)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


def _set_up(connection: sqlite3.Connection, path: str) -> None:
    """WAL mode and the schema, retried while another process holds the lock.

    Several relays (``relay serve --workers``) start at the same instant on one file, and
    SQLite does not apply its busy timeout to switching the journal mode: one of them would
    fail at once with "database is locked".
    """
    give_up = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    pause = 0.005
    while True:
        try:
            if path != ":memory:":
                connection.execute("PRAGMA journal_mode = WAL")
                # In WAL mode NORMAL survives an application crash; only a power cut can
                # lose the last commits, which is fine for usage counters.
                connection.execute("PRAGMA synchronous = NORMAL")
            connection.executescript(_SQLITE_SCHEMA)
            _add_missing_counters(connection)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > give_up:
                raise
        time.sleep(pause)  # this runs in a worker thread, not on the event loop
        pause = min(2 * pause, 0.1)


def _add_missing_counters(connection: sqlite3.Connection) -> None:
    """Give a file made by an older relay the counters it lacks (``cost_nanodollars``), at 0.

    Another process may add the same column at the same moment; then ours is a duplicate.
    """
    have = {row[1] for row in connection.execute("PRAGMA table_info(usage)")}
    for name in COUNTERS:
        if name not in have:
            kind = "REAL" if name in FLOAT_COUNTERS else "INTEGER"
            try:
                connection.execute(f"ALTER TABLE usage ADD COLUMN {name} {kind} NOT NULL DEFAULT 0")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):
                    raise
