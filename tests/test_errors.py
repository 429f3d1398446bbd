"""Every error status, always JSON with a `code`, and no half-made session left behind."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel_service.workdir.workspaces import MARKER
from tests.conftest import Server, kernel_processes, running_server


def error_of(response: object, status: int, code: str) -> object:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert body["code"] == code
    assert body["detail"]
    return body["detail"]


def test_unknown_session_is_404(server: Server) -> None:
    for response in (
        server.client.post("/execute", json={"code": "1", "session_id": "nope"}),
        server.client.get("/sessions/nope"),
        server.client.delete("/sessions/nope"),
        server.client.post("/sessions/nope/interrupt"),
        server.client.post("/sessions/nope/restart"),
        server.client.get("/sessions/nope/images/1.png"),
    ):
        detail = error_of(response, 404, "session_not_found")
        assert "does not exist" in str(detail)


def test_unknown_image_is_404(server: Server, session: str) -> None:
    error_of(server.client.get(f"/sessions/{session}/images/9.png"), 404, "image_not_found")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"code": ""},
        {"code": "   \n"},
        {"code": 12},
        {"code": None},
        {"code": "1", "timeout": 0},
        {"code": "1", "timeout": -3},
        {"code": "1", "timeout": "soon"},
        {"code": "1", "timeout": "5"},
        {"code": "1", "timeout": True},
        {"code": "1", "session_id": 7},
        {"code": "1", "timout": 5},
        ["code"],
    ],
)
def test_invalid_execute_bodies_are_422(server: Server, body: object) -> None:
    before = len(server.client.get("/sessions").json()["sessions"])
    error_of(server.client.post("/execute", json=body), 422, "invalid_request")
    assert len(server.client.get("/sessions").json()["sessions"]) == before


def test_malformed_json_is_422(server: Server) -> None:
    response = server.client.post(
        "/execute", content=b'{"code": "1"', headers={"content-type": "application/json"}
    )
    error_of(response, 422, "invalid_request")


def test_bodies_json_cannot_carry_are_422(server: Server) -> None:
    for raw in (b'{"code": "\\ud800"}', b'{"code": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        response = server.client.post(
            "/execute", content=raw, headers={"content-type": "application/json"}
        )
        error_of(response, 422, "invalid_request")


def test_bad_session_ids_are_422(server: Server) -> None:
    for bad in ("", "../etc", "a" * 129, "with space", "-leading"):
        error_of(server.client.post("/sessions", json={"session_id": bad}), 422, "invalid_request")


def test_unknown_route_and_method_are_json(server: Server) -> None:
    error_of(server.client.get("/nothing-here"), 404, "not_found")
    error_of(server.client.get("/execute"), 405, "method_not_allowed")


def test_limits(tmp_path: Path) -> None:
    with running_server(tmp_path, max_sessions=2, max_code_bytes=1000) as server:
        # code over the limit, checked after parsing and (much larger) before reading
        detail = error_of(
            server.client.post("/execute", json={"code": "#" * 1001}), 413, "code_too_large"
        )
        assert "1,001 bytes" in str(detail)
        error_of(
            server.client.post("/execute", json={"code": "#" * 100_000}), 413, "code_too_large"
        )

        def chunked() -> Iterator[bytes]:  # no Content-Length: read up to the limit, no more
            yield b'{"code": "'
            for _ in range(1000):
                yield b"#" * 1000
            yield b'"}'

        response = server.client.post(
            "/execute", content=chunked(), headers={"content-type": "application/json"}
        )
        error_of(response, 413, "code_too_large")
        assert server.client.get("/sessions").json()["sessions"] == []

        # too many sessions: 429 with a clear message, and nothing half-made
        server.new_session("one")
        server.execute("1")
        for attempt in (
            server.client.post("/sessions", json={"session_id": "three"}),
            server.client.post("/execute", json={"code": "1"}),
        ):
            detail = error_of(attempt, 429, "too_many_sessions")
            assert "service already runs its maximum of 2 sessions" in str(detail)
        assert len(server.client.get("/sessions").json()["sessions"]) == 2
        assert len(kernel_processes(server.connection_dir)) == 2
        assert len(list(server.connection_dir.glob("*/connection.json"))) == 2


def test_a_kernel_that_cannot_start_is_503_and_leaves_nothing(tmp_path: Path) -> None:
    with running_server(tmp_path, kernel_start_timeout=0.01) as server:
        detail = error_of(server.client.post("/sessions"), 503, "kernel_start_failed")
        assert "did not answer within" in str(detail)
        error_of(server.client.post("/execute", json={"code": "1"}), 503, "kernel_start_failed")
        assert server.client.get("/sessions").json()["sessions"] == []
        assert kernel_processes(server.connection_dir) == []
        assert list(server.connection_dir.iterdir()) == []
        # nothing but the mark that the root is the service's
        assert [p.name for p in (tmp_path / "work").iterdir()] == [MARKER]
