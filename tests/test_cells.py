"""A service as one cell of a cluster: the ids it makes name it (their first 4 characters,
its tag), chosen ids must carry its tag, /readyz tells a proxy whether to send it new
sessions, and a drained cell makes none while its own sessions go on."""

import asyncio
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kernel_service_client.tools.spec import TOOL_NAME
from tests.conftest import HOLD, Server, running_server, service_process, wait_for
from tests.test_mcp import INITIALIZE, http_client, text

TAG = "0003"
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("cell"), cell=3, max_sessions=4) as server:
        yield server


def test_every_id_a_cell_makes_starts_with_its_tag(cell: Server) -> None:
    made = cell.new_session()
    ran = cell.execute("1 + 1")
    kernel = cell.client.post("/api/kernels", json={})
    assert kernel.status_code == 201, kernel.text
    kernel_id = kernel.json()["id"]
    try:
        assert made.startswith(TAG) and len(made) == 32
        assert ran["session_id"].startswith(TAG)
        assert kernel_id.startswith(TAG) and str(uuid.UUID(kernel_id)) == kernel_id
        health = cell.client.get("/healthz").json()
        assert health["cell"] == {"index": 3, "tag": TAG}
    finally:
        for session_id in (made, ran["session_id"], kernel_id):
            cell.client.delete(f"/sessions/{session_id}")


def test_a_chosen_id_must_carry_the_cells_tag(cell: Server) -> None:
    refused = cell.client.post("/sessions", json={"session_id": "mine"})
    assert refused.status_code == 400
    assert refused.json()["code"] == "wrong_cell"
    assert "'0003'" in refused.json()["detail"]
    refused = cell.client.post("/sessions", json={"session_id": "0004-mine"})
    assert refused.status_code == 400 and refused.json()["code"] == "wrong_cell"
    assert cell.client.get("/sessions").json()["sessions"] == []  # nothing half-made
    chosen = cell.new_session(f"{TAG}-mine")
    cell.client.delete(f"/sessions/{chosen}")


def test_execute_by_path_and_another_cells_ids(cell: Server) -> None:
    session_id = cell.new_session()
    try:
        by_path = cell.client.post(f"/sessions/{session_id}/execute", json={"code": "y = 6; y"})
        assert by_path.json()["result"] == "6", by_path.text
        same = {"code": "y", "session_id": session_id}
        named = cell.client.post(f"/sessions/{session_id}/execute", json=same)
        assert named.status_code == 422  # the path says which session: not the body
        # a request for another cell's session reached this one: it says where it belongs
        elsewhere = "0004" + session_id[4:]
        for misdirected in (
            cell.client.post("/execute", json={"code": "y", "session_id": elsewhere}),
            cell.client.post(f"/sessions/{elsewhere}/execute", json={"code": "y"}),
            cell.client.get(f"/sessions/{elsewhere}"),
        ):
            assert misdirected.status_code == 421, misdirected.text
            assert misdirected.json()["code"] == "misdirected"
            assert "held by cell '0004'" in misdirected.json()["detail"]
    finally:
        cell.client.delete(f"/sessions/{session_id}")


def test_mcp_says_when_a_session_is_on_another_cell(cell: Server) -> None:
    """An MCP conversation lives on one cell: its tool cannot reach another cell's session,
    and says so (not "send it to the proxy", which the client did)."""

    async def scenario() -> str:
        async with http_client(f"{cell.base_url}/mcp") as mcp:
            answer = await mcp.call_tool(TOOL_NAME, {"code": "1", "session_id": "0004" + "0" * 28})
            assert answer.is_error
            return text(answer)

    said = asyncio.run(scenario())
    assert "is on another cell of this cluster than this MCP conversation" in said, said
    assert "without session_id" in said


def test_mcp_session_ids_carry_the_tag_both_ways(cell: Server) -> None:
    opened = cell.client.post("/mcp", json=INITIALIZE, headers=MCP_HEADERS)
    assert opened.status_code == 200, opened.text
    mcp_id = opened.headers["mcp-session-id"]
    assert mcp_id.startswith(TAG) and len(mcp_id) == 36
    listing = {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}
    named = {**MCP_HEADERS, "Mcp-Session-Id": mcp_id, "Mcp-Protocol-Version": "2025-06-18"}
    assert cell.client.post("/mcp", json=listing, headers=named).status_code == 200
    other = {**named, "Mcp-Session-Id": "0004" + mcp_id[4:]}
    assert cell.client.post("/mcp", json=listing, headers=other).status_code == 404
    ended = cell.client.delete("/mcp", headers=named)
    assert ended.status_code == 200, ended.text


def test_readyz_says_full_and_the_cell_still_serves_its_own(cell: Server) -> None:
    assert cell.client.get("/readyz").json() == {
        "status": "ready",
        "sessions": 0,
        "max_sessions": 4,
    }
    held = [cell.new_session() for _ in range(4)]
    try:
        full = cell.client.get("/readyz")
        assert full.status_code == 503 and full.json()["status"] == "full"
        assert cell.client.get("/healthz").json()["accepting"] is False
        assert cell.execute("2 + 2", held[0])["result"] == "4"
    finally:
        for session_id in held:
            cell.client.delete(f"/sessions/{session_id}")
    assert cell.client.get("/readyz").status_code == 200


def test_a_drained_cell_makes_no_new_sessions_and_keeps_its_own(tmp_path: Path) -> None:
    with running_server(tmp_path, cell=1) as server:
        kept = server.new_session()
        server.execute("x = 41", kept)
        drained = server.client.post("/drain")
        assert drained.status_code == 200 and drained.json()["accepting"] is False
        ready = server.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        for refused in (
            server.client.post("/sessions", json={}),
            server.client.post("/execute", json={"code": "1"}),
            server.client.post("/api/kernels", json={}),
        ):
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "draining"
        assert server.execute("x + 1", kept)["result"] == "42"


def test_drain_needs_a_key_where_keys_are_set(tmp_path: Path) -> None:
    with running_server(tmp_path, api_key="cell-key-0123456789") as server:
        assert server.client.post("/drain").status_code == 401
        assert server.client.get("/readyz").status_code == 200  # probes carry no key
        keyed = {"Authorization": "Bearer cell-key-0123456789"}
        assert server.client.post("/drain", headers=keyed).status_code == 200
        assert server.client.get("/readyz").json()["status"] == "draining"


def test_lost_with_its_cell(tmp_path: Path) -> None:
    """A cell restarted on new state (a new volume) tells its earlier sessions from ids
    that never existed: lost with the cell (410), not merely unknown (404)."""
    with running_server(tmp_path / "a", cell=5) as server:
        earlier = server.new_session()
        assert earlier.startswith("0005")
    for attempt in range(3):
        # the same cell on new state; drawn again, the same incarnation (1 in 65 536) would
        # take the old ids for its own: then another new state
        with running_server(tmp_path / f"b{attempt}", cell=5) as server:
            made_here = server.new_session()
            if made_here[4:8] == earlier[4:8]:
                continue
            lost = server.client.post("/execute", json={"code": "1", "session_id": earlier})
            assert lost.status_code == 410, lost.text
            assert lost.json()["code"] == "session_lost_with_cell"
            assert "lost with its cell '0005'" in lost.json()["detail"]
            never = "0005" + made_here[4:8] + "0" * 24  # this incarnation's form, never made
            unknown = server.client.get(f"/sessions/{never}")
            assert unknown.status_code == 404 and unknown.json()["code"] == "session_not_found"
            assert server.client.get("/sessions/0005-never-made").status_code == 404
            return
    pytest.fail("three new states drew the same incarnation")


def test_the_drain_command_waits_for_running_executions(tmp_path: Path) -> None:
    with service_process(tmp_path, env={"KERNEL_SERVICE_CELL": "2"}) as (_, base_url):
        client = httpx.Client(base_url=base_url, timeout=120)
        session_id = client.post("/sessions", json={}).json()["session_id"]
        assert session_id.startswith("0002")
        work_dir = tmp_path / "work" / session_id
        running = subprocess.Popen(
            [sys.executable, "-c",
             f"import httpx; print(httpx.post('{base_url}/execute', timeout=300, json="
             f"{{'code': {HOLD!r}, 'session_id': '{session_id}', 'timeout': 300}}).status_code)"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert wait_for(lambda: client.get("/healthz").json()["executing"] == 1)
        drain = subprocess.Popen(
            [sys.executable, "-m", "kernel_service", "drain", "--url", base_url, "--wait", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert wait_for(lambda: client.get("/readyz").json()["status"] == "draining")
        assert drain.poll() is None  # the execution still runs: it waits
        (work_dir / "let-end").touch()
        out, err = drain.communicate(timeout=120)
        assert drain.returncode == 0, err
        assert "no execution runs" in out
        assert running.communicate(timeout=120)[0].strip() == "200"
        unreachable = subprocess.run(
            [sys.executable, "-m", "kernel_service", "drain", "--url", "http://127.0.0.1:9"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert unreachable.returncode == 2 and "could not be reached" in unreachable.stderr
