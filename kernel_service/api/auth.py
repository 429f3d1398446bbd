"""API keys: who may use the service, and whose sessions a request may see.

With keys configured, every request but `GET /healthz` and the web inspector's page must
carry a key: `Authorization: Bearer <key>`, or `Authorization: token <key>` as Jupyter
clients send it. On Jupyter's paths (`/api/...`, `/kernelspecs/...`, the kernels'
WebSockets included) `?token=<key>` does too, since browsers cannot set a WebSocket's
headers. The key is compared with every configured key in constant time; the request's
`owner` (a digest of its key, never the key) decides which sessions it can see. A
WebSocket without a key is refused before it is accepted.
"""

import hashlib
import hmac
import secrets
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from kernel_service.api.errors import detail_of, error_response_for, is_jupyter_path, status_of
from kernel_service.api.inspector import PAGES
from kernel_service.errors import Unauthorized

# /healthz, and the web inspector's page and files (no data: the page asks for a key)
_OPEN = {("GET", "/healthz"), *(("GET", path) for path in PAGES)}
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
        refusal = Unauthorized()
        path = scope["path"]
        response = error_response_for(
            path, status_of(refusal), detail_of(refusal, is_jupyter_path(path)), refusal.code
        )
        response.headers["WWW-Authenticate"] = "Bearer"
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        # A WebSocket: refused at its handshake, with the same 401 where the server can
        # answer one (uvicorn can), else closed before it is accepted.
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
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
