"""The state store's SQLite database, and the one thread that uses it.

Every statement runs on that thread, in the order it was handed over: writes keep their
order, and a read sees every write handed over before it. The event loop hands a job over
and awaits its outcome (or does not wait at all), so a result of 32 MiB is written and read
without stopping it. A job handed over always runs, even when whoever awaits it is
cancelled: a write is never half called off.

The database runs in WAL mode with `synchronous=NORMAL`: a commit is an append to the log,
with no fsync. A write that cannot be made (disk full, I/O error) raises `StateFull`; SQLite
rolls it back, and it works again once there is room.
"""

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from kernel_service.errors import StateFull

T = TypeVar("T")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kernels (
    kernel_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    start_ticks INTEGER NOT NULL,  -- /proc/PID/stat's starttime: tells a reused pid apart
    directory TEXT NOT NULL,
    connection TEXT NOT NULL,      -- JSON, with the HMAC key
    uid INTEGER,                   -- the sandbox uid it runs as
    cgroup TEXT,                   -- its cgroup (memory's, else pids' or cpu's): the others by name
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    key TEXT PRIMARY KEY,          -- owner.id: each API key has a namespace of its own
    session_id TEXT NOT NULL,
    owner TEXT,
    work_dir TEXT NOT NULL,
    kernel_id TEXT,                -- NULL: no kernel now (the next execution starts one)
    created_at TEXT NOT NULL,
    last_activity TEXT NOT NULL,
    execution_count INTEGER NOT NULL DEFAULT 0,
    notice TEXT                    -- what the session has to tell at its next execution
);
CREATE TABLE IF NOT EXISTS executions (
    session_key TEXT NOT NULL REFERENCES sessions(key) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    code TEXT NOT NULL,
    status TEXT NOT NULL,          -- running, ok, error, timeout, cancelled, failed, lost
    started_at TEXT NOT NULL,
    duration_ms REAL,
    execution_count INTEGER,
    result TEXT,                   -- the ExecutionResult as JSON; NULL once dropped for room
    result_bytes INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session_key, seq)
);
CREATE TABLE IF NOT EXISTS images (
    session_key TEXT NOT NULL REFERENCES sessions(key) ON DELETE CASCADE,
    image_id TEXT NOT NULL,
    mime TEXT NOT NULL,
    data TEXT NOT NULL,            -- base64
    PRIMARY KEY (session_key, image_id)
);
"""


class Database:
    """One SQLite connection, opened, used and closed on a thread of its own."""

    def __init__(self, path: Path) -> None:
        """Open (or make) the database at `path`, 0600, with its schema."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-store")
        self.closed = False
        try:
            self._db = self.wait(_open, path)
        except BaseException:
            self._thread.shutdown()
            raise

    # ------------------------------------------------------------ handing jobs over

    def queue(self, job: Callable[..., T], *args: Any) -> "Future[T]":
        """Hand `job` over without waiting: it runs after every job handed over before it."""
        return self._thread.submit(job, *args)

    def run(self, job: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Hand `job` over now; its outcome, to await on the running loop. Cancelling the
        wait leaves the job to run."""
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[T] = loop.create_future()
        done = self.queue(job, *args)
        done.add_done_callback(lambda _: _call_in(loop, _settle, outcome, done))
        return outcome

    def wait(self, job: Callable[..., T], *args: Any) -> T:
        """Hand `job` over and wait for its outcome: for the start and the stop, and for
        threads other than the event loop's."""
        return self.queue(job, *args).result()

    def close(self) -> None:
        """Run every job handed over, then close the database."""
        if not self.closed:
            self.closed = True
            self._thread.submit(self._db.close)
            self._thread.shutdown(wait=True)

    # ------------------------------------------------------------ on the thread only

    def write(self, sql: str, parameters: tuple[Any, ...] = ()) -> int:
        """One statement that writes; how many rows it changed."""
        try:
            return self._db.execute(sql, parameters).rowcount
        except sqlite3.OperationalError as exc:
            # SQLITE_FULL, SQLITE_IOERR...: rolled back, the database as it was
            raise StateFull(str(exc)) from exc

    def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        """One query's rows."""
        return self._db.execute(sql, parameters).fetchall()


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        os.chmod(path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.executescript(SCHEMA)
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
    except BaseException:
        db.close()
        raise
    return db


def _call_in(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(callback, *args)


def _settle(outcome: "asyncio.Future[T]", done: "Future[T]") -> None:
    if outcome.cancelled():
        return
    if (exc := done.exception()) is not None:
        outcome.set_exception(exc)
    else:
        outcome.set_result(done.result())
