"""What a session's work directory holds: its regular files walked (never through a link),
listed, counted, and named by the URLs the API serves them at."""

import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from kernel_service.workdir.paths import DIR_FLAGS, MAX_DEPTH, open_root
from kernel_service_client.models import FILE_URL_TEMPLATE, FileRef

# Entries a listing or a size count walks at most (files and directories).
WALK_ENTRIES = 100_000


@dataclass(frozen=True)
class FileStat:
    path: str  # relative to the work directory, `/`-separated
    size: int
    mtime_ns: int


def file_url(session_id: str, path: str) -> str:
    return FILE_URL_TEMPLATE.format(session_id=session_id, path=quote(path, safe="/"))


def file_ref(session_id: str, found: FileStat) -> FileRef:
    return FileRef(
        path=found.path,
        size=found.size,
        modified=datetime.fromtimestamp(found.mtime_ns / 1e9, UTC),
        url=file_url(session_id, found.path),
    )


def list_files(work_dir: Path, limit: int, hidden: bool) -> tuple[list[FileStat], bool]:
    """The regular files below the work directory in path order, at most `limit`; whether
    there are more (or more than WALK_ENTRIES entries were there to walk)."""
    root = open_root(work_dir, ".")
    try:
        found, complete = walk(root, hidden=hidden, max_entries=WALK_ENTRIES, max_files=limit)
    finally:
        os.close(root)
    return found, not complete


def used_bytes(work_dir: Path) -> int:
    """The size of the files in the work directory (the first WALK_ENTRIES entries)."""
    try:
        root = os.open(work_dir, DIR_FLAGS)
    except OSError:
        return 0
    try:
        return sum(f.size for f in walk(root, hidden=True, max_entries=WALK_ENTRIES)[0])
    finally:
        os.close(root)


def walk(
    root: int, *, hidden: bool, max_entries: int, max_files: int | None = None
) -> tuple[list[FileStat], bool]:
    """The regular files below `root` in path order, and whether the walk was whole.

    Never follows a link; skips names that are not UTF-8 (no URL can name them), hidden
    names unless `hidden`, and directories deeper than MAX_DEPTH; stops after
    `max_entries` entries seen or `max_files` files found."""
    found: list[FileStat] = []
    seen = 0
    stack: list[tuple[str, int, Iterator[os.DirEntry[str]]]] = []
    complete = True
    try:
        top = os.dup(root)
        try:
            listed = _entries(top, max_entries)
        except BaseException:
            os.close(top)
            raise
        stack.append(("", top, iter(listed)))
        while stack:
            prefix, fd, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                os.close(fd)
                stack.pop()
                continue
            seen += 1
            if seen > max_entries or (max_files is not None and len(found) >= max_files):
                complete = False
                break
            name = entry.name
            if not hidden and name.startswith("."):
                continue
            try:
                name.encode()
                status = entry.stat(follow_symlinks=False)
            except (UnicodeEncodeError, OSError):
                continue
            path = prefix + name
            if stat.S_ISREG(status.st_mode):
                found.append(FileStat(path, status.st_size, status.st_mtime_ns))
            elif stat.S_ISDIR(status.st_mode) and len(stack) < MAX_DEPTH:
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                try:
                    children = _entries(child, max_entries - seen)
                except OSError:
                    os.close(child)
                    continue
                stack.append((path + "/", child, iter(children)))
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    return found, complete


def _entries(fd: int, at_most: int) -> list[os.DirEntry[str]]:
    """A directory's entries by name, at most `at_most` (+1, to tell there were more)."""
    with os.scandir(fd) as listing:
        return sorted(itertools.islice(listing, max(at_most, 0) + 1), key=lambda e: e.name)
