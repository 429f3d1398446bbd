"""A file of the work directory opened to be read: only a single regular file, reached
without a link, and read whole as it was at one moment."""

import os
import stat
from pathlib import Path

from kernel_service.errors import FileChanged, IsADirectory, NotAFile
from kernel_service.workdir.paths import parent_of, refusal


def open_file(work_dir: Path, path: str) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at `path` (the caller closes it) and its status.

    Refused: a symbolic link anywhere on the path, a directory, anything but a regular
    file, and a file with other hard links (it could be a file from elsewhere)."""
    parts, parent = parent_of(work_dir, path)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO: no wait
        try:
            fd = os.open(parts[-1], flags, dir_fd=parent)
        except OSError as exc:
            raise refusal(parent, parts[-1], path, path, exc) from None
    finally:
        os.close(parent)
    try:
        found = os.fstat(fd)
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectory(path)
        if not stat.S_ISREG(found.st_mode):
            raise NotAFile(path, "is not a regular file")
        if found.st_nlink > 1:
            raise NotAFile(path, "has other hard links: the files API serves only single files")
    except BaseException:
        os.close(fd)
        raise
    return fd, found


def read_whole(fd: int, path: str, found: os.stat_result, attempts: int = 3) -> bytes:
    """All of the open file `fd` (`found`: its status when opened), as it was at one moment:
    read again while the code changes it (its size or times change while it is read), and
    FileChanged once `attempts` reads all saw it change."""
    for _ in range(attempts):
        data = bytearray()
        while chunk := os.pread(fd, found.st_size + 1 - len(data), len(data)):
            data += chunk
            if len(data) > found.st_size:
                break
        now = os.fstat(fd)
        if len(data) == found.st_size and _unchanged(found, now):
            return bytes(data)
        found = now
    raise FileChanged(path, "Nothing was sent.")


def _unchanged(before: os.stat_result, after: os.stat_result) -> bool:
    return (before.st_size, before.st_mtime_ns, before.st_ctime_ns) == (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
    )
