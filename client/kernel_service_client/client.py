"""A Python client for kernel-service, sync and async, on httpx.

    from kernel_service_client.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as client, client.session() as session:
        session.execute("x = 6 * 7")
        print(session.execute("x").text)          # Out[2]: 42

Results are the server's own models (`kernel_service_client.models.ExecutionResult`).

These are the two faces only. Each call is written once, without I/O, as a flow
(`kernel_service_client.flows`: a session that is gone is remade there, and the result says
that state was lost); `Client` runs flows with httpx's sync client and `AsyncClient` with
its async one (`kernel_service_client.drivers`).
"""

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from types import TracebackType
from typing import Any, Self

import httpx

from kernel_service_client import flows
from kernel_service_client.drivers import AsyncDriver, SyncDriver
from kernel_service_client.flows import SessionState, StreamEvent, lost_state_notice, stream_event
from kernel_service_client.models import ExecutionResult, Health, KernelSpecInfo, SessionInfo
from kernel_service_client.protocol import TIMEOUT, KernelServiceError, Protocol, parse_events
from kernel_service_client.tools.spec import ToolFormat, ToolSpec

# Importable from here as before: the public names, and those tests/test_streaming.py uses.
__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "KernelServiceError",
    "Session",
    "StreamEvent",
    "_Protocol",
    "_SessionState",
    "_stream_event",
    "lost_state_notice",
    "parse_events",
]
_Protocol = Protocol
_SessionState = SessionState
_stream_event = stream_event

DEFAULT_URL = "http://127.0.0.1:8000"


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
        self._protocol = Protocol(base_url, api_key)
        self._http = http or httpx.Client(timeout=TIMEOUT)
        self._driver = SyncDriver(self._http)

    def session(self, session_id: str | None = None, language: str | None = None) -> "Session":
        """A session handle. Nothing is started until it is used; with `session_id`, that
        session is used (and made when it does not exist yet, e.g. one per conversation id);
        `language`: the language of a session it makes (python when None; `kernelspecs()`
        lists what the service has)."""
        return Session(self, SessionState(self._protocol, session_id, language))

    def tool_spec(self) -> ToolSpec:
        """The `code_interpreter` tool as this service describes it (its limits included)."""
        return self._driver.run(flows.tool_spec(self._protocol))

    def tools(self, fmt: ToolFormat = "openai") -> Any:
        """`GET /tools?format=`: a list of tool definitions, or prompt text for ReAct."""
        return self._driver.run(flows.tools(self._protocol, fmt))

    def sessions(self) -> list[SessionInfo]:
        return self._driver.run(flows.sessions(self._protocol))

    def kernelspecs(self) -> list[KernelSpecInfo]:
        """The languages the service has, and whether each can run there."""
        return self._driver.run(flows.kernelspecs(self._protocol))

    def health(self) -> Health:
        return self._driver.run(flows.health(self._protocol))

    def image(self, url: str) -> bytes:
        """The bytes behind an image's `url`."""
        return self._driver.run(flows.image(self._protocol, url))

    def url(self, path: str) -> str:
        return self._protocol.url(path)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Session:
    """One kernel session: state persists between `execute` calls."""

    def __init__(self, client: Client, state: SessionState) -> None:
        self._client = client
        self._state = state
        self._driver = client._driver
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
            return self._driver.run(self._state.execute(code, timeout))

    def stream(self, code: str, timeout: float | None = None) -> Iterator[StreamEvent]:
        """Run `code`, yielding each output as it arrives and then the result (the last
        event). Leaving the loop early closes the stream: the server interrupts the code."""
        with self._lock:
            yield from self._driver.drive(self._state.stream(code, timeout))

    def interrupt(self) -> bool:
        """Interrupt the running execution; whether one was running."""
        # not behind the lock: it is meant for while `execute` runs in another thread
        return self._driver.run(self._state.interrupt())

    def restart(self) -> SessionInfo:
        """A fresh kernel: every variable is gone."""
        with self._lock:
            return self._driver.run(self._state.restart())

    def info(self) -> SessionInfo:
        with self._lock:
            return self._driver.run(self._state.info())

    def close(self) -> None:
        """End the session and its kernel (nothing happens if it never started)."""
        with self._lock:
            self._driver.run(self._state.close())

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
        self._protocol = Protocol(base_url, api_key)
        self._http = http or httpx.AsyncClient(timeout=TIMEOUT)
        self._driver = AsyncDriver(self._http)

    def session(self, session_id: str | None = None, language: str | None = None) -> "AsyncSession":
        """As `Client.session`."""
        return AsyncSession(self, SessionState(self._protocol, session_id, language))

    async def tool_spec(self) -> ToolSpec:
        return await self._driver.run(flows.tool_spec(self._protocol))

    async def tools(self, fmt: ToolFormat = "openai") -> Any:
        return await self._driver.run(flows.tools(self._protocol, fmt))

    async def sessions(self) -> list[SessionInfo]:
        return await self._driver.run(flows.sessions(self._protocol))

    async def kernelspecs(self) -> list[KernelSpecInfo]:
        return await self._driver.run(flows.kernelspecs(self._protocol))

    async def health(self) -> Health:
        return await self._driver.run(flows.health(self._protocol))

    async def image(self, url: str) -> bytes:
        return await self._driver.run(flows.image(self._protocol, url))

    def url(self, path: str) -> str:
        return self._protocol.url(path)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncSession:
    """The asyncio twin of `Session`."""

    def __init__(self, client: AsyncClient, state: SessionState) -> None:
        self._client = client
        self._state = state
        self._driver = client._driver
        self._lock = asyncio.Lock()

    @property
    def id(self) -> str | None:
        return self._state.id

    @property
    def client(self) -> AsyncClient:
        return self._client

    async def execute(self, code: str, timeout: float | None = None) -> ExecutionResult:
        async with self._lock:
            return await self._driver.run(self._state.execute(code, timeout))

    async def stream(self, code: str, timeout: float | None = None) -> AsyncIterator[StreamEvent]:
        """As `Session.stream`."""
        async with (
            self._lock,
            aclosing(self._driver.events(self._state.stream(code, timeout))) as events,
        ):
            async for event in events:
                yield event

    async def interrupt(self) -> bool:
        return await self._driver.run(self._state.interrupt())

    async def restart(self) -> SessionInfo:
        async with self._lock:
            return await self._driver.run(self._state.restart())

    async def info(self) -> SessionInfo:
        async with self._lock:
            return await self._driver.run(self._state.info())

    async def close(self) -> None:
        async with self._lock:
            await self._driver.run(self._state.close())

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
