"""The state store's database: jobs handed to its thread run in order, in batches, each
outcome given back (exceptions included); small writes run in place on the event loop only
when that overtakes nothing and waits for nothing, all or nothing, and the log they grow is
checkpointed."""

import asyncio
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kernel_service.errors import StateFull
from kernel_service.store.database import _CHECKPOINT_EVERY, Database


def insert(db: Database, name: str, value: str = "v") -> int:
    return db.write("INSERT INTO meta VALUES (?, ?)", (name, value))


def names(db: Database) -> list[str]:
    return [
        row[0]
        for row in db.wait(
            db.read,
            "SELECT name FROM meta WHERE name NOT IN ('schema', 'checkpointed') ORDER BY rowid",
        )
    ]


def test_handed_over_jobs_run_in_order_with_their_outcomes(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")

    async def main() -> None:
        gate = threading.Event()
        db.queue(gate.wait)  # the thread waits: the jobs below pile up into one batch
        outcomes = [db.run(insert, db, f"n{i}") for i in range(100)]
        failing = db.run(insert, db, "n0")  # a duplicate key
        gate.set()
        assert await asyncio.gather(*outcomes) == [1] * 100
        with pytest.raises(sqlite3.IntegrityError):
            await failing

    asyncio.run(main())
    assert names(db) == [f"n{i}" for i in range(100)]
    db.close()
    with pytest.raises(RuntimeError, match="closed"):
        db.queue(insert, db, "late")


def test_a_small_write_runs_in_place_only_when_it_overtakes_nothing(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")

    async def main() -> None:
        in_place = db.run_small(insert, db, "first")
        assert in_place.done() and in_place.result() == 1  # no thread, no wait
        gate = threading.Event()
        db.queue(gate.wait)
        handed = db.run(insert, db, "second")
        behind = db.run_small(insert, db, "third")  # must not overtake "second"
        assert not behind.done()
        gate.set()
        await asyncio.gather(handed, behind)

    asyncio.run(main())
    assert names(db) == ["first", "second", "third"]
    db.close()


def test_a_small_write_waits_for_no_lock(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    other = sqlite3.connect(tmp_path / "db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's write in progress

    async def main() -> None:
        waiting = db.run_small(insert, db, "after the lock")
        assert not waiting.done()  # handed to the thread, which may wait its turn
        other.execute("COMMIT")
        assert await waiting == 1

    asyncio.run(main())
    assert names(db) == ["after the lock"]
    other.close()
    db.close()


def test_a_small_job_in_place_keeps_all_its_writes_or_none(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")

    def two_writes() -> None:
        insert(db, "kept only with the second")
        insert(db, "kept only with the second")  # a duplicate: fails

    async def main() -> None:
        failed = db.run_small(two_writes)
        assert failed.done()
        with pytest.raises(sqlite3.IntegrityError):
            failed.result()
        assert (await db.run_small(insert, db, "next")) == 1

    asyncio.run(main())
    assert names(db) == ["next"]
    db.close()


def test_a_full_disk_in_place_is_state_full(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    db._small_db.execute("PRAGMA max_page_count=1")  # as full as a full disk, for this one

    async def main() -> None:
        with pytest.raises(StateFull):
            await db.run_small(insert, db, "x" * 10_000, "y" * 100_000)

    asyncio.run(main())
    assert names(db) == []
    db.close()


def test_the_log_grown_in_place_is_checkpointed(tmp_path: Path) -> None:
    db = Database(tmp_path / "db")
    log = tmp_path / "db-wal"

    async def main() -> int:
        largest = 0
        for i in range(_CHECKPOINT_EVERY * 8):
            await db.run_small(insert, db, f"n{i}", "x" * 2000)
            largest = max(largest, log.stat().st_size)
        return largest

    largest = asyncio.run(main())
    db.close()
    # each write adds a page or two: checkpointed, the log is written over from its start
    assert largest < _CHECKPOINT_EVERY * 3 * 4096 * 2


def test_a_finished_jobs_outcome_does_not_wait_for_a_slow_job_behind_it(tmp_path: Path) -> None:
    """A job's outcome reaches the event loop as soon as the job has run, never after the
    jobs queued behind it (another session's 32 MiB result, a slow disk...)."""
    db = Database(tmp_path / "db")
    fast_ran, slow_may_end = threading.Event(), threading.Event()

    async def main() -> None:
        gate = threading.Event()
        db.queue(gate.wait)  # the thread busy: the next two are taken in one batch
        fast = db.run(fast_ran.set)
        slow = db.run(slow_may_end.wait, 30)
        gate.set()
        assert await asyncio.to_thread(fast_ran.wait, 30)
        try:
            await asyncio.wait_for(asyncio.shield(fast), 5)  # its job ran: its outcome?
        finally:
            slow_may_end.set()
            await slow

    try:
        asyncio.run(main())
    finally:
        db.close()


# Run in a process of its own: RLIMIT_FSIZE is a full disk for one process (the state's files
# cannot grow), with SIGXFSZ ignored so that a write past it fails (EFBIG, "disk I/O error").
_FULL_DISK_AT_THE_END = """
import asyncio, os, resource, signal, sys, types
from datetime import UTC, datetime
from pathlib import Path

from kernel_service.sessions.journal import ExecutionJournal
from kernel_service.store.records import SessionRecord, SessionTotals
from kernel_service.store.state import StateStore

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
directory = Path(sys.argv[1])

async def main() -> None:
    store = StateStore(directory)
    now = datetime.now(UTC)
    await store.add_session(
        SessionRecord("k", "s", None, directory / "work", None, now, now, 0, None)
    )
    journal = ExecutionJournal("s", "k", store, 1 << 20, SessionTotals())
    seq = await journal.begin("print(1)")
    # the code runs... and meanwhile the disk fills up: no state file may grow any more
    limit = max(f.stat().st_size for f in directory.iterdir() if f.is_file())
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    result = types.SimpleNamespace(
        model_dump_json=lambda: '{"status": "ok"}', status="ok", duration_ms=1.0,
        execution_count=1,
    )
    await journal.end(seq, result, now, 1, output_bytes=10)  # a small result: in place
    print("END RETURNED")

asyncio.run(main())
"""


def test_a_result_that_cannot_be_recorded_is_still_given(tmp_path: Path) -> None:
    """ExecutionJournal.end logs a failure to write, never raises it: the code has run and
    its caller gets the result. In place, a small result's writes are one transaction whose
    COMMIT, where they first reach the disk, comes after the job: that failure too."""
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_AT_THE_END, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "END RETURNED" in done.stdout, done.stderr[-2000:]


_IN_PLACE_WRITES_WITH_PAUSES = """
import asyncio, os, sys, threading
from pathlib import Path
from kernel_service.store.database import _CHECKPOINT_EVERY, Database

db = Database(Path(sys.argv[1]) / "db")

def insert(i):
    return db.write("INSERT INTO meta VALUES (?, 'v')", (f"n{i}",))

async def main():
    for i in range(_CHECKPOINT_EVERY * 3):
        await db.run_small(insert, i)
        await db.run(int)  # as an execution between two writes does, let the thread's
                           # checkpoint (handed over before this) end first

print(threading.get_native_id(), flush=True)
asyncio.run(main())
os._exit(0)  # not the close: its checkpoint is the loop's by design
"""


def test_the_event_loop_makes_no_fsync(tmp_path: Path) -> None:
    """The event loop's connection never checkpoints, nor starts the log over after a
    checkpoint: with synchronous=NORMAL SQLite syncs the log's header then, and on a busy
    disk that fsync would stall every session. The thread's checkpoint job writes a row
    right after the checkpoint, so the start-over (and its fsync) is the thread's."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace")
    trace = tmp_path / "trace"
    done = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(trace),
         sys.executable, "-c", _IN_PLACE_WRITES_WITH_PAUSES, str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    loop_thread = done.stdout.split()[0]
    on_the_loop = [line for line in trace.read_text().splitlines() if line.startswith(loop_thread)]
    assert on_the_loop == []


def test_sessions_keep_their_language_and_the_version_before_runs_on_the_store(
    tmp_path: Path,
) -> None:
    """A session's kernel and language are in a table of their own, written with its row:
    the version before them (which inserts whole rows of nine values into sessions) still
    runs on the store after an upgrade, and its sessions read back as Python's."""
    from datetime import UTC, datetime

    from kernel_service.store.records import SessionRecord
    from kernel_service.store.state import DATABASE, StateStore

    now = datetime.now(UTC)
    record = SessionRecord("k1", "k1", None, tmp_path / "w", None, now, now, 0, None, "ir", "r")
    store = StateStore(tmp_path / "state")
    try:
        asyncio.run(store.add_session(record))
    finally:
        store.close()
    with sqlite3.connect(tmp_path / "state" / DATABASE) as db:  # as the version before does
        db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old", "old", None, str(tmp_path / "o"), None, now.isoformat(), now.isoformat(),
             0, None),
        )  # fmt: skip
    store = StateStore(tmp_path / "state")
    try:
        found = {s.key: (s.kernel_name, s.language) for s in store.sessions()}
    finally:
        store.close()
    assert found == {"k1": ("ir", "r"), "old": ("python3", "python")}
