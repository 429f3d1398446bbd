"""Real servers for the tests: uvicorn on 127.0.0.1 with a free port, real kernels, httpx.

Every server's shutdown is checked: no kernel process and no connection file may remain.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import nbformat
import psutil
import pytest
import uvicorn

from kernel_service.api import create_app
from kernel_service.api.server import uvicorn_config
from kernel_service.config import Settings
from kernel_service.kernel.programs.zygote import KERNEL_NAME

# The sandbox needs root and bubblewrap; elsewhere the suite runs unsandboxed and the attack
# suite is skipped (CI has both).
SANDBOXED = os.geteuid() == 0 and shutil.which("bwrap") is not None
# A secret in the service's environment that no kernel may read (the attack suite checks).
os.environ.setdefault("KERNEL_SERVICE_TEST_SECRET", "sk-test-secret-0123456789")


# pytest-timeout's limit for a test marked slow (the default, in pyproject.toml, is 300 s):
# two minutes on an idle machine may be four on a busy one.
SLOW_TIMEOUT = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked slow gets SLOW_TIMEOUT unless it names its own timeout."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))


def kernel_processes(connection_dir: Path) -> list[psutil.Process]:
    """Live kernel processes started on a connection file in `connection_dir`."""
    found = []
    for process in psutil.process_iter(["cmdline", "status", "name"]):
        cmdline = process.info["cmdline"] or []
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        # the kernel's own python, not a wrapper that launched it (bwrap, prlimit, the
        # fork-server's sandbox set-up): started as ipykernel, or forked and named a kernel
        is_python = bool(cmdline) and Path(cmdline[0]).name.startswith("python")
        is_kernel = "ipykernel_launcher" in cmdline or process.info["name"] == KERNEL_NAME
        if is_python and is_kernel and any(str(connection_dir) in arg for arg in cmdline):
            found.append(process)
    return found


def zygotes(server: "Server") -> list[psutil.Process]:
    """The fork-server's zygote of `server`."""
    return [
        p
        for p in psutil.process_iter(["cmdline", "name"])
        if p.info["name"] == "ks-zygote" and str(server.connection_dir) in (p.info["cmdline"] or [])
    ]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        zombie: bool = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    return not zombie


def processes_running(*argv: str) -> list[psutil.Process]:
    """Host processes whose command line is exactly `argv` (pids inside a sandbox differ)."""
    return [
        p
        for p in psutil.process_iter(["cmdline", "status"])
        if p.info["cmdline"] == list(argv) and p.info["status"] != psutil.STATUS_ZOMBIE
    ]


def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> bool:
    """Poll `condition` until it holds or `timeout` passes; its last value. The default is
    generous: a state that comes in milliseconds may take seconds on a loaded machine, and
    waiting longer costs only a test that fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# nbformat's reader, typed (its own annotations leave it out)
_reads_notebook = cast(Callable[..., nbformat.NotebookNode], nbformat.reads)


def read_notebook(text: str) -> nbformat.NotebookNode:
    """`text` as an nbformat v4 notebook, validated."""
    nb = _reads_notebook(text, as_version=4)
    nbformat.validate(nb)
    return nb


def descendants() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.status() != psutil.STATUS_ZOMBIE
    }


# Code that keeps its kernel busy until the test lets it end (`Server.let_end`), rather than
# for a guessed time: the test observes what it needs while the code runs, then ends it.
HOLD = (
    "import os, time\n"
    "while not os.path.exists('let-end'):\n"
    "    time.sleep(0.01)\n"
    "os.remove('let-end')"
)


class Server:
    """A running kernel-service and a client for it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.connection_dir = settings.connection_dir
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(settings)
        self._server = uvicorn.Server(uvicorn_config(self.app, settings))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.base_url, timeout=120)

    def execute(self, code: str, session_id: str | None = None, **extra: Any) -> dict[str, Any]:
        response = self.client.post(
            "/execute", json={"code": code, "session_id": session_id, **extra}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def new_session(self, session_id: str | None = None) -> str:
        response = self.client.post("/sessions", json={"session_id": session_id})
        assert response.status_code == 201, response.text
        created: str = response.json()["session_id"]
        return created

    def status(self, session_id: str) -> str:
        """The session's status as GET /sessions/{id} tells it."""
        status: str = self.client.get(f"/sessions/{session_id}").json()["status"]
        return status

    def requests_in_flight(self) -> int:
        """Requests the server is handling now (uvicorn runs one task for each)."""
        return len(self._server.server_state.tasks)

    def wait_busy(self, session_id: str) -> None:
        """Until the session runs an execution."""
        assert wait_for(lambda: self.status(session_id) == "busy", 10)

    def let_end(self, session_id: str) -> None:
        """Let the session's running `HOLD` code end (it removes the file it waits for)."""
        work_dir: Path = self.app.state.registry.get(session_id).work_dir
        (work_dir / "let-end").touch()

    def stop(self) -> None:
        self.client.close()
        self._server.should_exit = True
        self._thread.join(timeout=60)
        assert not self._thread.is_alive(), "server did not stop"

    def assert_clean(self) -> None:
        """No kernel process and no connection file of this server is left."""
        wait_for(lambda: not kernel_processes(self.connection_dir))
        assert kernel_processes(self.connection_dir) == []
        assert sorted(p.name for p in self.connection_dir.iterdir()) == []


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        # each server claims a free block of uids by itself, as a service does, apart from
        # every other server of this run or of another one on the machine
        "sandbox_uid_count": 1000,
        "connection_dir": tmp / "connection",
        "work_dir": tmp / "work",
        "state_dir": tmp / "state",
        "log_level": "warning",
        "sandbox": "bubblewrap" if SANDBOXED else "none",
        "sandbox_work_dir_mb": 256,
        "pool_size": 0,  # the pool's own tests turn it on
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_server(tmp: Path, **overrides: Any) -> Iterator[Server]:
    """A server with these settings, stopped and checked for leftovers afterwards."""
    before = descendants()
    server = Server(make_settings(tmp, **overrides))
    try:
        yield server
    finally:
        server.stop()
        server.assert_clean()
        wait_for(lambda: not descendants() - before)
        assert descendants() - before == set(), "processes left behind"


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by the tests that need default settings."""
    with running_server(tmp_path_factory.mktemp("service")) as shared:
        yield shared


@pytest.fixture
def session(server: Server) -> Iterator[str]:
    """A fresh session on the shared server, deleted afterwards."""
    session_id = server.new_session()
    yield session_id
    server.client.delete(f"/sessions/{session_id}")


@contextmanager
def service_process(
    tmp_path: Path,
    log_level: str = "warning",
    env: dict[str, str] | None = None,
    uid_base: int | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The real `python -m kernel_service serve` on a free loopback port, its directories in
    `tmp_path` (so a second one there carries on the first's sessions, and their uids); its
    kernels' uids claimed automatically unless `uid_base` is given; its log appended to
    service.log. Killed at the end if still running."""
    log_file = tmp_path / "service.log"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel_service",
            "serve",
            "--port",
            str(port),
            "--connection-dir",
            str(tmp_path / "connection"),
            "--work-dir",
            str(tmp_path / "work"),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-level",
            log_level,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_file.open("ab"),
        env={
            **os.environ,
            **({} if SANDBOXED else {"KERNEL_SERVICE_SANDBOX": "none"}),
            **({"KERNEL_SERVICE_SANDBOX_UID_BASE": str(uid_base)} if uid_base else {}),
            "KERNEL_SERVICE_SANDBOX_UID_COUNT": "1000",
            "KERNEL_SERVICE_POOL_SIZE": "0",
            **(env or {}),
        },
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base_url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert process.poll() is None, log_file.read_text()
                assert time.monotonic() < deadline, "service did not start"
                time.sleep(0.1)
        yield process, base_url
    finally:
        stop_process(process)


def stop_process(process: "subprocess.Popen[bytes]") -> None:
    """End a process a test started, cleanly if it can (a test that failed half-way may
    leave it running): SIGTERM, then SIGKILL after 30 s; reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(timeout=30)
