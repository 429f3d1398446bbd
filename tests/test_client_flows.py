"""The client's calls over httpx's MockTransport, sync and async, with the service's answers
scripted (tests/scripted_service.py): its errors and its gone sessions included."""

import json
from typing import Any

import httpx
import pytest

from kernel_service_client.client import KernelServiceError
from kernel_service_client.tools.spec import ToolSpec
from tests.scripted_service import MODES, URL, Mode, Service, connect, error, gone, info, result

# ---------------------------------------------------------------- execute


@pytest.mark.parametrize("mode", MODES)
def test_execute_makes_the_session_on_first_use(mode: Mode) -> None:
    service = Service(
        ("POST", "/sessions", info("s1")),
        ("POST", "/execute", result("s1")),
        ("POST", "/execute", result("s1", "second")),
    )
    session = connect(mode, service, api_key="k").session()
    assert session.id is None
    first = session.execute("1 + 1", timeout=2.5)
    assert (first.session_id, first.stdout, first.state_lost) == ("s1", "hi\n", False)
    assert session.id == "s1"
    assert session.execute("x").text == "second"
    assert service.finished
    assert service.body(0) == {"session_id": None}
    assert service.body(1) == {"code": "1 + 1", "session_id": "s1", "timeout": 2.5}
    assert all(r.headers["authorization"] == "Bearer k" for r in service.requests)
    # executions may run as long as the server allows: no read timeout on them
    assert service.requests[1].extensions["timeout"]["read"] is None
    assert service.requests[0].extensions["timeout"]["read"] == 60.0


@pytest.mark.parametrize("mode", MODES)
def test_a_chosen_id_is_made_when_missing_without_a_lost_state_notice(mode: Mode) -> None:
    service = Service(
        ("POST", "/execute", gone()),
        ("POST", "/sessions", info("conv-1")),
        ("POST", "/execute", result("conv-1")),
    )
    ran = connect(mode, service).session("conv-1").execute("x = 1")
    assert (ran.session_id, ran.state_lost, ran.text) == ("conv-1", False, "Out[1]: 2")
    assert service.body(1) == {"session_id": "conv-1"}
    assert service.body(2)["session_id"] == "conv-1"


@pytest.mark.parametrize("mode", MODES)
def test_a_gone_session_is_remade_and_the_result_says_state_was_lost(mode: Mode) -> None:
    service = Service(
        ("POST", "/sessions", info("old")),
        ("POST", "/execute", result("old")),
        ("POST", "/execute", gone()),
        ("POST", "/sessions", info("new")),
        ("POST", "/execute", result("new", "after")),
        ("POST", "/execute", result("new", "again")),
    )
    session = connect(mode, service).session()
    session.execute("x = 1")
    remade = session.execute("print('after')")
    assert remade.state_lost is True
    assert remade.session_id == session.id == "new"
    notice, text = remade.text.split("\n", 1)
    assert notice.startswith("[Session 'old' had expired") and "new session 'new'" in notice
    assert text == "after"
    assert service.body(3) == {"session_id": None}
    assert service.body(4)["session_id"] == "new"
    assert session.execute("y").state_lost is False  # an ordinary session again


@pytest.mark.parametrize("mode", MODES)
def test_a_chosen_id_being_made_by_another_call_is_waited_for(mode: Mode) -> None:
    service = Service(
        ("POST", "/execute", gone()),
        ("POST", "/sessions", error(409, "session_exists")),
        ("GET", "/sessions/chosen", gone()),  # being made (or ended): asked again
        ("POST", "/sessions", error(409, "session_exists")),
        ("GET", "/sessions/chosen", info("chosen", 3)),
        ("POST", "/execute", result("chosen")),
    )
    ran = connect(mode, service).session("chosen").execute("1")
    assert ran.session_id == "chosen"
    assert service.finished


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("answer", "status", "code", "message"),
    [
        ((413, {"detail": "at most 1000 bytes", "code": "code_too_large"}), 413, "code_too_large",
         "at most"),
        ((401, {"detail": "bad key", "code": "unauthorized"}), 401, "unauthorized", "bad key"),
        ((422, {"detail": [{"loc": ["code"]}], "code": "invalid_request"}), 422,
         "invalid_request", "'loc'"),
        ((502, "bad gateway"), 502, "http_error", "bad gateway"),
        ((500, {"detail": "boom"}), 500, "http_error", "boom"),
    ],
)  # fmt: skip
def test_an_error_answer_is_a_service_error_with_its_code(
    mode: Mode, answer: tuple[int, Any], status: int, code: str, message: str
) -> None:
    status_sent, body = answer
    sent = (
        httpx.Response(status_sent, text=body)
        if isinstance(body, str)
        else httpx.Response(status_sent, json=body)
    )
    service = Service(("POST", "/execute", sent))
    with pytest.raises(KernelServiceError) as raised:
        connect(mode, service).session("s").execute("1")
    assert (raised.value.status, raised.value.code) == (status, code)
    assert message in raised.value.message
    assert str(raised.value).startswith(f"{status} {code}: ")


@pytest.mark.parametrize("mode", MODES)
def test_an_unreachable_service_is_a_service_error(mode: Mode) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    service = Service(("POST", "/sessions", refuse))
    with pytest.raises(KernelServiceError) as raised:
        connect(mode, service).session().execute("1")
    assert (raised.value.status, raised.value.code) == (0, "service_unreachable")
    assert "kernel-service at http://kernels.test:8000 could not be reached" in str(raised.value)
    assert "ConnectError: connection refused" in raised.value.message


# ---------------------------------------------------------------- the other session calls


@pytest.mark.parametrize("mode", MODES)
def test_interrupt(mode: Mode) -> None:
    service = Service(
        ("POST", "/sessions/s/interrupt", httpx.Response(200, json={"interrupted": True})),
        ("POST", "/sessions/s/interrupt", httpx.Response(200, json={"interrupted": False})),
        ("POST", "/sessions/s/interrupt", gone()),
        ("POST", "/sessions/s/interrupt", error(500, "internal_error")),
    )
    client = connect(mode, service)
    assert client.session().interrupt() is False  # never started: nothing asked
    session = client.session("s")
    assert [session.interrupt(), session.interrupt(), session.interrupt()] == [True, False, False]
    with pytest.raises(KernelServiceError):
        session.interrupt()
    assert service.finished


@pytest.mark.parametrize("mode", MODES)
def test_restart_remakes_a_gone_session_with_its_chosen_id(mode: Mode) -> None:
    service = Service(
        ("POST", "/sessions/s/restart", info("s")),
        ("POST", "/sessions/s/restart", gone()),
        ("POST", "/sessions", info("s")),
        ("POST", "/sessions", info("fresh")),
    )
    client = connect(mode, service)
    session = client.session("s")
    assert session.restart().session_id == "s"
    assert session.restart().session_id == "s"
    assert service.body(2) == {"session_id": "s"}
    assert client.session().restart().session_id == "fresh"
    assert service.finished


@pytest.mark.parametrize("mode", MODES)
def test_info_makes_the_session_and_close_forgets_it(mode: Mode) -> None:
    service = Service(
        ("POST", "/sessions", info("made")),
        ("GET", "/sessions/made", info("made", 4)),
        ("DELETE", "/sessions/made", httpx.Response(204)),
        ("POST", "/sessions", info("other")),
        ("DELETE", "/sessions/other", gone()),  # already gone: nothing to end
        ("POST", "/sessions", info("third")),
        ("DELETE", "/sessions/third", error(503, "unavailable")),
    )
    client = connect(mode, service)
    session = client.session()
    session.close()  # never started: nothing asked
    assert session.info().execution_count == 4
    session.close()
    assert session.id is None
    second = client.session()
    second.restart()
    second.close()
    assert second.id is None
    third = client.session()
    third.restart()
    with pytest.raises(KernelServiceError) as raised:
        third.close()
    assert raised.value.status == 503
    assert third.id == "third"


# ---------------------------------------------------------------- the service's calls


@pytest.mark.parametrize("mode", MODES)
def test_service_calls(mode: Mode) -> None:
    tool = {
        "type": "function",
        "function": {"name": "code_interpreter", "description": "Runs Python.", "parameters": {}},
    }
    health = {
        "version": "1",
        "sessions": 2,
        "max_sessions": 8,
        "warm_kernels": 1,
        "sandbox": "none",
        "isolation": {},
    }
    listing = {"sessions": [json.loads(info("a").content), json.loads(info("b").content)]}
    service = Service(
        ("GET", "/tools", httpx.Response(200, json=[tool])),
        ("GET", "/tools", httpx.Response(200, json=[tool])),
        ("GET", "/tools", httpx.Response(200, text="Answer the following")),
        ("GET", "/sessions", httpx.Response(200, json=listing)),
        ("GET", "/healthz", httpx.Response(200, json=health)),
        ("GET", "/sessions/a/images/1", httpx.Response(200, content=b"\x89PNG")),
        ("GET", "/sessions/a/images/2", error(404, "image_not_found")),
    )
    client = connect(mode, service)
    assert client.tool_spec() == ToolSpec("code_interpreter", "Runs Python.", {})
    assert client.tools() == [tool]
    assert client.tools("react") == "Answer the following"
    assert [s.session_id for s in client.sessions()] == ["a", "b"]
    assert client.health().max_sessions == 8
    assert client.image("/sessions/a/images/1") == b"\x89PNG"
    with pytest.raises(KernelServiceError) as raised:
        client.image(f"{URL}/sessions/a/images/2")  # an absolute URL is used as it is
    assert raised.value.code == "image_not_found"
    assert [r.url.params.get("format") for r in service.requests[1:3]] == ["openai", "react"]
    assert client.url("/sessions/a/images/1") == f"{URL}/sessions/a/images/1"
    assert client.url("http://elsewhere/x") == "http://elsewhere/x"
