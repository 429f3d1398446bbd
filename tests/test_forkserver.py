"""The fork-server: kernels forked from a zygote, each on its own; and the plain launch."""

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import SANDBOXED, Server, kernel_processes, running_server, wait_for, zygotes

RANDOMS = (
    "import os, random, numpy as np\n"
    "print(random.random(), np.random.rand(), np.random.default_rng().random(), os.getpid())"
)


def test_forked_kernels_have_their_own_random_streams(server: Server) -> None:
    assert server.client.get("/healthz").json()["isolation"]["launch"] == "fork-server"
    first = server.execute(RANDOMS)["stdout"].split()
    second = server.execute(RANDOMS)["stdout"].split()
    # random, numpy's global state and a new numpy Generator all differ between kernels
    assert [a != b for a, b in zip(first[:3], second[:3], strict=True)] == [True] * 3


def test_a_forked_kernel_has_the_data_stack_ready_and_its_own_work_dir(server: Server) -> None:
    result = server.execute(
        "import sys, os\n"
        "print(all(m in sys.modules for m in ('numpy', 'pandas', 'matplotlib.pyplot')))\n"
        "print(os.listdir('.'))\n"
        "import pandas as pd\n"
        "pd.DataFrame({'a': [1, 2]}).a.sum()"
    )
    assert result["stdout"] == "True\n[]\n"
    assert result["result"] == "np.int64(3)"


def test_when_the_zygote_dies_its_kernels_live_on(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        session = server.new_session()
        server.execute("x = 1", session)
        [zygote] = zygotes(server)
        [kernel] = kernel_processes(server.connection_dir)
        os.kill(zygote.pid, signal.SIGKILL)
        assert wait_for(lambda: not zygote.is_running() or zygote.status() == "zombie")
        after = server.execute("x + 1", session)
        assert after["result"] == "2" and not after["state_lost"]
        # the zygote is started again for later kernels
        assert server.execute("print('new session')")["stdout"] == "new session\n"
        assert len(zygotes(server)) == 1
        # an orphan's end is seen (through its pidfd) though nobody tells its exit status
        kernel.kill()
        assert wait_for(lambda: server.status(session) != "idle")
        lost = server.execute("'x' in globals()", session)
        assert lost["state_lost"] is True and lost["result"] == "False"
        assert "its exit status is not known" in lost["text"]
        assert "memory" not in lost["text"]  # not taken for an out-of-memory kill


@pytest.mark.parametrize("sandbox", ["bubblewrap", "none"] if SANDBOXED else ["none"])
def test_the_plain_launch_still_works(tmp_path: Path, sandbox: str) -> None:
    with running_server(tmp_path, fork_server=False, sandbox=sandbox) as server:
        assert "launch" not in server.client.get("/healthz").json()["isolation"]
        assert zygotes(server) == []
        result = server.execute("import os\nprint(os.getcwd())")
        assert result["status"] == "ok"
        expected = "/workspace" if sandbox == "bubblewrap" else str(server.settings.work_dir)
        assert result["stdout"].startswith(expected)
        [kernel] = kernel_processes(server.connection_dir)
        assert "ipykernel_launcher" in kernel.cmdline()


def test_a_launch_called_off_before_its_pid_came_leaves_no_kernel(tmp_path: Path) -> None:
    import asyncio

    from kernel_service.kernel.forkserver import ForkServer, _fork, zygote_env

    connection_dir = tmp_path / "connection"
    connection_dir.mkdir()

    async def scenario() -> None:
        server = ForkServer(("numpy",), zygote_env({}), connection_dir)
        await server.ensure_started()
        request = {
            "argv": ["-f", str(connection_dir / "never.json")],
            "work_dir": str(tmp_path),
            "env": {"PATH": os.environ["PATH"]},
        }
        try:
            launch = asyncio.create_task(_fork(server, request, [], wrapper=False))
            await asyncio.sleep(0)  # sent; its pid is not back yet
            launch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await launch
            assert await asyncio.to_thread(
                wait_for, lambda: not kernel_processes(connection_dir), 60
            )
            # the zygote reports the pid, then the exit, of the kernel it forked: both are
            # known to be the abandoned launch's (an exit taken for a kernel still to be
            # watched would be kept in _early_exits for ever, and _unwatched never empty)
            deadline = time.monotonic() + 60
            while server._abandoned or server._unwatched:
                assert time.monotonic() < deadline, (server._abandoned, server._unwatched)
                await asyncio.sleep(0.02)
            assert server._early_exits == {}
        finally:
            await server.close()

    asyncio.run(scenario())
    assert kernel_processes(connection_dir) == []
