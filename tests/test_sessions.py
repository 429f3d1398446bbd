"""Session endpoints, serialised executions within a session, concurrency across sessions."""

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, kernel_processes, running_server, wait_for, zygotes


def test_session_lifecycle_endpoints(server: Server) -> None:
    created = server.client.post("/sessions", json={"session_id": "analysis-1"})
    assert created.status_code == 201
    info = created.json()
    assert info["session_id"] == "analysis-1"
    assert info["status"] == "idle"
    assert info["execution_count"] == 0
    assert "analysis-1" in [
        s["session_id"] for s in server.client.get("/sessions").json()["sessions"]
    ]

    server.execute("v = 5", "analysis-1")
    fetched = server.client.get("/sessions/analysis-1").json()
    assert fetched["execution_count"] == 1
    assert fetched["last_activity"] >= fetched["created_at"]

    assert server.client.delete("/sessions/analysis-1").status_code == 204
    gone = server.client.get("/sessions/analysis-1")
    assert gone.status_code == 404
    assert gone.json()["code"] == "session_not_found"
    assert server.client.delete("/sessions/analysis-1").status_code == 404


def test_post_sessions_without_a_body_makes_an_id(server: Server) -> None:
    created = server.client.post("/sessions")
    assert created.status_code == 201
    session_id = created.json()["session_id"]
    assert len(session_id) == 32
    server.client.delete(f"/sessions/{session_id}")


def test_a_taken_id_is_refused(server: Server, session: str) -> None:
    again = server.client.post("/sessions", json={"session_id": session})
    assert again.status_code == 409
    assert again.json()["code"] == "session_exists"


def test_restart_clears_state(server: Server, session: str) -> None:
    server.execute("gone = 1", session)
    restarted = server.client.post(f"/sessions/{session}/restart")
    assert restarted.status_code == 200
    assert restarted.json()["status"] == "idle"
    assert restarted.json()["execution_count"] == 0
    result = server.execute("'gone' in globals()", session)
    assert result["result"] == "False"
    assert result["execution_count"] == 1


def test_interrupt_stops_a_running_execution(server: Server, session: str) -> None:
    server.execute("kept = 3", session)
    idle = server.client.post(f"/sessions/{session}/interrupt")
    assert idle.json() == {"session_id": session, "interrupted": False}
    with ThreadPoolExecutor(1) as pool:
        code = "open('running', 'w').close()\nimport time\nwhile True: time.sleep(0.01)"
        running = pool.submit(server.execute, code, session)
        # the kernel runs it (an interrupt that came before would be held for it)
        assert wait_for((server.settings.work_dir / session / "running").exists, 60)
        answer = server.client.post(f"/sessions/{session}/interrupt")
        assert answer.json()["interrupted"] is True
        result = running.result(timeout=10)
    assert result["status"] == "error"
    assert result["error"]["ename"] == "KeyboardInterrupt"
    assert server.execute("kept", session)["result"] == "3"


def test_requests_to_one_session_are_serialised(server: Server, session: str) -> None:
    code = (
        "import time\nfor i in range(5):\n    print('{tag}', i, flush=True)\n    time.sleep(0.05)"
    )
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(server.execute, code.format(tag=t), session) for t in "abcd"]
        results = [f.result(timeout=60) for f in futures]
    for tag, result in zip("abcd", results, strict=True):
        assert result["stdout"] == "".join(f"{tag} {i}\n" for i in range(5))
    assert sorted(r["execution_count"] for r in results) == [1, 2, 3, 4]


def test_different_sessions_run_concurrently(server: Server) -> None:
    sessions = [server.new_session() for _ in range(3)]
    # each says it runs, then waits for the test's go, given only once all three run: run
    # one after another, the first would wait in vain (and give up after 60 s)
    code = (
        "import os, time\nopen('running', 'w').close()\ndeadline = time.monotonic() + 60\n"
        "while not os.path.exists('go') and time.monotonic() < deadline:\n"
        "    time.sleep(0.02)\nos.path.exists('go')"
    )
    try:
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(server.execute, code, s) for s in sessions]
            work_dirs = [server.settings.work_dir / s for s in sessions]
            all_run = wait_for(lambda: all((d / "running").exists() for d in work_dirs), 60)
            for work_dir in work_dirs:
                (work_dir / "go").touch()
            results = [r.result(timeout=120) for r in running]
        assert all_run, "the sessions did not run at the same time"
        assert [r["result"] for r in results] == ["True"] * 3
    finally:
        for session_id in sessions:
            server.client.delete(f"/sessions/{session_id}")


def test_tools_and_health(server: Server) -> None:
    [tool] = server.client.get("/tools").json()
    assert tool["type"] == "function"
    function = tool["function"]
    assert function["name"] == "code_interpreter"
    assert function["parameters"]["required"] == ["code"]
    assert "persist" in function["description"]
    assert ("no network access" in function["description"]) == (server.settings.sandbox != "none")
    health = server.client.get("/healthz").json()
    assert health["status"] == "ok"
    assert health["sandbox"] == "bubblewrap"
    assert health["isolation"]["memory_mb"] == server.settings.sandbox_memory_mb
    assert health["max_sessions"] == server.settings.max_sessions


def test_deleting_a_busy_session_ends_its_queue(server: Server) -> None:
    session_id = server.new_session()
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(server.execute, "import time; time.sleep(30)", session_id)
        server.wait_busy(session_id)
        assert wait_for(lambda: server.requests_in_flight() == 1, 10)  # the running one
        queued = pool.submit(
            server.client.post, "/execute", json={"code": "1", "session_id": session_id}
        )
        assert wait_for(lambda: server.requests_in_flight() == 2, 10)  # and the queued one
        assert server.client.delete(f"/sessions/{session_id}").status_code == 204
        first = running.result(timeout=10)
        second = queued.result(timeout=10)
    assert first["status"] == "error"
    assert first["error"]["ename"] == "KernelDied"
    assert "shut down by the service" in first["error"]["evalue"]
    assert second.status_code == 404
    assert second.json()["code"] == "session_not_found"
    assert server.client.get(f"/sessions/{session_id}").status_code == 404


def test_deleting_a_session_while_its_kernel_restarts_is_a_clean_404(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        session_id = server.new_session()
        server.execute("x = 1", session_id)
        [kernel] = kernel_processes(server.connection_dir)
        kernel.kill()
        assert wait_for(lambda: server.status(session_id) == "dead", 60)
        # the next call starts a new kernel, held half-way: the zygote that forks it is stopped
        [zygote] = zygotes(server)
        zygote.suspend()
        try:
            with ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(
                    server.client.post, "/execute", json={"code": "1", "session_id": session_id}
                )
                assert wait_for(lambda: server.status(session_id) == "starting", 60)
                assert server.client.delete(f"/sessions/{session_id}").status_code == 204
                response = waiting.result(timeout=60)
        finally:
            zygote.resume()
        assert response.status_code == 404, response.text
        assert response.json()["code"] == "session_not_found"
        # the kernel forked for it once the zygote goes on is ended
        assert wait_for(lambda: not kernel_processes(server.connection_dir), 60)


def test_an_id_deleted_and_made_again_at_once_gets_a_working_session(server: Server) -> None:
    server.new_session("again")
    server.execute("x = 1", "again")
    with ThreadPoolExecutor(1) as pool:
        deleting = pool.submit(server.client.delete, "/sessions/again")
        deadline = time.monotonic() + 20
        while (
            created := server.client.post("/sessions", json={"session_id": "again"})
        ).status_code != 201:
            assert created.status_code in (409,), created.text
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert deleting.result(timeout=20).status_code == 204
    result = server.execute("import os\nprint(os.getcwd()); 'x' in globals()", "again")
    assert result["status"] == "ok", result["text"]
    assert result["result"] == "False"
    assert server.client.delete("/sessions/again").status_code == 204


def test_connection_file_is_private_and_removed_with_the_session(server: Server) -> None:
    before = set(server.connection_dir.glob("*/connection.json"))
    session_id = server.new_session()
    [connection_file] = set(server.connection_dir.glob("*/connection.json")) - before
    assert connection_file.stat().st_mode & 0o777 == 0o600
    assert connection_file.parent.stat().st_mode & 0o066 == 0  # others can't list or write
    assert json.loads(connection_file.read_text())["transport"] == "ipc"
    server.client.delete(f"/sessions/{session_id}")
    assert not connection_file.exists()


def test_update_display_and_clear_output_from_a_real_kernel(server: Server, session: str) -> None:
    result = server.execute(
        "from IPython.display import display, clear_output\n"
        "handle = display('step 1', display_id=True)\n"
        "handle.update('step 3 of 3')\n"
        "print('old line')\n"
        "clear_output()\n"
        "print('after clear')\n"
        "handle2 = display('kept', display_id=True)",
        session,
    )
    kinds = [
        (o["output_type"], o.get("text") or o.get("data", {}).get("text/plain"))
        for o in result["outputs"]
    ]
    assert kinds == [("stream", "after clear\n"), ("display_data", "'kept'")]
    progress = server.execute(
        "h = display('0%', display_id=True)\nfor p in ('50%', '100%'):\n    h.update(p)", session
    )
    [bar] = progress["outputs"]
    assert bar["data"]["text/plain"] == "'100%'"


@contextmanager
def store_held(server: Server) -> Iterator[Callable[[], None]]:
    """The state store's thread held busy (its writes wait) until the caller releases it:
    a session's awaits on the store are then a window other requests can reach into."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        release.wait(60)

    server.app.state.runtime.store._db.queue(hold)
    assert held.wait(60)
    try:
        yield release.set
    finally:
        release.set()


def warm_kernels(server: Server) -> int:
    warm: int = server.app.state.runtime.warm_kernels()
    return warm


def test_an_interrupt_while_the_execution_is_being_recorded_is_kept(tmp_path: Path) -> None:
    """The session is busy from the moment its execution holds the lock; an interrupt asked
    for while the execution is still being written to the state store (before its code is
    sent) is kept, and ends the code as it begins."""
    with running_server(tmp_path) as server:
        session = server.new_session()
        with store_held(server) as release, ThreadPoolExecutor(1) as pool:
            running = pool.submit(server.execute, "import time\ntime.sleep(60)", session)
            server.wait_busy(session)
            interrupted = server.client.post(f"/sessions/{session}/interrupt").json()
            release()
            result = running.result(timeout=60)
        assert interrupted["interrupted"] is True
        assert result["status"] == "error"
        assert result["error"]["ename"] == "KeyboardInterrupt"


def test_an_execution_given_up_on_while_it_is_recorded_leaves_the_session_usable(
    tmp_path: Path,
) -> None:
    """Its record is written anyway (as cut short), its number taken: the next execution
    gets the next number and runs."""
    with running_server(tmp_path) as server:
        session = server.new_session()
        with store_held(server) as release:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up: the server cancels
                httpx.post(
                    f"{server.base_url}/execute",
                    json={"code": "1", "session_id": session},
                    timeout=httpx.Timeout(60, read=1.0),
                )
            assert wait_for(lambda: server.requests_in_flight() == 0, 30)
            release()
        after = server.execute("40 + 2", session)
        assert after["result"] == "42"
        history = server.client.get(f"/sessions/{session}/history").json()["executions"]
        assert [(e["seq"], e["status"]) for e in history] == [(1, "cancelled"), (2, "ok")]


def test_sessions_being_recorded_count_against_the_limit(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=2, max_sessions=1) as server:
        assert wait_for(lambda: warm_kernels(server) == 2, 60)
        with store_held(server) as release, ThreadPoolExecutor(2) as pool:
            answers = [
                pool.submit(server.client.post, "/sessions", json={"session_id": name})
                for name in ("a", "b")
            ]
            # the first has taken a warm kernel and waits on its record
            assert wait_for(lambda: warm_kernels(server) < 2 or any(a.done() for a in answers))
            release()
            codes = sorted(a.result(60).status_code for a in answers)
        assert codes == [201, 429]


def test_one_id_asked_for_twice_at_once_is_made_once(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=2) as server:
        assert wait_for(lambda: warm_kernels(server) == 2, 60)
        with store_held(server) as release, ThreadPoolExecutor(2) as pool:
            answers = [
                pool.submit(server.client.post, "/sessions", json={"session_id": "twice"})
                for _ in range(2)
            ]
            assert wait_for(lambda: warm_kernels(server) < 2 or any(a.done() for a in answers))
            release()
            codes = sorted(a.result(60).status_code for a in answers)
        assert codes == [201, 409]
        assert server.execute("40 + 2", "twice")["result"] == "42"
