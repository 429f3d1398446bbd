"""Who may reach an MCP session over HTTP, and what of it is logged: each MCP session bound
to the API key that opened it, its id tagged with the cell's in a cluster, kept out of the
SDK's logs above debug, and requests for other hosts refused on a loopback address."""

import ipaddress
import logging
import re

from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_service.sessions.cell import Cell


class OwnedSessions:
    """Makes the request's API key owner the request's user for the SDK's session manager,
    which binds each MCP session to the user that opened it and answers any other's
    requests for it (POST, GET, DELETE) with 404, as for an unknown session. Without keys
    there is no user, and every request is everyone's, as the REST API's sessions are."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        owner = scope.get("state", {}).get("owner")
        if owner is not None:
            token = AccessToken(token="", client_id=owner, scopes=[])
            scope = {**scope, "user": AuthenticatedUser(token)}
        await self._app(scope, receive, send)


class CellSessionIds:
    """In a cell of a cluster, MCP session ids as clients see them start with the cell's tag
    (so a proxy routes them; sessions/cell.py): the SDK's own ids get it on the way out
    (`Mcp-Session-Id` of a response) and lose it on the way in. An id with another tag is
    passed on whole, no id of the SDK's: it answers 404, as for any unknown session."""

    _HEADER = b"mcp-session-id"

    def __init__(self, app: ASGIApp, cell: Cell) -> None:
        self._app = app
        self._cell = cell

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._cell.tag is None or scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = [
            (name, self._untagged(value)) if name.lower() == self._HEADER else (name, value)
            for name, value in scope["headers"]
        ]

        async def send_tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [
                    (name, self._cell.tagged(value.decode("latin-1")).encode())
                    if name.lower() == self._HEADER else (name, value)
                    for name, value in message.get("headers", [])
                ]}  # fmt: skip
            await send(message)

        await self._app({**scope, "headers": headers}, receive, send_tagged)

    def _untagged(self, value: bytes) -> bytes:
        seen = self._cell.untagged(value.decode("latin-1"))
        return value if seen is None else seen.encode()  # another cell's: unknown here


class SessionIdsAtDebug(logging.Filter):
    """On the SDK's streamable HTTP loggers, which log MCP session ids at info and warning
    ("Created new transport with session ID ...", "Rejecting request for session ...",
    "Terminating session: ..."): a record that holds one is lowered to debug, shown only
    where its logger logs debug; an error (a session that crashed) keeps its level, with the
    id cut out."""

    LOGGERS = ("mcp.server.streamable_http_manager", "mcp.server.streamable_http")
    _SESSION_ID = re.compile(r"[0-9a-f]{32}")  # the SDK's ids: uuid4().hex

    @classmethod
    def install(cls) -> None:
        for name in cls.LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in logger.filters):
                logger.addFilter(cls())

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG:
            return True
        message = record.getMessage()
        if not self._SESSION_ID.search(message):
            return True
        if record.levelno >= logging.ERROR:
            record.msg, record.args = self._SESSION_ID.sub("<id>", message), None
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        # lowered after its logger's level check: ask that logger again
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def loopback_only(host: str) -> TransportSecuritySettings | None:
    """On a loopback address, refuse requests for other hosts and origins (DNS rebinding),
    as the SDK does for servers it builds itself."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return None
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=["127.0.0.1:*", "localhost:*", "[::1]:*"],
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
