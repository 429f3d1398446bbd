"""The client's flows over httpx's MockTransport: each call, sync and async, with the
service's answers scripted, its errors and its gone sessions included."""

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterable, Iterator
from typing import Any, Literal, Protocol

import httpx
import pytest

from kernel_service_client.client import (
    AsyncClient,
    AsyncSession,
    Client,
    KernelServiceError,
    StreamEvent,
    parse_events,
)
from kernel_service_client.models import (
    ExecutionResult,
    Health,
    SessionInfo,
    StreamOutput,
)
from kernel_service_client.tools.spec import ToolFormat, ToolSpec

URL = "http://kernels.test:8000"
NOW = "2024-01-01T00:00:00Z"
Mode = Literal["sync", "async"]
MODES: tuple[Mode, ...] = ("sync", "async")
Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


class Service:
    """The service's answers, in the order the calls must come; the requests it was sent."""

    def __init__(self, *answers: tuple[str, str, Answer]) -> None:
        self._answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        assert self._answers, f"unexpected {request.method} {request.url.path}"
        method, path, answer = self._answers.pop(0)
        assert (request.method, request.url.path) == (method, path)
        self.requests.append(request)
        return answer(request) if callable(answer) else answer

    @property
    def finished(self) -> bool:
        return not self._answers

    def body(self, index: int) -> Any:
        return json.loads(self.requests[index].content)


class Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body that arrives in the given pieces, for both clients; it notes being closed."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self.pieces = list(pieces)
        self.sent = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces:
            self.sent += 1
            yield piece

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.sent += 1
            yield piece

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


# ---------------------------------------------------------------- both faces as one


class SessionFace(Protocol):
    @property
    def id(self) -> str | None: ...
    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult: ...
    def stream(self, code: str, timeout: float | None = None) -> Iterable[StreamEvent]: ...
    def interrupt(self) -> bool: ...
    def restart(self) -> SessionInfo: ...
    def info(self) -> SessionInfo: ...
    def close(self) -> None: ...


class ClientFace(Protocol):
    def session(self, session_id: str | None = None) -> SessionFace: ...
    def tool_spec(self) -> ToolSpec: ...
    def tools(self, fmt: ToolFormat = "openai") -> Any: ...
    def sessions(self) -> list[SessionInfo]: ...
    def health(self) -> Health: ...
    def image(self, url: str) -> bytes: ...
    def url(self, path: str) -> str: ...


class BlockingSession:
    """An `AsyncSession` called as the sync one is: each call in an event loop of its own."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @property
    def id(self) -> str | None:
        return self._session.id

    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        return asyncio.run(self._session.execute(code, timeout))

    def stream(self, code: str, timeout: float | None = None) -> list[StreamEvent]:
        async def events() -> list[StreamEvent]:
            return [event async for event in self._session.stream(code, timeout)]

        return asyncio.run(events())

    def interrupt(self) -> bool:
        return asyncio.run(self._session.interrupt())

    def restart(self) -> SessionInfo:
        return asyncio.run(self._session.restart())

    def info(self) -> SessionInfo:
        return asyncio.run(self._session.info())

    def close(self) -> None:
        asyncio.run(self._session.close())


class BlockingClient:
    """An `AsyncClient` called as the sync one is."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    def session(self, session_id: str | None = None) -> BlockingSession:
        return BlockingSession(self._client.session(session_id))

    def tool_spec(self) -> ToolSpec:
        return asyncio.run(self._client.tool_spec())

    def tools(self, fmt: ToolFormat = "openai") -> Any:
        return asyncio.run(self._client.tools(fmt))

    def sessions(self) -> list[SessionInfo]:
        return asyncio.run(self._client.sessions())

    def health(self) -> Health:
        return asyncio.run(self._client.health())

    def image(self, url: str) -> bytes:
        return asyncio.run(self._client.image(url))

    def url(self, path: str) -> str:
        return self._client.url(path)


def connect(mode: Mode, service: Service, api_key: str | None = None) -> ClientFace:
    transport = httpx.MockTransport(service)
    if mode == "sync":
        return Client(URL, api_key, http=httpx.Client(transport=transport))
    return BlockingClient(AsyncClient(URL, api_key, http=httpx.AsyncClient(transport=transport)))


# ---------------------------------------------------------------- the service's answers


def info(session_id: str, count: int = 0) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "session_id": session_id,
            "status": "idle",
            "execution_count": count,
            "created_at": NOW,
            "last_activity": NOW,
        },
    )


def result_json(session_id: str, text: str = "Out[1]: 2") -> dict[str, Any]:
    return {
        "session_id": session_id,
        "status": "ok",
        "execution_count": 1,
        "outputs": [{"output_type": "stream", "name": "stdout", "text": "hi\n"}],
        "error": None,
        "images": [],
        "text": text,
        "duration_ms": 1.5,
        "state_lost": False,
    }


def result(session_id: str, text: str = "Out[1]: 2") -> httpx.Response:
    return httpx.Response(200, json=result_json(session_id, text))


def error(status: int, code: str, detail: Any = "it went wrong") -> httpx.Response:
    return httpx.Response(status, json={"detail": detail, "code": code})


def gone() -> httpx.Response:
    return error(404, "session_not_found", "no such session")


def sse(*events: tuple[str, Any]) -> bytes:
    return "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events).encode()


def streamed(body: bytes, piece: int) -> tuple[httpx.Response, Chunks]:
    """A 200 of Server-Sent Events whose body arrives `piece` bytes at a time."""
    chunks = Chunks(body[i : i + piece] for i in range(0, len(body), piece))
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=chunks)
    return response, chunks


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


# ---------------------------------------------------------------- streaming


OUTPUT = {"output_type": "stream", "name": "stdout", "text": "héllo ✓\n"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_stream_events_arrive_whatever_the_pieces_of_the_body(mode: Mode, piece: int) -> None:
    body = b": keep-alive\n\n" + sse(
        ("output", OUTPUT), ("shutdown", {}), ("output", OUTPUT), ("result", result_json("s"))
    )
    response, chunks = streamed(body, piece)
    service = Service(("POST", "/sessions", info("s")), ("POST", "/execute", response))
    session = connect(mode, service).session()
    events = list(session.stream("print('héllo ✓')", timeout=3))
    assert [e.kind for e in events] == ["output", "output", "result"]  # unknown events skipped
    assert events[0].output == StreamOutput(name="stdout", text="héllo ✓\n")
    last = events[-1].result
    assert last is not None and last.session_id == session.id == "s"
    sent = {"code": "print('héllo ✓')", "session_id": "s", "timeout": 3, "stream": True}
    assert service.body(1) == sent
    assert chunks.closed


@pytest.mark.parametrize("mode", MODES)
def test_a_streamed_execution_in_a_gone_session_says_state_was_lost(mode: Mode) -> None:
    response, _ = streamed(sse(("result", result_json("new", "x"))), 7)
    service = Service(
        ("POST", "/sessions", info("old")),
        ("POST", "/execute", result("old")),
        ("POST", "/execute", gone()),
        ("POST", "/sessions", info("new")),
        ("POST", "/execute", response),
    )
    session = connect(mode, service).session()
    session.execute("x = 1")
    [event] = session.stream("x")
    assert event.result is not None and event.result.state_lost
    assert event.result.text.startswith("[Session 'old' had expired")
    assert event.result.text.endswith("\nx")
    assert service.body(4)["stream"] is True and service.body(4)["session_id"] == "new"


@pytest.mark.parametrize("mode", MODES)
def test_stream_errors_are_service_errors(mode: Mode) -> None:
    failing = sse(("output", OUTPUT), ("error", {"detail": "full", "code": "state_full"}))
    response, chunks = streamed(failing, 4)
    service = Service(
        ("POST", "/execute", error(409, "session_busy", "busy")),
        ("POST", "/execute", response),
    )
    session = connect(mode, service).session("s")
    with pytest.raises(KernelServiceError) as busy:
        list(session.stream("1"))
    assert (busy.value.status, busy.value.code) == (409, "session_busy")
    with pytest.raises(KernelServiceError) as mid_stream:
        list(session.stream("1"))
    assert (mid_stream.value.status, mid_stream.value.code) == (500, "state_full")
    assert chunks.closed


def test_leaving_a_sync_stream_early_closes_its_body() -> None:
    response, chunks = streamed(sse(*[("output", OUTPUT)] * 5, ("result", result_json("s"))), 9)
    service = Service(("POST", "/execute", response))
    client = Client(URL, http=httpx.Client(transport=httpx.MockTransport(service)))
    events = client.session("s").stream("1")
    assert isinstance(events, Generator)
    assert next(events).kind == "output"
    assert not chunks.closed
    events.close()  # what leaving a for loop does, once the generator is dropped
    assert chunks.closed and chunks.sent < len(chunks.pieces)


def test_leaving_an_async_stream_early_closes_its_body() -> None:
    response, chunks = streamed(sse(*[("output", OUTPUT)] * 5, ("result", result_json("s"))), 9)
    service = Service(("POST", "/execute", response))
    client = AsyncClient(URL, http=httpx.AsyncClient(transport=httpx.MockTransport(service)))

    async def first_event_only() -> None:
        events = client.session("s").stream("1")
        assert isinstance(events, AsyncGenerator)
        assert (await anext(events)).kind == "output"
        assert not chunks.closed
        await events.aclose()

    asyncio.run(first_event_only())
    assert chunks.closed and chunks.sent < len(chunks.pieces)


# ---------------------------------------------------------------- Server-Sent Events


def test_parse_events() -> None:
    lines = [
        ": keep-alive",
        "",
        "data: no name",
        "",
        "event: output",
        "data:first",
        "data: second",
        "id: 7",
        "",
        "event: named but empty",
        "",
        "data: after an empty event the name is fresh",
        "",
        "event: result",
        "data: {}",  # the stream ends without the blank line
    ]
    assert list(parse_events(lines)) == [
        ("message", "no name"),
        ("output", "first\nsecond"),
        ("message", "after an empty event the name is fresh"),
        ("result", "{}"),
    ]
    assert list(parse_events([])) == []
