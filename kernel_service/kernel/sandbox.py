"""The bubblewrap launcher: every kernel in its own namespaces, as its own unprivileged user.

Each kernel gets a private network namespace (it reaches the service only through the ipc
sockets in its bind-mounted directory), its own PID namespace, a read-only system and
Python, a private size-capped /tmp, its session's work directory as /workspace, a clean
environment, a uid of its own (so per-uid limits are per kernel; from the range this
service process claimed, see uids.py), no capabilities, no new privileges, a seccomp
filter and rlimits.

bubblewrap runs as root *without* a user namespace and the kernel drops to its uid inside
(setpriv): an unprivileged bwrap could not reach a Python installed under a 0700 /root,
and a uid mapped inside a user namespace created by root is root on the host. Without a
user namespace of its own, the seccomp filter is what keeps the kernel from making one.

What the sandbox is, is written once in sandbox_spec.py; here it is rendered as prlimit,
bwrap and setpriv arguments, and the fork-server's launch (forkserver.py) sends it to the
zygote instead.
"""

import asyncio
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kernel_service.kernel.cgroups import CPU_SHARES, CgroupLimits, KernelCgroups
from kernel_service.kernel.launcher import (
    AdoptionError,
    KernelLauncher,
    KernelProcess,
    LaunchSpec,
    PopenKernelProcess,
    RecordedKernel,
)
from kernel_service.kernel.sandbox_spec import (
    MIB,
    PROC_MASKED,
    SHM_BYTES,
    SandboxLimits,
    SandboxSpec,
    bwrap_options,
    prlimit_options,
    sandbox_spec,
    setpriv_options,
)
from kernel_service.kernel.seccomp import build_filter
from kernel_service.kernel.uids import UidClaim, UidPool, UidRange, claim

log = logging.getLogger(__name__)

# Processes in a kernel's cgroup that are not the kernel's: the launch's two root wrappers
# (bwrap and its pid 1, or the zygote's child and its pid 1).
_WRAPPER_TASKS = 2


class SandboxUnavailable(Exception):
    """The sandbox cannot be set up here; the message says why and what to do."""


class BubblewrapLauncher(KernelLauncher):
    """Starts each kernel under bubblewrap; see the module docstring for what that means."""

    isolation = "bubblewrap"

    def __init__(self, limits: SandboxLimits, uid_base: int | None, uid_count: int,
                 read_only_paths: tuple[Path, ...] = ()) -> None:  # fmt: skip
        """`uid_base` None: a free range of `uid_count` uids is claimed (see uids.py)."""
        self._limits = limits
        self._uid_base, self._uid_count = uid_base, uid_count
        self._claim: UidClaim | None = None
        self._uids = UidPool(0, 0)  # until the range is claimed
        self._read_only = read_only_paths
        bwrap, setpriv, prlimit = (shutil.which(t) for t in ("bwrap", "setpriv", "prlimit"))
        if not (bwrap and setpriv and prlimit):
            raise SandboxUnavailable(
                "bubblewrap, setpriv and prlimit are needed (Debian: apt-get install "
                "bubblewrap util-linux); or run without a sandbox: KERNEL_SERVICE_SANDBOX=none"
            )
        if os.geteuid() != 0:
            raise SandboxUnavailable(
                "the sandbox gives each kernel a uid of its own, which needs the service "
                "to run as root; or run without a sandbox: KERNEL_SERVICE_SANDBOX=none"
            )
        self._bwrap, self._setpriv, self._prlimit = bwrap, setpriv, prlimit
        self._cgroups = KernelCgroups.detect()
        self._cgroup_limits = CgroupLimits(
            # Above RLIMIT_AS, so one process growing gets MemoryError first; /tmp and
            # /dev/shm are memory too and count here.
            memory_bytes=limits.memory_bytes + limits.tmp_bytes + SHM_BYTES + 128 * MIB,
            # RLIMIT_NPROC stops the kernel first; this holds whatever its uid does
            tasks=limits.processes + _WRAPPER_TASKS,
            cpus=limits.cpus,
        )
        try:
            self._seccomp = build_filter()
        except OSError as exc:
            raise SandboxUnavailable(f"the seccomp filter could not be built: {exc}") from exc

    def bounds_memory_by_cgroup(self) -> bool:
        return "memory" in self._cgroups.roots

    def describe(self) -> dict[str, Any]:
        limits, roots = self._limits, self._cgroups.roots
        return {
            "sandbox": self.isolation,
            "network": "none (private network namespace: ipc sockets to the service; a "
            "bridged kernel's TCP stays on the namespace's own loopback)",
            "processes": "own PID namespace",
            "filesystem": "system and Python read-only; /workspace and a private /tmp writable",
            "user": "a uid of its own per kernel, no capabilities, no new privileges",
            "seccomp": True,
            "memory_mb": limits.memory_bytes // MIB,
            "max_processes": limits.processes,
            "max_file_mb": limits.file_bytes // MIB,
            "max_open_files": limits.open_files,
            "tmp_mb": limits.tmp_bytes // MIB,
            "memory_cgroup_mb": self._cgroup_limits.memory_bytes // MIB
            if "memory" in roots
            else None,
            "pids_cgroup_max": self._cgroup_limits.tasks if "pids" in roots else None,
            "cpu_shares": CPU_SHARES if "cpu" in roots else None,
            "cpu_quota": limits.cpus if "cpu" in roots and limits.cpus > 0 else None,
            "cgroups": self._describe_cgroups(),
            "proc_masked": [f"/proc/{name}" for name in PROC_MASKED],
        }

    def _describe_cgroups(self) -> str:
        used = ", ".join(self._cgroups.roots)
        words = f"{used} (v1): a group per kernel, all its processes together" if used else ""
        missing = "; ".join(f"{name}: {why}" for name, why in self._cgroups.missing.items())
        if missing:
            words += f"{'; ' if words else ''}not available here ({missing}): rlimits only"
        return words

    def verify(self) -> None:
        """Start a sandbox once, so a host that refuses namespaces is found at start-up."""
        probe = subprocess.run(
            [self._bwrap, "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
             "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
             "--symlink", "usr/bin", "/bin", "--", "/bin/true"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        if probe.returncode != 0:
            raise SandboxUnavailable(
                f"bubblewrap could not create namespaces here: {probe.stderr.strip()}; "
                "or run without a sandbox: KERNEL_SERVICE_SANDBOX=none"
            )

    def claim_uids(self, earlier: UidRange | None, own: set[int]) -> UidRange:
        self._claim = claim(self._uid_count, self._uid_base, earlier, own)
        self._uids = UidPool(self._claim.range.first, self._claim.range.count)
        return self._claim.range

    def release_uids(self) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    async def prepare(self) -> None:
        await asyncio.to_thread(self.check_uids)  # a scan of every process on the host

    def check_uids(self) -> None:
        """Refuse a uid range that processes other than our kernels (adopted ones included)
        run as: called at start, once kernels of an earlier run are adopted."""
        in_use = self._uids.in_use_by_others()
        if in_use:
            raise SandboxUnavailable(
                f"processes already run as uid {in_use[0]}, one of the uids this service "
                "gives its kernels (another kernel-service?): two services must not share "
                "uids; leave KERNEL_SERVICE_SANDBOX_UID_BASE unset to have a free range claimed"
            )

    async def launch(self, spec: LaunchSpec) -> KernelProcess:
        uid = self._uids.take()
        name = spec.files.directory.name
        cgroup = self._cgroups.group(name)
        try:
            # The kernel's files become its own; a walk that never follows its symlinks.
            await asyncio.to_thread(_chown_tree, spec.files.directory, uid)
            await asyncio.to_thread(_chown_tree, spec.work_dir, uid)
            sandbox = await asyncio.to_thread(self.sandbox_spec, spec, uid)
            # on the loop (a few writes): a thread cancelled meanwhile would leave them
            procs = self._cgroups.create(name, self._cgroup_limits)
            seccomp_fd = self.seccomp_program()
            try:
                process = await self._start(spec, sandbox, procs, seccomp_fd)
            finally:
                os.close(seccomp_fd)
        except BaseException:
            self._uids.give_back(uid)
            if cgroup is not None:
                await asyncio.shield(asyncio.to_thread(KernelCgroups.remove, cgroup))
            raise
        process.sandbox_uid, process.cgroup = uid, cgroup
        process.on_exit(lambda _: self._release(uid, cgroup))
        log.debug("sandboxed kernel pid=%d uid=%d in %s", process.pid, uid, spec.files.directory)
        return process

    def sandbox_spec(self, spec: LaunchSpec, uid: int) -> SandboxSpec:
        """The sandbox of the kernel `spec` describes, run as `uid` (see sandbox_spec.py)."""
        return sandbox_spec(
            self._limits,
            uid,
            kernel_env=spec.kernel_env(),
            files_dir=spec.files.directory,
            work_dir=spec.work_dir,
            read_only=(*self._read_only, *spec.kind.read_only),
            etc=spec.kind.etc,
            address_space_limit=spec.kind.address_space_limit,
        )

    def seccomp_program(self) -> int:
        """A memfd holding the seccomp BPF program, at offset 0; the caller closes it."""
        seccomp_fd = os.memfd_create("kernel-seccomp")
        os.write(seccomp_fd, self._seccomp)
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
        return seccomp_fd

    async def _start(
        self, spec: LaunchSpec, sandbox: SandboxSpec, cgroup_procs: list[Path], seccomp_fd: int
    ) -> KernelProcess:
        """The sandboxed process, its uid, files and cgroups prepared (bubblewrap here)."""
        # bubblewrap reads its options from a file: they (host paths, the kernel's
        # environment) are not on its command line, which the kernel sees as
        # /proc/1/cmdline; the command (its own, seen in /proc/self/cmdline) is
        options = [*bwrap_options(sandbox), "--seccomp", str(seccomp_fd)]
        args_fd = os.memfd_create("bwrap-args")
        try:
            os.write(args_fd, b"".join(f"{arg}\0".encode() for arg in options))
            os.lseek(args_fd, 0, os.SEEK_SET)
            argv = [
                self._prlimit, *prlimit_options(sandbox), "--",
                self._bwrap, "--args", str(args_fd), "--",
                self._setpriv, *setpriv_options(sandbox), "--", *spec.command(),
            ]  # fmt: skip
            if cgroup_procs:
                # joins the cgroups before anything forks, then becomes prlimit → bwrap
                join = 'for p; do [ "$p" = -- ] && break; echo $$ > "$p" || exit 1; done'
                argv = ["/bin/sh", "-c", f'{join}; shift {len(cgroup_procs) + 1}; exec "$@"',
                        "sh", *map(str, cgroup_procs), "--", *argv]  # fmt: skip
            # No --die-with-parent: the kernel outlives a killed service (launcher.py).
            popen = subprocess.Popen(  # noqa: ASYNC220 (a fork+exec: ~1 ms)
                argv,
                env={"PATH": "/usr/bin:/bin"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=(seccomp_fd, args_fd),
            )
        finally:
            os.close(args_fd)
        return PopenKernelProcess(popen, exit_status_of_child=True)

    def adopt(self, record: RecordedKernel) -> KernelProcess:
        """A kernel of an earlier service process: its uid is not given to another kernel
        while it lives, and its cgroup goes when it ends."""
        if record.uid is None:
            raise AdoptionError("it was not started in a sandbox")
        process = super().adopt(record)
        self._uids.reserve(record.uid)
        process.sandbox_uid, process.cgroup = record.uid, record.cgroup
        uid, cgroup = record.uid, record.cgroup
        process.on_exit(lambda _: self._release(uid, cgroup))
        return process

    def _release(self, uid: int, cgroup: Path | None) -> None:
        self._uids.give_back(uid)
        if cgroup is not None:
            asyncio.get_running_loop().create_task(self._remove_cgroup(cgroup))

    async def _remove_cgroup(self, cgroup: Path) -> None:
        for _ in range(100):  # the namespace's last processes take a moment to go
            if await asyncio.to_thread(KernelCgroups.remove, cgroup):
                return
            await asyncio.sleep(0.05)
        log.warning("cgroup %s still busy; left for the service's exit", cgroup)

    async def close(self, kernels_left: bool = False) -> None:
        await self._cgroups.close(kernels_left)

    async def on_ready(self, spec: LaunchSpec) -> None:
        # Its sockets are bound: from now on the kernel may not change its directory.
        spec.files.lock()


def host_headroom(kernels: int, limits: SandboxLimits) -> list[str]:
    """Where `kernels` kernels, each holding all the processes and open files it may, would
    take more than half of the host's file table or pids: a sentence for each, saying what
    to lower. (The figures are per kernel: RLIMIT_NOFILE per process times its processes.)"""
    worst = (
        ("open files", kernels * limits.processes * limits.open_files, "fs/file-max",
         "KERNEL_SERVICE_SANDBOX_OPEN_FILES or KERNEL_SERVICE_SANDBOX_PROCESSES"),
        ("processes", kernels * (limits.processes + _WRAPPER_TASKS), "kernel/pid_max",
         "KERNEL_SERVICE_SANDBOX_PROCESSES"),
    )  # fmt: skip
    sentences = []
    for what, held, name, settings in worst:
        try:
            host = int(Path("/proc/sys", name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if held > host / 2:
            sentences.append(
                f"{kernels} kernels at their limits could hold {held:,} {what}, "
                f"{held / host:.0%} of this host's {host:,} ({name}): one tenant could "
                f"exhaust the host; lower KERNEL_SERVICE_MAX_SESSIONS or {settings}"
            )
    return sentences


def _chown_tree(root: Path, uid: int) -> None:
    for path in _walk(root):
        os.chown(path, uid, uid, follow_symlinks=False)


def _walk(root: Path) -> Iterator[Path]:
    """Every path below `root`, without following symlinks and without recursion (a kernel
    may nest directories deeper than Python's recursion limit)."""
    pending = [root]
    while pending:
        directory = pending.pop()
        yield directory
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
            else:
                yield Path(entry.path)
