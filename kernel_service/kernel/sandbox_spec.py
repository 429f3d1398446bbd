"""One description of a kernel's sandbox, made once per launch and applied by either launch.

`sandbox_spec` says everything a sandboxed kernel gets: its namespaces and hostname, the
ordered mount operations that build its filesystem, its working directory, environment,
uid and rlimits. The bubblewrap launch renders it as arguments (`bwrap_options`,
`prlimit_options`, `setpriv_options`); the fork-server's launch sends it as JSON
(`SandboxSpec.to_json`) to the zygote, whose child applies each operation with system calls
(programs/zygote.py, which knows the operations by their `op` names and nothing else). No
path, size or mode is written in either launch, so the two cannot drift apart.
"""

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, assert_never

MIB = 1024 * 1024
WORKSPACE = Path("/workspace")
HOSTNAME = "sandbox"
# Besides the mount namespace, which every sandbox has.
NAMESPACES = ("pid", "net", "ipc", "uts", "cgroup")
# Only what Python, SSL, fonts and user lookups need from /etc.
ETC_FILES = (
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "fonts",
    "localtime", "mime.types", "nsswitch.conf", "passwd", "group", "hosts", "alternatives",
)  # fmt: skip
# What of /proc a kernel does not see, as container runtimes (runc, containerd) mask it, and
# what else tells of the host or of other tenants: disks and their I/O (each session's work
# directory is a loop device), per-filesystem details (ext4 and jbd2 list those devices),
# file locks, pressure stall figures, the boot command line and the kernel's build config.
# A file becomes an unreadable /dev/null, a directory an empty read-only tmpfs. Left
# readable: what programs size themselves by (cpuinfo, meminfo, stat, loadavg, uptime,
# vmstat), host-wide totals that name no tenant. There is no /sys at all.
PROC_MASKED = (
    "acpi", "asound", "kcore", "keys", "latency_stats", "timer_list", "timer_stats",
    "sched_debug", "scsi",
    "diskstats", "partitions", "fs", "locks", "swaps", "pressure", "cmdline", "config.gz",
)  # fmt: skip
# Read-only in /proc: the kernel's knobs (bubblewrap makes some of these read-only itself,
# but not `sys` when it runs as root).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus")
SHM_BYTES = 16 * MIB  # the size of /dev/shm (memory, counted in the kernel's cgroup)
# Fewer malloc arenas keep the address space (what RLIMIT_AS counts) small; one BLAS thread
# keeps thread pools from eating the process limit (and a zygote free of threads).
FEW_THREADS_ENV = {
    "MALLOC_ARENA_MAX": "2",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class SandboxLimits:
    memory_bytes: int  # RLIMIT_AS: past it allocations fail with MemoryError
    processes: int  # RLIMIT_NPROC for the kernel's own uid: processes and threads
    file_bytes: int  # RLIMIT_FSIZE: the largest file it may write
    open_files: int  # RLIMIT_NOFILE
    tmp_bytes: int  # size of its private /tmp (RAM)
    cpus: float = 0.0  # CPU quota of its cgroup, in CPUs; 0: none


# ---------------------------------------------------------------- mount operations
# Applied in order on an empty root. Every mount is nosuid; none but /dev's own gives
# access to devices.


@dataclass(frozen=True)
class Dir:
    """A directory, with any missing parents, made with `mode` (an existing one is kept)."""

    op: ClassVar[str] = "dir"
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    op: ClassVar[str] = "symlink"
    target: str
    path: str


@dataclass(frozen=True)
class Bind:
    """The host's `source` at `path`, with every mount below it; `optional`: nothing if
    `source` is missing."""

    op: ClassVar[str] = "bind"
    source: str
    path: str
    read_only: bool = True
    optional: bool = False


@dataclass(frozen=True)
class Proc:
    """A procfs of the sandbox's PID namespace."""

    op: ClassVar[str] = "proc"
    path: str = "/proc"


@dataclass(frozen=True)
class Dev:
    """A minimal /dev: null, zero, full, random, urandom and tty, the fd and stdio links, a
    private devpts (as bubblewrap's --dev makes it)."""

    op: ClassVar[str] = "dev"
    path: str = "/dev"


@dataclass(frozen=True)
class Tmpfs:
    """A tmpfs of `size` bytes (None: the default, half the RAM)."""

    op: ClassVar[str] = "tmpfs"
    path: str
    mode: int
    size: int | None = None
    read_only: bool = False


@dataclass(frozen=True)
class ReadOnly:
    """What the sandbox has at `path`, made read-only in place, if it has anything there
    (bubblewrap binds the host's file of that name: for /proc's kernel knobs, the same)."""

    op: ClassVar[str] = "read_only"
    path: str


@dataclass(frozen=True)
class Mask:
    """What the sandbox has at `path` hidden: a directory under an empty read-only tmpfs
    (mode 0555), a file under /dev/null, nothing if there is nothing. Each launch looks in
    the sandbox's own procfs where it can (the zygote's child); bubblewrap's arguments are
    written beforehand, from the host's /proc."""

    op: ClassVar[str] = "mask"
    path: str


@dataclass(frozen=True)
class RemountReadOnly:
    """The mount at `path` made read-only, not the mounts below it (the root, at the end)."""

    op: ClassVar[str] = "remount_read_only"
    path: str


Mount = Dir | Symlink | Bind | Proc | Dev | Tmpfs | ReadOnly | Mask | RemountReadOnly
MOUNT_TYPES: tuple[type[Mount], ...] = (
    Dir, Symlink, Bind, Proc, Dev, Tmpfs, ReadOnly, Mask, RemountReadOnly,
)  # fmt: skip


@dataclass(frozen=True)
class SandboxSpec:
    """A kernel's whole sandbox. Both launches also give it a session of its own, no
    capabilities, no new privileges and the seccomp filter (seccomp.py)."""

    mounts: tuple[Mount, ...]
    cwd: str
    env: dict[str, str]
    uid: int
    gid: int
    # soft and hard limit by resource, named as RLIMIT_<NAME> without the prefix
    rlimits: dict[str, int]
    namespaces: tuple[str, ...] = NAMESPACES
    hostname: str = HOSTNAME

    def to_json(self) -> dict[str, Any]:
        """The spec as the zygote reads it: each mount a dict with its `op` name."""
        return {
            "namespaces": list(self.namespaces),
            "hostname": self.hostname,
            "mounts": [{"op": mount.op, **asdict(mount)} for mount in self.mounts],
            "cwd": self.cwd,
            "env": self.env,
            "uid": self.uid,
            "gid": self.gid,
            "rlimits": self.rlimits,
        }


def sandbox_spec(
    limits: SandboxLimits,
    uid: int,
    *,
    kernel_env: dict[str, str],
    files_dir: Path,
    work_dir: Path,
    read_only: tuple[Path, ...],
    etc: tuple[str, ...] = (),
    address_space_limit: bool = True,
) -> SandboxSpec:
    """The sandbox of one kernel: `files_dir` (its connection files) and `work_dir` (as
    /workspace) writable, `read_only` (the Python environment, a runtime's files) and
    `etc` (what of /etc its runtime needs beyond the few every kernel gets) readable,
    `kernel_env` (what the kernel needs) with a sandbox's own home, PATH and temporary
    directories. Without `address_space_limit` (a runtime that reserves far more address
    space than it uses: V8) only its memory cgroup bounds its memory. Reads the host's
    /proc and the font cache: call it off the event loop."""
    mounts: list[Mount] = [
        Bind("/usr", "/usr"),
        Symlink("usr/bin", "/bin"), Symlink("usr/sbin", "/sbin"),
        Symlink("usr/lib", "/lib"), Symlink("usr/lib64", "/lib64"),
        Dir("/etc"),
        *(Bind(f"/etc/{name}", f"/etc/{name}", optional=True) for name in (*ETC_FILES, *etc)),
        Proc("/proc"),
    ]  # fmt: skip
    mounts += [Mask(f"/proc/{name}") for name in PROC_MASKED]
    mounts += [ReadOnly(f"/proc/{name}") for name in PROC_READ_ONLY]
    mounts += [
        Dev("/dev"),
        Tmpfs("/tmp", 0o1777, size=limits.tmp_bytes),
        Tmpfs("/dev/shm", 0o1777, size=SHM_BYTES),
        Dir("/tmp/matplotlib", 0o1777),
    ]
    mounts += [Bind(str(c), f"/tmp/matplotlib/{c.name}") for c in font_caches(kernel_env)]
    for path in read_only:
        mounts += [*_parents(path, 0o755), Bind(str(path), str(path))]
    mounts += [*_parents(files_dir, 0o711), Bind(str(files_dir), str(files_dir), False)]
    mounts += [Dir(str(WORKSPACE)), Bind(str(work_dir), str(WORKSPACE), False)]
    mounts.append(RemountReadOnly("/"))
    rlimits = {
        "as": limits.memory_bytes,
        "nproc": limits.processes,
        "fsize": limits.file_bytes,
        "nofile": limits.open_files,
        "core": 0,
    }
    if not address_space_limit:
        del rlimits["as"]
    return SandboxSpec(
        mounts=tuple(mounts),
        cwd=str(WORKSPACE),
        env=sandbox_env(kernel_env, uid),
        uid=uid,
        gid=uid,
        rlimits=rlimits,
    )


def sandbox_env(kernel_env: dict[str, str], uid: int) -> dict[str, str]:
    """The whole environment of a sandboxed kernel (nothing of the service's)."""
    return {
        **kernel_env,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(WORKSPACE),
        "USER": f"kernel{uid}",
        "TMPDIR": "/tmp",
        "IPYTHONDIR": "/tmp/ipython",
        "JUPYTER_RUNTIME_DIR": "/tmp/jupyter",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        **FEW_THREADS_ENV,
    }


def font_caches(kernel_env: dict[str, str]) -> list[Path]:
    """matplotlib's font list, built once by the service, read-only in every kernel."""
    matplotlib_dir = Path(kernel_env.get("MPLCONFIGDIR", "/nonexistent"))
    return sorted(matplotlib_dir.glob("fontlist-*.json"))


def default_read_only_paths(*own_files: Path) -> tuple[Path, ...]:
    """The Python environment the kernel runs in, and the files of ours it executes."""
    paths = {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}
    paths.update(path.resolve() for path in own_files)
    return tuple(sorted(p for p in paths if not p.is_relative_to("/usr")))


def _parents(path: Path, mode: int) -> list[Mount]:
    """A mount point's parents, made traversable (bubblewrap makes them 0700 as root)."""
    return [Dir(str(parent), mode) for parent in reversed(path.parents) if parent != Path("/")]


# ---------------------------------------------------------------- bubblewrap's rendering


def bwrap_options(spec: SandboxSpec) -> list[str]:
    """bwrap's options for the sandbox (the seccomp filter's fd is the caller's to add)."""
    args = [_UNSHARE[namespace] for namespace in spec.namespaces]
    args += ["--hostname", spec.hostname, "--new-session"]
    for mount in spec.mounts:
        args += bwrap_mount(mount)
    args += ["--chdir", spec.cwd, "--clearenv"]
    for key, value in spec.env.items():
        args += ["--setenv", key, value]
    return args


def bwrap_mount(mount: Mount) -> list[str]:
    """One mount operation as bwrap's options (a mask or a read-only knob as the host's
    /proc has it: bubblewrap's own procfs shows the same entries)."""
    match mount:
        case Dir(path, mode):
            return ["--perms", f"{mode:04o}", "--dir", path]
        case Symlink(target, path):
            return ["--symlink", target, path]
        case Bind(source, path, read_only, optional):
            option = ("--ro-bind" if read_only else "--bind") + ("-try" if optional else "")
            return [option, source, path]
        case Proc(path):
            return ["--proc", path]
        case Dev(path):
            return ["--dev", path]
        case Tmpfs(path, mode, size, read_only):
            sized = ["--size", str(size)] if size is not None else []
            made = ["--perms", f"{mode:04o}", *sized, "--tmpfs", path]
            return [*made, "--remount-ro", path] if read_only else made
        case ReadOnly(path):
            return ["--ro-bind", path, path] if os.path.exists(path) else []
        case Mask(path):
            if os.path.isdir(path):
                return ["--perms", "0555", "--tmpfs", path, "--remount-ro", path]
            return ["--ro-bind", "/dev/null", path] if os.path.exists(path) else []
        case RemountReadOnly(path):
            return ["--remount-ro", path]
        case _:
            assert_never(mount)


def prlimit_options(spec: SandboxSpec) -> list[str]:
    """prlimit's options setting the sandbox's rlimits (soft and hard)."""
    return [f"--{name}={value}" for name, value in spec.rlimits.items()]


def setpriv_options(spec: SandboxSpec) -> list[str]:
    """setpriv's options that drop root for the sandbox's uid, with every capability."""
    return [
        f"--reuid={spec.uid}", f"--regid={spec.gid}", "--clear-groups",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
    ]  # fmt: skip


_UNSHARE = {
    "pid": "--unshare-pid",
    "net": "--unshare-net",
    "ipc": "--unshare-ipc",
    "uts": "--unshare-uts",
    "cgroup": "--unshare-cgroup-try",
}
