"""The state store: what a service process must leave behind for the next one to carry on.

One SQLite database (WAL) in the state directory holds every kernel the service started
(its pid, connection info, sandbox uid and cgroup), every session (owner, work dir, its
kernel, times, execution count), each session's executions and its images. A session is
written before it is handed out; a kernel is written as soon as its process exists, so a
service killed at any moment leaves no kernel it does not know of.

The directory is the service's alone: the store holds an exclusive lock on it while the
service runs (and the orphan reaper briefly, see `kernel/reaper.py`). The database is
0600 in a 0700 directory: it holds the kernels' connection keys, and no kernel can reach
it (sandboxed kernels see only their own connection directory).

Writes are small and run on the event loop: with WAL and `synchronous=NORMAL` a commit is
an append to the log, with no fsync. When the disk is full a write raises `StateFull`; the
database stays consistent (SQLite rolls the write back) and works again once there is room.
"""

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kernel_service.errors import StateFull

DATABASE = "sessions.sqlite3"
LOCK_FILE = "lock"
_SCHEMA_VERSION = 1
_SCHEMA = """
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


class DirectoryInUse(Exception):
    """Another service process holds one of the directories; the message says which."""


@dataclass(frozen=True)
class KernelRecord:
    kernel_id: str
    pid: int
    start_ticks: int
    directory: Path
    connection: dict[str, Any]
    uid: int | None = None
    cgroup: Path | None = None


@dataclass(frozen=True)
class SessionRecord:
    key: str
    session_id: str
    owner: str | None
    work_dir: Path
    kernel_id: str | None
    created_at: datetime
    last_activity: datetime
    execution_count: int
    notice: str | None


@dataclass(frozen=True)
class ExecutionRecord:
    seq: int
    code: str
    status: str
    started_at: datetime
    duration_ms: float | None
    execution_count: int | None
    result: str | None


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if there is no such
    process or it has ended (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


class StateStore:
    """The database, opened by one service process at a time."""

    def __init__(self, directory: Path, wait: float = 10.0) -> None:
        """Lock the directory (waiting up to `wait` s for an orphan reaper that holds it for
        a moment) and open the database. Raises DirectoryInUse when a service holds it."""
        self.directory = directory.resolve()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = lock_directory(self.directory, LOCK_FILE, wait)
        try:
            self._db = sqlite3.connect(
                self.directory / DATABASE, isolation_level=None, check_same_thread=False
            )
            os.chmod(self.directory / DATABASE, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self.set_meta("schema", str(_SCHEMA_VERSION))
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def path(self) -> Path:
        return self.directory / DATABASE

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock_fd)

    # ------------------------------------------------------------ the service itself

    def service_started(self, pid: int) -> str | None:
        """Record this service's pid; how the one before it ended (None: it was killed)."""
        before = self.meta("stopped")
        self._write("DELETE FROM meta WHERE name = 'stopped'")
        self.set_meta("service_pid", str(pid))
        return before

    def service_stopped(self, how: str) -> None:
        """`clean` (kernels ended) or `kept` (kernels left running for the next start)."""
        self.set_meta("stopped", how)

    def meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    # ------------------------------------------------------------ kernels

    def add_kernel(self, record: KernelRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.kernel_id,
                record.pid,
                record.start_ticks,
                str(record.directory),
                json.dumps(record.connection, default=_bytes_as_text),
                record.uid,
                str(record.cgroup) if record.cgroup else None,
                time.time(),
            ),
        )

    def remove_kernel(self, kernel_id: str) -> None:
        """Forget an ended kernel; a failure here only leaves a record the next start clears
        (also after the store is closed: a kernel's end may be noticed late)."""
        with contextlib.suppress(StateFull, sqlite3.ProgrammingError):
            self._write("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))

    def kernels(self) -> list[KernelRecord]:
        rows = self._db.execute(
            "SELECT kernel_id, pid, start_ticks, directory, connection, uid, cgroup FROM kernels"
        ).fetchall()
        return [
            KernelRecord(
                kernel_id=row[0],
                pid=row[1],
                start_ticks=row[2],
                directory=Path(row[3]),
                connection=json.loads(row[4]),
                uid=row[5],
                cgroup=Path(row[6]) if row[6] else None,
            )
            for row in rows
        ]

    # ------------------------------------------------------------ sessions

    def add_session(self, record: SessionRecord) -> None:
        self._write(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.key,
                record.session_id,
                record.owner,
                str(record.work_dir),
                record.kernel_id,
                record.created_at.isoformat(),
                record.last_activity.isoformat(),
                record.execution_count,
                record.notice,
            ),
        )

    def set_kernel(self, key: str, kernel_id: str | None, notice: str | None = None) -> None:
        """The session's kernel is now `kernel_id` (None: none); `notice`, what its next
        execution will have to say (a new kernel resets the execution count)."""
        with contextlib.suppress(StateFull):  # the next start checks the kernel anyway
            self._write(
                "UPDATE sessions SET kernel_id = ?, notice = ?, execution_count = 0 WHERE key = ?",
                (kernel_id, notice, key),
            )

    def session_used(self, key: str, last_activity: datetime, execution_count: int) -> None:
        self._write(
            "UPDATE sessions SET last_activity = ?, execution_count = ?, notice = NULL "
            "WHERE key = ?",
            (last_activity.isoformat(), execution_count, key),
        )

    def remove_session(self, key: str) -> None:
        """The session, its executions and images (a failure leaves a record whose kernel
        is gone: the next start keeps its work dir and starts it a new kernel)."""
        with contextlib.suppress(StateFull):
            self._write("DELETE FROM sessions WHERE key = ?", (key,))

    def sessions(self) -> list[SessionRecord]:
        rows = self._db.execute(
            "SELECT key, session_id, owner, work_dir, kernel_id, created_at, last_activity, "
            "execution_count, notice FROM sessions"
        ).fetchall()
        return [
            SessionRecord(
                key=row[0],
                session_id=row[1],
                owner=row[2],
                work_dir=Path(row[3]),
                kernel_id=row[4],
                created_at=datetime.fromisoformat(row[5]),
                last_activity=datetime.fromisoformat(row[6]),
                execution_count=row[7],
                notice=row[8],
            )
            for row in rows
        ]

    # ------------------------------------------------------------ executions

    def execution_started(self, key: str, seq: int, code: str) -> None:
        self._write(
            "INSERT INTO executions (session_key, seq, code, status, started_at) "
            "VALUES (?, ?, ?, 'running', ?)",
            (key, seq, code, datetime.now(UTC).isoformat()),
        )

    def execution_ended(
        self,
        key: str,
        seq: int,
        status: str,
        *,
        duration_ms: float | None = None,
        execution_count: int | None = None,
        result: str | None = None,
    ) -> None:
        self._write(
            "UPDATE executions SET status = ?, duration_ms = ?, execution_count = ?, "
            "result = ?, result_bytes = ? WHERE session_key = ? AND seq = ?",
            (status, duration_ms, execution_count, result, len(result or ""), key, seq),
        )

    def last_seq(self, key: str) -> int:
        row = self._db.execute(
            "SELECT MAX(seq) FROM executions WHERE session_key = ?", (key,)
        ).fetchone()
        return int(row[0] or 0)

    def result_bytes(self, key: str) -> int:
        row = self._db.execute(
            "SELECT SUM(result_bytes) FROM executions WHERE session_key = ?", (key,)
        ).fetchone()
        return int(row[0] or 0)

    def drop_oldest_results(self, key: str, bytes_to_free: int) -> int:
        """Forget the stored results of the oldest executions (their code and status stay)
        until `bytes_to_free` are freed; how many were freed."""
        rows = self._db.execute(
            "SELECT seq, result_bytes FROM executions WHERE session_key = ? AND result_bytes > 0 "
            "ORDER BY seq",
            (key,),
        ).fetchall()
        freed, seqs = 0, []
        for seq, size in rows:
            if freed >= bytes_to_free:
                break
            freed += size
            seqs.append(seq)
        if seqs:
            self._write(
                f"UPDATE executions SET result = NULL, result_bytes = 0 "
                f"WHERE session_key = ? AND seq IN ({','.join('?' * len(seqs))})",
                (key, *seqs),
            )
        return freed

    def executions(
        self, key: str, since: int = 0, limit: int | None = None
    ) -> list[ExecutionRecord]:
        """The session's executions numbered after `since`, oldest first (at most `limit`)."""
        rows = self._db.execute(
            "SELECT seq, code, status, started_at, duration_ms, execution_count, result "
            "FROM executions WHERE session_key = ? AND seq > ? ORDER BY seq LIMIT ?",
            (key, since, -1 if limit is None else limit),
        ).fetchall()
        return [
            ExecutionRecord(
                seq=row[0],
                code=row[1],
                status=row[2],
                started_at=datetime.fromisoformat(row[3]),
                duration_ms=row[4],
                execution_count=row[5],
                result=row[6],
            )
            for row in rows
        ]

    def executions_cut_short(self) -> list[tuple[str, int, datetime]]:
        """Executions that were running when the service before this one ended, marked
        `lost`: (session key, seq, started at)."""
        rows = self._db.execute(
            "SELECT session_key, seq, started_at FROM executions WHERE status = 'running'"
        ).fetchall()
        self._write("UPDATE executions SET status = 'lost' WHERE status = 'running'")
        return [(row[0], row[1], datetime.fromisoformat(row[2])) for row in rows]

    # ------------------------------------------------------------ images

    def add_image(self, key: str, image_id: str, mime: str, data: str) -> None:
        self._write(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)", (key, image_id, mime, data)
        )

    def remove_images(self, key: str, image_ids: list[str]) -> None:
        with contextlib.suppress(StateFull):
            self._write(
                f"DELETE FROM images WHERE session_key = ? "
                f"AND image_id IN ({','.join('?' * len(image_ids))})",
                (key, *image_ids),
            )

    def image(self, key: str, image_id: str) -> tuple[str, str] | None:
        row = self._db.execute(
            "SELECT mime, data FROM images WHERE session_key = ? AND image_id = ?",
            (key, image_id),
        ).fetchone()
        return (row[0], row[1]) if row else None

    def image_sizes(self, key: str) -> list[tuple[str, int]]:
        """The session's images, oldest first: (id, bytes of base64)."""
        rows = self._db.execute(
            "SELECT image_id, length(data) FROM images WHERE session_key = ? ORDER BY rowid",
            (key,),
        ).fetchall()
        return [(row[0], row[1]) for row in rows]

    # ------------------------------------------------------------ writing

    def _write(self, sql: str, parameters: tuple[Any, ...] = ()) -> None:
        try:
            self._db.execute(sql, parameters)
        except sqlite3.OperationalError as exc:
            # SQLITE_FULL, SQLITE_IOERR...: rolled back, the database as it was
            raise StateFull(str(exc)) from exc


def _bytes_as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot store {type(value).__name__}")


def lock_directory(directory: Path, name: str | None = None, wait: float = 0.0) -> int:
    """An exclusive lock on `directory` (on the directory itself, or on a file `name` in
    it), held until the returned fd is closed; raises DirectoryInUse if another process
    holds it for `wait` seconds."""
    if name is None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DirectoryInUse(
                    f"another kernel-service process uses {directory}: each service needs a "
                    "state, connection and work directory of its own"
                ) from None
            time.sleep(0.1)
            continue
        return fd
