"""kernel-service as the benchmark runs it: `kernel-service serve` in a process of its own (so
its CPU time can be read), on a free loopback port, with its settings in the environment;
and a bare HTTP/1.1 client light enough to load it with many connections."""

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from bench.stats import tree
from bench.watched import STALL

T = TypeVar("T")
_ROOT = str(Path(__file__).resolve().parent.parent)  # where `bench` and the service import from
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the benchmark dies, however it dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def poll_until(condition: Callable[[], bool], timeout: float) -> bool:
    """Check `condition` every 0.1 s until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


async def gather_limited(limit: int, coroutines: Iterable[Awaitable[T]]) -> list[T]:
    """Run at most `limit` at once, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(coroutine: Awaitable[T]) -> T:
        async with gate:
            return await coroutine

    return await asyncio.gather(*(one(c) for c in coroutines))


class Service:
    """One kernel-service process and an httpx client for it; `stop()` leaves nothing behind."""

    def __init__(
        self,
        name: str,
        root: Path,
        settings: dict[str, Any],
        watch_stalls: bool = False,
        code: Path | None = None,
    ) -> None:
        """`watch_stalls`: run it on asyncio's loop, reporting slow callbacks (see
        `bench.watched`) for `stalls()` to read. `code`: the checkout whose kernel_service
        it runs (this one's by default)."""
        self.code = str(code) if code is not None else _ROOT
        client = os.path.join(self.code, "client")  # the light client, in its checkout
        self._paths = [self.code, *([client] if os.path.isdir(client) else [])]
        self.name = name
        self.watch_stalls = watch_stalls
        self.root = root
        self.settings = settings
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = root / "service.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self.process: psutil.Process | None = None
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=120)

    async def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_SERVICE_")}
        for key, value in self.settings.items():
            text = str(value).lower() if isinstance(value, bool) else str(value)
            env[f"KERNEL_SERVICE_{key.upper()}"] = text
        program = "bench.watched" if self.watch_stalls else "kernel_service"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (*self._paths, env.get("PYTHONPATH"))))
        with self.log.open("wb") as log:
            self._popen = subprocess.Popen(  # noqa: ASYNC220 (a fork+exec)
                [sys.executable, "-m", program, "serve", "--port", str(self.port)],
                env=env,
                cwd=self.root,  # `-m` imports from the working directory first: not a checkout
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent,  # noqa: PLW1509 (no threads run yet)
            )
        self.process = psutil.Process(self._popen.pid)
        deadline = time.monotonic() + 120
        while True:
            if self._popen.poll() is not None:
                raise RuntimeError(f"{self.name}: the service exited at start:\n{self.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await self.http.get("/healthz")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: the service did not answer:\n{self.log_tail()}")
            await asyncio.sleep(0.1)

    def stalls(self) -> list[tuple[float, float, str]]:
        """The slow callbacks of its event loop (seconds, seconds of them waiting for a
        CPU, which), longest first, when it runs with `watch_stalls`."""
        found = []
        with contextlib.suppress(OSError), self.log.open(errors="replace") as log:
            for line in log:
                if match := STALL.search(line):
                    waiting = float(match["waiting"] or 0)
                    found.append((float(match["seconds"]), waiting, match["callback"]))
        return sorted(found, reverse=True)

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""

    async def wait_pool_full(self, timeout: float = 60.0) -> bool:
        """Until the warm pool holds `pool_size` ready kernels."""
        wanted = int(self.settings.get("pool_size", 2))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = (await self.http.get("/healthz")).json()
            if health.get("warm_kernels", 0) >= wanted:
                return True
            await asyncio.sleep(0.05)
        return False

    def children(self) -> list[psutil.Process]:
        """Everything the service started and still runs: kernels, sandboxes, a zygote."""
        return tree(self.process) if self.process else []

    def cpu_seconds(self) -> float:
        """The service process's own CPU time (its kernels are processes of their own)."""
        assert self.process is not None
        times = self.process.cpu_times()
        return times.user + times.system

    async def new_session(self) -> str:
        response = await self.http.post("/sessions", json={})
        response.raise_for_status()
        session_id: str = response.json()["session_id"]
        return session_id

    async def execute(self, code: str, session_id: str | None = None, **extra: Any) -> Any:
        body = {"code": code, "session_id": session_id, **extra}
        response = await self.http.post("/execute", json=body)
        response.raise_for_status()
        return response.json()

    async def delete(self, session_id: str) -> None:
        (await self.http.delete(f"/sessions/{session_id}")).raise_for_status()

    async def stop(self, timeout: float = 120.0) -> list[str]:
        """SIGTERM (the service ends its kernels), then SIGKILL for whatever remains; returns
        what had to be killed, unmounts what is left mounted and removes the files."""
        leftovers: list[str] = []
        with contextlib.suppress(Exception):
            await self.http.aclose()
        if self._popen is not None and self.process is not None:
            started = {(p.pid, _created(p)) for p in self.children()}
            if self._popen.poll() is None:
                self._popen.send_signal(signal.SIGTERM)
            popen = self._popen
            if not await poll_until(lambda: popen.poll() is not None, timeout):
                leftovers.append(f"service pid {self._popen.pid}")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait()
            await asyncio.sleep(0.2)  # the last sandboxes go with their parents
            leftovers += kill_remaining(started)
        unmount_below(self.root)
        shutil.rmtree(self.root, ignore_errors=True)
        return leftovers


def kill_remaining(started: set[tuple[int, float]]) -> list[str]:
    """Kill the processes (pid, create time) of `started` that still run; say which."""
    killed = []
    for pid, created in started:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if _created(process) == created and process.status() != psutil.STATUS_ZOMBIE:
                killed.append(f"{pid} {' '.join(process.cmdline())[:80]}")
                process.kill()
    return killed


def unmount_below(root: Path) -> None:
    """Work directories a killed service left mounted (their loop devices go with them)."""
    with contextlib.suppress(OSError):
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in sorted(mounts, reverse=True):
            if point.startswith(f"{root}/"):
                subprocess.run(["umount", "-l", point], check=False, capture_output=True)


def _created(process: psutil.Process) -> float:
    try:
        return process.create_time()
    except psutil.Error:
        return 0.0


class RawHttp:
    """One keep-alive HTTP/1.1 connection, requests written and answers parsed by hand: a
    fraction of httpx's CPU per request, so the client perturbs the service less."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def connect(cls, port: int) -> "RawHttp":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(line.split(":", 1)[1])
            for line in lines[1:]
            if line.lower().startswith("content-length:")
        )
        return status, await self._reader.readexactly(length)

    async def execute(self, code: str, session_id: str) -> dict[str, Any]:
        status, body = await self.post(
            "/execute", json.dumps({"code": code, "session_id": session_id}).encode()
        )
        if status != 200:
            raise RuntimeError(f"POST /execute: {status} {body[:200]!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class JupyterSocket:
    """A kernel's WebSocket (`/api/kernels/{id}/channels`) as a Jupyter client uses it: an
    `execute_request` out, the kernel's messages in until its `idle` (no compression, as
    Jupyter Server's gateway client and websocket-client speak)."""

    def __init__(self, socket: Any) -> None:
        self._socket = socket
        self._sent = 0

    @classmethod
    async def connect(cls, port: int, kernel_id: str) -> "JupyterSocket":
        from websockets.asyncio.client import connect

        url = f"ws://127.0.0.1:{port}/api/kernels/{kernel_id}/channels"
        return cls(await connect(url, compression=None, max_size=None))

    async def execute(self, code: str) -> dict[str, Any]:
        """The execute_request's `execute_result` content ({} if none), once idle."""
        self._sent += 1
        msg_id = f"bench-{self._sent}"
        header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "bench",
                  "session": "bench", "date": "", "version": "5.3"}  # fmt: skip
        await self._socket.send(
            json.dumps(
                {
                    "header": header,
                    "parent_header": {},
                    "metadata": {},
                    "content": {"code": code, "silent": False},
                    "channel": "shell",
                }
            )
        )
        value: dict[str, Any] = {}
        while True:
            msg = json.loads(await self._socket.recv())
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "execute_result":
                value = msg["content"]
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return value

    async def close(self) -> None:
        await self._socket.close()
