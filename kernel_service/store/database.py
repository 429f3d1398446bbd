"""The state store's SQLite database, and the one thread that uses it.

Every statement runs on that thread, in the order it was handed over: writes keep their
order, and a read sees every write handed over before it. The event loop hands a job over
and awaits its outcome (or does not wait at all), so a result of 32 MiB is written and read
without stopping it. A job handed over always runs, even when whoever awaits it is
cancelled: a write is never half called off.

Outcomes reach the event loop as soon as their job has run, but the loop is woken once for
all those that wait for it when it next runs, not once each: a hand-over per job (a thread
pool's) cost ~60 µs of CPU in wake-ups, more than the statements themselves.

Small writes on the hot path (an execution's start and its small result) need no thread at
all when they cannot wait: `run_small` runs one on the event loop, through a second
connection, when nothing handed over is pending (so it overtakes nothing) and the write lock
is free at once (`BEGIN IMMEDIATE`, no waiting); otherwise it is handed over like any job.
That connection never checkpoints the log, nor starts it over after a checkpoint (the
thread's does both, see `_checkpoint`), so the event loop makes no fsync: a write there
appends a few pages to the log, ~20 µs.

The database runs in WAL mode with `synchronous=NORMAL`: a commit is an append to the log,
with no fsync. A write that cannot be made (disk full, I/O error) raises `StateFull`; SQLite
rolls it back, and it works again once there is room.
"""

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
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
-- A session's kernel and language, when not Python's (a table of its own, not columns of
-- sessions: the version before it, which inserts whole rows there, still runs on it).
CREATE TABLE IF NOT EXISTS session_kernels (
    session_key TEXT PRIMARY KEY REFERENCES sessions(key) ON DELETE CASCADE,
    kernel_name TEXT NOT NULL,     -- its kernelspec (kernel/kernelspecs.py)
    language TEXT NOT NULL         -- the language it was asked for
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


# A job, its arguments, and where its outcome goes: a future of an event loop's (settled
# there), one of another thread's, or nowhere.
_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any] | Future[Any] | None"]
_STOP = None
# Writes made in place between two checkpoints the thread is asked for (a few pages each:
# SQLite's own would come after 1000 pages).
_CHECKPOINT_EVERY = 256


class Database:
    """One SQLite connection, opened, used and closed on a thread of its own; and one for
    the event loop's small writes (`run_small`)."""

    def __init__(self, path: Path) -> None:
        """Open (or make) the database at `path`, 0600, with its schema."""
        self._path = path
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="state-store", daemon=True)
        self._thread.start()
        self.closed = False
        self._putting = threading.Lock()  # hand-overs from any thread, and the close
        self._handed = self._finished = 0  # jobs handed over, and finished by the thread
        self._given: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        self._giving = threading.Lock()  # outcomes on their way to their loops
        self._in_place_commits = 0
        self._inline = threading.local()  # .db: the connection of a job run in place
        try:
            self._db = self.wait(_open, path)
        except BaseException:
            self._jobs.put(_STOP)
            self._thread.join()
            raise
        try:
            self._small_db = _open_for_small_writes(path)
        except BaseException:
            self.close_thread()
            raise

    # ------------------------------------------------------------ handing jobs over

    def queue(self, job: Callable[..., T], *args: Any) -> None:
        """Hand `job` over without waiting: it runs after every job handed over before it."""
        self._put((job, args, None))

    def run(self, job: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """Hand `job` over now; its outcome, to await on the running loop. Cancelling the
        wait leaves the job to run."""
        outcome: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._put((job, args, outcome))
        return outcome

    def run_small(self, job: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
        """`run`, or the job run at once on the event loop when it need not wait (see the
        module docstring): its outcome, done already then. For jobs of a few small writes
        only; all of a job's writes or none are kept when it runs in place."""
        if self._handed == self._finished and not self.closed:
            outcome: asyncio.Future[T] = asyncio.get_running_loop().create_future()
            try:
                outcome.set_result(self._in_place(job, args))
            except _Busy:
                pass  # handed over below
            except Exception as exc:
                outcome.set_exception(exc)
                return outcome
            else:
                return outcome
        return self.run(job, *args)

    def _in_place(self, job: Callable[..., T], args: tuple[Any, ...]) -> T:
        db = self._small_db
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise _Busy from exc
            raise StateFull(str(exc)) from exc
        except sqlite3.ProgrammingError as exc:  # closed: it could not be made anew
            raise _Busy from exc
        self._inline.db = db
        try:
            result = job(*args)
            if db.in_transaction:  # SQLite may have rolled it back after an error
                db.execute("COMMIT")
        except BaseException as exc:
            self._roll_back()
            if isinstance(exc, sqlite3.OperationalError):
                raise StateFull(str(exc)) from exc
            raise
        finally:
            self._inline.db = None
        self._in_place_commits += 1
        if self._in_place_commits % _CHECKPOINT_EVERY == 0:
            # the log is checkpointed by the thread's connection, which may have no commit
            # of its own to do it after while every write is made in place
            self.queue(_checkpoint, self)
        return result

    def _roll_back(self) -> None:
        """End the event loop's transaction; a connection that cannot (it would hold the
        write lock for good) is made anew."""
        db = self._small_db
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.close()
            self._small_db = _open_for_small_writes(self._path)

    def wait(self, job: Callable[..., T], *args: Any) -> T:
        """Hand `job` over and wait for its outcome: for the start and the stop, and for
        threads other than the event loop's."""
        outcome: Future[T] = Future()
        self._put((job, args, outcome))
        return outcome.result()

    def close(self) -> None:
        """Run every job handed over, then close the database."""
        if not self.closed:
            self.close_thread()
            self._small_db.close()

    def close_thread(self) -> None:
        """Run every job handed over, then close the thread's connection and end it."""
        with self._putting:
            if self.closed:
                return
            self.closed = True
            self._jobs.put((self._db.close, (), None))
            self._jobs.put(_STOP)
        self._thread.join()

    def _put(self, job: _Job) -> None:
        with self._putting:
            if self.closed:
                raise RuntimeError("the state store is closed")
            self._handed += 1
            self._jobs.put(job)

    def _serve(self) -> None:
        """The thread: each job in turn, its outcome given at once."""
        while (item := self._jobs.get()) is not _STOP:
            job, args, outcome = item
            try:
                result: Any = job(*args)
            except BaseException as exc:  # an outcome like any other; the thread goes on
                result, failed = exc, True
            else:
                failed = False
            self._finished += 1
            if isinstance(outcome, Future):
                if failed:
                    outcome.set_exception(result)
                else:
                    outcome.set_result(result)
            elif outcome is not None:
                self._give(outcome, _Failed(result) if failed else result)

    def _give(self, outcome: "asyncio.Future[Any]", result: Any) -> None:
        """Hand an outcome to its loop: the loop is told once for all the outcomes that
        wait for it when it next runs, not once each."""
        loop = outcome.get_loop()
        with self._giving:
            waiting = self._given.setdefault(loop, [])
            waiting.append((outcome, result))
            if len(waiting) > 1:
                return  # the loop has been told, and has not taken them yet
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            loop.call_soon_threadsafe(self._take, loop)

    def _take(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._giving:
            outcomes = self._given.pop(loop, [])
        _settle(outcomes)

    # ------------------------------------------------------------ in a job only

    def write(self, sql: str, parameters: tuple[Any, ...] = ()) -> int:
        """One statement that writes; how many rows it changed."""
        try:
            return self._connection().execute(sql, parameters).rowcount
        except sqlite3.OperationalError as exc:
            # SQLITE_FULL, SQLITE_IOERR...: rolled back, the database as it was
            raise StateFull(str(exc)) from exc

    def read(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        """One query's rows."""
        return self._connection().execute(sql, parameters).fetchall()

    def _connection(self) -> sqlite3.Connection:
        """The thread's connection, or the event loop's in a job run in place."""
        return getattr(self._inline, "db", None) or self._db


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


def _checkpoint(database: "Database") -> None:
    """On the thread: the log copied into the database, then a one-row write, so that this
    connection (not the event loop's) starts the log over, and makes the fsync that SQLite
    makes then."""
    with contextlib.suppress(sqlite3.Error):
        database._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        database._db.execute(  # a change: SQLite writes nothing for a row left the same
            "INSERT OR REPLACE INTO meta VALUES ('checkpointed', ?)", (str(time.time()),)
        )


def _open_for_small_writes(path: Path) -> sqlite3.Connection:
    """The event loop's connection: it never waits for a lock, and never checkpoints (one
    made on the loop would fsync the database there). Used on the event loop's thread
    only, though made wherever the store is opened."""
    db = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    try:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        db.close()
        raise
    return db


class _Busy(Exception):
    """The write lock is taken (by the thread or another process): hand the job over."""


class _Failed:
    """A job's exception, carried to the event loop."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _settle(outcomes: list[tuple["asyncio.Future[Any]", Any]]) -> None:
    for outcome, result in outcomes:
        if outcome.done():  # cancelled: nobody waits
            continue
        if not isinstance(result, _Failed):
            outcome.set_result(result)
        elif isinstance(result.exc, StopIteration):  # a future cannot carry it
            outcome.set_exception(RuntimeError(f"a state store job raised {result.exc!r}"))
        else:
            outcome.set_exception(result.exc)
