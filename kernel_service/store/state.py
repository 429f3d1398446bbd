"""The state store: what a service process must leave behind for the next one to carry on.

One SQLite database (WAL) in the state directory holds every kernel the service started
(its pid, connection info, sandbox uid and cgroup), every session (owner, work dir, its
kernel, times, execution count), each session's executions and its images. A session is
written before it is handed out; a kernel's record is handed over as soon as its process
exists, and written before the kernel is handed out, so a service killed at any moment
leaves no kernel in use that it does not know of (a kernel still starting is found by the
next start's sweep, see `sessions/recovery.py`).

The directory is the service's alone: the store holds an exclusive lock on it while the
service runs (and the orphan reaper briefly, see `kernel/programs/reaper.py`). The database
is 0600 in a 0700 directory: it holds the kernels' connection keys, and no kernel can reach
it (sandboxed kernels see only their own connection directory).

Every statement runs on the database's own thread (see `database.py`), but for an
execution's start and its small result, made on the event loop when they need not wait.
While the service serves, its methods are awaited, or hand a write over and return
(`remove_kernel`, `set_kernel`...: writes whose failure changes nothing). Those for the
start and the stop (the service's own records, what recovery reads) wait for the thread.
"""

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kernel_service.errors import StateFull
from kernel_service.store.database import Database
from kernel_service.store.locks import lock_directory
from kernel_service.store.records import (
    ExecutionRecord,
    KernelRecord,
    SessionRecord,
    SessionTotals,
)

# Bytes under which a write is small enough to be made on the event loop (`run_small`).
SMALL_WRITE = 16 * 1024

T = TypeVar("T")

DATABASE = "sessions.sqlite3"
LOCK_FILE = "lock"


class StateStore:
    """The database, opened by one service process at a time."""

    def __init__(self, directory: Path, wait: float = 10.0) -> None:
        """Lock the directory (waiting up to `wait` s for an orphan reaper that holds it for
        a moment) and open the database. Raises DirectoryInUse when a service holds it."""
        self.directory = directory.resolve()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = lock_directory(self.directory, LOCK_FILE, wait)
        try:
            self._db = Database(self.directory / DATABASE)
        except BaseException:
            os.close(self._lock_fd)
            raise

    @property
    def path(self) -> Path:
        return self.directory / DATABASE

    def close(self) -> None:
        """Write what was handed over, close the database and let go of the directory."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        os.close(self._lock_fd)

    # ------------------------------------------------------------ start and stop (waiting)

    def service_started(self, pid: int) -> str | None:
        """Record this service's pid; how the one before it ended (None: it was killed)."""
        before = self.meta("stopped")
        self._db.wait(self._db.write, "DELETE FROM meta WHERE name = 'stopped'")
        self.set_meta("service_pid", str(pid))
        return before

    def service_stopped(self, how: str) -> None:
        """`clean` (kernels ended) or `kept` (kernels left running for the next start)."""
        self.set_meta("stopped", how)

    def meta(self, name: str) -> str | None:
        rows = self._db.wait(self._db.read, "SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    def set_meta(self, name: str, value: str) -> None:
        self._db.wait(self._db.write, "INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def kernels(self) -> list[KernelRecord]:
        rows = self._db.wait(
            self._db.read,
            "SELECT kernel_id, pid, start_ticks, directory, connection, uid, cgroup FROM kernels",
        )
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

    def sessions(self) -> list[SessionRecord]:
        rows = self._db.wait(
            self._db.read,
            "SELECT key, session_id, owner, work_dir, kernel_id, created_at, last_activity, "
            "execution_count, notice, kernel_name, language FROM sessions "
            "LEFT JOIN session_kernels ON session_key = key",
        )
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
                kernel_name=row[9] or "python3",  # no row: Python's
                language=row[10] or "python",
            )
            for row in rows
        ]

    def executions_cut_short(self) -> list[tuple[str, int, datetime]]:
        """Executions that were running when the service before this one ended, marked
        `lost`: (session key, seq, started at)."""

        def mark() -> list[Any]:
            rows = self._db.read(
                "SELECT session_key, seq, started_at FROM executions WHERE status = 'running'"
            )
            self._db.write("UPDATE executions SET status = 'lost' WHERE status = 'running'")
            return rows

        return [(row[0], row[1], datetime.fromisoformat(row[2])) for row in self._db.wait(mark)]

    # ------------------------------------------------------------ kernels

    def add_kernel(self, record: KernelRecord) -> "asyncio.Future[None]":
        """Handed over at once (the process exists); the outcome, StateFull or None, is to
        be awaited before the kernel is handed out."""
        row = (
            record.kernel_id,
            record.pid,
            record.start_ticks,
            str(record.directory),
            json.dumps(record.connection, default=_bytes_as_text),
            record.uid,
            str(record.cgroup) if record.cgroup else None,
            time.time(),
        )
        sql = "INSERT OR REPLACE INTO kernels VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        return self._db.run(self._write, sql, row)

    def remove_kernel(self, kernel_id: str) -> None:
        """Forget an ended kernel; a failure here only leaves a record the next start clears
        (also after the store is closed: a kernel's end may be noticed late)."""
        self._quietly("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))

    # ------------------------------------------------------------ sessions

    async def add_session(self, record: SessionRecord) -> None:
        row = (
            record.key,
            record.session_id,
            record.owner,
            str(record.work_dir),
            record.kernel_id,
            record.created_at.isoformat(),
            record.last_activity.isoformat(),
            record.execution_count,
            record.notice,
        )
        kernel = (record.key, record.kernel_name, record.language)
        await self._db.run(self._add_session_rows, row, kernel)

    def _add_session_rows(self, row: tuple[Any, ...], kernel: tuple[str, str, str]) -> None:
        """The session's row and its kernel's, both or neither."""
        self._db.write("SAVEPOINT add_session")
        try:
            self._db.write("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            self._db.write("INSERT INTO session_kernels VALUES (?, ?, ?)", kernel)
        except BaseException:
            with contextlib.suppress(StateFull):  # SQLite may have rolled it all back
                self._db.write("ROLLBACK TO add_session")
                self._db.write("RELEASE add_session")
            raise
        self._db.write("RELEASE add_session")

    def set_kernel(self, key: str, kernel_id: str | None, notice: str | None = None) -> None:
        """The session's kernel is now `kernel_id` (None: none); `notice`, what its next
        execution will have to say (a new kernel resets the execution count). Handed over:
        a failure is harmless, the next start checks the kernel anyway."""
        self._quietly(
            "UPDATE sessions SET kernel_id = ?, notice = ?, execution_count = 0 WHERE key = ?",
            (kernel_id, notice, key),
        )

    async def remove_session(self, key: str) -> None:
        """The session, its executions and images (a failure leaves a record whose kernel
        is gone: the next start keeps its work dir and starts it a new kernel)."""
        with contextlib.suppress(StateFull):
            await self._db.run(self._write, "DELETE FROM sessions WHERE key = ?", (key,))

    async def session_totals(self, key: str) -> SessionTotals:
        """Where a session carried on from an earlier service process stands."""

        def read() -> SessionTotals:
            seq, size = self._db.read(
                "SELECT MAX(seq), SUM(result_bytes) FROM executions WHERE session_key = ?",
                (key,),
            )[0]
            images = self._db.read(
                "SELECT image_id, length(data) FROM images WHERE session_key = ? ORDER BY rowid",
                (key,),
            )
            return SessionTotals(int(seq or 0), int(size or 0), tuple(map(tuple, images)))

        return await self._db.run(read)

    # ------------------------------------------------------------ executions

    async def execution_started(self, key: str, seq: int, code: str) -> None:
        """Made on the event loop when it need not wait (see `Database.run_small`): unless
        the code is large, it is a small write."""
        run = self._db.run_small if len(code) <= SMALL_WRITE else self._db.run
        await run(
            self._write,
            "INSERT INTO executions (session_key, seq, code, status, started_at) "
            "VALUES (?, ?, ?, 'running', ?)",
            (key, seq, code, datetime.now(UTC).isoformat()),
        )

    def execution_cut_short(self, key: str, seq: int, status: str) -> None:
        """It ended with no result (`cancelled`, `failed`); handed over, failures ignored."""
        self._quietly(
            "UPDATE executions SET status = ?, duration_ms = NULL, execution_count = NULL, "
            "result = NULL, result_bytes = 0 WHERE session_key = ? AND seq = ?",
            (status, key, seq),
        )

    def hand_over(self, job: Callable[[], T], small: bool = False) -> "asyncio.Future[T]":
        """Run `job`, made of this store's `*_now` calls, on the store's thread in its turn;
        its outcome, to await (cancelling the wait does not call it off). `small`: it
        writes a few small rows, and may be run at once on the event loop instead, when
        that need not wait (see `Database.run_small`)."""
        return self._db.run_small(job) if small else self._db.run(job)

    def execution_ended_now(
        self,
        key: str,
        seq: int,
        status: str,
        *,
        duration_ms: float | None,
        execution_count: int | None,
        result: str,
    ) -> None:
        """On the store's thread (in a job given to `run`)."""
        self._write(
            "UPDATE executions SET status = ?, duration_ms = ?, execution_count = ?, "
            "result = ?, result_bytes = ? WHERE session_key = ? AND seq = ?",
            (status, duration_ms, execution_count, result, len(result), key, seq),
        )

    def session_used_now(self, key: str, last_activity: datetime, execution_count: int) -> None:
        """On the store's thread (in a job given to `run`)."""
        self._write(
            "UPDATE sessions SET last_activity = ?, execution_count = ?, notice = NULL "
            "WHERE key = ?",
            (last_activity.isoformat(), execution_count, key),
        )

    def drop_oldest_results_now(self, key: str, bytes_to_free: int) -> int:
        """Forget the stored results of the oldest executions (their code and status stay)
        until `bytes_to_free` are freed; how many were freed. On the store's thread."""
        rows = self._db.read(
            "SELECT seq, result_bytes FROM executions WHERE session_key = ? AND result_bytes > 0 "
            "ORDER BY seq",
            (key,),
        )
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

    async def executions(
        self, key: str, since: int = 0, limit: int | None = None
    ) -> list[ExecutionRecord]:
        """The session's executions numbered after `since`, oldest first (at most `limit`)."""
        rows = await self._db.run(
            self._db.read,
            "SELECT seq, code, status, started_at, duration_ms, execution_count, result "
            "FROM executions WHERE session_key = ? AND seq > ? ORDER BY seq LIMIT ?",
            (key, since, -1 if limit is None else limit),
        )
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

    # ------------------------------------------------------------ images

    def add_image_now(self, key: str, image_id: str, mime: str, data: str) -> None:
        """On the store's thread (in a job given to `run`)."""
        self._write(
            "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)", (key, image_id, mime, data)
        )

    def remove_images_now(self, key: str, image_ids: list[str]) -> None:
        """On the store's thread (in a job given to `run`); failures ignored."""
        with contextlib.suppress(StateFull):
            self._write(
                f"DELETE FROM images WHERE session_key = ? "
                f"AND image_id IN ({','.join('?' * len(image_ids))})",
                (key, *image_ids),
            )

    async def image(self, key: str, image_id: str) -> tuple[str, str] | None:
        rows = await self._db.run(
            self._db.read,
            "SELECT mime, data FROM images WHERE session_key = ? AND image_id = ?",
            (key, image_id),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    # ------------------------------------------------------------ writing

    def _write(self, sql: str, parameters: tuple[Any, ...] = ()) -> None:
        self._db.write(sql, parameters)

    def _quietly(self, sql: str, parameters: tuple[Any, ...]) -> None:
        """Hand a write over whose failure changes nothing (after the close too)."""
        if not self._db.closed:
            self._db.queue(_ignoring_failure, self._db.write, sql, parameters)


def _ignoring_failure(
    write: Callable[[str, tuple[Any, ...]], int], sql: str, parameters: tuple[Any, ...]
) -> None:
    with contextlib.suppress(StateFull, sqlite3.ProgrammingError):
        write(sql, parameters)


def _bytes_as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    raise TypeError(f"cannot store {type(value).__name__}")
