"""Memory cgroups for sandboxed kernels: a hard cap on all of a kernel's processes together.

RLIMIT_AS bounds each process; a kernel that forks could still hold many times the limit.
A memory cgroup per kernel, nested in the service's own (so the host's limits on the
service still apply), makes the kernel's processes share one limit; past it the kernel
is killed by the OOM killer, which the service reports as out of memory. Uses cgroup v1's
memory controller, the one this kind of host has; where it is missing or read-only there
are no cgroups and the start-up log and /healthz say so.
"""

import asyncio
import contextlib
import logging
import os
import uuid
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

_V1_MEMORY = Path("/sys/fs/cgroup/memory")


class MemoryCgroups:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def detect(cls) -> "MemoryCgroups | None":
        """Memory cgroups under the service's own, if this host lets us make them."""
        if not (_V1_MEMORY / "memory.limit_in_bytes").exists():
            return None
        own = next(
            (
                line.split(":", 2)[2]
                for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":", 2)[1] == "memory"
            ),
            None,
        )
        if own is None:
            return None
        parent = _V1_MEMORY / own.lstrip("/")
        _remove_stale(parent)
        # one per launcher: a process may run several services (tests do)
        root = parent / f"kernel-service-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            root.mkdir(exist_ok=True)
        except OSError as exc:
            log.warning("no memory cgroups for kernels: %s", exc)
            return None
        return cls(root)

    def create(self, name: str, limit_bytes: int) -> Path:
        """A cgroup with this memory limit; returns the `cgroup.procs` to join it by."""
        group = self.root / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return group / "cgroup.procs"

    @staticmethod
    def remove(group: Path) -> bool:
        """Remove a kernel's cgroup; False while processes are still leaving it. The service's
        group that held it goes too once empty, if its service is gone (adopted kernels)."""
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        _remove_stale(group.parent.parent)
        return True

    async def close(self, kernels_left: bool = False) -> None:
        """Remove every cgroup, waiting briefly for the last processes to leave them; with
        `kernels_left`, only the empty ones (the rest are kept kernels', and their parent)."""
        if kernels_left:
            _remove_tree(self.root)
            return
        for _ in range(100):
            _remove_tree(self.root)
            if not self.root.exists():
                return
            await asyncio.sleep(0.05)
        log.warning("memory cgroup %s still busy at exit", self.root)


def oom_kills(group: Path) -> int | None:
    """How many of the group's processes the out-of-memory killer has ended (any OOM kill,
    the group's limit or the host's); None when that cannot be read."""
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def _remove_tree(root: Path) -> None:
    for group in root.glob("*"):
        if group.is_dir():
            with contextlib.suppress(OSError):
                group.rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def _remove_stale(parent: Path) -> None:
    """Remove what services that died outright left (their pid is gone)."""
    for root in parent.glob("kernel-service-*"):
        pid = root.name.split("-")[2]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            _remove_tree(root)
