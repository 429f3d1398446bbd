"""A cheap snapshot of a work directory, taken before and after an execution, to tell which
files the execution created or changed."""

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterator
from pathlib import Path

from kernel_service.workdir.listing import FileStat, file_ref, walk
from kernel_service.workdir.paths import DIR_FLAGS
from kernel_service_client.models import FileRef

# A snapshot walks this many entries on the event loop, and the rest (up to
# SNAPSHOT_ENTRIES) in a thread: a small work dir costs microseconds, a large one no stall.
SNAPSHOT_INLINE = 256
SNAPSHOT_ENTRIES = 10_000
# Changed files one result reports at most.
REPORTED_FILES = 100


Snapshot = dict[str, tuple[int, int]]  # path → (size, mtime_ns)


def take_snapshot(work_dir: Path, max_entries: int = SNAPSHOT_ENTRIES) -> tuple[Snapshot, bool]:
    """The visible regular files of the work directory (hidden names are skipped, with the
    service's `.outputs` and IPython's `.ipython`), and whether the walk saw them all."""
    try:
        root = os.open(work_dir, DIR_FLAGS)
    except OSError:
        return {}, True
    try:
        found, complete = walk(root, hidden=False, max_entries=max_entries)
    except OSError:
        return {}, False
    finally:
        os.close(root)
    return {f.path: (f.size, f.mtime_ns) for f in found}, complete


async def snapshot(work_dir: Path) -> Snapshot:
    """take_snapshot, on the event loop while it is small and in a thread once it is not."""
    taken, complete = take_snapshot(work_dir, SNAPSHOT_INLINE)
    if complete:
        return taken
    return (await asyncio.to_thread(take_snapshot, work_dir))[0]


def changed_files(before: Snapshot, after: Snapshot, session_id: str) -> list[FileRef]:
    """The files in `after` that are new or differ (size or time) from `before`, in path
    order; at most REPORTED_FILES. Done on the event loop: two snapshots of SNAPSHOT_ENTRIES
    files compare in about 2 ms."""
    changed = (
        FileStat(path, size, mtime_ns)
        for path, (size, mtime_ns) in sorted(after.items())
        if before.get(path) != (size, mtime_ns)
    )
    return [file_ref(session_id, f) for f in itertools.islice(changed, REPORTED_FILES)]


class FileChanges:
    """Which files each execution in a work directory creates or changes.

    The snapshot taken after one execution is the one before the next (a walk of the
    directory saved per execution), unless something else wrote there meanwhile or is
    writing now (an upload or a removal through the API, inside `writing()`): then a new
    one is taken. Files written between two results (by code left running in the kernel, or
    by an execution cut short) are reported with the next result."""

    def __init__(self, work_dir: Path, session_id: str) -> None:
        self._work_dir = work_dir
        self._session_id = session_id
        self._last: Snapshot | None = None
        self._writers = 0
        self._writes = 0  # writes begun or ended: a walk they overlapped is not kept

    async def before(self) -> Snapshot:
        """The snapshot before an execution."""
        if self._last is not None and self._writers == 0:
            return self._last
        return await snapshot(self._work_dir)

    async def after(self, before: Snapshot) -> list[FileRef]:
        """What the execution changed since `before`; its snapshot is kept for the next."""
        self._last = None
        writes = self._writes
        taken = await snapshot(self._work_dir)
        if self._writers == 0 and self._writes == writes:
            self._last = taken
        return changed_files(before, taken, self._session_id)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Around a write into the directory made outside the kernel."""
        self._writers += 1
        self._writes += 1
        self._last = None
        try:
            yield
        finally:
            self._writers -= 1
            self._writes += 1
            self._last = None
