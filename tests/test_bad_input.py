"""Bad input, case by case: bodies that are not JSON objects or not UTF-8, wrong types,
unknown fields, 10 MB of code, NUL bytes, odd timeouts and session ids that try paths.
Each gets a clear 4xx (or runs, where that is the answer), never a 500 or a hang.
(tests/test_errors.py has each error status; tests/test_fuzz.py fuzzes from the schema.)"""

import http.client
import json
import re
from pathlib import Path

import pytest

from tests.conftest import Server, running_server
from tests.test_errors import error_of

JSON = {"content-type": "application/json"}
MIB = 1024 * 1024


def raw_request(
    server: Server, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A request with its path sent as written: httpx would resolve `..` before sending."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def session_count(server: Server) -> int:
    return len(server.client.get("/sessions").json()["sessions"])


# ---------------------------------------------------------------- bodies


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"", JSON),
        (b"code=1", JSON),
        (b'{"code": "1"} trailing', JSON),
        (b"null", JSON),
        (b'"print(1)"', JSON),
        (b"42", JSON),
        (b'{"code": "1"}', {"content-type": "text/plain"}),
        (b"code=1", {"content-type": "application/x-www-form-urlencoded"}),
    ],
)
def test_bodies_that_are_not_a_json_object_are_422(
    server: Server, body: bytes, headers: dict[str, str]
) -> None:
    before = session_count(server)
    for path in ("/execute", "/sessions"):
        if path == "/sessions" and body in (b"", b"null"):
            continue  # the body of POST /sessions is optional: none is no body
        response = server.client.post(path, content=body, headers=headers)
        error_of(response, 422, "invalid_request")
    assert session_count(server) == before


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_json_body_sent_as_another_type_is_told_the_header(
    server: Server, content_type: str
) -> None:
    for path in ("/execute", "/sessions"):
        headers = {"content-type": content_type}
        response = server.client.post(path, content=b'{"code": "1"}', headers=headers)
        detail = error_of(response, 422, "invalid_request")
        assert detail == (
            f"The body was sent as {content_type!r}: send it as JSON, with the header "
            "`Content-Type: application/json`."
        )


def test_a_body_that_is_not_utf8_is_422_and_says_so(server: Server) -> None:
    for path in ("/execute", "/sessions"):
        response = server.client.post(path, content=b'{"code": "\xff\xfe"}', headers=JSON)
        detail = error_of(response, 422, "invalid_request")
        assert "not valid utf-8 text (invalid start byte at byte 10)" in str(detail)


@pytest.mark.parametrize(
    "body",
    [
        {"code": ["print(1)"]},
        {"code": {"source": "print(1)"}},
        {"code": "1", "session_id": ["s"]},
        {"code": "1", "session_id": {"id": "s"}},
        {"code": "1", "session_id": True},
        {"code": "1", "timeout": [1]},
        {"code": "1", "timeout": {"seconds": 1}},
        {"code": "1", "kernel": "python3"},
        {"code": "1", "session_id": None, "timeout": None, "extra": None},
    ],
)
def test_wrong_types_and_unknown_fields_in_execute_are_422(server: Server, body: object) -> None:
    error_of(server.client.post("/execute", json=body), 422, "invalid_request")


@pytest.mark.parametrize(
    "body", [{"session_id": 7}, {"session_id": ["s"]}, {"id": "s"}, {"session_id": "s", "x": 1}, []]
)
def test_wrong_types_and_unknown_fields_in_sessions_are_422(server: Server, body: object) -> None:
    before = session_count(server)
    error_of(server.client.post("/sessions", json=body), 422, "invalid_request")
    assert session_count(server) == before


# ---------------------------------------------------------------- code


def test_ten_megabytes_of_code_are_refused_unread(server: Server) -> None:
    # announced and never sent: the answer comes without waiting for the body
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.putrequest("POST", "/execute")
        connection.putheader("content-type", "application/json")
        connection.putheader("content-length", str(10 * MIB))
        connection.endheaders()
        refusal = connection.getresponse()
        assert refusal.status == 413
        body = json.loads(refusal.read())
        assert body["code"] == "code_too_large"
        assert "10,485,760 bytes" in body["detail"]
    finally:
        connection.close()
    # and sent whole
    before = session_count(server)
    response = server.client.post("/execute", json={"code": "#" * (10 * MIB)})
    error_of(response, 413, "code_too_large")
    assert session_count(server) == before


def test_nul_bytes_in_code_run_as_code_python_cannot_compile(server: Server, session: str) -> None:
    """Decided: NUL is text like any other; Python refuses such source, so the answer is
    the SyntaxError, as for any code that does not compile, and the session carries on."""
    for code in ("print('a\x00b')", "\x00", "x = 1\x00\nprint(x)"):
        result = server.execute(code, session)
        assert result["status"] == "error"
        assert result["error"]["ename"] == "SyntaxError"
        assert "null bytes" in result["error"]["evalue"]
    assert server.execute("6 * 7", session)["result"] == "42"


def test_blank_code_is_refused_as_the_schema_says(server: Server, session: str) -> None:
    """What the schema's pattern for `code` allows runs; what it refuses is refused. Once
    the schema had no pattern and refused blank code anyway; then a pattern `\\S`, which
    other regex dialects read otherwise than Python (U+001F, U+FEFF)."""
    schema = server.client.get("/openapi.json").json()
    pattern = schema["components"]["schemas"]["ExecuteRequest"]["properties"]["code"]["pattern"]
    for point in range(0x110000):
        if not 0xD800 <= point <= 0xDFFF:
            char = chr(point)
            assert (re.search(pattern, char) is None) == char.isspace(), hex(point)
    for code in ("\x1c\x1f", "\x85", "\u00a0\u001f", "\u3000 \t\n", "\u2028"):
        response = server.client.post("/execute", json={"code": code, "session_id": session})
        assert "code is empty" in str(error_of(response, 422, "invalid_request"))
    for code in ("\ufeff", "\u200b", "1\x1c"):
        assert server.execute(code, session)["status"] in ("ok", "error")


# ---------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "timeout", [b"0", b"-0.0", b"-1", b"-1e308", b"NaN", b"-Infinity", b"9" * 400]
)
def test_timeouts_that_are_not_positive_numbers_are_422(server: Server, timeout: bytes) -> None:
    body = b'{"code": "1", "timeout": ' + timeout + b"}"
    error_of(server.client.post("/execute", content=body, headers=JSON), 422, "invalid_request")


def test_huge_and_tiny_timeouts_run_within_the_cap(tmp_path: Path) -> None:
    """Huge ones (1e308, and Infinity, which Python's JSON reads) are capped by the server;
    the smallest float times out at once, and the session carries on."""
    with running_server(tmp_path, default_timeout=1, max_timeout=1) as server:
        session = server.new_session()
        for timeout in (b"1e308", b"1e999", b"Infinity"):
            body = b'{"code": "import time; time.sleep(30)", "timeout": %s, "session_id": "%s"}'
            response = server.client.post(
                "/execute", content=body % (timeout, session.encode()), headers=JSON
            )
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["status"] == "timeout"
            assert "the 1 s time limit" in result["error"]["evalue"]
            assert result["duration_ms"] < 10_000
        result = server.execute("1", session, timeout=5e-324)
        assert result["status"] in ("ok", "timeout")
        assert server.execute("6 * 7", session)["result"] == "42"
        server.client.delete(f"/sessions/{session}")


# ---------------------------------------------------------------- session ids

# Ids no session can have, in a JSON body...
ODD_IDS = ["a/b", "..", "../..", "../etc/passwd", "%2F", "é", "日本", "\u202e", "a" * 129, " "]
ODD_IDS += ["", "a\x00b", "-leading", ".hidden"]
# ...and as written in a path (percent-encoded where a raw byte cannot go)
ODD_PATH_IDS = ["a/b", "..", "../..", "..%2F..%2Fetc", "%2F", "a%2Fb", "%2E%2E", "%C3%A9"]
ODD_PATH_IDS += ["%E6%97%A5", "a" * 129, "", "a%00b", "%FF", "%20"]
SESSION_ROUTES = [
    ("GET", ""),
    ("DELETE", ""),
    ("POST", "/interrupt"),
    ("POST", "/restart"),
    ("GET", "/images/1.png"),
]


def test_odd_session_ids_are_404_or_422_in_every_route(server: Server) -> None:
    """No such session can exist: POST /sessions refuses the id (422); every other route
    answers 404; none reaches a file, makes a session, or fails."""
    root = server.settings.work_dir.parent
    files_before = set(root.rglob("*"))
    sessions_before = session_count(server)
    for session_id in ODD_IDS:
        response = server.client.post("/sessions", json={"session_id": session_id})
        error_of(response, 422, "invalid_request")
        response = server.client.post("/execute", json={"code": "1", "session_id": session_id})
        error_of(response, 404, "session_not_found")
    for path_id in ODD_PATH_IDS:
        for method, suffix in SESSION_ROUTES:
            path = f"/sessions/{path_id}{suffix}"
            status, headers, body = raw_request(server, method, path)
            if suffix == "" and path_id in ("", "%2F"):
                # `/sessions/` (`/sessions//` once decoded): redirected to `/sessions`
                assert (status, headers["location"]) == (307, f"{server.base_url}/sessions")
                continue
            # no session (session_not_found), or no route when the id holds a slash
            assert status == 404, (method, path, status, body)
            assert json.loads(body)["code"] in ("session_not_found", "not_found")
    assert session_count(server) == sessions_before
    assert set(root.rglob("*")) == files_before


# ---------------------------------------------------------------- methods and /mcp


def test_a_405_names_every_method_the_path_takes(server: Server) -> None:
    """It used to carry no `Allow` header, then only the first route's methods."""
    for method, path, allowed in [
        ("PUT", "/sessions", "GET, POST"),
        ("OPTIONS", "/sessions", "GET, POST"),
        ("PATCH", "/sessions/nope", "DELETE, GET"),
        ("GET", "/execute", "POST"),
        ("DELETE", "/sessions/nope/restart", "POST"),
    ]:
        response = server.client.request(method, path)
        error_of(response, 405, "method_not_allowed")
        assert response.headers["allow"] == allowed, (method, path)


def test_mcp_answers_bad_bodies_with_protocol_errors(server: Server) -> None:
    headers = {**JSON, "accept": "application/json, text/event-stream"}
    for body in (b"{nope", b'{"jsonrpc": "2.0", "id": 1, "method": "\xff"}', b"[1, 2]", b""):
        response = server.client.post("/mcp", content=body, headers=headers)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] < 0


# ---------------------------------------------------------------- input()

NO_ONE_TO_TYPE = "{}() is not available: this kernel has no one to type an answer; pass the "
NO_ONE_TO_TYPE += "value in the code instead."


@pytest.mark.parametrize("fork_server", [True, False], ids=["fork-server", "plain"])
def test_input_and_getpass_say_so_in_one_sentence(tmp_path: Path, fork_server: bool) -> None:
    with running_server(tmp_path, fork_server=fork_server) as server:
        launch = server.client.get("/healthz").json()["isolation"].get("launch", "plain")
        assert (launch == "fork-server") == fork_server
        session = server.new_session()
        for name, code in (
            ("input", "x = input('Your name? ')"),
            ("getpass", "import getpass\ndef ask():\n    return getpass.getpass()\nask()"),
        ):
            result = server.execute(code, session)
            sentence = NO_ONE_TO_TYPE.format(name)
            assert result["status"] == "error"
            assert result["error"] == {
                "ename": "StdinNotImplementedError",
                "evalue": sentence,
                "traceback": [f"StdinNotImplementedError: {sentence}"],
            }
            assert result["text"] == f"StdinNotImplementedError: {sentence}"
        # code that expects it can still catch it
        caught = server.execute(
            "from IPython.core.error import StdinNotImplementedError\n"
            "try:\n    input()\nexcept StdinNotImplementedError:\n    print('caught')",
            session,
        )
        assert caught["stdout"] == "caught\n"
