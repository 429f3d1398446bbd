"""API keys: who may use the service, and whose sessions a request may see.

With keys configured, every request but `GET /healthz`, `GET /readyz` and the web
inspector's page must
carry a key: `Authorization: Bearer <key>`, or `Authorization: token <key>` as Jupyter
clients send it. On Jupyter's paths (`/api/...`, `/kernelspecs/...`, the kernels'
WebSockets included) `?token=<key>` does too, since browsers cannot set a WebSocket's
headers. The key is compared with every configured key in constant time; the request's
`owner` (a digest of its key, never the key) decides which sessions it can see. A
WebSocket without a key is refused before it is accepted.

Without keys, `LocalPagesOnly` refuses what may come from another site's web page in the
user's browser (another Origin; a Host that is not a loopback name: DNS rebinding).
"""

import hashlib
import hmac
import ipaddress
import secrets
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from kernel_service.api.errors import (
    RefusedOrigin,
    detail_of,
    error_response_for,
    is_jupyter_path,
    status_of,
)
from kernel_service.api.inspector import PAGES
from kernel_service.errors import ServiceError, Unauthorized

# /healthz and /readyz (probes carry no key), and the web inspector's page and files (no
# data: the page asks for a key)
_OPEN = {("GET", "/healthz"), ("GET", "/readyz"), *(("GET", path) for path in PAGES)}
# How a key may be named in the Authorization header (compared without case).
_SCHEMES = (b"bearer", b"token")


# Owner names appear in paths a kernel can see: keyed with a secret of this process, they
# tell nothing about the API key (a plain hash of a weak key could be brute-forced).
_OWNER_SECRET = secrets.token_bytes(32)


def owner_of_key(key: bytes) -> str:
    """A name for the holder of a key, stable for the life of this process."""
    return hmac.new(_OWNER_SECRET, key, hashlib.sha256).hexdigest()[:16]


def presented_key(scope: Scope) -> bytes | None:
    """The key a request carries: its Authorization header's (Bearer or token), or on a
    Jupyter path its `?token=`."""
    header: bytes | None = dict(scope["headers"]).get(b"authorization")
    if header is not None:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() in _SCHEMES and token.strip():
            return token.strip()
    if is_jupyter_path(scope["path"]) and scope.get("query_string"):
        query: bytes = scope["query_string"]
        tokens = parse_qs(query.decode("latin-1")).get("token")
        if tokens:
            return tokens[-1].encode()
    return None


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self._app = app
        self._keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or (
            kind == "http" and (scope["method"], scope["path"]) in _OPEN
        ):
            await self._app(scope, receive, send)
            return
        token = presented_key(scope) or b""
        matched: bytes | None = None
        for key in self._keys:  # every key is compared, so timing tells nothing
            if hmac.compare_digest(token, key):
                matched = key
        if matched is None:
            await self._refuse(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner_of_key(matched)
        await self._app(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(scope, receive, send, Unauthorized(), {"WWW-Authenticate": "Bearer"})


async def refuse(
    scope: Scope, receive: Receive, send: Send, error: ServiceError, headers: dict[str, str]
) -> None:
    """Answer a request with `error`, in the shape its path's clients read; a WebSocket is
    refused at its handshake, with the same answer where the server can give one (uvicorn
    can), else closed before it is accepted."""
    path = scope["path"]
    response = error_response_for(
        path, status_of(error), detail_of(error, is_jupyter_path(path)), error.code, headers
    )
    if scope["type"] == "http":
        await response(scope, receive, send)
        return
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": response.status_code,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.code})


_LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]"}
# Routes a web page of another site may reach: /healthz (no data), and /mcp, which guards
# itself in the same way (mcp_guards.loopback_only, answering 421).
_ANY_PAGE = {"/healthz", "/readyz", "/mcp"}


def refused_page(headers: dict[bytes, bytes], listen_host: str) -> str | None:
    """Why a request to a service without keys may come from another site's web page: an
    Origin that is not the host it was sent to, or, on a loopback address, a Host that is
    not a loopback name (a site whose name was made to point at 127.0.0.1: DNS
    rebinding). None: it may not."""
    host = headers.get(b"host", b"").decode("latin-1").lower()
    name = host if host.endswith("]") else host.rsplit(":", 1)[0]
    if _on_loopback(listen_host) and name not in _LOOPBACK_NAMES:
        return f"the request names host {host[:100]!r}, not this machine's loopback address"
    origin = headers.get(b"origin", b"").decode("latin-1")
    if origin and origin.partition("://")[2].rstrip("/").lower() != host:
        return f"the request comes from a page of {origin[:100]!r}"
    return None


def _on_loopback(address: str) -> bool:
    try:
        return address == "localhost" or ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class LocalPagesOnly:
    """Without API keys: a web page of another site may not use the service (its browser
    would send the requests with nothing to stop them). Pages served from the service's
    own address may; so may every client that is not a browser."""

    def __init__(self, app: ASGIApp, listen_host: str) -> None:
        self._app = app
        self._listen_host = listen_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in _ANY_PAGE:
            why = refused_page(dict(scope["headers"]), self._listen_host)
            if why is not None:
                await refuse(scope, receive, send, RefusedOrigin(why), {})
                return
        await self._app(scope, receive, send)
