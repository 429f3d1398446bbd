"""POST /execute as Server-Sent Events: outputs as they arrive, then the whole result; and the
Python client's iterators over them."""

import asyncio
import json
import time
from typing import Any

import pytest

from kernel_service_client.client import (
    AsyncClient,
    Client,
    KernelServiceError,
    StreamEvent,
    _Protocol,
    _SessionState,
    _stream_event,
    parse_events,
)
from tests.conftest import Server, wait_for

PROGRESS = (
    "import time\nfor i in range(3):\n    print(f'step {i}', flush=True)\n    time.sleep(0.4)\n"
    "'done'"
)


def events(server: Server, body: dict[str, Any], **headers: str) -> list[tuple[float, str, Any]]:
    """(seconds since the request, event, data) of each event, as they arrived."""
    started = time.monotonic()
    seen = []
    with server.client.stream("POST", "/execute", json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for name, data in parse_events(response.iter_lines()):
            seen.append((time.monotonic() - started, name, json.loads(data)))
    return seen


def test_outputs_arrive_as_they_happen_then_the_result(server: Server, session: str) -> None:
    seen = events(server, {"code": PROGRESS, "session_id": session, "stream": True})
    names = [name for _, name, _ in seen]
    assert names == ["output"] * 4 + ["result"], names
    texts = [data.get("text") for _, name, data in seen[:3]]
    assert texts == ["step 0\n", "step 1\n", "step 2\n"]
    # the first line came while the code still ran, not with the result
    assert seen[-1][0] - seen[0][0] > 0.6, seen
    assert seen[3][2]["output_type"] == "execute_result"
    result = seen[-1][2]
    plain = server.execute("1", session)  # the same shape as a plain answer
    assert set(result) == set(plain)
    assert result["stdout"] == "step 0\nstep 1\nstep 2\n" and result["result"] == "'done'"


def test_accept_header_asks_for_a_stream_too(server: Server, session: str) -> None:
    seen = events(
        server, {"code": "print('hi')", "session_id": session}, accept="text/event-stream"
    )
    assert [name for _, name, _ in seen] == ["output", "result"]


def test_images_and_errors_are_streamed(server: Server, session: str) -> None:
    code = (
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()\nprint('before'); 1 / 0"
    )
    seen = events(server, {"code": code, "session_id": session, "stream": True})
    kinds = [data.get("output_type") for _, name, data in seen if name == "output"]
    assert kinds == ["display_data", "stream", "error"], kinds
    image = next(data for _, _, data in seen if data.get("output_type") == "display_data")
    assert image["data"]["image/png"].startswith("iVBOR")
    result = seen[-1][2]
    assert result["status"] == "error" and result["error"]["ename"] == "ZeroDivisionError"
    assert len(result["images"]) == 1


def test_errors_before_the_stream_are_http_errors(server: Server) -> None:
    missing = server.client.post(
        "/execute", json={"code": "1", "session_id": "nope", "stream": True}
    )
    assert missing.status_code == 404
    assert missing.json()["code"] == "session_not_found"


def test_a_client_that_leaves_the_stream_interrupts_the_code(server: Server, session: str) -> None:
    server.execute("x = 1", session)
    code = (
        "import time\nfor i in range(300):\n    print(i, flush=True)\n    time.sleep(0.1)\n"
        "done = True"
    )
    body = {"code": code, "session_id": session, "stream": True}
    with server.client.stream("POST", "/execute", json=body) as response:
        for name, _ in parse_events(response.iter_lines()):
            if name == "output":
                break  # and close the connection
    assert wait_for(
        lambda: server.client.get(f"/sessions/{session}").json()["status"] == "idle", 10
    )
    after = server.execute("x, 'done' in globals()", session)
    assert after["result"] == "(1, False)" and not after["state_lost"], after


def test_the_client_iterates_sync_and_async(server: Server) -> None:
    with Client(server.base_url) as client, client.session() as session:
        events = list(session.stream(PROGRESS))
        assert [e.kind for e in events] == ["output"] * 4 + ["result"]
        assert events[0].output is not None and events[0].output.output_type == "stream"
        assert events[-1].result is not None and events[-1].result.result == "'done'"
        assert session.execute("i").result == "2"  # the same session

    async def run() -> list[StreamEvent]:
        async with AsyncClient(server.base_url) as client:
            session = client.session()
            try:
                return [e async for e in session.stream(PROGRESS)]
            finally:
                await session.close()

    streamed = asyncio.run(run())
    assert [e.kind for e in streamed] == ["output"] * 4 + ["result"]
    assert streamed[-1].result is not None and streamed[-1].result.stdout.count("step") == 3


def test_the_client_remakes_a_gone_session_and_says_state_was_lost(server: Server) -> None:
    with Client(server.base_url) as client, client.session("streamed-gone") as session:
        session.execute("x = 1")
        assert server.client.delete("/sessions/streamed-gone").status_code == 204
        *_, last = session.stream("'x' in globals()")
        assert last.result is not None
        assert last.result.state_lost and last.result.result == "False"
        assert last.result.text.startswith("[Session 'streamed-gone' had expired")


def test_a_service_error_mid_stream_is_raised_by_the_client() -> None:
    error = '{"detail": "no room", "code": "state_storage_full", "status": 507}'
    lines = [": keep-alive", "", "event: error", f"data: {error}", ""]
    [(name, data)] = list(parse_events(lines))
    state = _SessionState(_Protocol("http://127.0.0.1:1", None), "s")
    with pytest.raises(KernelServiceError) as raised:
        _stream_event(state, name, data, None)
    assert (raised.value.status, raised.value.code) == (507, "state_storage_full")
