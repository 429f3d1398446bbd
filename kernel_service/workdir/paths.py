"""Link-safe paths in a session's work directory: a path checked before anything is touched,
then walked one directory at a time without following a link.

The kernel owns the work directory (another uid, in the sandbox) and may change it at any
moment, planting symbolic links where the service will look. So nothing in `workdir` trusts
a name between two system calls: every directory on a path is opened relative to the one
before it with O_NOFOLLOW | O_DIRECTORY (a `dir_fd` walk), a file is opened with O_NOFOLLOW,
an upload is written to a new hidden file and renamed over its target (never written
through an existing file or link), walks never follow links, and ownership is only ever set
with fchown on a descriptor the service opened. A path through a symbolic link is refused,
wherever the link points. What the service makes gets the owner of the work directory, so
the kernel can read and change it.
"""

import contextlib
import errno
import os
import stat
from pathlib import Path

from kernel_service.errors import (
    FileChanged,
    FileNotFound,
    InvalidFilePath,
    NotAFile,
    SymlinkRefused,
)

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
# Directories deeper than this are not walked, and paths may not be deeper: a walk holds
# one descriptor per level.
MAX_DEPTH = 64

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# What a path the code changes under the service gives: gone, a link, a directory, or not
RACED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)


def split_path(path: str) -> list[str]:
    """The names along `path`, relative to the work directory; InvalidFilePath for a path
    that is empty, absolute, has `.` or `..` or empty components, a NUL byte, or is too
    long or too deep. Nothing is touched."""
    if not path:
        raise InvalidFilePath(path, "it is empty")
    if "\x00" in path:
        raise InvalidFilePath(path, "it holds a NUL byte")
    if path.startswith("/"):
        raise InvalidFilePath(path, "it is absolute")
    try:
        encoded = path.encode()
    except UnicodeEncodeError:
        raise InvalidFilePath(path, "it is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise InvalidFilePath(path, f"it is longer than {MAX_PATH_BYTES} bytes")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise InvalidFilePath(path, f"it is more than {MAX_DEPTH} levels deep")
    for part in parts:
        if part in ("", ".", ".."):
            shown = f"`{part}`" if part else "an empty name (`//`, or `/` at an end)"
            raise InvalidFilePath(path, f"it has {shown} in it")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise InvalidFilePath(path, f"a name in it is longer than {MAX_NAME_BYTES} bytes")
    return parts


def open_root(work_dir: Path, path: str) -> int:
    try:
        return os.open(work_dir, DIR_FLAGS)
    except FileNotFoundError:
        raise FileNotFound(path) from None


def refusal(parent: int, name: str, path: str, shown: str, exc: OSError) -> Exception:
    """Why `name` in `parent` could not be opened, as the error to raise: what is there now
    when that explains it, else FileChanged (the code changed it in between)."""
    try:
        found = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return FileNotFound(path)
    except OSError:
        return exc
    if stat.S_ISLNK(found.st_mode):
        return SymlinkRefused(path, shown)
    if not stat.S_ISREG(found.st_mode) and not stat.S_ISDIR(found.st_mode):
        return NotAFile(shown, "is not a regular file")
    if exc.errno == errno.ENOTDIR and stat.S_ISREG(found.st_mode):
        return NotAFile(shown, "is not a directory")
    if exc.errno in RACED:
        return FileChanged(path, "Nothing was done.")
    return exc


def open_dir(parent: int, name: str, path: str, shown: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise refusal(parent, name, path, shown, exc) from None


def _open_parent(root: int, parts: list[str], path: str) -> int:
    """A new descriptor of the directory that holds the last of `parts`."""
    current = os.dup(root)
    try:
        for depth, name in enumerate(parts[:-1]):
            following = open_dir(current, name, path, "/".join(parts[: depth + 1]))
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


def parent_of(work_dir: Path, path: str) -> tuple[list[str], int]:
    """`path` split, and a descriptor of the directory its last part is in (to close)."""
    parts = split_path(path)
    root = open_root(work_dir, path)
    try:
        return parts, _open_parent(root, parts, path)
    finally:
        os.close(root)


def own_dir(work_dir: Path, name: str) -> tuple[int, int, int]:
    """A descriptor of the directory `name` right in the work directory, made if missing
    (the owner's), and the uid and gid of the work directory's owner. A link is refused."""
    root = open_root(work_dir, name)
    try:
        owner = os.fstat(root)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=root)
        fd = open_dir(root, name, name, name)
    finally:
        os.close(root)
    try:
        found = os.fstat(fd)
        if (found.st_uid, found.st_gid) != (owner.st_uid, owner.st_gid):
            os.fchown(fd, owner.st_uid, owner.st_gid)
    except BaseException:
        os.close(fd)
        raise
    return fd, owner.st_uid, owner.st_gid
