"""The state store's database: jobs handed to its thread run in order, in batches, each
outcome given back (exceptions included); small writes run in place on the event loop only
when that overtakes nothing and waits for nothing, all or nothing, and the log they grow is
checkpointed."""

import asyncio
import sqlite3
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
        for row in db.wait(db.read, "SELECT name FROM meta WHERE name != 'schema' ORDER BY rowid")
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
