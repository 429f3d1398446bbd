"""The seam where a kernel process comes to life: how it is started, watched and ended.

`Kernel` never starts a process itself; it hands a `LaunchSpec` to a `KernelLauncher`.
The plain `SubprocessLauncher` runs ipykernel as a child in its own process group; a
sandboxing launcher, a warm pool or a fork-server plug in here without touching execution.

No kernel is tied to the service's life: a service killed outright leaves its kernels
running, and the next one adopts them (`KernelLauncher.adopt`) or the orphan reaper ends
them (`reaper.py`).
"""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil

from kernel_service.kernel.files import KernelFiles
from kernel_service.kernel.kernelspecs import BRIDGE_FILE, PYTHON_KIND, KernelKind
from kernel_service.kernel.programs.reaper import start_ticks
from kernel_service.kernel.uids import UidRange

log = logging.getLogger(__name__)

_OUTPUT_TAIL = 8192


@dataclass(frozen=True)
class LaunchSpec:
    """What any launcher needs to start one kernel on its own files."""

    files: KernelFiles
    work_dir: Path
    env: dict[str, str]  # what the kernel needs; launchers add where home and PATH are
    kernel_args: list[str] = field(default_factory=list)  # ipykernel's (Python's only)
    kind: KernelKind = PYTHON_KIND

    def command(self) -> list[str]:
        """The kernel's whole command line: ipykernel's, the kernelspec's, or the bridge's
        with the kernelspec's after it (see kernelspecs.py)."""
        if self.kind.is_python:
            # isolated: neither the work dir nor PYTHON* variables shape the kernel's start
            return [sys.executable, "-I", "-m", "ipykernel_launcher", *self.kernel_argv()]
        connection_file = str(self.files.connection_file)
        if not self.kind.bridged:
            return self.kind.command(connection_file)
        return [
            sys.executable, "-I", str(BRIDGE_FILE), connection_file, self.kind.interrupt_mode,
            "--", *self.kind.argv,
        ]  # fmt: skip

    def kernel_env(self) -> dict[str, str]:
        """What the kernel needs: the service's choice, then its kernelspec's."""
        return {**self.env, **self.kind.env}

    def kernel_argv(self) -> list[str]:
        """ipykernel's own arguments (for the zygote, which forks Python's kernels)."""
        return ["-f", str(self.files.connection_file), *self.kernel_args]


class RecordedKernel(Protocol):
    """What a later service process needs to take a kernel over. The service keeps it (in
    its state store) from the kernel's launch; this package only reads it."""

    @property
    def kernel_id(self) -> str: ...
    @property
    def pid(self) -> int: ...
    @property
    def start_ticks(self) -> int:
        """When its process started (see `start_ticks`): tells a reused pid apart."""

    @property
    def directory(self) -> Path: ...
    @property
    def connection(self) -> dict[str, Any]: ...
    @property
    def uid(self) -> int | None: ...
    @property
    def cgroup(self) -> Path | None: ...


class KernelProcess(ABC):
    """A running kernel process as the service sees it."""

    # What a sandboxing launcher gave it, recorded so that a later service can take it over.
    sandbox_uid: int | None = None
    cgroup: Path | None = None

    @property
    @abstractmethod
    def pid(self) -> int: ...

    @property
    @abstractmethod
    def returncode(self) -> int | None:
        """None while it runs; the exit code, or minus the signal number that ended it."""

    @abstractmethod
    def on_exit(self, callback: Callable[[int], None]) -> None:
        """Call `callback(returncode)` on the event loop as soon as the process has ended."""

    @abstractmethod
    async def wait(self) -> int: ...

    @abstractmethod
    async def kill(self) -> None:
        """End the kernel and every process it started, at once; done even if the caller
        is cancelled meanwhile."""

    def output_tail(self) -> str:
        """The end of what the process wrote to its own stdout and stderr (not iopub)."""
        return ""

    def exit_reason(self) -> str | None:
        """Why it ended, when its exit status is not known; else None."""
        return None


class AdoptionError(Exception):
    """A recorded kernel cannot be taken over; the message says why."""


class OutputTail:
    """Reads a pipe on the event loop until every writer is gone, keeping its last bytes."""

    def __init__(self, fd: int) -> None:
        """Takes `fd` over: it is closed once the pipe ends."""
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._tail = bytearray()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._read)

    def text(self) -> str:
        return self._tail.decode(errors="replace")

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # every writer is gone
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            return
        self._tail += chunk
        del self._tail[:-_OUTPUT_TAIL]


class KernelLauncher(ABC):
    """Starts kernel processes. `isolation` names what contains them, for /healthz."""

    isolation: str

    @abstractmethod
    async def launch(self, spec: LaunchSpec) -> KernelProcess: ...

    def claim_uids(self, earlier: UidRange | None, own: set[int]) -> UidRange | None:
        """Claim the uids its kernels will run as, for as long as this process runs or until
        `release_uids` (see uids.py), preferring `earlier`, the range of the state's last
        service; `own`, the recorded kernels' uids. None: it needs none. Raises
        UidRangeInUse."""
        return None

    def release_uids(self) -> None:  # noqa: B027 (optional hook)
        """Let the claimed uids go."""

    async def prepare(self) -> None:  # noqa: B027 (optional hook)
        """Called once at the service's start, before any launch (after the font cache)."""

    async def on_ready(self, spec: LaunchSpec) -> None:  # noqa: B027 (optional hook)
        """Called once the kernel answers, before user code can run in it."""

    async def close(self, kernels_left: bool = False) -> None:  # noqa: B027 (optional hook)
        """Release what the launcher holds; with `kernels_left` (kept for the next start),
        what is theirs stays."""

    def adopt(self, record: RecordedKernel) -> KernelProcess:
        """Watch a kernel that an earlier service process started. Raises AdoptionError when
        its process is gone (or its pid is another process's now)."""
        return AdoptedKernelProcess(record.pid, record.start_ticks)

    def bounds_memory_by_cgroup(self) -> bool:
        """Whether its kernels' memory is bounded by a cgroup (not only by RLIMIT_AS)."""
        return False

    def describe(self) -> dict[str, Any]:
        """What this launcher isolates and limits, for the start-up log and /healthz."""
        return {"sandbox": self.isolation}


class SubprocessLauncher(KernelLauncher):
    """ipykernel as a plain child process in a process group of its own (no sandbox)."""

    isolation = "none"

    async def launch(self, spec: LaunchSpec) -> KernelProcess:
        # No JPY_PARENT_PID: the kernel outlives a service that is killed (see the module).
        env = {
            **spec.kernel_env(),
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(spec.work_dir),
            "IPYTHONDIR": str(spec.work_dir / ".ipython"),
        }
        popen = subprocess.Popen(  # noqa: ASYNC220 (a fork+exec: ~1 ms)
            spec.command(),
            env=env,
            cwd=spec.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        log.debug("launched kernel pid=%d in %s", popen.pid, spec.files.directory.name)
        return PopenKernelProcess(popen)


class WatchedProcess(KernelProcess):
    """A kernel process leading a process group of its own, whose end is reported once;
    subclasses say how that end is noticed and call `_ended`.

    Its stdout and stderr come through a pipe of which only the last few KiB are kept: a
    kernel that writes without end costs neither memory nor the host's disk.
    """

    def __init__(self, pid: int, output_fd: int | None, wrapper: bool) -> None:
        """`wrapper`: the process is a sandbox's outer process that exits with its
        kernel's status, 128 + N for a kernel ended by signal N. `output_fd` is taken over."""
        self._pid = pid
        self._wrapper = wrapper
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._callbacks: list[Callable[[int], None]] = []
        self._output = OutputTail(output_fd) if output_fd is not None else None
        self._reason: str | None = None

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._exited.result() if self._exited.done() else None

    def on_exit(self, callback: Callable[[int], None]) -> None:
        if self._exited.done():
            self._loop.call_soon(callback, self._exited.result())
        else:
            self._callbacks.append(callback)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    async def kill(self) -> None:
        await asyncio.shield(self._kill())

    async def _kill(self) -> None:
        descendants: list[psutil.Process] = []
        if not self._exited.done():
            # Collected before the kill: once the kernel is gone its children are
            # re-parented and can't be found, even those that left its process group.
            # Off the loop: finding them reads every process of the host.
            descendants = await asyncio.to_thread(_descendants, self._pid)
        if not self._exited.done():  # checked again: it may have ended meanwhile
            with contextlib.suppress(ProcessLookupError):
                self._send_kill()
        self._kill_group()
        if descendants:
            await asyncio.to_thread(_kill_all, descendants)

    def _send_kill(self) -> None:
        os.kill(self._pid, signal.SIGKILL)

    def output_tail(self) -> str:
        return self._output.text() if self._output else ""

    def exit_reason(self) -> str | None:
        return self._reason

    def _watch_pidfd(self, pidfd: int) -> None:
        """Learn of the process's end through its pidfd (taken over): for a process that is
        not our child, whose exit status nobody will tell us."""

        def ended() -> None:
            self._loop.remove_reader(pidfd)
            os.close(pidfd)
            self._ended(UNKNOWN_STATUS, UNKNOWN_EXIT)

        self._loop.add_reader(pidfd, ended)

    def _kill_group(self) -> None:
        # Safe after the kernel is reaped: Linux reuses no pid that still names a live group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pid, signal.SIGKILL)

    def _ended(self, status: int, reason: str | None = None) -> None:
        if self._exited.done():
            return
        self._reason = reason
        if self._wrapper and 128 < status < 128 + 65:
            status = 128 - status
        self._kill_group()  # what a kernel that died by itself left running in its group
        self._exited.set_result(status)
        for callback in self._callbacks:
            callback(status)


def _descendants(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).children(recursive=True)
    return []


def _kill_all(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


# The exit status of a process that was not ours when it ended, and the words for it.
UNKNOWN_STATUS = 255
UNKNOWN_EXIT = (
    "it ended while another process was its parent (its exit status is not known; it was "
    "started by an earlier run of the service, or its fork-server had died)"
)


class AdoptedKernelProcess(WatchedProcess):
    """A kernel an earlier service process started, found alive by its pid and start time."""

    def __init__(self, pid: int, ticks: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            raise AdoptionError(f"its process {pid} is gone") from exc
        # checked after the pidfd is open: from here on the pid cannot be reused under us
        if start_ticks(pid) != ticks:
            os.close(pidfd)
            raise AdoptionError(f"its process {pid} is gone (the pid is another process's now)")
        super().__init__(pid, None, wrapper=False)
        self._pidfd = pidfd
        self._watch_pidfd(os.dup(pidfd))

    def _send_kill(self) -> None:
        # by pidfd: the pid may name another process once init has reaped this one
        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _ended(self, status: int, reason: str | None = None) -> None:
        if not self._exited.done():
            os.close(self._pidfd)
        super()._ended(status, reason)


class PopenKernelProcess(WatchedProcess):
    """A child process watched through a pidfd, so its death is seen at once."""

    def __init__(self, popen: subprocess.Popen[bytes], exit_status_of_child: bool = False) -> None:
        """`exit_status_of_child`: the process is a wrapper (bwrap) that exits with its
        child's status, 128 + N for a child ended by signal N."""
        output_fd = None
        if popen.stdout is not None:  # its fd handed to the reader, which owns it
            output_fd = os.dup(popen.stdout.fileno())
            popen.stdout.close()
        super().__init__(popen.pid, output_fd, exit_status_of_child)
        self._popen = popen
        self._pidfd: int | None = None
        self._poller: asyncio.Task[None] | None = None
        try:
            self._pidfd = os.pidfd_open(popen.pid)
            self._loop.add_reader(self._pidfd, self._reap)
        except (OSError, AttributeError):  # no pidfd on this kernel: poll instead
            self._poller = self._loop.create_task(self._poll())

    def _reap(self) -> None:
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._ended(self._popen.wait())

    async def _poll(self) -> None:
        while self._popen.poll() is None:  # noqa: ASYNC110 (only where pidfd is missing)
            await asyncio.sleep(0.05)
        self._reap()
