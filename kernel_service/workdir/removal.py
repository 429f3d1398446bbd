"""A file or a whole directory of the work directory removed, without following a link,
with a descriptor per level and a bound on what is walked."""

import contextlib
import os
import stat
from pathlib import Path

from kernel_service.errors import FileChanged, FileNotFound, NotAFile, SymlinkRefused
from kernel_service.workdir.paths import DIR_FLAGS, RACED, open_dir, parent_of

# A DELETE removes directories nested this deep at most (a descriptor per level), and
# stops after this many entries.
REMOVE_DEPTH = 256
REMOVE_ENTRIES = 1_000_000


def remove(work_dir: Path, path: str) -> None:
    """Remove the file, directory (with all in it) or symbolic link (not what it points
    to) at `path`; nothing is followed. FileChanged when the code changes it meanwhile."""
    parts, parent = parent_of(work_dir, path)
    try:
        try:
            found = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            raise FileNotFound(path) from None
        if stat.S_ISDIR(found.st_mode):
            _remove_dir(parent, parts[-1], path)
        else:
            os.unlink(parts[-1], dir_fd=parent)
    except FileNotFoundError:
        raise FileNotFound(path) from None
    except OSError as exc:
        if exc.errno in RACED:
            raise FileChanged(path, "It may be partly removed.", partly_done=True) from None
        raise
    finally:
        os.close(parent)


def _remove_dir(parent: int, name: str, path: str) -> None:
    """Remove the directory `name` in `parent` and all in it. Each directory is opened with
    O_NOFOLLOW | O_DIRECTORY relative to the one above (never a link, nor anything that
    could block an open, as a FIFO would), everything else is unlinked. One descriptor is
    held per level: NotAFile for directories nested deeper than REMOVE_DEPTH; FileChanged
    past REMOVE_ENTRIES entries (the code keeps filling it)."""
    try:
        top = open_dir(parent, name, path, path)
    except (SymlinkRefused, NotAFile):  # a directory a moment ago
        raise FileChanged(path, "Nothing was removed.") from None
    stack = [(parent, name, top)]  # (the directory's parent, its name, it), deepest last
    budget = REMOVE_ENTRIES
    try:
        while stack:
            above, current, fd = stack[-1]
            with os.scandir(fd) as entries:
                subdir = None
                for entry in entries:
                    budget -= 1
                    if budget < 0:
                        raise FileChanged(
                            path, "Some of it was removed, not all.", partly_done=True
                        )
                    if entry.is_dir(follow_symlinks=False):
                        subdir = entry.name
                        break
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=fd)
            if subdir is None:  # empty now: up a level
                stack.pop()
                os.close(fd)
                os.rmdir(current, dir_fd=above)
            elif len(stack) >= REMOVE_DEPTH:
                shown = f"holds directories nested more than {REMOVE_DEPTH} deep"
                raise NotAFile(path, f"{shown}: remove them from the code")
            else:
                stack.append((fd, subdir, os.open(subdir, DIR_FLAGS, dir_fd=fd)))
    finally:
        for _, _, fd in stack:
            os.close(fd)
