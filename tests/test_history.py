"""A session's history (GET /sessions/{id}/history) and the session as a Jupyter notebook
(GET /sessions/{id}/notebook), from real executions in a real kernel."""

import base64
import contextlib
import os
import signal
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nbformat
import psutil
import pytest

from tests.conftest import (
    HOLD,
    Server,
    kernel_processes,
    read_notebook,
    running_server,
    service_process,
    wait_for,
)

CELLS = [
    ("print('hello')", "ok"),
    ("6 * 7", "ok"),
    ("1 / 0", "error"),
    (
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('a plot')\n"
        "print('plotted')\nplt.show()",
        "ok",
    ),
]
KEY_A, KEY_B = "history-key-alpha-0123", "history-key-bravo-4567"


@pytest.fixture(scope="module")
def ran(server: Server) -> Iterator[str]:
    """A session that ran CELLS, in order."""
    session_id = server.new_session()
    for code, _ in CELLS:
        server.execute(code, session_id)
    yield session_id
    server.client.delete(f"/sessions/{session_id}")


def history(server: Server, session_id: str, **params: Any) -> list[dict[str, Any]]:
    response = server.client.get(f"/sessions/{session_id}/history", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["session_id"] == session_id
    executions: list[dict[str, Any]] = body["executions"]
    return executions


def notebook(server: Server, session_id: str) -> nbformat.NotebookNode:
    response = server.client.get(f"/sessions/{session_id}/notebook")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-ipynb+json"
    assert response.headers["content-disposition"] == f'attachment; filename="{session_id}.ipynb"'
    return read_notebook(response.text)


def test_history_lists_every_execution_in_order(server: Server, ran: str) -> None:
    entries = history(server, ran)
    assert [e["seq"] for e in entries] == [1, 2, 3, 4]
    assert [e["code"] for e in entries] == [code for code, _ in CELLS]
    assert [e["status"] for e in entries] == [status for _, status in CELLS]
    assert [e["execution_count"] for e in entries] == [1, 2, 3, 4]
    for entry in entries:
        assert entry["result_dropped"] is False
        assert entry["state_lost"] is False
        assert entry["duration_ms"] > 0
        assert datetime.fromisoformat(entry["started_at"]).tzinfo is not None
    started = [datetime.fromisoformat(e["started_at"]) for e in entries]
    assert started == sorted(started)

    printed, value, error, plot = (e["outputs"] for e in entries)
    assert printed == [{"output_type": "stream", "name": "stdout", "text": "hello\n"}]
    assert [(o["output_type"], o["data"]["text/plain"]) for o in value] == [
        ("execute_result", "42")
    ]
    assert [(o["output_type"], o["ename"]) for o in error] == [("error", "ZeroDivisionError")]
    assert entries[2]["error"]["ename"] == "ZeroDivisionError"
    assert any("1 / 0" in line for line in error[0]["traceback"])
    kinds = [o["output_type"] for o in plot]
    assert kinds == ["stream", "display_data"]
    assert plot[0]["text"] == "plotted\n"
    assert base64.b64decode(plot[1]["data"]["image/png"]).startswith(b"\x89PNG\r\n\x1a\n")


def test_the_answer_is_the_result_as_stored(server: Server, session: str) -> None:
    """The result's JSON is made once: what the state store keeps is what the client got."""
    for code in ("print('hi'); 6 * 7", "1 / 0"):
        answer = server.client.post("/execute", json={"code": code, "session_id": session})
        assert answer.status_code == 200
        seq = answer.json()["execution_count"]
        database = server.settings.state_dir / "sessions.sqlite3"
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            [(stored,)] = db.execute(
                "SELECT result FROM executions WHERE session_key = ? AND seq = ?", (session, seq)
            ).fetchall()
        assert stored == answer.text


def test_history_pages_with_since_and_limit(server: Server, ran: str) -> None:
    assert [e["seq"] for e in history(server, ran, since=2)] == [3, 4]
    assert [e["seq"] for e in history(server, ran, limit=1)] == [1]
    assert [e["seq"] for e in history(server, ran, since=1, limit=2)] == [2, 3]
    assert history(server, ran, since=4) == []
    for params in ({"since": -1}, {"limit": 0}, {"since": "x"}, {"since": 2**63}):
        response = server.client.get(f"/sessions/{ran}/history", params=params)
        assert response.status_code == 422, params
        assert response.json()["code"] == "invalid_request"


def test_notebook_has_a_cell_per_execution_with_its_outputs(server: Server, ran: str) -> None:
    nb = notebook(server, ran)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    assert nb.metadata.kernel_service.session_id == ran
    cells = nb.cells
    assert [c.cell_type for c in cells] == ["code"] * 4
    assert [c.source for c in cells] == [code for code, _ in CELLS]
    assert [c.execution_count for c in cells] == [1, 2, 3, 4]
    assert [c.metadata.kernel_service.status for c in cells] == [s for _, s in CELLS]

    printed, value, error, plot = (c.outputs for c in cells)
    assert [(o.output_type, o.name, o.text) for o in printed] == [("stream", "stdout", "hello\n")]
    assert [(o.output_type, o.execution_count, o.data["text/plain"]) for o in value] == [
        ("execute_result", 2, "42")
    ]
    assert [(o.output_type, o.ename) for o in error] == [("error", "ZeroDivisionError")]
    assert error[0].traceback
    assert [o.output_type for o in plot] == ["stream", "display_data"]
    png = base64.b64decode(plot[1].data["image/png"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")


def test_a_timeout_and_a_running_execution(server: Server, session: str) -> None:
    """A timeout's error (only in the result's `error`) is an error output in the notebook;
    an execution still running is in the history, without outputs."""
    server.execute("while True: pass", session, timeout=1)
    holder = threading.Thread(target=server.execute, args=(HOLD, session))
    holder.start()
    try:
        server.wait_busy(session)
        timed_out, running = history(server, session)
        nb = notebook(server, session)
    finally:
        server.let_end(session)
        holder.join()
    assert timed_out["status"] == "timeout"
    assert timed_out["error"]["ename"] == "TimeoutError"
    # the kernel's own words (KeyboardInterrupt), then the service's (TimeoutError)
    assert [o["ename"] for o in timed_out["outputs"]] == ["KeyboardInterrupt"]
    assert running["status"] == "running"
    assert running["outputs"] is None
    assert running["result_dropped"] is False
    assert running["duration_ms"] is None
    timeout_cell, running_cell = nb.cells
    assert [(o.output_type, o.ename) for o in timeout_cell.outputs] == [
        ("error", "KeyboardInterrupt"),
        ("error", "TimeoutError"),
    ]
    assert "1 s time limit" in timeout_cell.outputs[1].evalue
    assert running_cell.outputs == []
    assert running_cell.execution_count is None
    assert running_cell.metadata.kernel_service.status == "running"
    # once it ends, a poll from the last settled execution brings it
    assert [(e["seq"], e["status"]) for e in history(server, session, since=1)] == [(2, "ok")]


def test_results_dropped_for_room_keep_code_and_status(tmp_path: Path) -> None:
    with running_server(tmp_path, history_mb=1) as server:
        session_id = server.new_session()
        for _ in range(4):  # about 400 kB stored each: the oldest go past 1 MB
            server.execute("print('x' * 150_000)", session_id)
        entries = history(server, session_id)
        nb = notebook(server, session_id)
    assert [e["status"] for e in entries] == ["ok"] * 4
    dropped = [e["result_dropped"] for e in entries]
    assert dropped[0] and not dropped[-1], dropped
    for entry, cell in zip(entries, nb.cells, strict=True):
        assert cell.source == entry["code"]
        if entry["result_dropped"]:
            assert entry["outputs"] is None
            assert cell.outputs == []
            assert cell.metadata.kernel_service.result_dropped is True
        else:
            # (the kernel may send the text in several chunks)
            assert "".join(o["text"] for o in entry["outputs"]) == "x" * 150_000 + "\n"
            assert "".join(o.text for o in cell.outputs) == "x" * 150_000 + "\n"


def test_unknown_session_is_404(server: Server) -> None:
    for route in ("history", "notebook"):
        response = server.client.get(f"/sessions/no-such-session/{route}")
        assert response.status_code == 404
        assert response.json()["code"] == "session_not_found"


def test_history_is_private_to_its_api_key(tmp_path: Path) -> None:
    with running_server(tmp_path, api_key=f"{KEY_A},{KEY_B}") as server:
        alpha = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60
        )
        bravo = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60
        )
        with alpha, bravo:
            session_id = alpha.post("/execute", json={"code": "secret = 42"}).json()["session_id"]
            for route in ("history", "notebook"):
                path = f"/sessions/{session_id}/{route}"
                assert alpha.get(path).status_code == 200
                refused = bravo.get(path)
                assert refused.status_code == 404
                assert refused.json()["code"] == "session_not_found"
                assert server.client.get(path).status_code == 401
            assert alpha.delete(f"/sessions/{session_id}").status_code == 204


def test_the_history_outlives_a_killed_service(tmp_path: Path) -> None:
    """A service killed mid-execution: the next one has the session's history, the
    execution cut short marked `lost`, in the notebook too."""
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            assert client.post("/sessions", json={"session_id": "kept"}).status_code == 201
            for code in ("print('before')", "x = 41"):
                assert client.post("/execute", json={"code": code, "session_id": "kept"}).is_success

            failure: list[BaseException] = []

            def in_flight() -> None:
                body = {"code": "import time; time.sleep(3)", "session_id": "kept"}
                try:
                    client.post("/execute", json=body)
                except BaseException as exc:
                    failure.append(exc)

            thread = threading.Thread(target=in_flight)
            thread.start()
            assert wait_for(lambda: client.get("/sessions/kept").json()["status"] == "busy", 10)
            os.kill(process.pid, signal.SIGKILL)
            thread.join(timeout=10)
            assert failure and isinstance(failure[0], httpx.TransportError), failure
        process.wait(timeout=10)
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=60) as client:
            entries = client.get("/sessions/kept/history").json()["executions"]
            response = client.get("/sessions/kept/notebook")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert [(e["seq"], e["status"]) for e in entries] == [(1, "ok"), (2, "ok"), (3, "lost")]
    assert entries[0]["outputs"] == [
        {"output_type": "stream", "name": "stdout", "text": "before\n"}
    ]
    assert entries[2]["outputs"] is None
    assert entries[2]["result_dropped"] is False
    nb = read_notebook(response.text)
    assert [c.metadata.kernel_service.status for c in nb.cells] == ["ok", "ok", "lost"]
    assert nb.cells[0].outputs[0].text == "before\n"
    # nothing left: the kernel ended with the second service, the first's reaper with it
    assert wait_for(lambda: kernel_processes(tmp_path / "connection") == [], 10)
    state = str(tmp_path / "state")
    assert wait_for(
        lambda: (
            not [
                p
                for p in psutil.process_iter(["name", "cmdline"])
                if p.info["name"] == "ks-reaper" and state in (p.info["cmdline"] or [])
            ]
        ),
        10,
    )
