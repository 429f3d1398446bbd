"""Sessions' work directories: the kernel's cwd and home, kept across kernel restarts.

Where the service can (root, with mkfs.ext4 and loop devices), each one is a filesystem
of its own, an ext4 image of a fixed size mounted nosuid,nodev on the directory, so a
session that fills its disk gets ENOSPC and nobody else notices. Elsewhere it is a plain
directory and its size is not capped (said at start-up and in /healthz).

The root they are made in is the service's alone: at each start, what in it no session
owns is deleted. So a root is taken only when it is new, empty, marked as the service's
(MARKER, written when it is taken), or holds nothing but the recorded sessions' work
directories (a root an earlier version made); one that holds anything else is refused
before anything in it is touched.
"""

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = ".kernel-service-work-root"
_MARKER_TEXT = (
    "This directory holds kernel-service's session work directories (KERNEL_SERVICE_WORK_DIR).\n"
    "At each start the service deletes what in it no session owns: keep nothing else here.\n"
)
# What a root may hold besides the sessions' work directories: a filesystem's own
# lost+found, and warm kernels' directories (pool.py names them; never recorded).
_LOST_AND_FOUND = "lost+found"
_POOL_DIR = re.compile(r"pool-[0-9a-f]{32}")


class WorkspaceError(Exception):
    """A work directory could not be made; the message says why."""


class ForeignWorkRoot(Exception):
    """The work root holds what the service did not make; the message says what."""


class Workspaces:
    def __init__(self, root: Path, size_bytes: int) -> None:
        """`size_bytes` 0 means no cap."""
        self.root = root.resolve()
        self._size = size_bytes
        self._mkfs = shutil.which("mkfs.ext4")
        self.capped = bool(size_bytes and os.geteuid() == 0 and self._mkfs)

    def claim_root(self, recorded: Iterable[Path]) -> None:
        """Take the root as the service's (see the module's docstring); `recorded`: the
        work directories of the sessions the state store records. Raises ForeignWorkRoot
        for a root that holds anything else."""
        self.root.mkdir(parents=True, exist_ok=True)
        marker = self.root / MARKER
        if marker.is_file() and not marker.is_symlink():
            return
        own = {p.name for p in recorded if p.parent == self.root}
        own |= {f".{name}.img" for name in own}
        foreign = sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.name not in own
            and entry.name != _LOST_AND_FOUND
            and not (entry.is_dir() and _POOL_DIR.fullmatch(entry.name))
        )
        if foreign:
            shown = ", ".join(map(repr, foreign[:5])) + (", ..." if len(foreign) > 5 else "")
            raise ForeignWorkRoot(
                f"the work directory {self.root} holds {len(foreign)} entries kernel-service "
                f"did not make ({shown}); the service deletes what in it no session owns, so "
                "give it a directory of its own, new or empty (KERNEL_SERVICE_WORK_DIR, "
                "--work-dir). If they are an earlier kernel-service's leftovers, remove them, "
                f"or create the file {MARKER} there to hand the service the directory whole"
            )
        marker.write_text(_MARKER_TEXT)

    def describe(self) -> str:
        if self.capped:
            return f"{self._size // (1024 * 1024)} MiB per session (own ext4 filesystem)"
        return "not capped (needs root and mkfs.ext4)"

    def path(self, session_id: str) -> Path:
        return self.root / session_id

    async def create(self, session_id: str) -> Path:
        path = self.path(session_id)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        if not self.capped:
            return path
        image = self._image(path)
        try:
            await asyncio.to_thread(_sparse_file, image, self._size)
            await _run(self._mkfs or "mkfs.ext4", "-q", "-F", "-m", "0", str(image))
            await _run("mount", "-o", "loop,nosuid,nodev", str(image), str(path))
            await asyncio.to_thread(shutil.rmtree, path / "lost+found", True)
        except BaseException:
            await self.remove(path)
            raise
        return path

    async def remove(self, path: Path) -> None:
        """Unmount (if mounted) and delete a work directory and everything in it."""
        if os.path.ismount(path):  # noqa: ASYNC240 (one stat)
            try:
                await _run("umount", str(path))
            except WorkspaceError:
                await _run("umount", "-l", str(path))  # busy: detach now, free when unused
        await asyncio.to_thread(_remove_dir_and_image, path, self._image(path))

    async def restore(self, path: Path) -> None:
        """A recorded session's work directory as it was: mounted again if its filesystem
        is not (after a reboot), made afresh if it is gone."""
        image = self._image(path)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        if os.path.ismount(path) or not image.exists():  # noqa: ASYNC240 (two stats)
            return
        await _run("mount", "-o", "loop,nosuid,nodev", str(image), str(path))

    async def remove_stale(self, keep: set[Path]) -> list[Path]:
        """Remove the work directories an earlier service left that no session of `keep`
        (the ones carried on) owns."""
        stale = await asyncio.to_thread(self._stale, keep)
        for path in stale:
            await self.remove(path)
        return stale

    def _stale(self, keep: set[Path]) -> list[Path]:
        """The work directories in the root (taken by claim_root: the service's) that no
        session of `keep` owns, and images without their directory; never the root's mark,
        the filesystem's lost+found, a symbolic link or another file."""
        stale = [
            p
            for p in self.root.iterdir()
            if not p.name.startswith(".")
            and p.name != _LOST_AND_FOUND
            and p.is_dir()
            and not p.is_symlink()
            and p.resolve() not in keep
        ]
        stale += [
            p.parent / p.name[1:-4]
            for p in self.root.glob(".*.img")
            if not (p.parent / p.name[1:-4]).exists()
        ]
        return stale

    @staticmethod
    def _image(path: Path) -> Path:
        return path.parent / f".{path.name}.img"


async def _run(*argv: str) -> None:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise WorkspaceError(f"{argv[0]} failed: {output.decode(errors='replace').strip()}")


def _sparse_file(path: Path, size: int) -> None:
    with path.open("wb") as file:
        file.truncate(size)


def _remove_dir_and_image(path: Path, image: Path) -> None:
    """The work directory with all in it, and its filesystem's image if it has one (freeing
    a large image's blocks takes a while)."""
    shutil.rmtree(path, ignore_errors=True)
    image.unlink(missing_ok=True)
