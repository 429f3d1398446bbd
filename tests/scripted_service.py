"""A kernel-service scripted over httpx's MockTransport, for the client's unit tests: the
answers in the order the calls must come, and both faces of the client called alike."""

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Literal, Protocol

import httpx

from kernel_service_client.client import AsyncClient, AsyncSession, Client, StreamEvent
from kernel_service_client.models import ExecutionResult, Health, SessionInfo
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
