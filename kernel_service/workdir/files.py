"""The files of a session's work directory: paths checked, read, written, listed, removed,
and a cheap snapshot to tell which files an execution created or changed.

The kernel owns the work directory (another uid, in the sandbox) and may change it at any
moment, planting symbolic links where the service will look. So nothing here trusts a name
between two system calls: every directory on a path is opened relative to the one before
it with O_NOFOLLOW | O_DIRECTORY (a `dir_fd` walk), a file is opened with O_NOFOLLOW, an
upload is written to a new hidden file and renamed over its target (never written through
an existing file or link), walks never follow links, and ownership is only ever set with
fchown on a descriptor the service opened. A path through a symbolic link is refused,
wherever the link points. What the service makes gets the owner of the work directory, so
the kernel can read and change it.
"""

import asyncio
import contextlib
import errno
import itertools
import os
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from kernel_service.errors import (
    FileChanged,
    FileNotFound,
    FileTooLarge,
    InvalidFilePath,
    IsADirectory,
    NotAFile,
    SymlinkRefused,
    WorkspaceFull,
)
from kernel_service_client.models import FILE_URL_TEMPLATE, FileRef

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096
# Directories deeper than this are not walked, and paths may not be deeper: a walk holds
# one descriptor per level.
MAX_DEPTH = 64
# A snapshot walks this many entries on the event loop, and the rest (up to
# SNAPSHOT_ENTRIES) in a thread: a small work dir costs microseconds, a large one no stall.
SNAPSHOT_INLINE = 256
SNAPSHOT_ENTRIES = 10_000
# Entries a listing or a size count walks at most (files and directories).
WALK_ENTRIES = 100_000
# A DELETE removes directories nested this deep at most (a descriptor per level), and
# stops after this many entries.
REMOVE_DEPTH = 256
REMOVE_ENTRIES = 1_000_000
# Changed files one result reports at most.
REPORTED_FILES = 100

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
# What a path the code changes under the service gives: gone, a link, a directory, or not
_RACED = (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST)


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


# ---------------------------------------------------------------- paths


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


def _open_root(work_dir: Path, path: str) -> int:
    try:
        return os.open(work_dir, _DIR_FLAGS)
    except FileNotFoundError:
        raise FileNotFound(path) from None


def _refusal(parent: int, name: str, path: str, shown: str, exc: OSError) -> Exception:
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
    if exc.errno in _RACED:
        return FileChanged(path, "Nothing was done.")
    return exc


def _open_dir(parent: int, name: str, path: str, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        raise _refusal(parent, name, path, shown, exc) from None


def _open_parent(root: int, parts: list[str], path: str) -> int:
    """A new descriptor of the directory that holds the last of `parts`."""
    current = os.dup(root)
    try:
        for depth, name in enumerate(parts[:-1]):
            following = _open_dir(current, name, path, "/".join(parts[: depth + 1]))
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current


# ---------------------------------------------------------------- reading and removing


def _parent_of(work_dir: Path, path: str) -> tuple[list[str], int]:
    """`path` split, and a descriptor of the directory its last part is in (to close)."""
    parts = split_path(path)
    root = _open_root(work_dir, path)
    try:
        return parts, _open_parent(root, parts, path)
    finally:
        os.close(root)


def open_file(work_dir: Path, path: str) -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at `path` (the caller closes it) and its status.

    Refused: a symbolic link anywhere on the path, a directory, anything but a regular
    file, and a file with other hard links (it could be a file from elsewhere)."""
    parts, parent = _parent_of(work_dir, path)
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # a FIFO: no wait
        try:
            fd = os.open(parts[-1], flags, dir_fd=parent)
        except OSError as exc:
            raise _refusal(parent, parts[-1], path, path, exc) from None
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


def remove(work_dir: Path, path: str) -> None:
    """Remove the file, directory (with all in it) or symbolic link (not what it points
    to) at `path`; nothing is followed. FileChanged when the code changes it meanwhile."""
    parts, parent = _parent_of(work_dir, path)
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
        if exc.errno in _RACED:
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
        top = _open_dir(parent, name, path, path)
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
                stack.append((fd, subdir, os.open(subdir, _DIR_FLAGS, dir_fd=fd)))
    finally:
        for _, _, fd in stack:
            os.close(fd)


# ---------------------------------------------------------------- writing


class Upload:
    """One file being written to `path`: into a new hidden file beside it, renamed over
    the target by `commit` (so the kernel sees the old file or the new, never half of
    one), removed by `abort` with any directories made for it.

    `max_bytes`: FileTooLarge past it. `room`: WorkspaceFull past it (None: the
    filesystem's own ENOSPC decides, also a WorkspaceFull)."""

    def __init__(self, work_dir: Path, path: str, max_bytes: int, room: int | None) -> None:
        parts = split_path(path)
        self.path = path
        self.size = 0
        self.replaces = False
        self._name = parts[-1]
        self._max = max_bytes
        self._room = room
        self._fd: int | None = None
        self._dir: int | None = None
        self._temp = f".upload-{uuid.uuid4().hex}"
        self._made: list[tuple[int, str]] = []  # directories made: (parent fd, name)
        root = _open_root(work_dir, path)
        try:
            owner = os.fstat(root)
            self._uid, self._gid = owner.st_uid, owner.st_gid
            self._dir = self._make_parents(root, parts)
            self._check_target()
            self._fd = os.open(
                self._temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=self._dir,
            )
            os.fchown(self._fd, self._uid, self._gid)
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                raise WorkspaceFull(os.strerror(exc.errno)) from None
            if isinstance(exc, OSError) and exc.errno in _RACED:  # a directory removed
                raise FileChanged(path, "Nothing was written.") from None
            raise
        finally:
            os.close(root)

    def _make_parents(self, root: int, parts: list[str]) -> int:
        """The directory to write in, made with any missing parents (the owner's)."""
        current = os.dup(root)
        for depth, name in enumerate(parts[:-1]):
            shown = "/".join(parts[: depth + 1])
            try:
                os.mkdir(name, 0o755, dir_fd=current)
            except FileExistsError:
                made = False
            except BaseException:
                os.close(current)
                raise
            else:
                made = True
            try:
                try:
                    following = _open_dir(current, name, self.path, shown)
                except FileNotFound:  # there a moment ago
                    raise FileChanged(self.path, "Nothing was written.") from None
                if made:
                    os.fchown(following, self._uid, self._gid)
            except BaseException:
                if made:
                    with contextlib.suppress(OSError):
                        os.rmdir(name, dir_fd=current)
                os.close(current)
                raise
            if made:
                self._made.append((current, name))  # kept open to remove it on abort
            else:
                os.close(current)
            current = following
        return current

    def _check_target(self) -> None:
        assert self._dir is not None
        try:
            found = os.stat(self._name, dir_fd=self._dir, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISLNK(found.st_mode):
            raise SymlinkRefused(self.path, self.path)
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectory(self.path)
        self.replaces = True
        if self._room is not None:
            self._room += found.st_size  # freed by the rename

    def write(self, data: bytes) -> None:
        assert self._fd is not None
        self.size += len(data)
        if self.size > self._max:
            raise FileTooLarge(self._max)
        if self._room is not None and self.size > self._room:
            raise WorkspaceFull("the session's files would exceed KERNEL_SERVICE_SESSION_FILES_MB")
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise WorkspaceFull(os.strerror(exc.errno)) from None
            if exc.errno == errno.EFBIG:
                raise FileTooLarge(self._max) from None
            raise

    def commit(self) -> FileStat:
        """Put the file in place; what is there now."""
        assert self._fd is not None and self._dir is not None
        found = os.fstat(self._fd)
        os.close(self._fd)
        self._fd = None
        try:
            os.rename(self._temp, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                raise IsADirectory(self.path) from None
            if exc.errno in _RACED:  # its directory, or the new file, removed by the code
                raise FileChanged(self.path, "Nothing was written.") from None
            raise
        self._close()  # the directories made hold the file now
        return FileStat(self.path, found.st_size, found.st_mtime_ns)

    def abort(self) -> None:
        """Remove what was written and made; safe to call more than once."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._temp, dir_fd=self._dir)
        for parent, name in reversed(self._made):
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=parent)
        self._close()

    def _close(self) -> None:
        for parent, _ in self._made:
            os.close(parent)
        self._made.clear()
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None


def room_for_upload(work_dir: Path, total_bytes: int) -> int | None:
    """Bytes an upload may add: None where the work directory is a filesystem of its own
    (its ENOSPC caps it), else what `total_bytes` leaves beside the files already there."""
    if os.path.ismount(work_dir):
        return None
    return max(total_bytes - used_bytes(work_dir), 0)


def used_bytes(work_dir: Path) -> int:
    """The size of the files in the work directory (the first WALK_ENTRIES entries)."""
    try:
        root = os.open(work_dir, _DIR_FLAGS)
    except OSError:
        return 0
    try:
        return sum(f.size for f in _walk(root, hidden=True, max_entries=WALK_ENTRIES)[0])
    finally:
        os.close(root)


def own_dir(work_dir: Path, name: str) -> tuple[int, int, int]:
    """A descriptor of the directory `name` right in the work directory, made if missing
    (the owner's), and the uid and gid of the work directory's owner. A link is refused."""
    root = _open_root(work_dir, name)
    try:
        owner = os.fstat(root)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=root)
        fd = _open_dir(root, name, name, name)
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


# ---------------------------------------------------------------- listing and snapshots


def list_files(work_dir: Path, limit: int, hidden: bool) -> tuple[list[FileStat], bool]:
    """The regular files below the work directory in path order, at most `limit`; whether
    there are more (or more than WALK_ENTRIES entries were there to walk)."""
    root = _open_root(work_dir, ".")
    try:
        found, complete = _walk(root, hidden=hidden, max_entries=WALK_ENTRIES, max_files=limit)
    finally:
        os.close(root)
    return found, not complete


Snapshot = dict[str, tuple[int, int]]  # path → (size, mtime_ns)


def take_snapshot(work_dir: Path, max_entries: int = SNAPSHOT_ENTRIES) -> tuple[Snapshot, bool]:
    """The visible regular files of the work directory (hidden names are skipped, with the
    service's `.outputs` and IPython's `.ipython`), and whether the walk saw them all."""
    try:
        root = os.open(work_dir, _DIR_FLAGS)
    except OSError:
        return {}, True
    try:
        found, complete = _walk(root, hidden=False, max_entries=max_entries)
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
    order; at most REPORTED_FILES."""
    changed = (
        FileStat(path, size, mtime_ns)
        for path, (size, mtime_ns) in sorted(after.items())
        if before.get(path) != (size, mtime_ns)
    )
    return [file_ref(session_id, f) for f in itertools.islice(changed, REPORTED_FILES)]


def _walk(
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
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
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
