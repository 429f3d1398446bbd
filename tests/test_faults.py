"""Faults injected for real, and what survives them: a client that hangs up mid-execution,
a kernel killed or stopped by a signal, its connection file deleted or corrupted, and
clients racing for one session id.

Covered elsewhere and not repeated here: a kernel that kills itself (`os._exit`, SIGKILL
from inside, a segfault: tests/test_execute.py), a death between calls (test_execute.py),
deletion of a busy session (tests/test_sessions.py), the service's own death
(tests/test_lifecycle.py) and a dead pooled kernel (tests/test_pool.py).
"""

import asyncio
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import HOLD, Server, alive, kernel_processes, running_server, wait_for, zygotes

LOOP_30S = "import time\nfor i in range(300):\n    n = i\n    time.sleep(0.1)\ndone = True"


# The first line of code whose running the test waits for (`wait_running`).
MARK_RUNNING = "open('running', 'w').close()"


def wait_running(server: Server, session_id: str) -> None:
    """Until the kernel runs the code that began with MARK_RUNNING (not only the service
    sent it): the file it made is in the session's work directory."""
    assert wait_for((server.settings.work_dir / session_id / "running").exists, 60)


def status_of(server: Server, session_id: str) -> str:
    status: str = server.client.get(f"/sessions/{session_id}").json()["status"]
    return status


@contextmanager
def new_session_with_kernel(server: Server) -> Iterator[tuple[str, psutil.Process, Path]]:
    """A new session, its kernel process and its connection file; deleted afterwards."""
    files_before = set(server.connection_dir.glob("k-*/connection.json"))
    pids_before = {p.pid for p in kernel_processes(server.connection_dir)}
    session_id = server.new_session()
    try:
        [connection_file] = set(server.connection_dir.glob("k-*/connection.json")) - files_before
        # forked kernels carry only the connection dir in their command line: told apart by
        # being new (nothing else starts kernels on this server meanwhile)
        [kernel] = [p for p in kernel_processes(server.connection_dir) if p.pid not in pids_before]
        yield session_id, kernel, connection_file
    finally:
        server.client.delete(f"/sessions/{session_id}")


def watch_tasks(server: Server) -> list[str]:
    """The service's live asyncio tasks that watch a client or run an execution for it."""
    loop = server._server.servers[0].get_loop()  # the loop uvicorn serves on

    async def names() -> list[str]:
        coros = [task.get_coro() for task in asyncio.all_tasks()]
        return [name for c in coros if (name := getattr(c, "__qualname__", "")) in WATCH_TASKS]

    return asyncio.run_coroutine_threadsafe(names(), loop).result(timeout=5)


WATCH_TASKS = {"_cancel_on_disconnect", "execute.<locals>.run"}


def kernel_pids(server: Server) -> set[int]:
    return {p.pid for p in kernel_processes(server.connection_dir)}


# ---------------------------------------------------------------- client disconnects


def hang_up_with_httpx(server: Server, session_id: str, code: str, after: float) -> None:
    """POST /execute, and give up (closing the connection) after `after` seconds."""
    timeout = httpx.Timeout(30, read=after)
    with (
        httpx.Client(base_url=server.base_url, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/execute", json={"code": code, "session_id": session_id})


def hang_up_with_a_socket(server: Server, session_id: str, code: str, after: float) -> None:
    """The same over a bare socket, closed without reading a byte of the answer."""
    body = httpx.Request(
        "POST", f"{server.base_url}/execute", json={"code": code, "session_id": session_id}
    )
    head = (
        f"POST /execute HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body.content)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(head.encode() + body.content)
        time.sleep(after)


@pytest.mark.parametrize("hang_up", [hang_up_with_httpx, hang_up_with_a_socket])
def test_a_client_that_hangs_up_interrupts_its_execution(server: Server, hang_up: Any) -> None:
    assert server.settings.interrupt_on_disconnect  # the default
    with new_session_with_kernel(server) as (session_id, kernel, _):
        assert server.execute("x = 1", session_id)["status"] == "ok"
        hang_up(server, session_id, LOOP_30S, 1.0)
        gone = time.monotonic()
        assert wait_for(lambda: status_of(server, session_id) == "idle", 5)
        idle_after = time.monotonic() - gone
        # free once the interrupted cell has ended in the kernel: the next request runs
        result = server.execute("(x, 'done' in globals(), n)", session_id)
        assert result["status"] == "ok", result["text"]
        x, done, n = result["result"].strip("()").split(", ")
        assert (x, done) == ("1", "False")
        assert 3 <= int(n) < 30, n  # it ran about a second, then stopped
        assert result["state_lost"] is False
        assert result["stdout"] == "" and result["error"] is None  # nothing of the old cell
        assert kernel.pid in kernel_pids(server)  # interrupted, not restarted
        assert watch_tasks(server) == []  # the watcher and the execution's task have ended
        print(f"idle {idle_after * 1000:.0f} ms after the client left; n={n}")


def test_a_client_that_stays_leaves_no_task_behind(server: Server, session: str) -> None:
    assert server.execute("1 + 1", session)["result"] == "2"
    # a chunked body (replayed by the body size limit): the watcher reads after it, not it
    body = f'{{"session_id": "{session}", "code": "print(40 + 2)"}}'.encode()
    chunked = server.client.post(
        "/execute",
        content=iter([body[:10], body[10:30], body[30:]]),
        headers={"content-type": "application/json"},
    )
    assert chunked.json()["stdout"] == "42\n"
    made = server.execute("'a' + 'b'")  # in a new session
    assert made["result"] == "'ab'"
    server.client.delete(f"/sessions/{made['session_id']}")
    missing = server.client.post("/execute", json={"code": "1", "session_id": "nope"})
    assert missing.status_code == 404
    assert watch_tasks(server) == []


def test_a_queued_request_whose_client_hangs_up_never_runs(server: Server, session: str) -> None:
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.execute, f"{HOLD}\n'first'", session)
        server.wait_busy(session)
        hang_up_with_httpx(server, session, "queued_ran = True", 0.5)
        # the service has seen the hang-up: only the running request is left
        assert wait_for(lambda: server.requests_in_flight() == 1, 30)
        server.let_end(session)
        assert running.result(timeout=30)["result"] == "'first'"
    result = server.execute("'queued_ran' in globals()", session)
    assert result["result"] == "False"
    assert result["execution_count"] == 2  # the dropped request never reached the kernel


def test_a_request_queued_behind_a_hung_up_one_runs_normally(server: Server, session: str) -> None:
    """The next request in the queue runs once the hung-up one is interrupted (not aborted by
    the kernel, as it would be if it reached it before the interrupted cell had ended)."""
    server.execute("x = 1", session)
    with ThreadPoolExecutor(2) as pool:
        leaving = pool.submit(
            hang_up_with_httpx, server, session, f"{MARK_RUNNING}\n{LOOP_30S}", 1.0
        )
        wait_running(server, session)
        queued = pool.submit(server.execute, "x + 1", session)
        leaving.result(timeout=30)
        result = queued.result(timeout=30)
    assert result["status"] == "ok", result["text"]
    assert result["result"] == "2"


def test_without_interrupt_on_disconnect_the_code_runs_on(tmp_path: Path) -> None:
    with running_server(tmp_path, interrupt_on_disconnect=False) as server:
        session_id = server.new_session()
        server.execute("x = 1", session_id)
        code = "import time\nfor i in range(20):\n    time.sleep(0.1)\ndone = True"
        hang_up_with_httpx(server, session_id, code, 0.5)
        assert status_of(server, session_id) == "busy"  # still running after the client left
        assert wait_for(lambda: status_of(server, session_id) == "idle", 10)
        result = server.execute("(x, done)", session_id)
        assert result["result"] == "(1, True)"
        assert result["state_lost"] is False


# ---------------------------------------------------------------- signals to the kernel


def test_a_kernel_killed_mid_execution(server: Server) -> None:
    with (
        new_session_with_kernel(server) as (session_id, kernel, _),
        new_session_with_kernel(server) as (other, other_kernel, _),
    ):
        kernels_before = len(kernel_pids(server))
        server.execute("x = 1", session_id)
        server.execute("kept = 42", other)
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(server.execute, f"{MARK_RUNNING}\n{LOOP_30S}", session_id)
            wait_running(server, session_id)
            os.kill(kernel.pid, signal.SIGKILL)
            killed = time.monotonic()
            result = running.result(timeout=60)
            answered = time.monotonic() - killed
        assert answered < 15, answered  # its death seen, long before the loop's 30 s
        assert result["status"] == "error"
        assert result["error"]["ename"] == "KernelDied"
        assert "SIGKILL" in result["error"]["evalue"]
        assert result["state_lost"] is True
        assert wait_for(lambda: not alive(kernel.pid))

        after = server.execute("'x' in globals()", session_id)
        assert after["status"] == "ok", after["text"]
        assert after["result"] == "False"
        # the loss was told once, in the answer of the request it hit
        assert after["state_lost"] is False
        assert after["execution_count"] == 1
        assert len(kernel_pids(server)) == kernels_before  # one for one
        assert kernel.pid not in kernel_pids(server)

        survivor = server.execute("kept", other)
        assert survivor["result"] == "42"
        assert survivor["state_lost"] is False
        assert other_kernel.is_running()
        print(f"answered {answered * 1000:.0f} ms after the SIGKILL")


def test_a_kernel_stopped_mid_execution_is_killed_at_the_deadline(server: Server) -> None:
    grace = server.settings.interrupt_grace
    with new_session_with_kernel(server) as (session_id, kernel, _):
        server.execute("x = 1", session_id)
        try:
            with ThreadPoolExecutor(1) as pool:
                started = time.monotonic()
                running = pool.submit(server.execute, LOOP_30S, session_id, timeout=2)
                server.wait_busy(session_id)
                os.kill(kernel.pid, signal.SIGSTOP)  # deaf to the interrupt, and to all else
                result = running.result(timeout=30)
                answered = time.monotonic() - started
        finally:
            if alive(kernel.pid):  # SIGKILL ends a stopped process too
                os.kill(kernel.pid, signal.SIGKILL)
        assert answered < 20, answered  # (2 s + the grace, with room for a loaded machine)
        assert result["status"] == "timeout"
        assert result["error"]["ename"] == "TimeoutError"
        assert result["state_lost"] is True
        assert wait_for(lambda: not alive(kernel.pid)), "the stopped kernel is still there"

        after = server.execute("'x' in globals()", session_id)
        assert after["status"] == "ok", after["text"]
        assert after["result"] == "False"
        assert status_of(server, session_id) == "idle"
        print(f"answered {answered:.2f} s after the start (timeout 2 s, grace {grace:g} s)")


def test_an_interrupt_asked_for_before_the_code_begins_ends_it_as_it_begins(
    server: Server,
) -> None:
    """The kernel ignores SIGINT until it takes up a request, so an interrupt that comes
    first is held for the code, not lost (the code would run its 30 s). Here the session
    waits for a new kernel, its last one killed and the zygote stopped meanwhile."""
    with new_session_with_kernel(server) as (session_id, kernel, _):
        server.execute("x = 1", session_id)
        kernel.kill()
        assert wait_for(lambda: status_of(server, session_id) == "dead")
        [zygote] = zygotes(server)
        with ThreadPoolExecutor(1) as pool:
            zygote.suspend()
            try:
                started = time.monotonic()
                running = pool.submit(server.execute, "import time; time.sleep(30)", session_id)
                assert wait_for(lambda: status_of(server, session_id) == "starting")
                answer = server.client.post(f"/sessions/{session_id}/interrupt").json()
                assert answer["interrupted"] is True
            finally:
                zygote.resume()
            result = running.result(timeout=40)
            answered = time.monotonic() - started
        assert result["status"] == "error", result["text"]
        assert result["error"]["ename"] == "KeyboardInterrupt"
        assert result["state_lost"] is True  # the kernel it had was killed
        assert answered < 15, answered
        assert server.execute("1 + 1", session_id)["result"] == "2"  # not interrupted too


# ---------------------------------------------------------------- connection files


@pytest.mark.parametrize("fault", ["deleted", "corrupted"])
def test_a_lost_connection_file_does_not_matter_to_a_running_session(
    tmp_path: Path, fault: str
) -> None:
    """The service read the connection info once, at the start, and keeps it in memory.

    (What a damaged file means to a kernel carried over a service restart is another
    matter: tests/test_survival.py.)"""
    with running_server(tmp_path) as server:
        with new_session_with_kernel(server) as (session_id, kernel, connection_file):
            server.execute("x = 1", session_id)
            if fault == "deleted":
                connection_file.unlink()
            else:
                connection_file.write_bytes(b"\x00garbage{not json")
            result = server.execute("x + 1", session_id)
            assert result["status"] == "ok", result["text"]
            assert result["result"] == "2"
            # the control channel too: an interrupt still reaches the kernel
            with ThreadPoolExecutor(1) as pool:
                code = f"{MARK_RUNNING}\nimport time; time.sleep(30)"
                running = pool.submit(server.execute, code, session_id)
                wait_running(server, session_id)
                assert server.client.post(f"/sessions/{session_id}/interrupt").json()["interrupted"]
                interrupted = running.result(timeout=10)
            assert interrupted["error"]["ename"] == "KeyboardInterrupt"
            assert server.execute("x", session_id)["result"] == "1"
            assert kernel.pid in kernel_pids(server)
            assert status_of(server, session_id) == "idle"
        # deleted (by the context manager): kernel and directory gone, the file or not
        assert wait_for(lambda: not kernel_pids(server))
        assert list(server.connection_dir.iterdir()) == []


# ---------------------------------------------------------------- racing clients


def test_clients_racing_for_one_session_id(server: Server) -> None:
    kernels_before = kernel_pids(server)

    async def race() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            return await asyncio.gather(
                *(client.post("/sessions", json={"session_id": "raced"}) for _ in range(4))
            )

    responses = asyncio.run(race())
    try:
        assert sorted(r.status_code for r in responses) == [201, 409, 409, 409]
        # refused while the winner's kernel was still starting: the id was reserved by then
        [created] = [r for r in responses if r.status_code == 201]
        assert all(r.elapsed < created.elapsed for r in responses if r is not created)
        assert {r.json()["code"] for r in responses if r.status_code == 409} == {"session_exists"}
        [new_kernel] = kernel_pids(server) - kernels_before
        listed = [s["session_id"] for s in server.client.get("/sessions").json()["sessions"]]
        assert listed.count("raced") == 1
        assert server.execute("1 + 1", "raced")["result"] == "2"
    finally:
        deleted = server.client.delete("/sessions/raced")
    assert deleted.status_code == 204
    assert wait_for(lambda: not alive(new_kernel))
    assert kernel_pids(server) == kernels_before


def test_a_session_made_for_a_request_whose_client_left_is_not_kept(server: Server) -> None:
    """Its id was in the answer nobody read: nobody could ever use it."""
    before = {s["session_id"] for s in server.client.get("/sessions").json()["sessions"]}
    timeout = httpx.Timeout(30, read=1.0)
    with (
        httpx.Client(base_url=server.base_url, timeout=timeout) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/execute", json={"code": "import time; time.sleep(30)"})

    def listed() -> set[str]:
        return {s["session_id"] for s in server.client.get("/sessions").json()["sessions"]}

    assert wait_for(lambda: listed() == before, 10), listed() - before
