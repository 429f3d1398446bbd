"""`WS /api/kernels/{id}/channels`: a Jupyter client's WebSocket on a session's kernel.

The API key is checked before the socket is accepted (`api/auth.py`: a header, or
`?token=` for browsers); an unknown or foreign kernel is refused with 404 before it is
accepted too. The socket then carries Jupyter messages both ways (`frames.py`), through
a `KernelConnection` (`bridge.py`), until the client goes or the session ends.
"""

import asyncio
import contextlib
import logging

from fastapi import APIRouter, WebSocket
from starlette.responses import Response

from kernel_service.api.errors import (
    detail_of,
    jupyter_error_response,
    status_of,
)
from kernel_service.api.jupyter.bridge import Connections, KernelConnection
from kernel_service.api.jupyter.frames import V1_PROTOCOL, BadFrame, Frame, Framing, read
from kernel_service.config import Settings
from kernel_service.errors import ServiceError, SessionNotFound
from kernel_service.sessions.registry import SessionRegistry

log = logging.getLogger(__name__)

router = APIRouter()

# WebSockets open on one kernel at most (Jupyter Server's gateway client can leave one
# behind when its browser leaves mid-handshake; a few dozen is more than any use needs).
MAX_PER_KERNEL = 32
# Close codes: the kernel ended (deleted, culled, the service stopping) and a frame that is
# not a Jupyter message (RFC 6455's "policy violation" and "going away").
_KERNEL_ENDED = 1001
_NOT_A_MESSAGE = 1008
# Seconds a closing handshake may take before the socket is left to the server to drop.
_CLOSING = 5.0


class TooManyConnections(ServiceError):
    code = "too_many_connections"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"This kernel already has {limit} WebSockets open; close one before opening more."
        )


async def _deny(websocket: WebSocket, error: ServiceError, status: int | None = None) -> None:
    """Refuse the handshake with an HTTP error (the server permitting), else close."""
    status = status or status_of(error)
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        response: Response = jupyter_error_response(status, detail_of(error, jupyter=True),
                                                    error.code)  # fmt: skip
        await websocket.send_denial_response(response)
    else:
        await websocket.close(code=_NOT_A_MESSAGE, reason=str(error)[:120])


@router.websocket("/api/kernels/{kernel_id}/channels")
async def kernel_channels(websocket: WebSocket, kernel_id: str) -> None:
    app_state = websocket.app.state
    registry: SessionRegistry = app_state.registry
    settings: Settings = app_state.settings
    connections: Connections = app_state.jupyter_connections
    owner: str | None = websocket.scope.get("state", {}).get("owner")
    try:
        session = registry.get(kernel_id, owner)
    except SessionNotFound as exc:
        await _deny(websocket, exc)
        return
    if connections.count(session) >= MAX_PER_KERNEL:
        await _deny(websocket, TooManyConnections(MAX_PER_KERNEL), 429)
        return
    framing: Framing = "v1" if V1_PROTOCOL in websocket.scope.get("subprotocols", ()) else "legacy"

    async def send(frame: Frame) -> None:
        if isinstance(frame, str):
            await websocket.send_text(frame)
        else:
            await websocket.send_bytes(frame)

    connection = KernelConnection(
        session, registry, settings, connections, framing=framing, send=send
    )
    # counted from before the handshake's end: handshakes at once cannot pass the cap
    with connections.attached(connection):
        await websocket.accept(subprotocol=V1_PROTOCOL if framing == "v1" else None)
        writer = asyncio.create_task(connection.outbox.run(), name="jupyter-writer")
        ender = asyncio.create_task(_close_when_gone(websocket, connection, writer))
        try:
            await _read(websocket, connection)
        finally:
            ender.cancel()
            await connection.close()
            writer.cancel()
            await asyncio.wait([writer, ender])
            for task in (writer, ender):
                if not task.cancelled() and task.exception() is not None:
                    log.debug("a Jupyter client's socket failed: %s", task.exception())


async def _read(websocket: WebSocket, connection: KernelConnection) -> None:
    """Hand the client's messages to the connection until it goes (or is closed)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data: Frame | None = message.get("text")
        if data is None:
            data = message.get("bytes")
        if data is None:
            continue
        try:
            request = read(data, connection.framing)
        except BadFrame as error:
            if not connection.refuse(error):
                with contextlib.suppress(RuntimeError, OSError):  # closed meanwhile
                    await websocket.close(_NOT_A_MESSAGE, f"Not a Jupyter message: {error}"[:120])
                return
            continue
        connection.receive(request)


async def _close_when_gone(
    websocket: WebSocket, connection: KernelConnection, writer: "asyncio.Task[None]"
) -> None:
    """When the session ends (deleted, culled, the service stopping), send what waits and
    close the socket: its kernel is gone. When the client reads nothing while its messages
    pile up, close the socket: it is not listening."""
    gone = asyncio.ensure_future(connection.session.gone.wait())
    broken = asyncio.ensure_future(connection.outbox.broken.wait())
    try:
        await asyncio.wait([gone, broken], return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        broken.cancel()
    if connection.outbox.broken.is_set():
        # it reads nothing: what waits is dropped, and the closing is not waited for
        writer.cancel()
        code, reason = _NOT_A_MESSAGE, "The client read none of its messages; closed."
    else:
        connection.outbox.close()
        await asyncio.wait([writer])
        code, reason = _KERNEL_ENDED, "The kernel was deleted or culled, or the service stopped."
    with contextlib.suppress(RuntimeError, OSError, TimeoutError):  # closed by the client
        async with asyncio.timeout(_CLOSING):
            await websocket.close(code, reason)
