"""Kernels forked from a zygote that has imported ipykernel and the data stack once.

A fork is ready in about a tenth of a fresh start and shares the zygote's memory pages.
`ForkServer` runs the zygote (`zygote.py`) and speaks to it; `ForkLauncher` (no sandbox)
and `SandboxedForkLauncher` (the same sandbox as bubblewrap's, built by the zygote's
child) plug it into the launcher seam. If the zygote cannot start, or dies, kernels are
launched the plain way, with a warning; the zygote is started again for later launches.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from kernel_service.kernel.launcher import (
    UNKNOWN_EXIT,
    UNKNOWN_STATUS,
    KernelProcess,
    LaunchSpec,
    SubprocessLauncher,
    WatchedProcess,
)
from kernel_service.kernel.sandbox import BubblewrapLauncher
from kernel_service.kernel.sandbox_spec import FEW_THREADS_ENV, SandboxSpec

log = logging.getLogger(__name__)

ZYGOTE_FILE = Path(__file__).parent / "programs" / "zygote.py"
_START_TIMEOUT = 60.0
_MAX_MESSAGE = 65536


class ForkServerError(Exception):
    """The zygote is not there to fork from."""


class ForkServer:
    """The zygote process and the channel to it."""

    def __init__(self, preload: tuple[str, ...], env: dict[str, str], connection_dir: Path) -> None:
        self._preload = preload
        self._env = env
        self._connection_dir = connection_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._channel: socket.socket | None = None
        self._pending: dict[str, asyncio.Future[int]] = {}
        self._abandoned: set[str] = set()  # launches called off before their pid came
        self._unwatched: set[int] = set()  # their processes, killed
        self._children: dict[int, ForkedKernelProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._next_id = 0
        self._starting: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    async def ensure_started(self) -> None:
        if self.running and self._channel is not None:
            return
        if self._starting is None:
            self._starting = asyncio.create_task(self._start())
        try:
            await asyncio.shield(self._starting)
        finally:
            if self._starting is not None and self._starting.done():
                self._starting = None

    async def _start(self) -> None:
        self._drop_channel()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # Started on the event loop's thread: its death signal is tied to this thread.
            self._process = subprocess.Popen(  # noqa: ASYNC220 (a fork+exec: ~1 ms)
                [sys.executable, "-I", str(ZYGOTE_FILE), str(theirs.fileno()),
                 ",".join(self._preload), str(self._connection_dir)],
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )  # fmt: skip
        finally:
            theirs.close()
        ours.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            ready = await asyncio.wait_for(loop.sock_recv(ours, _MAX_MESSAGE), _START_TIMEOUT)
        except BaseException:
            ours.close()
            await self._end_zygote()
            raise
        if not ready:
            ours.close()
            await self._end_zygote()
            raise ForkServerError("the zygote exited while importing its modules")
        self._channel = ours
        loop.add_reader(ours.fileno(), self._receive)
        log.info("fork-server ready: zygote pid %d", json.loads(ready)["ready"])

    async def spawn(self, request: dict[str, Any], fds: list[int]) -> int:
        """Fork a kernel as `request` says; its pid (host pid of the forked child)."""
        await self.ensure_started()
        assert self._channel is not None
        self._next_id += 1
        request_id = str(self._next_id)
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            message = json.dumps({**request, "id": request_id}).encode()
            socket.send_fds(self._channel, [message], fds)
            return await answer
        except OSError as exc:
            raise ForkServerError(f"the zygote is gone: {exc}") from exc
        except asyncio.CancelledError:
            # called off: the kernel forked for it anyway is killed, now or when its pid comes
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                self._kill_unwatched(answer.result())
            else:
                self._abandoned.add(request_id)
            raise
        finally:
            self._pending.pop(request_id, None)

    def watch(self, process: "ForkedKernelProcess") -> None:
        """Deliver the process's exit status to it when the zygote reports it."""
        status = self._early_exits.pop(process.pid, None)
        if status is not None:
            process.exited(status)
        else:
            self._children[process.pid] = process

    async def close(self) -> None:
        self._drop_channel()
        await self._end_zygote()

    def _receive(self) -> None:
        assert self._channel is not None
        while True:
            try:
                data = self._channel.recv(_MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            message = json.loads(data)
            if "exited" in message:
                pid, status = message["exited"], message["status"]
                child = self._children.pop(pid, None)
                if child is not None:
                    child.exited(status)
                elif pid in self._unwatched:
                    self._unwatched.discard(pid)
                else:  # ended before its launcher began to watch it
                    self._early_exits[pid] = status
            elif message["id"] in self._abandoned:
                self._abandoned.discard(message["id"])
                if "pid" in message:
                    self._kill_unwatched(message["pid"])
            elif (answer := self._pending.get(message["id"])) is not None and not answer.done():
                if "pid" in message:
                    answer.set_result(message["pid"])
                else:
                    answer.set_exception(ForkServerError(message.get("error", "fork failed")))

    def _kill_unwatched(self, pid: int) -> None:
        """Kill a forked process nobody will watch (what it started dies with it)."""
        self._unwatched.add(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _lost(self) -> None:
        """The zygote died: its kernels live on, orphans whose end only their pidfd tells."""
        log.error("the fork-server's zygote died; it is started again at the next launch")
        self._drop_channel()
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(ForkServerError("the zygote died"))
        children, self._children = self._children, {}
        for child in children.values():
            child.orphaned()

    def _drop_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._channel.fileno())
            self._channel.close()
            self._channel = None

    async def _end_zygote(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            await asyncio.to_thread(process.wait)  # its teardown: a moment for its memory


class ForkedKernelProcess(WatchedProcess):
    """A kernel forked by the zygote: not our child, so its end is reported by the zygote
    (`exited`)."""

    def exited(self, status: int) -> None:
        self._ended(status)

    def orphaned(self) -> None:
        """The zygote is gone: watch the process through a pidfd from now on."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # ended already; the status went with the zygote
            self._ended(UNKNOWN_STATUS, UNKNOWN_EXIT)
            return
        self._watch_pidfd(pidfd)


async def _fork(server: ForkServer, request: dict[str, Any], fds: list[int], wrapper: bool
                ) -> ForkedKernelProcess:  # fmt: skip
    """Fork a kernel with a fresh output pipe; its process handle."""
    read_end, write_end = os.pipe()
    try:
        pid = await server.spawn(request, [write_end, *fds])
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    process = ForkedKernelProcess(pid, read_end, wrapper)
    server.watch(process)
    return process


async def _start_or_warn(server: ForkServer) -> None:
    try:
        await server.ensure_started()
    except (ForkServerError, OSError, TimeoutError) as exc:
        log.warning("the fork-server did not start (%s): kernels start the plain way", exc)


def zygote_env(env: dict[str, str]) -> dict[str, str]:
    """The zygote imports under the kernels' environment (matplotlib's backend, one BLAS
    thread: no thread may run in it when it forks)."""
    return {
        **env,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        **FEW_THREADS_ENV,
    }


class ForkLauncher(SubprocessLauncher):
    """Unsandboxed kernels forked from the zygote; a plain launch if it is not there."""

    isolation = "none"

    def __init__(self, server: ForkServer) -> None:
        self._server = server

    async def launch(self, spec: LaunchSpec) -> KernelProcess:
        if not spec.kind.is_python:  # the zygote holds Python's kernel only
            return await super().launch(spec)
        request = {
            "argv": spec.kernel_argv(),
            "work_dir": str(spec.work_dir),
            "env": {
                **spec.env,
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": str(spec.work_dir),
                "IPYTHONDIR": str(spec.work_dir / ".ipython"),
            },
        }
        try:
            return await _fork(self._server, request, [], wrapper=False)
        except (ForkServerError, OSError) as exc:
            log.warning("fork-server unavailable (%s); launching the kernel the plain way", exc)
            return await super().launch(spec)

    async def prepare(self) -> None:
        await _start_or_warn(self._server)

    async def close(self, kernels_left: bool = False) -> None:
        await self._server.close()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "launch": "fork-server"}


class SandboxedForkLauncher(BubblewrapLauncher):
    """Sandboxed kernels forked from the zygote, each in the sandbox bubblewrap would give
    it; a bubblewrap launch if the zygote is not there."""

    def __init__(self, server: ForkServer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._server = server
        self._root = Path("/run/kernel-service-root")

    async def _start(
        self, spec: LaunchSpec, sandbox: SandboxSpec, cgroup_procs: list[Path], seccomp_fd: int
    ) -> KernelProcess:
        if not spec.kind.is_python:  # the zygote holds Python's kernel only
            return await super()._start(spec, sandbox, cgroup_procs, seccomp_fd)
        # the root is built in a directory of the zygote child's own mount namespace
        await asyncio.to_thread(self._root.mkdir, mode=0o700, exist_ok=True)
        request = {
            "argv": spec.kernel_argv(),
            "sandbox": sandbox.to_json(),
            "root": str(self._root),
            "cgroup_procs": [str(p) for p in cgroup_procs],
        }
        try:
            return await _fork(self._server, request, [seccomp_fd], wrapper=True)
        except (ForkServerError, OSError) as exc:
            log.warning("fork-server unavailable (%s); launching the kernel with bubblewrap", exc)
            return await super()._start(spec, sandbox, cgroup_procs, seccomp_fd)

    async def prepare(self) -> None:
        await super().prepare()
        await _start_or_warn(self._server)

    async def close(self, kernels_left: bool = False) -> None:
        await self._server.close()
        await super().close(kernels_left)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "launch": "fork-server"}
