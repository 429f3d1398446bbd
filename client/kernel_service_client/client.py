"""A Python client for kernel-service, sync and async, on httpx.

    from kernel_service_client.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client, client.session() as session:
        session.execute("x = 6 * 7")
        print(session.execute("x").text)          # Out[2]: 42

Results are the server's own models (`kernel_service_client.models.ExecutionResult`).

A session that the service no longer has (deleted, culled after idling, or lost in a
restart: 404 `session_not_found`) is handled here, once: the code runs in a new session
(with the same id when the caller chose it) and the result says that earlier state is gone
(`state_lost` true and a notice at the top of `text`), so an agent's history stays true.

The protocol logic is written once, without I/O, as generators that yield the HTTP
requests to send and receive the responses (`_Flow`); `Client` drives them with httpx's
sync client and `AsyncClient` with its async one.
"""

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter

from kernel_service_client.models import ExecutionResult, Health, Output, SessionInfo, SessionList
from kernel_service_client.tools.spec import ToolFormat, ToolSpec

T = TypeVar("T")
# A protocol step: yields requests and is sent their responses, or yields a number of
# seconds to wait (and is sent an empty response); returns its value.
_Flow = Generator[httpx.Request | float, httpx.Response, T]
_WAITED = httpx.Response(204)
# How long a chosen id that another call is making (409) is waited for.
_MAKING_TIMEOUT = 120.0
_MAKING_POLL = 0.05

DEFAULT_URL = "http://127.0.0.1:8000"
# Executions can legitimately take as long as the server's time limit: the server enforces
# it, so reads wait; connecting and the other calls are bounded.
_TIMEOUT = httpx.Timeout(60.0)
_EXECUTE_TIMEOUT = httpx.Timeout(60.0, read=None)


class KernelServiceError(Exception):
    """An error answer of the service: `status` (HTTP), `code` (machine-readable), message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def lost_state_notice(old_id: str, new_id: str) -> str:
    """What a result says when its code ran in a new session because the old one was gone."""
    same = "a new session with the same id" if old_id == new_id else f"new session {new_id!r}"
    return (
        f"[Session {old_id!r} had expired (deleted, or culled after being idle), so this code "
        f"ran in {same}: variables, imports and files from earlier calls are gone. Re-run "
        "whatever this code depends on.]"
    )


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        body = response.json()
        code, detail = str(body.get("code", "http_error")), body.get("detail", response.text)
    except ValueError:
        code, detail = "http_error", response.text
    message = detail if isinstance(detail, str) else str(detail)
    raise KernelServiceError(response.status_code, code, message)


def _parse(model: type[BaseModel], response: httpx.Response) -> Any:
    return model.model_validate_json(_check(response).content)


class _Protocol:
    """Builds requests and reads answers; shared by the sync and async clients."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        """A request for `path` under the base URL (or for an absolute URL of the service)."""
        timeout = kwargs.pop("timeout", _TIMEOUT)
        return httpx.Request(
            method,
            self.url(path),
            headers=self.headers,
            extensions={"timeout": timeout.as_dict()},
            **kwargs,
        )

    def url(self, path: str) -> str:
        """An absolute URL for a path the service returned (an image's `url`)."""
        return path if "://" in path else self.base_url + path


class _SessionState:
    """What a session handle knows: its id once it has one, and whether it has run code."""

    def __init__(self, protocol: _Protocol, session_id: str | None) -> None:
        self.protocol = protocol
        self.id = session_id
        self.chosen_id = session_id  # the caller's id is kept when the session is remade
        self.used = False

    def execute(self, code: str, timeout: float | None) -> _Flow[ExecutionResult]:
        if self.id is None:  # made first, so that interrupt() can reach this execution
            yield from self._create(None)
        body = {"code": code, "session_id": self.id, "timeout": timeout}
        response = yield self._execute_request(body)
        if not _is_session_gone(response):
            return self._ran(_parse(ExecutionResult, response))
        lost = yield from self._remake(body)
        result: ExecutionResult = _parse(ExecutionResult, (yield self._execute_request(body)))
        return self._ran(result, lost)

    def interrupt(self) -> _Flow[bool]:
        if self.id is None:
            return False
        response = yield self.protocol.request("POST", f"/sessions/{self.id}/interrupt")
        if _is_session_gone(response):
            return False
        return bool(_check(response).json()["interrupted"])

    def restart(self) -> _Flow[SessionInfo]:
        if self.id is not None:
            response = yield self.protocol.request("POST", f"/sessions/{self.id}/restart")
            if not _is_session_gone(response):
                info: SessionInfo = _parse(SessionInfo, response)
                return info
        self.id = None
        return (yield from self._create(self.chosen_id))

    def info(self) -> _Flow[SessionInfo]:
        if self.id is None:
            yield from self._create(self.chosen_id)
        info: SessionInfo = _parse(
            SessionInfo, (yield self.protocol.request("GET", f"/sessions/{self.id}"))
        )
        return info

    def close(self) -> _Flow[None]:
        if self.id is None:
            return
        response = yield self.protocol.request("DELETE", f"/sessions/{self.id}")
        if not _is_session_gone(response):
            _check(response)
        self.id = None

    def _create(self, session_id: str | None) -> _Flow[SessionInfo]:
        """Make the session (with the chosen id, if any). When another call is making or
        ending a session of that id (409), wait until it is there, or gone and made anew."""
        waited = 0.0
        while True:
            response = yield self.protocol.request(
                "POST", "/sessions", json={"session_id": session_id}
            )
            if response.status_code != 409 or session_id is None:
                info: SessionInfo = _parse(SessionInfo, response)
                self.id = info.session_id
                return info
            existing = yield self.protocol.request("GET", f"/sessions/{session_id}")
            if existing.status_code != 404 or waited > _MAKING_TIMEOUT:
                info = _parse(SessionInfo, existing)
                self.id = session_id
                return info
            yield _MAKING_POLL  # still being made (or ended) by another call
            waited += _MAKING_POLL

    def stream_start(self) -> _Flow[None]:
        """Before a streamed execution: the session made, if it is not yet."""
        if self.id is None:
            yield from self._create(None)

    def _remake(self, body: dict[str, Any]) -> _Flow[str | None]:
        """The session is gone: make it again (with the caller's id, if chosen), point `body`
        at it; the old id if state was lost (code had run there)."""
        old_id = self.id
        yield from self._create(self.chosen_id)
        body["session_id"] = self.id
        return old_id if self.used else None

    def _execute_request(self, body: dict[str, Any]) -> httpx.Request:
        return self.protocol.request("POST", "/execute", json=body, timeout=_EXECUTE_TIMEOUT)

    def _ran(self, result: ExecutionResult, lost_from: str | None = None) -> ExecutionResult:
        """Note that code ran; with `lost_from`, say that the state of that session is gone."""
        if lost_from is not None:
            notice = lost_state_notice(lost_from, result.session_id)
            result = result.model_copy(
                update={"state_lost": True, "text": f"{notice}\n{result.text}"}
            )
        self.id = result.session_id
        self.used = True
        return result


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed execution: an `output` as it arrived (a stream output holds
    only the new text), or, last, the whole `result`."""

    kind: Literal["output", "result"]
    output: Output | None = None
    result: ExecutionResult | None = None


_OUTPUT = TypeAdapter[Output](Output)


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream, given its lines."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue  # a comment: keep-alive
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    if data:
        yield name, "\n".join(data)


def _stream_body(state: _SessionState, code: str, timeout: float | None) -> dict[str, Any]:
    return {"code": code, "session_id": state.id, "timeout": timeout, "stream": True}


async def _aparse_events(lines: AsyncIterable[str]) -> AsyncIterator[tuple[str, str]]:
    """`parse_events` over an async stream of lines."""
    buffered: list[str] = []
    async for line in lines:
        buffered.append(line)
        if not line:
            for pair in parse_events(buffered):
                yield pair
            buffered = []
    for pair in parse_events(buffered):
        yield pair


def _stream_event(state: _SessionState, name: str, data: str, lost_from: str | None
                  ) -> StreamEvent | None:  # fmt: skip
    """The event, the result noted as ran; an `error` event raised; unknown events None."""
    if name == "output":
        return StreamEvent("output", output=_OUTPUT.validate_json(data))
    if name == "result":
        result = state._ran(ExecutionResult.model_validate_json(data), lost_from)
        return StreamEvent("result", result=result)
    if name == "error":
        error = json.loads(data)
        raise KernelServiceError(int(error.get("status", 500)), error["code"], error["detail"])
    return None


def _transport(send: Callable[[httpx.Request], httpx.Response], request: httpx.Request
               ) -> httpx.Response:  # fmt: skip
    try:
        return send(request)
    except httpx.TransportError as exc:
        raise _unreachable(request, exc) from exc


def _unreachable(request: httpx.Request, exc: httpx.TransportError) -> KernelServiceError:
    """A failure to reach the service, as a service error (status 0)."""
    return KernelServiceError(
        0,
        "service_unreachable",
        f"kernel-service at {request.url.scheme}://{request.url.netloc.decode()} could not be "
        f"reached or did not answer ({type(exc).__name__}: {exc}). If it was restarted, "
        "sessions may have been lost.",
    )


def _is_session_gone(response: httpx.Response) -> bool:
    if response.status_code != 404:
        return False
    try:
        return bool(response.json().get("code") == "session_not_found")
    except ValueError:
        return False


def _tool_spec(protocol: _Protocol) -> _Flow[ToolSpec]:
    response = yield protocol.request("GET", "/tools")
    return ToolSpec.from_openai(_check(response).json()[0])


def _tools(protocol: _Protocol, fmt: ToolFormat) -> _Flow[Any]:
    response = _check((yield protocol.request("GET", "/tools", params={"format": fmt})))
    return response.text if fmt.startswith("react") else response.json()


def _image(protocol: _Protocol, url: str) -> _Flow[bytes]:
    return _check((yield protocol.request("GET", url))).content


def _sessions(protocol: _Protocol) -> _Flow[list[SessionInfo]]:
    listing: SessionList = _parse(SessionList, (yield protocol.request("GET", "/sessions")))
    return listing.sessions


def _health(protocol: _Protocol) -> _Flow[Health]:
    health: Health = _parse(Health, (yield protocol.request("GET", "/healthz")))
    return health


# ---------------------------------------------------------------- sync


class Client:
    """A connection to kernel-service. `session()` gives a handle on one kernel session."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        http: httpx.Client | None = None,
    ) -> None:
        self._protocol = _Protocol(base_url, api_key)
        self._http = http or httpx.Client(timeout=_TIMEOUT)

    def session(self, session_id: str | None = None) -> "Session":
        """A session handle. Nothing is started until it is used; with `session_id`, that
        session is used (and made when it does not exist yet, e.g. one per conversation id)."""
        return Session(self, _SessionState(self._protocol, session_id))

    def tool_spec(self) -> ToolSpec:
        """The `code_interpreter` tool as this service describes it (its limits included)."""
        return self._run(_tool_spec(self._protocol))

    def tools(self, fmt: ToolFormat = "openai") -> Any:
        """`GET /tools?format=`: a list of tool definitions, or prompt text for ReAct."""
        return self._run(_tools(self._protocol, fmt))

    def sessions(self) -> list[SessionInfo]:
        return self._run(_sessions(self._protocol))

    def health(self) -> Health:
        return self._run(_health(self._protocol))

    def image(self, url: str) -> bytes:
        """The bytes behind an image's `url`."""
        return self._run(_image(self._protocol, url))

    def url(self, path: str) -> str:
        return self._protocol.url(path)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, request: httpx.Request) -> httpx.Response:
        """Send `request`, its answer's body not read yet unless it is an error."""
        response = _transport(partial(self._http.send, stream=True), request)
        if response.status_code != 200:
            response.read()
        return response

    def _run(self, flow: _Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, float):
                    time.sleep(step)
                    step = flow.send(_WAITED)
                else:
                    step = flow.send(_transport(self._http.send, step))
        except StopIteration as done:
            value: T = done.value
            return value


class Session:
    """One kernel session: state persists between `execute` calls."""

    def __init__(self, client: Client, state: _SessionState) -> None:
        self._client = client
        self._state = state
        # one call at a time per handle: the first ones may have to make the session
        self._lock = threading.Lock()

    @property
    def id(self) -> str | None:
        """The session's id; None until it is first used (unless the caller chose it)."""
        return self._state.id

    @property
    def client(self) -> Client:
        return self._client

    def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        """Run `code`; `timeout` in seconds (None: the server's default)."""
        with self._lock:
            return self._client._run(self._state.execute(code, timeout))

    def stream(self, code: str, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Run `code`, yielding each output as it arrives and then the result (the last
        event). Leaving the loop early closes the stream: the server interrupts the code."""
        with self._lock:
            state, client = self._state, self._client
            client._run(state.stream_start())
            body = _stream_body(state, code, timeout)
            response = client._open(state._execute_request(body))
            lost_from = None
            if _is_session_gone(response):
                response.close()
                lost_from = client._run(state._remake(body))
                response = client._open(state._execute_request(body))
            try:
                _check(response)
                for name, data in parse_events(response.iter_lines()):
                    if (event := _stream_event(state, name, data, lost_from)) is not None:
                        yield event
            finally:
                response.close()

    def interrupt(self) -> bool:
        """Interrupt the running execution; whether one was running."""
        # not behind the lock: it is meant for while `execute` runs in another thread
        return self._client._run(self._state.interrupt())

    def restart(self) -> SessionInfo:
        """A fresh kernel: every variable is gone."""
        with self._lock:
            return self._client._run(self._state.restart())

    def info(self) -> SessionInfo:
        with self._lock:
            return self._client._run(self._state.info())

    def close(self) -> None:
        """End the session and its kernel (nothing happens if it never started)."""
        with self._lock:
            self._client._run(self._state.close())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# ---------------------------------------------------------------- async


class AsyncClient:
    """The asyncio twin of `Client`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._protocol = _Protocol(base_url, api_key)
        self._http = http or httpx.AsyncClient(timeout=_TIMEOUT)

    def session(self, session_id: str | None = None) -> "AsyncSession":
        """As `Client.session`."""
        return AsyncSession(self, _SessionState(self._protocol, session_id))

    async def tool_spec(self) -> ToolSpec:
        return await self._run(_tool_spec(self._protocol))

    async def tools(self, fmt: ToolFormat = "openai") -> Any:
        return await self._run(_tools(self._protocol, fmt))

    async def sessions(self) -> list[SessionInfo]:
        return await self._run(_sessions(self._protocol))

    async def health(self) -> Health:
        return await self._run(_health(self._protocol))

    async def image(self, url: str) -> bytes:
        return await self._run(_image(self._protocol, url))

    def url(self, path: str) -> str:
        return self._protocol.url(path)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _open(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _unreachable(request, exc) from exc
        if response.status_code != 200:
            await response.aread()
        return response

    async def _run(self, flow: _Flow[T]) -> T:
        try:
            step = next(flow)
            while True:
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    step = flow.send(_WAITED)
                else:
                    try:
                        response = await self._http.send(step)
                    except httpx.TransportError as exc:
                        raise _unreachable(step, exc) from exc
                    step = flow.send(response)
        except StopIteration as done:
            value: T = done.value
            return value


class AsyncSession:
    """The asyncio twin of `Session`."""

    def __init__(self, client: AsyncClient, state: _SessionState) -> None:
        self._client = client
        self._state = state
        self._lock = asyncio.Lock()

    @property
    def id(self) -> str | None:
        return self._state.id

    @property
    def client(self) -> AsyncClient:
        return self._client

    async def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        async with self._lock:
            return await self._client._run(self._state.execute(code, timeout))

    async def stream(self, code: str, timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """As `Session.stream`."""
        async with self._lock:
            state, client = self._state, self._client
            await client._run(state.stream_start())
            body = _stream_body(state, code, timeout)
            response = await client._open(state._execute_request(body))
            lost_from = None
            if _is_session_gone(response):
                await response.aclose()
                lost_from = await client._run(state._remake(body))
                response = await client._open(state._execute_request(body))
            try:
                _check(response)
                async for name, data in _aparse_events(response.aiter_lines()):
                    if (event := _stream_event(state, name, data, lost_from)) is not None:
                        yield event
            finally:
                await response.aclose()

    async def interrupt(self) -> bool:
        return await self._client._run(self._state.interrupt())

    async def restart(self) -> SessionInfo:
        async with self._lock:
            return await self._client._run(self._state.restart())

    async def info(self) -> SessionInfo:
        async with self._lock:
            return await self._client._run(self._state.info())

    async def close(self) -> None:
        async with self._lock:
            await self._client._run(self._state.close())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
