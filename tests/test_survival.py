"""Sessions outlive the service process: a SIGKILL, or a stop that keeps the kernels, then a
new start that adopts them; kernels whose service never comes back are ended by the orphan
reaper; a kernel whose connection file was damaged is not adopted. The service runs as its
own process here (`kernel-service serve`), so that it can be killed for real."""

import contextlib
import ctypes
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kernel_service.kernel.uids import UidRange
from kernel_service.workdir.workspaces import MARKER
from tests.conftest import (
    alive,
    kernel_processes,
    running_server,
    service_process,
    wait_for,
)

IN_OPEN = 0x20  # inotify: the file was opened


def reapers(tmp_path: Path) -> list[psutil.Process]:
    state = str(tmp_path / "state")
    return [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "ks-reaper" and state in (p.info["cmdline"] or [])
    ]


def uid_range(tmp_path: Path) -> range:
    """The kernel uids claimed by the service on the state in `tmp_path` (empty unsandboxed)."""
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "sessions.sqlite3")) as db:
        row = db.execute("SELECT value FROM meta WHERE name = 'uid_range'").fetchone()
    uids = UidRange.parse(row[0] if row else None)
    return uids.uids if uids else range(0)


def session_kernels(tmp_path: Path) -> set[int]:
    """The pids of the sessions' kernels (of their sandbox), as the state in `tmp_path`
    records them."""
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "sessions.sqlite3")) as db:
        query = "SELECT pid FROM kernels JOIN sessions USING (kernel_id)"
        return {pid for (pid,) in db.execute(query).fetchall()}


@contextlib.contextmanager
def opened(path: Path) -> Iterator[Callable[[float], bool]]:
    """A watch on `path` (inotify); calling what it gives waits up to that many seconds for
    a process to open the file since the watch began, and says whether one did."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, bytes(path), IN_OPEN) >= 0, ctypes.get_errno()
    try:
        yield lambda timeout: bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def run(client: httpx.Client, code: str, session_id: str, **extra: Any) -> dict[str, Any]:
    response = client.post("/execute", json={"code": code, "session_id": session_id, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def make_session(client: httpx.Client, session_id: str) -> None:
    assert client.post("/sessions", json={"session_id": session_id}).status_code == 201


def test_a_killed_service_leaves_its_kernels_to_the_next_start(tmp_path: Path) -> None:
    connection = tmp_path / "connection"
    env = {"KERNEL_SERVICE_POOL_SIZE": "1"}  # a warm kernel too: ended by the next start
    with service_process(tmp_path, env=env) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for name, code in (("a", "x = 41"), ("b", "y = 'kept'")):
                make_session(client, name)
                run(client, code, name)
            assert wait_for(lambda: len(kernel_processes(connection)) == 3, 60)  # + the pool's
            before = session_kernels(tmp_path)
            assert len(before) == 2
            uids = uid_range(tmp_path)
            assert not uids or all(k.uids().real in uids for k in kernel_processes(connection))
            # an execution in flight when the service dies: its client gets an error (not an
            # answer, which would come only when the loop ends)
            failure: list[BaseException] = []
            code = "open('started', 'w').close()\nimport time\nfor i in range(40): time.sleep(0.1)"

            def in_flight() -> None:
                try:
                    run(client, f"{code}\nz = i", "a")
                except BaseException as exc:
                    failure.append(exc)

            thread = threading.Thread(target=in_flight)
            thread.start()
            # the kernel runs it (not only the service sent it): it is the kernel's to finish
            assert wait_for((tmp_path / "work" / "a" / "started").exists, 60)
            os.kill(process.pid, signal.SIGKILL)
            thread.join(timeout=60)
            assert failure and isinstance(failure[0], httpx.TransportError), failure
        process.wait(timeout=60)
    # the kernels live on without their service
    assert all(alive(pid) for pid in before)
    with service_process(tmp_path, env=env) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            info = client.get("/sessions/a").json()
            assert "ServiceRestarted" in (info["notice"] or ""), info
            # the same uids again, without a setting: the kernels are adopted inside them
            assert uid_range(tmp_path) == uids
            after = run(client, "x + 1", "a")
            assert after["result"] == "42" and not after["state_lost"], after
            assert "ServiceRestarted: The service was restarted" in after["text"], after
            # the in-flight execution went on in the kernel and finished there, before the
            # next one (a kernel runs its executions in turn)
            assert run(client, "z", "a")["result"] == "39"
            assert run(client, "y", "b")["result"] == "'kept'"
            assert client.get("/sessions/b").json()["notice"] is None
            # the first service's warm kernel was ended; the adopted ones are the same processes
            assert session_kernels(tmp_path) == before and all(alive(pid) for pid in before)
            assert wait_for(lambda: len(kernel_processes(connection)) == 3, 60)
            assert not uids or all(k.uids().real in uids for k in kernel_processes(connection))
            # one reaper: the first service's saw a service take over and left
            assert wait_for(lambda: len(reapers(tmp_path)) == 1, 60)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert kernel_processes(connection) == []
    assert list(connection.iterdir()) == []
    assert wait_for(lambda: reapers(tmp_path) == [], 10)
    with sqlite3.connect(tmp_path / "state" / "sessions.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM sessions").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM kernels").fetchone() == (0,)


def test_keep_kernels_carries_sessions_over_a_graceful_restart(tmp_path: Path) -> None:
    connection = tmp_path / "connection"
    env = {"KERNEL_SERVICE_KEEP_KERNELS": "true"}
    with service_process(tmp_path, env=env) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            make_session(client, "s")
            run(client, "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2, 3]})", "s")
            (work,) = [p for p in (tmp_path / "work").iterdir() if p.name == "s"]
            run(client, "open('notes.txt', 'w').write('hello')", "s")
        [kernel] = kernel_processes(connection)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert alive(kernel.pid)
    assert (work / "notes.txt").read_text() == "hello"
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            result = run(client, "int(df.a.sum()), open('notes.txt').read()", "s")
            assert result["result"] == "(6, 'hello')" and not result["state_lost"], result
            assert result["execution_count"] == 3  # counting on from the first service's
            assert client.get("/sessions/s").json()["notice"] is None
        # without keep_kernels this time: the stop ends everything
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert not alive(kernel.pid)
    assert list(connection.iterdir()) == []


def test_kernels_of_a_service_that_never_returns_end_after_the_orphan_timeout(
    tmp_path: Path,
) -> None:
    connection = tmp_path / "connection"
    env = {"KERNEL_SERVICE_ORPHAN_TIMEOUT": "2"}
    with service_process(tmp_path, env=env) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            make_session(client, "s")
            run(client, "x = 1", "s")
        [kernel] = kernel_processes(connection)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    killed_at = time.monotonic()
    assert alive(kernel.pid)
    assert wait_for(lambda: not alive(kernel.pid), 60), "the orphaned kernel lives on"
    waited = time.monotonic() - killed_at
    assert waited > 1.5, waited  # not before the orphan timeout
    # the reaper removes the kernel's files before it exits
    assert wait_for(lambda: reapers(tmp_path) == [], 60)
    assert list(connection.iterdir()) == []
    # the session and its files are still there for the next start, which says state is lost
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            result = client.post("/execute", json={"code": "x", "session_id": "s"}).json()
            assert result["state_lost"] and result["error"]["ename"] == "NameError", result
            assert "orphan timeout" in result["text"], result["text"]
            assert run(client, "x = 2\nx", "s")["result"] == "2"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert kernel_processes(connection) == []


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_a_kernel_whose_connection_file_was_damaged_is_not_adopted(
    tmp_path: Path, damage: str
) -> None:
    connection = tmp_path / "connection"
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for name in ("hurt", "whole"):
                make_session(client, name)
                run(client, f"v = {name!r}", name)
                kernels = {p.pid for p in kernel_processes(connection)}
                if name == "hurt":
                    [hurt_pid] = kernels
                    [hurt_dir] = connection.iterdir()
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    connection_file = hurt_dir / "connection.json"
    if damage == "deleted":
        connection_file.unlink()
    else:
        connection_file.write_text('{"transport": "tcp", "ip": "10.0.0.1", "shell_port": 1}')
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            assert wait_for(lambda: not alive(hurt_pid), 10), "the refused kernel still runs"
            assert not hurt_dir.exists()
            hurt = client.post("/execute", json={"code": "v", "session_id": "hurt"}).json()
            assert hurt["state_lost"] and hurt["error"]["ename"] == "NameError", hurt
            assert "connection file" in hurt["text"], hurt["text"]
            assert run(client, "v", "whole")["result"] == "'whole'"
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert kernel_processes(connection) == []
    assert list(connection.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small filesystem needs root")
def test_a_full_state_disk_refuses_with_507_and_corrupts_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)
    try:
        with running_server(tmp_path, state_dir=state) as server:
            server.new_session("a")
            server.execute("x = 1", "a")
            filler = state / "filler"
            with contextlib.suppress(OSError), filler.open("wb") as file:
                while True:
                    file.write(b"\0" * 4096)
                    file.flush()
            refused = server.client.post("/sessions", json={"session_id": "b"})
            assert refused.status_code == 507, refused.text
            assert refused.json()["code"] == "state_storage_full"
            assert server.client.get("/sessions/b").status_code == 404  # nothing half-made
            assert len(kernel_processes(server.connection_dir)) == 1
            assert not (server.settings.work_dir / "b").exists()
            busy = server.client.post("/execute", json={"code": "x = 2", "session_id": "a"})
            assert busy.status_code == 507, busy.text  # refused before it ran
            filler.unlink()
            server.new_session("b")
            assert server.execute("x", "a")["result"] == "1"
        with sqlite3.connect(state / "sessions.sqlite3") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_second_service_on_the_same_directories_refuses_to_start(tmp_path: Path) -> None:
    with service_process(tmp_path) as (_, base_url):
        other = tmp_path / "other"
        refused = subprocess.run(
            [sys.executable, "-m", "kernel_service", "serve", "--port", "0",
             "--connection-dir", str(tmp_path / "connection"),  # the first one's
             "--work-dir", str(other / "work"), "--state-dir", str(other / "state")],
            env={**os.environ, "KERNEL_SERVICE_SANDBOX": "none", "KERNEL_SERVICE_POOL_SIZE": "0"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert f"another kernel-service process uses {tmp_path / 'connection'}" in refused.stderr
        # the first one is untouched
        answer = httpx.post(f"{base_url}/execute", json={"code": "1 + 1"}, timeout=60)
        assert answer.json()["result"] == "2"


def test_a_work_dir_of_other_files_is_refused_and_left_untouched(tmp_path: Path) -> None:
    """The service deletes what in its work root no session owns: given a directory that
    holds anything else (a checkout, say), it must refuse to start, not empty it."""
    work = tmp_path / "work"
    (work / "checkout" / ".git").mkdir(parents=True)
    (work / "checkout" / "README.md").write_text("mine")
    (work / "notes.txt").write_text("mine too")
    refused = subprocess.run(
        [sys.executable, "-m", "kernel_service", "serve", "--port", "0",
         "--connection-dir", str(tmp_path / "connection"), "--work-dir", str(work),
         "--state-dir", str(tmp_path / "state")],
        env={**os.environ, "KERNEL_SERVICE_SANDBOX": "none", "KERNEL_SERVICE_POOL_SIZE": "0"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode != 0
    assert "refusing to start" in refused.stderr and "did not make" in refused.stderr
    assert "'checkout', 'notes.txt'" in refused.stderr, refused.stderr
    assert (work / "checkout" / "README.md").read_text() == "mine"
    assert (work / "notes.txt").read_text() == "mine too"
    assert sorted(p.name for p in work.iterdir()) == ["checkout", "notes.txt"]


def test_a_work_root_of_an_earlier_version_is_taken_and_its_strays_removed(
    tmp_path: Path,
) -> None:
    """A root an earlier version made holds only the recorded sessions' work dirs (and warm
    kernels' leftovers): it is taken, marked, and what no session owns is removed."""
    keep = {"KERNEL_SERVICE_KEEP_KERNELS": "true"}
    with service_process(tmp_path, env=keep) as (process, base_url):
        make_session(httpx.Client(base_url=base_url, timeout=60), "kept")
        process.terminate()  # graceful, keeping the session for the next start
        process.wait(timeout=60)
    marker = tmp_path / "work" / MARKER
    marker.unlink()  # as an earlier version left it
    stray = tmp_path / "work" / f"pool-{'0' * 32}"
    stray.mkdir()
    with service_process(tmp_path) as (_, base_url):
        answer = httpx.post(
            f"{base_url}/execute", json={"code": "1 + 1", "session_id": "kept"}, timeout=60
        )
        assert answer.json()["result"] == "2", answer.text
        assert marker.is_file() and not stray.exists()
    # in a root that is the service's, what is not a work directory is never removed:
    # a file, a symbolic link (nor what it points at), lost+found
    outside = tmp_path / "outside"
    (outside / "precious").mkdir(parents=True)
    (tmp_path / "work" / "notes.txt").write_text("mine")
    (tmp_path / "work" / "link").symlink_to(outside)
    (tmp_path / "work" / "lost+found").mkdir()
    with service_process(tmp_path):
        pass
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "work" / "link").is_symlink() and (outside / "precious").is_dir()
    assert (tmp_path / "work" / "lost+found").is_dir() and marker.is_file()


def test_the_reaper_ends_orphans_even_if_the_state_dir_is_removed(tmp_path: Path) -> None:
    connection = tmp_path / "connection"
    env = {"KERNEL_SERVICE_ORPHAN_TIMEOUT": "2"}
    with service_process(tmp_path, env=env) as (process, base_url):
        answer = httpx.post(f"{base_url}/execute", json={"code": "1"}, timeout=60)
        assert answer.status_code == 200
        [kernel] = kernel_processes(connection)
        with opened(tmp_path / "state" / "lock") as lock_opened:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=60)
            # the reaper has read what it must end: it polls the lock file only after that
            assert lock_opened(60)
    shutil.rmtree(tmp_path / "state")
    assert wait_for(lambda: not alive(kernel.pid), 60), "the orphaned kernel lives on"
    # the reaper removes the kernel's files before it exits
    assert wait_for(lambda: reapers(tmp_path) == [], 60)
    assert list(connection.iterdir()) == []
    # the session's work dir (its own filesystem) is the next start's to clear
    with service_process(tmp_path):
        # nothing but the mark that the root is the service's
        assert [p.name for p in (tmp_path / "work").iterdir()] == [MARKER]
