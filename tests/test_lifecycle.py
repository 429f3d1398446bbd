"""Sessions end cleanly: culling, deletion, and the service's own SIGTERM/SIGINT (its death:
test_survival)."""

import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    Server,
    alive,
    kernel_processes,
    processes_running,
    running_server,
    service_process,
    wait_for,
)


def test_idle_sessions_are_culled(tmp_path: Path) -> None:
    with running_server(tmp_path, session_ttl=2.0) as server:
        idle = server.new_session("idle")
        busy = server.new_session("busy")
        with httpx.Client(base_url=server.base_url, timeout=30) as other:
            # a running execution is activity: it must not be culled under it
            response = other.post(
                "/execute",
                json={"code": "import time; time.sleep(4); 'done'", "session_id": busy},
            )
        assert response.json()["result"] == "'done'"
        assert server.client.get(f"/sessions/{idle}").status_code == 404
        assert server.client.get(f"/sessions/{busy}").status_code == 200
        assert wait_for(lambda: server.client.get(f"/sessions/{busy}").status_code == 404)
        # the culler unlists a session first, then ends its kernel
        assert wait_for(lambda: not kernel_processes(server.connection_dir))
        assert wait_for(lambda: not list(server.connection_dir.iterdir()))
        culled = server.client.post("/execute", json={"code": "1", "session_id": busy})
        assert culled.status_code == 404


def test_delete_ends_the_kernel_and_what_it_started(server: Server) -> None:
    before = {p.pid for p in kernel_processes(server.connection_dir)}
    session_id = server.new_session()
    [kernel] = [p.pid for p in kernel_processes(server.connection_dir) if p.pid not in before]
    server.execute(
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '300.2'])\n"
        "escaped = subprocess.Popen(['sleep', '300.3'], start_new_session=True)",
        session_id,
    )
    children = [*processes_running("sleep", "300.2"), *processes_running("sleep", "300.3")]
    assert len(children) == 2
    assert server.client.delete(f"/sessions/{session_id}").status_code == 204
    assert wait_for(lambda: not alive(kernel) and not any(c.is_running() for c in children))
    assert not (server.settings.work_dir.resolve() / session_id).exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_service_signal_ends_every_kernel(tmp_path: Path, sig: signal.Signals) -> None:
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for _ in range(2):
                assert client.post("/execute", json={"code": "x = 1"}).status_code == 200
        kernels = kernel_processes(tmp_path / "connection")
        assert len(kernels) == 2, [k.info["cmdline"] for k in kernels]
        process.send_signal(sig)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=30) in (0, -sig)
    assert kernel_processes(tmp_path / "connection") == []
    assert list((tmp_path / "connection").iterdir()) == []
