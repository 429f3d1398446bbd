"""Jupyter's REST API (kernel specs, kernels, sessions) as Jupyter Server answers it, and its
keys as Jupyter clients send them, against a real server with API keys (and, for the
origin checks, the shared server without keys)."""

import re
import socket
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.conftest import Server, kernel_processes, running_server, service_process, wait_for
from tests.test_metrics import scrape, value

KEY_A, KEY_B = "jupyter-key-alpha-0123456789", "jupyter-key-bravo-9876543210"
TIMESTAMP = "%Y-%m-%dT%H:%M:%S.%fZ"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("jupyter-rest"), api_key=f"{KEY_A},{KEY_B}") as s:
        yield s


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server without API keys (origins are checked only then)."""
    with running_server(tmp_path_factory.mktemp("jupyter-keyless")) as s:
        yield s


def as_key(server: Server, key: str, scheme: str = "token") -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"{scheme} {key}"}, timeout=120
    )


@pytest.fixture
def alpha(keyed: Server) -> Iterator[httpx.Client]:
    with as_key(keyed, KEY_A) as client:
        yield client


@pytest.fixture
def bravo(keyed: Server) -> Iterator[httpx.Client]:
    with as_key(keyed, KEY_B) as client:
        yield client


@pytest.fixture
def kernel(alpha: httpx.Client) -> Iterator[str]:
    """A kernel of KEY_A's, ended afterwards."""
    response = alpha.post("/api/kernels")
    assert response.status_code == 201, response.text
    kernel_id: str = response.json()["id"]
    yield kernel_id
    alpha.delete(f"/api/kernels/{kernel_id}")


def ws(server: Server, path: str, **options: Any) -> ClientConnection:
    opened: ClientConnection = connect(
        f"ws://127.0.0.1:{server.port}{path}",
        proxy=None,
        open_timeout=60,
        close_timeout=60,
        ping_interval=None,
        **options,
    )
    return opened


def refused_handshake(server: Server, path: str, **options: Any) -> httpx.Response:
    """The HTTP answer to a WebSocket handshake that must be refused."""
    with pytest.raises(InvalidStatus) as refused:
        ws(server, path, **options).close()
    response = refused.value.response
    answer = httpx.Response(
        response.status_code,
        headers=list(response.headers.raw_items()),
        content=bytes(response.body or b""),
    )
    answer.read()
    return answer


def rebound_handshake(server: Server, path: str, host: str) -> httpx.Response:
    """A WebSocket handshake to the server that names `host` (as after DNS rebinding)."""
    sock = socket.create_connection(("127.0.0.1", server.port))
    with pytest.raises(InvalidStatus) as refused, sock:
        connect(f"ws://{host}{path}", sock=sock, proxy=None, open_timeout=60).close()
    response = refused.value.response
    answer = httpx.Response(response.status_code, content=bytes(response.body or b""))
    answer.read()
    return answer


def assert_jupyter_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"reason", "message", "detail", "code"}
    assert isinstance(body["reason"], str) and body["reason"]
    assert isinstance(body["message"], str) and body["message"]
    assert body["code"] == code
    return body


def assert_kernel_model(model: dict[str, Any]) -> None:
    assert set(model) == {"id", "name", "last_activity", "execution_state", "connections"}
    assert str(uuid.UUID(model["id"])) == model["id"]
    assert model["id"].count("-") == 4
    assert model["name"] == "python3"
    # exactly Jupyter's form (Jupyter Server's gateway client parses it strictly)
    parsed = datetime.strptime(model["last_activity"], TIMESTAMP)
    assert parsed.strftime(TIMESTAMP) == model["last_activity"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", model["last_activity"])
    assert model["execution_state"] in {"starting", "idle", "busy"}
    assert type(model["connections"]) is int


# ---------------------------------------------------------------- kernel specs


def test_kernelspecs(alpha: httpx.Client) -> None:
    listed = alpha.get("/api/kernelspecs")
    assert listed.status_code == 200
    body = listed.json()
    assert body["default"] == "python3"
    # every kernel that can run here, and only those (GET /kernelspecs says which)
    ours = alpha.get("/kernelspecs").json()["kernelspecs"]
    assert set(body["kernelspecs"]) == {k["name"] for k in ours if k["ready"]} >= {"python3"}
    for name, spec in body["kernelspecs"].items():
        assert set(spec) == {"name", "spec", "resources"}
        assert spec["name"] == name
        assert spec["spec"]["display_name"]
        assert isinstance(spec["spec"]["argv"], list)
        # the host's paths are not shown: program and file names only
        assert all(isinstance(arg, str) and "/" not in arg for arg in spec["spec"]["argv"])
        assert alpha.get(f"/api/kernelspecs/{name}").json() == spec
    assert body["kernelspecs"]["python3"]["spec"]["language"] == "python"


def test_an_unknown_kernelspec_is_404(alpha: httpx.Client) -> None:
    body = assert_jupyter_error(alpha.get("/api/kernelspecs/nope"), 404, "no_such_kernel")
    assert body["reason"] == "Not Found"
    assert "'nope'" in body["message"]


def test_the_kernelspec_logo_is_served(alpha: httpx.Client) -> None:
    resources = alpha.get("/api/kernelspecs/python3").json()["resources"]
    png = alpha.get(resources["logo-64x64"])
    assert png.status_code == 200
    assert png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    svg = alpha.get(resources["logo-svg"])
    assert svg.headers["content-type"].startswith("image/svg+xml")
    assert b"<svg" in svg.content
    escaped = alpha.get("/kernelspecs/python3/..%2F..%2F..%2Fetc%2Fpasswd")
    assert escaped.status_code == 404
    assert b"root:" not in escaped.content
    assert_jupyter_error(alpha.get("/kernelspecs/python3/kernel.json"), 404, "no_such_kernel")


# ---------------------------------------------------------------- kernels


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (None, {}),
        (b'{"name": "python3", "env": {"JUPY_VAR": "1"}}', {"Content-Type": "application/json"}),
        (b"", {"Content-Type": "application/octet-stream"}),
        (b'{"name": null}', {"Content-Type": "application/json"}),
    ],
    ids=["no body", "name and env", "empty octet-stream", "name null"],
)
def test_start_a_kernel(
    alpha: httpx.Client, content: bytes | None, headers: dict[str, str]
) -> None:
    started = alpha.post("/api/kernels", content=content, headers=headers)
    assert started.status_code == 201, started.text
    model = started.json()
    try:
        assert_kernel_model(model)
        assert started.headers["location"] == f"/api/kernels/{model['id']}"
        assert model["connections"] == 0
        fetched = alpha.get(f"/api/kernels/{model['id']}")
        assert fetched.status_code == 200
        assert fetched.json()["id"] == model["id"]
        assert model["id"] in [k["id"] for k in alpha.get("/api/kernels").json()]
    finally:
        assert alpha.delete(f"/api/kernels/{model['id']}").status_code == 204


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"not json", 400, "invalid_request"),
        (b"[1]", 400, "invalid_request"),
        (b'"python3"', 400, "invalid_request"),
        (b'{"name": "nope"}', 404, "no_such_kernel"),
        (b'{"name": 3}', 400, "invalid_request"),
        (b'{"env": []}', 400, "invalid_request"),
    ],
)
def test_a_bad_start_is_refused_and_starts_nothing(
    keyed: Server, alpha: httpx.Client, content: bytes, status: int, code: str
) -> None:
    listed = alpha.get("/api/kernels").json()
    processes = {p.pid for p in kernel_processes(keyed.connection_dir)}
    refused = alpha.post(
        "/api/kernels", content=content, headers={"Content-Type": "application/json"}
    )
    assert_jupyter_error(refused, status, code)
    assert alpha.get("/api/kernels").json() == listed
    assert {p.pid for p in kernel_processes(keyed.connection_dir)} == processes


def test_kernels_are_private_to_their_key(
    keyed: Server, alpha: httpx.Client, bravo: httpx.Client, kernel: str
) -> None:
    assert kernel in [k["id"] for k in alpha.get("/api/kernels").json()]
    assert kernel not in [k["id"] for k in bravo.get("/api/kernels").json()]
    for response in (
        bravo.get(f"/api/kernels/{kernel}"),
        bravo.delete(f"/api/kernels/{kernel}"),
        bravo.post(f"/api/kernels/{kernel}/interrupt"),
        bravo.post(f"/api/kernels/{kernel}/restart"),
    ):
        assert_jupyter_error(response, 404, "session_not_found")
    refused = refused_handshake(
        keyed,
        f"/api/kernels/{kernel}/channels",
        additional_headers={"Authorization": f"token {KEY_B}"},
    )
    assert refused.status_code == 404
    assert_jupyter_error(refused, 404, "session_not_found")
    # still there for its own key
    assert alpha.get(f"/api/kernels/{kernel}").status_code == 200


def test_an_unknown_kernel_is_404(keyed: Server, alpha: httpx.Client) -> None:
    missing = str(uuid.uuid4())
    body = assert_jupyter_error(alpha.get(f"/api/kernels/{missing}"), 404, "session_not_found")
    assert body["reason"] == "Not Found"
    refused = refused_handshake(keyed, f"/api/kernels/{missing}/channels?token={KEY_A}")
    assert refused.status_code == 404


def test_interrupt_restart_and_delete(keyed: Server, alpha: httpx.Client, kernel: str) -> None:
    executed = alpha.post("/execute", json={"code": "kept = 1", "session_id": kernel})
    assert executed.json()["status"] == "ok"
    interrupted = alpha.post(f"/api/kernels/{kernel}/interrupt")
    assert interrupted.status_code == 204
    assert interrupted.content == b""
    restarted = alpha.post(f"/api/kernels/{kernel}/restart")
    assert restarted.status_code == 200
    assert_kernel_model(restarted.json())
    assert restarted.json()["id"] == kernel
    after = alpha.post("/execute", json={"code": "'kept' in globals()", "session_id": kernel})
    assert after.json()["result"] == "False"
    deleted = alpha.delete(f"/api/kernels/{kernel}")
    assert deleted.status_code == 204
    assert_jupyter_error(alpha.get(f"/api/kernels/{kernel}"), 404, "session_not_found")
    assert_jupyter_error(alpha.delete(f"/api/kernels/{kernel}"), 404, "session_not_found")


def test_connections_count_open_websockets(keyed: Server, alpha: httpx.Client, kernel: str) -> None:
    def connections() -> int:
        count: int = alpha.get(f"/api/kernels/{kernel}").json()["connections"]
        return count

    def gauge() -> float:  # GET /metrics: every kernel's, on this server of its own
        return value(scrape(alpha), "kernel_service_jupyter_websockets")

    path = f"/api/kernels/{kernel}/channels?token={KEY_A}"
    assert connections() == 0
    assert gauge() == 0
    with ws(keyed, path):
        assert wait_for(lambda: connections() == 1)
        with ws(keyed, path):
            assert wait_for(lambda: connections() == 2)
            assert gauge() == 2
        assert wait_for(lambda: connections() == 1)
    assert wait_for(lambda: connections() == 0)
    assert gauge() == 0


def test_a_kernel_without_a_notebook_path_has_no_jupyter_session(
    alpha: httpx.Client, kernel: str
) -> None:
    body = assert_jupyter_error(alpha.get(f"/api/sessions/{kernel}"), 404, "no_jupyter_session")
    assert "was not given a notebook path" in body["message"]
    assert alpha.get(f"/api/kernels/{kernel}").status_code == 200  # alive all the same


def test_kernels_are_sessions(alpha: httpx.Client, kernel: str) -> None:
    sessions = alpha.get("/sessions").json()["sessions"]
    assert kernel in [s["session_id"] for s in sessions]
    made = alpha.post("/execute", json={"code": "1"}).json()["session_id"]
    try:
        assert made in [k["id"] for k in alpha.get("/api/kernels").json()]
    finally:
        alpha.delete(f"/sessions/{made}")


# ---------------------------------------------------------------- keys


@pytest.mark.parametrize("scheme", ["token", "Bearer", "TOKEN"])
def test_a_key_in_the_authorization_header(keyed: Server, scheme: str) -> None:
    with as_key(keyed, KEY_A, scheme) as client:
        assert client.get("/api/kernels").status_code == 200
        assert client.get("/api/kernelspecs").status_code == 200


def test_a_key_in_the_query_only_on_jupyter_paths(keyed: Server) -> None:
    client = keyed.client  # no key of its own
    assert client.get("/api/kernels", params={"token": KEY_A}).status_code == 200
    assert client.get("/api/kernelspecs", params={"token": KEY_A}).status_code == 200
    assert client.get("/api/kernels", params={"token": "wrong"}).status_code == 401
    # not on the service's own paths
    refused = client.get("/sessions", params={"token": KEY_A})
    assert refused.status_code == 401
    assert refused.json()["code"] == "unauthorized"
    assert "reason" not in refused.json()  # the service's error shape there
    assert client.post("/execute", params={"token": KEY_A}, json={"code": "1"}).status_code == 401


def test_no_key_is_401_in_jupyter_shape(keyed: Server) -> None:
    for method, path in [
        ("GET", "/api/kernels"),
        ("POST", "/api/kernels"),
        ("GET", "/api/kernelspecs"),
        ("GET", "/api/sessions"),
        ("GET", "/kernelspecs/python3/logo-64x64.png"),
    ]:
        for headers in ({}, {"Authorization": "token wrong"}, {"Authorization": KEY_A}):
            response = keyed.client.request(method, path, headers=headers)
            body = assert_jupyter_error(response, 401, "unauthorized")
            assert body["reason"] == "Unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.client.get("/api/kernels").json() is not None


def test_a_websocket_without_a_key_is_refused_at_its_handshake(keyed: Server, kernel: str) -> None:
    path = f"/api/kernels/{kernel}/channels"
    for options in (
        {},
        {"additional_headers": {"Authorization": "token wrong"}},
    ):
        refused = refused_handshake(keyed, path, **options)
        assert_jupyter_error(refused, 401, "unauthorized")
    assert refused_handshake(keyed, path + "?token=wrong").status_code == 401
    # and with it, accepted
    with ws(keyed, path, additional_headers={"Authorization": f"Bearer {KEY_A}"}) as opened:
        assert opened.subprotocol is None


def test_a_key_in_the_url_never_reaches_the_log(tmp_path: Path) -> None:
    with service_process(tmp_path, log_level="debug", env={"KERNEL_SERVICE_API_KEY": KEY_A}) as (
        process,
        base_url,
    ):
        assert httpx.get(f"{base_url}/api/kernels", params={"token": KEY_A}).status_code == 200
        assert httpx.get(f"{base_url}/api/kernelspecs", params={"token": "no"}).status_code == 401
        process.terminate()
        process.wait(timeout=30)
    log = (tmp_path / "service.log").read_text()
    assert " DEBUG " in log  # (everything logged that could be)
    assert KEY_A not in log


# ---------------------------------------------------------------- sessions


def test_jupyter_sessions(alpha: httpx.Client, bravo: httpx.Client) -> None:
    created = alpha.post(
        "/api/sessions",
        json={"path": "work/a.ipynb", "name": "a.ipynb", "type": "notebook",
              "kernel": {"name": "python3"}},
    )  # fmt: skip
    assert created.status_code == 201, created.text
    model = created.json()
    session_id = model["id"]
    try:
        assert created.headers["location"] == f"/api/sessions/{session_id}"
        assert (model["path"], model["name"], model["type"]) == (
            "work/a.ipynb",
            "a.ipynb",
            "notebook",
        )
        assert model["notebook"] == {"path": "work/a.ipynb", "name": "a.ipynb"}
        assert_kernel_model(model["kernel"])
        assert model["kernel"]["id"] == session_id
        assert alpha.get(f"/api/kernels/{session_id}").status_code == 200
        assert [s["id"] for s in alpha.get("/api/sessions").json()] == [session_id]
        assert alpha.get(f"/api/sessions/{session_id}").json()["path"] == "work/a.ipynb"
        assert bravo.get("/api/sessions").json() == []
        assert_jupyter_error(bravo.get(f"/api/sessions/{session_id}"), 404, "session_not_found")

        renamed = alpha.patch(f"/api/sessions/{session_id}", json={"path": "work/b.ipynb"})
        assert renamed.status_code == 200
        assert (renamed.json()["path"], renamed.json()["name"]) == ("work/b.ipynb", "a.ipynb")
        assert alpha.get(f"/api/sessions/{session_id}").json()["path"] == "work/b.ipynb"

        # a second session on the same kernel: the kernel named by id
        again = alpha.post("/api/sessions", json={"path": "c.ipynb", "kernel": {"id": session_id}})
        assert again.status_code == 201
        assert again.json()["kernel"]["id"] == session_id
        assert_jupyter_error(
            alpha.post("/api/sessions", json={"kernel": {"name": "nope"}}), 404, "no_such_kernel"
        )
        assert_jupyter_error(
            alpha.post("/api/sessions", json={"kernel": "python3"}), 400, "invalid_request"
        )
        assert_jupyter_error(
            alpha.patch(f"/api/sessions/{session_id}", json={"path": 5}), 400, "invalid_request"
        )
    finally:
        deleted = alpha.delete(f"/api/sessions/{session_id}")
    assert deleted.status_code == 204
    assert_jupyter_error(alpha.get(f"/api/sessions/{session_id}"), 404, "session_not_found")
    assert_jupyter_error(alpha.get(f"/api/kernels/{session_id}"), 404, "session_not_found")
    assert alpha.get("/api/sessions").json() == []


# ---------------------------------------------------------------- origins, without keys


def test_without_keys_another_origin_is_refused(keyless: Server) -> None:
    server = keyless
    listed = server.client.get("/api/kernels").json()
    evil = {"Origin": "http://evil.example"}
    assert_jupyter_error(server.client.post("/api/kernels", headers=evil), 403, "origin_refused")
    assert server.client.get("/api/kernels").json() == listed  # nothing started

    same = {"Origin": server.base_url}
    started = server.client.post("/api/kernels", headers=same)
    assert started.status_code == 201, started.text
    kernel_id = started.json()["id"]
    try:
        path = f"/api/kernels/{kernel_id}/channels"
        refused = refused_handshake(server, path, origin="http://evil.example")
        assert_jupyter_error(refused, 403, "origin_refused")
        # a host that only begins like ours is another origin
        lookalike = refused_handshake(server, path, origin=f"{server.base_url}.evil.example")
        assert lookalike.status_code == 403
        for method in ("interrupt", "restart"):
            assert_jupyter_error(
                server.client.post(f"/api/kernels/{kernel_id}/{method}", headers=evil),
                403,
                "origin_refused",
            )
        assert_jupyter_error(
            server.client.delete(f"/api/kernels/{kernel_id}", headers=evil), 403, "origin_refused"
        )
        # DNS rebinding: a site's name made to point at 127.0.0.1, its page then same-origin
        rebound = {"Host": f"rebound.evil.example:{server.port}",
                   "Origin": f"http://rebound.evil.example:{server.port}"}  # fmt: skip
        for answer in (
            server.client.post("/api/kernels", headers=rebound),
            server.client.get("/api/kernels", headers=rebound),
            rebound_handshake(server, path, rebound["Host"]),
        ):
            assert_jupyter_error(answer, 403, "origin_refused")
        with ws(server, path, origin=server.base_url) as opened:
            assert opened.subprotocol is None
        with ws(server, path) as opened:  # no Origin at all: not a browser
            assert opened.subprotocol is None
        assert kernel_id in [
            s["session_id"] for s in server.client.get("/sessions").json()["sessions"]
        ]
    finally:
        assert server.client.delete(f"/api/kernels/{kernel_id}", headers=same).status_code == 204
