"""The local cluster's status endpoint, the front's `GET /healthz` (kernel-service cluster):
a small app on a loopback port that only HAProxy reaches, answering with what `report` says
of the cells at that moment."""

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

# What `report` gives: the HTTP status and the JSON body.
Report = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]


def status_app(report: Report) -> Starlette:
    async def healthz(request: Request) -> Response:
        status, body = await report()
        return JSONResponse(body, status)

    return Starlette(routes=[Route("/healthz", healthz, methods=["GET", "HEAD"])])


class _Server(uvicorn.Server):
    """A uvicorn server inside a program that handles its own signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class StatusServer:
    """`status_app(report)` served on a free loopback port until `stop`."""

    def __init__(self, report: Report) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(
            status_app(report), log_level="warning", access_log=False, lifespan="off"
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve([self._socket]), name="status")
        while not self._server.started:
            if self._task.done():
                await self._task  # its failure, raised
            await asyncio.sleep(0.01)  # polling uvicorn's `started` (it has no event for it)

    async def stop(self) -> None:
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
