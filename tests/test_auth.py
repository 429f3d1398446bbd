"""API keys: 401 without the right one, sessions private to the key that made them; and the
start-up refusals: no public listening without a key, no start without the sandbox."""

import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import running_server, service_process

KEY_A, KEY_B = "key-alpha-0123456789", "key-bravo-9876543210"


def test_api_keys_guard_every_endpoint_but_health(tmp_path: Path) -> None:
    with running_server(tmp_path, api_key=f"{KEY_A}, {KEY_B}", max_sessions_per_key=2) as server:
        client = server.client
        assert client.get("/healthz").status_code == 200
        for method, path in [
            ("POST", "/execute"),
            ("POST", "/sessions"),
            ("GET", "/sessions"),
            ("GET", "/tools"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
        ]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_A}):
                response = client.request(method, path, headers=headers, json={"code": "1"})
                assert response.status_code == 401, (method, path, headers)
                assert response.json()["code"] == "unauthorized"
                assert response.headers["www-authenticate"] == "Bearer"

        alpha = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60
        )
        bravo = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=60
        )
        with alpha, bravo:
            made = alpha.post("/execute", json={"code": "secret = 42"}).json()
            session_id = made["session_id"]
            assert (
                alpha.post("/execute", json={"code": "secret", "session_id": session_id}).json()[
                    "result"
                ]
                == "42"
            )
            # another key neither sees nor reaches it
            assert bravo.get("/sessions").json()["sessions"] == []
            for response in (
                bravo.post("/execute", json={"code": "secret", "session_id": session_id}),
                bravo.get(f"/sessions/{session_id}"),
                bravo.delete(f"/sessions/{session_id}"),
                bravo.post(f"/sessions/{session_id}/restart"),
            ):
                assert response.status_code == 404
                assert response.json()["code"] == "session_not_found"
            # the same id is free in another key's namespace
            assert bravo.post("/sessions", json={"session_id": session_id}).status_code == 201
            assert [s["session_id"] for s in alpha.get("/sessions").json()["sessions"]] == [
                session_id
            ]
            # sessions per key
            assert alpha.post("/sessions").status_code == 201
            refused = alpha.post("/sessions")
            assert refused.status_code == 429
            assert "this API key already has its maximum of 2" in refused.json()["detail"]
            assert alpha.get(f"/sessions/{session_id}").status_code == 200


def _serve(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernel_service", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env_extra or {})},
        check=False,
    )


def test_no_public_listening_without_a_key(tmp_path: Path) -> None:
    refused = _serve("--host", "0.0.0.0", "--port", "1", "--connection-dir", str(tmp_path))
    assert refused.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in refused.stderr


def test_keys_never_reach_the_log(tmp_path: Path) -> None:
    with service_process(tmp_path, log_level="debug", env={"KERNEL_SERVICE_API_KEY": KEY_A}) as (
        process,
        base_url,
    ):
        headers = {"Authorization": f"Bearer {KEY_A}"}
        assert (
            httpx.post(
                f"{base_url}/execute", json={"code": "1"}, headers=headers, timeout=60
            ).status_code
            == 200
        )
        assert (
            httpx.get(f"{base_url}/sessions", headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        process.terminate()
        process.wait(timeout=30)
        log = (tmp_path / "service.log").read_text()
    assert "Uvicorn running" in log or "Application startup" in log
    assert KEY_A not in log


def test_without_a_sandbox_the_service_refuses_to_start(tmp_path: Path) -> None:
    # no bubblewrap on this PATH: the sandbox cannot be set up
    empty = tmp_path / "empty-path"
    empty.mkdir()
    refused = subprocess.run(
        [sys.executable, "-m", "kernel_service", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(empty)},
        check=False,
    )
    assert refused.returncode != 0
    assert "refusing to start: the sandbox is not available" in refused.stderr
    assert "KERNEL_SERVICE_SANDBOX=none" in refused.stderr


def test_without_keys_web_pages_of_other_sites_are_refused(tmp_path: Path) -> None:
    """No key stops a page in the user's browser: a page of another origin, or one whose
    site's name was made to point at 127.0.0.1 (DNS rebinding), gets 403 on every route
    but /healthz (and /mcp, which answers such hosts 421 itself)."""
    with running_server(tmp_path) as server:
        client = server.client
        session = server.new_session()
        port = server.port
        for headers in (
            {"Origin": "http://evil.example"},
            {
                "Host": f"rebound.evil.example:{port}",
                "Origin": f"http://rebound.evil.example:{port}",
            },
            {"Host": f"rebound.evil.example:{port}"},
        ):
            for method, path, body in (
                ("POST", "/execute", {"code": "1", "session_id": session}),
                ("GET", "/sessions", None),
                ("GET", f"/sessions/{session}/history", None),
                ("POST", "/api/kernels", None),
            ):
                refused = client.request(method, path, json=body, headers=headers)
                assert refused.status_code == 403, (headers, path, refused.text)
                assert refused.json()["code"] == "origin_refused"
                assert "Refused: the request" in refused.text
            assert client.get("/healthz", headers=headers).status_code == 200
        # the service's own pages, and clients that are not browsers, are served
        same = {"Origin": server.base_url}
        ran = client.post("/execute", json={"code": "1", "session_id": session}, headers=same)
        assert ran.status_code == 200, ran.text
        listed = client.get("/sessions", headers={"Host": f"localhost:{port}"})
        assert listed.status_code == 200
        assert [s["session_id"] for s in listed.json()["sessions"]] == [session]
