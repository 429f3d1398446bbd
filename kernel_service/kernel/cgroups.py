"""Cgroups for sandboxed kernels: limits on all of a kernel's processes together.

Rlimits bound each process (or each uid); a kernel that forks could still hold many times
them. A group per kernel in each cgroup v1 controller the host has, nested in the service's
own (so the host's limits on the service still apply), makes the kernel's processes share:

- memory: one limit; past it the OOM killer ends the kernel, which the service reports as
  out of memory;
- pids: one count of processes and threads (and with RLIMIT_NOFILE, of open files);
- cpu: an equal share (`cpu.shares`) beside every other kernel, all kernels together
  weighing as much as one busy task of the service, so it stays responsive; and an optional
  quota (`cpu.cfs_quota_us`).

A controller that is missing or read-only is left out, and the start-up log and /healthz
say so; the rlimits hold anyway.
"""

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

from kernel_service.kernel.programs.reaper import (
    CGROUP_ROOT,
    CONTROLLERS,
    own_cgroups,
    remove_cgroups_once,
)

log = logging.getLogger(__name__)

CPU_SHARES = 1024  # the kernel's weight; cgroup v1's default for a group, as for a task
CFS_PERIOD_US = 100_000
_PROBE_FILE = {"memory": "memory.limit_in_bytes", "pids": "pids.max", "cpu": "cpu.shares"}


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    tasks: int  # pids.max: processes and threads
    cpus: float = 0.0  # a CPU quota in CPUs; 0: none


class KernelCgroups:
    """The service's groups for kernels, one per controller it can use (`roots`)."""

    def __init__(self, roots: dict[str, Path], missing: dict[str, str]) -> None:
        self.roots = roots
        self.missing = missing  # controller → why it is not used

    @classmethod
    def detect(cls) -> "KernelCgroups":
        """Groups under the service's own, in each controller this host lets us use."""
        own = own_cgroups()
        roots: dict[str, Path] = {}
        missing: dict[str, str] = {}
        # one per launcher: a process may run several services (tests do)
        name = f"kernel-service-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for controller in CONTROLLERS:
            if controller not in own or not (CGROUP_ROOT / controller).is_dir():
                missing[controller] = "no cgroup v1 hierarchy for it"
                continue
            parent = CGROUP_ROOT / controller / own[controller].lstrip("/")
            _remove_stale(parent)
            root = parent / name
            try:
                root.mkdir(exist_ok=True)
            except OSError as exc:
                missing[controller] = str(exc)
                continue
            if not (root / _PROBE_FILE[controller]).exists():
                missing[controller] = f"{_PROBE_FILE[controller]} is not there"
                _remove_tree(root)
                continue
            roots[controller] = root
        for controller, why in missing.items():
            log.warning("no %s cgroups for kernels here: %s", controller, why)
        return cls(roots, missing)

    def group(self, name: str) -> Path | None:
        """The path recorded for the kernel `name`: its memory group where there is one
        (it tells an OOM kill), else any; its other groups are found from it."""
        for controller in CONTROLLERS:
            if controller in self.roots:
                return self.roots[controller] / name
        return None

    def create(self, name: str, limits: CgroupLimits) -> list[Path]:
        """The kernel's groups with their limits; the `cgroup.procs` files to join them by."""
        settings = {
            "memory": {"memory.limit_in_bytes": limits.memory_bytes},
            "pids": {"pids.max": limits.tasks},
            "cpu": {"cpu.shares": CPU_SHARES},
        }
        procs = []
        for controller, root in self.roots.items():
            group = root / name
            group.mkdir()
            for file, value in settings[controller].items():
                (group / file).write_text(str(value))
            swap_too = group / "memory.memsw.limit_in_bytes"
            if controller == "memory" and swap_too.exists():
                # memory and swap together: a kernel bounded by its cgroup alone (Deno,
                # the JVM: no RLIMIT_AS) must not spill past its limit into the host's swap
                swap_too.write_text(str(limits.memory_bytes))
            if controller == "cpu" and limits.cpus > 0:
                _set_quota(group, limits.cpus)
            procs.append(group / "cgroup.procs")
        return procs

    @staticmethod
    def remove(group: Path) -> bool:
        """Remove a kernel's groups (`group` is the one recorded); False while processes
        are still leaving them. The service's groups that held them go too once empty, if
        their service is gone (adopted kernels)."""
        done, removed = remove_cgroups_once(group)
        for member in removed:
            _remove_stale(member.parent.parent)
        return done

    async def close(self, kernels_left: bool = False) -> None:
        """Remove every group, waiting briefly for the last processes to leave them; with
        `kernels_left`, only the empty ones (the rest are kept kernels', and their parent)."""
        for _ in range(1 if kernels_left else 100):
            if await asyncio.to_thread(self._remove_roots) or kernels_left:
                return
            await asyncio.sleep(0.05)
        log.warning("cgroups %s still busy at exit", sorted(map(str, self.roots.values())))

    def _remove_roots(self) -> bool:
        """One try at removing every group; whether none is left."""
        for root in self.roots.values():
            _remove_tree(root)
        return not any(root.exists() for root in self.roots.values())


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


def _set_quota(group: Path, cpus: float) -> None:
    """At most `cpus` CPUs' time; refused (with a warning) past the quota of a group above."""
    quota = max(1000, round(cpus * CFS_PERIOD_US))
    try:
        (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(quota))
    except OSError as exc:
        log.warning("no CPU quota for kernel cgroup %s: %s", group.name, exc)


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
