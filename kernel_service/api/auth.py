"""API keys: who may use the service, and whose sessions a request may see.

With keys configured, every request but `GET /healthz` and the web inspector's page must
carry `Authorization: Bearer <key>`. The key is compared with every configured key in
constant time; the request's `owner` (a digest of its key, never the key) decides which
sessions it can see.
"""

import hashlib
import hmac
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from kernel_service.api.errors import detail_of, error_response, status_of
from kernel_service.api.inspector import PAGES
from kernel_service.errors import Unauthorized

# /healthz, and the web inspector's page and files (no data: the page asks for a key)
_OPEN = {("GET", "/healthz"), *(("GET", path) for path in PAGES)}


# Owner names appear in paths a kernel can see: keyed with a secret of this process, they
# tell nothing about the API key (a plain hash of a weak key could be brute-forced).
_OWNER_SECRET = secrets.token_bytes(32)


def owner_of_key(key: bytes) -> str:
    """A name for the holder of a key, stable for the life of this process."""
    return hmac.new(_OWNER_SECRET, key, hashlib.sha256).hexdigest()[:16]


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self._app = app
        self._keys = [key.encode() for key in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in _OPEN:
            await self._app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        matched: bytes | None = None
        for key in self._keys:  # every key is compared, so timing tells nothing
            if hmac.compare_digest(token.strip(), key):
                matched = key
        if matched is None or scheme.lower() != b"bearer":
            refusal = Unauthorized()
            response = error_response(status_of(refusal), detail_of(refusal), refusal.code)
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["owner"] = owner_of_key(matched)
        await self._app(scope, receive, send)
