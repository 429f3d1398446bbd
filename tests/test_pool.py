"""The warm pool: ready kernels handed to new sessions, one each, refilled, never reused."""

import os
import signal
from pathlib import Path

import psutil
import pytest

from tests.conftest import Server, kernel_processes, running_server, wait_for


def warm(server: Server) -> int:
    count: int = server.client.get("/healthz").json()["warm_kernels"]
    return count


def test_new_sessions_take_pooled_kernels_and_the_pool_refills(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=2) as server:
        assert wait_for(lambda: warm(server) == 2, timeout=60)
        pooled = {p.pid for p in kernel_processes(server.connection_dir)}
        assert len(pooled) == 2

        first = server.execute("secret = 'first'\nopen('mine.txt', 'w').write('1')")
        second = server.execute("import os\nprint('secret' in globals(), os.listdir('.'))")
        assert first["status"] == "ok"
        # a clean kernel and an empty work dir of its own
        assert second["stdout"] == "False []\n"

        # the two sessions run on the kernels that were waiting
        assert wait_for(lambda: warm(server) == 2, timeout=60)
        live = {p.pid for p in kernel_processes(server.connection_dir)}
        assert len(live) == 4
        assert pooled <= live

        # a deleted session's kernel ends; it never goes back to the pool
        server.client.delete(f"/sessions/{first['session_id']}")
        assert wait_for(lambda: len(kernel_processes(server.connection_dir)) == 3)
        assert warm(server) == 2
        assert server.execute("'secret' in globals()", second["session_id"])["result"] == "False"


def test_a_pooled_kernel_that_died_is_skipped(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=1) as server:
        assert wait_for(lambda: warm(server) == 1, timeout=60)
        [pooled] = kernel_processes(server.connection_dir)
        os.kill(pooled.pid, signal.SIGKILL)

        def replaced() -> bool:
            pids = [p.pid for p in kernel_processes(server.connection_dir)]
            return warm(server) == 1 and len(pids) == 1 and pids != [pooled.pid]

        assert wait_for(replaced, timeout=60)

        result = server.execute("print('fresh')")
        assert result["status"] == "ok"
        assert result["stdout"] == "fresh\n"
        assert result["state_lost"] is False
        assert wait_for(lambda: warm(server) == 1, timeout=60)


def test_client_chosen_ids_and_restarts_work_with_the_pool(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=1) as server:
        assert wait_for(lambda: warm(server) == 1, timeout=60)
        session_id = server.new_session("chosen")
        server.execute("open('kept.txt', 'w').write('x')\nv = 1", session_id)
        restarted = server.client.post(f"/sessions/{session_id}/restart")
        assert restarted.status_code == 200
        after = server.execute("import os\nprint('v' in globals(), os.listdir('.'))", session_id)
        # the work dir goes with the session across kernel restarts; variables do not
        assert after["stdout"] == "False ['kept.txt']\n"


def test_another_language_has_a_pool_of_its_own(tmp_path: Path) -> None:
    """KERNEL_SERVICE_POOL_SIZES: Bash's pool, apart from Python's; a Bash session takes its
    kernel from it, and it refills."""
    with running_server(tmp_path, pool_sizes="bash=1") as server:
        specs = {s["name"]: s for s in server.client.get("/kernelspecs").json()["kernelspecs"]}
        if not specs["bash"]["ready"]:
            pytest.skip(f"bash is not ready here: {specs['bash']['problem']}")

        def warm_bash() -> int:
            listed = server.client.get("/kernelspecs").json()["kernelspecs"]
            count: int = next(s["warm_kernels"] for s in listed if s["name"] == "bash")
            return count

        def bash_kernels() -> set[int]:
            """The Bash kernels' own processes (not the sandbox's wrappers around them)."""
            found = set()
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                if (
                    cmdline
                    and Path(cmdline[0]).name.startswith("python")
                    and any("bash_kernel_launch" in arg for arg in cmdline)
                    and any(str(server.connection_dir) in arg for arg in cmdline)
                ):
                    found.add(process.pid)
            return found

        assert wait_for(lambda: warm_bash() == 1, timeout=60)
        assert warm(server) == 1  # the same kernel: Python's pool is its own setting (0 here)
        waiting = bash_kernels()
        assert len(waiting) == 1
        made = server.client.post("/sessions", json={"language": "bash"})
        assert made.status_code == 201, made.text
        session = made.json()["session_id"]
        assert server.execute("echo $((6 * 7))", session, language="bash")["stdout"] == "42\n"
        # it ran on the kernel that was waiting, and the pool refilled behind it
        assert waiting <= bash_kernels()
        assert wait_for(lambda: warm_bash() == 1, timeout=60)
        assert len(bash_kernels()) == 2
