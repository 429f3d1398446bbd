"""FileChanges (workdir/snapshots.py): an upload made through the API
while the after-snapshot of an execution is being taken (a work dir of more than
SNAPSHOT_INLINE entries is walked in a thread: the event loop serves the upload meanwhile)
leaves a stale snapshot as the next execution's `before`, and the next result reports the
uploaded file as a change of its code."""

import asyncio
from pathlib import Path

import pytest

from kernel_service.workdir import snapshots
from kernel_service.workdir.snapshots import FileChanges, Snapshot


def test_an_upload_during_the_after_walk_is_not_the_next_executions_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = snapshots.snapshot
    walked, resume = asyncio.Event(), asyncio.Event()

    async def walk_in_a_thread(work_dir: Path) -> Snapshot:
        taken = await real(work_dir)  # what the thread saw...
        walked.set()
        await resume.wait()  # ...handed back to the loop a moment later
        return taken

    async def main() -> list[str]:
        changes = FileChanges(tmp_path, "s")
        before = await changes.before()
        monkeypatch.setattr(snapshots, "snapshot", walk_in_a_thread)
        after = asyncio.create_task(changes.after(before))
        await walked.wait()
        with changes.writing():  # PUT /sessions/s/files/up.txt, served meanwhile
            (tmp_path / "up.txt").write_text("uploaded")
        resume.set()
        assert await after == []
        monkeypatch.setattr(snapshots, "snapshot", real)
        next_before = await changes.before()
        return [f.path for f in await changes.after(next_before)]  # code that wrote nothing

    assert asyncio.run(main()) == []
