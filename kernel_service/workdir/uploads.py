"""A file written into the work directory: into a new hidden file, renamed over its target
once whole, with the size and room it may take."""

import asyncio
import contextlib
import errno
import os
import stat
import threading
import uuid
from pathlib import Path

from kernel_service.errors import (
    FileChanged,
    FileNotFound,
    FileTooLarge,
    IsADirectory,
    SymlinkRefused,
    WorkspaceFull,
)
from kernel_service.workdir.listing import FileStat, used_bytes
from kernel_service.workdir.paths import RACED, open_dir, open_root, split_path

_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
# Bytes of an upload gathered on the event loop before they are written, in a thread.
WRITE_BATCH = 1024 * 1024


class Upload:
    """One file being written to `path`: into a new hidden file beside it, renamed over
    the target by `commit` (so the kernel sees the old file or the new, never half of
    one), removed by `abort` with any directories made for it.

    Used from the event loop, it does its disk work in threads: `open`, then `write` each
    chunk as it arrives (gathered up to WRITE_BATCH bytes), then `commit`, or `abort` on
    any failure or cancellation. The thread work of one upload is done one step at a time
    (a lock), so `abort` waits for a step a cancelled caller left running before it undoes
    what that step made.

    `max_bytes`: FileTooLarge past it. `room`: WorkspaceFull past it (None: the
    filesystem's own ENOSPC decides, also a WorkspaceFull)."""

    def __init__(self, work_dir: Path, path: str, max_bytes: int, room: int | None) -> None:
        """Nothing is touched yet (`open` does)."""
        self._parts = split_path(path)
        self._work_dir = work_dir
        self.path = path
        self.size = 0
        self.replaces = False
        self._name = self._parts[-1]
        self._max = max_bytes
        self._room = room
        self._fd: int | None = None
        self._dir: int | None = None
        self._temp = f".upload-{uuid.uuid4().hex}"
        self._made: list[tuple[int, str]] = []  # directories made: (parent fd, name)
        self._batch: list[bytes] = []
        self._batched = 0
        self._lock = threading.RLock()
        # Set by abort: a step that starts later (its thread began before the abort took the
        # lock; its caller is gone) does nothing, so nothing is made after the clean-up.
        self._aborted = False

    async def open(self) -> None:
        """Make the missing directories and the hidden file to write."""
        await asyncio.to_thread(self._open)

    async def write(self, data: bytes) -> None:
        """Add `data`: FileTooLarge or WorkspaceFull at once when it takes the file past its
        bounds (nothing of it written); on disk once WRITE_BATCH bytes are waiting."""
        self.size += len(data)
        if self.size > self._max:
            raise FileTooLarge(self._max)
        if self._room is not None and self.size > self._room:
            raise WorkspaceFull("the session's files would exceed KERNEL_SERVICE_SESSION_FILES_MB")
        self._batch.append(data)
        self._batched += len(data)
        if self._batched >= WRITE_BATCH:
            await self._flush()

    async def commit(self) -> FileStat:
        """Put the file in place; what is there now."""
        await self._flush()
        return await asyncio.to_thread(self._commit)

    async def abort(self) -> None:
        """Remove what was written and made; safe to call more than once."""
        self._batch.clear()
        await asyncio.to_thread(self._abort)

    async def _flush(self) -> None:
        data, self._batch, self._batched = b"".join(self._batch), [], 0
        if data:
            await asyncio.to_thread(self._write, data)

    # ------------------------------------------------------------ in a thread, one at a time

    def _open(self) -> None:
        with self._lock:
            if self._aborted:
                return
            root = open_root(self._work_dir, self.path)
            try:
                owner = os.fstat(root)
                self._uid, self._gid = owner.st_uid, owner.st_gid
                self._dir = self._make_parents(root, self._parts)
                self._check_target()
                self._fd = os.open(
                    self._temp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                    dir_fd=self._dir,
                )
                os.fchown(self._fd, self._uid, self._gid)
            except BaseException as exc:
                self._abort()
                if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
                    raise WorkspaceFull(os.strerror(exc.errno)) from None
                if isinstance(exc, OSError) and exc.errno in RACED:  # a directory removed
                    raise FileChanged(self.path, "Nothing was written.") from None
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
                    following = open_dir(current, name, self.path, shown)
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

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._aborted:
                return
            assert self._fd is not None
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

    def _commit(self) -> FileStat:
        with self._lock:
            assert self._fd is not None and self._dir is not None
            found = os.fstat(self._fd)
            os.close(self._fd)
            self._fd = None
            try:
                os.rename(self._temp, self._name, src_dir_fd=self._dir, dst_dir_fd=self._dir)
            except OSError as exc:
                self._abort()
                if exc.errno in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise IsADirectory(self.path) from None
                if exc.errno in RACED:  # its directory, or the new file, removed by the code
                    raise FileChanged(self.path, "Nothing was written.") from None
                raise
            self._close()  # the directories made hold the file now
            return FileStat(self.path, found.st_size, found.st_mtime_ns)

    def _abort(self) -> None:
        with self._lock:
            self._aborted = True
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
