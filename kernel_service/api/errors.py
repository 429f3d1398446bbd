"""Every error the API answers with, mapped to its HTTP status in this one place, as JSON
`{"detail": ..., "code": ...}`; a service error's detail is its message with what to do
next in HTTP's words. On Jupyter's paths (`/api/...`, `/kernelspecs/...`) the same body
also has Jupyter's `{"reason": ..., "message": ...}`, which Jupyter clients show."""

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_service.errors import (
    CodeTooLarge,
    Draining,
    FileChanged,
    FileNotFound,
    FileTooLarge,
    ImageNotFound,
    InvalidFilePath,
    IsADirectory,
    KernelUnavailable,
    LanguageMismatch,
    LanguageUnavailable,
    NotAFile,
    ServiceError,
    SessionExists,
    SessionLostWithCell,
    SessionNotFound,
    SessionOfAnotherCell,
    StateFull,
    SymlinkRefused,
    TooManySessions,
    Unauthorized,
    UnknownLanguage,
    WorkspaceFull,
    WrongCell,
)

log = logging.getLogger(__name__)


class InvalidUpload(ServiceError):
    """An upload's body that is not what PUT takes (a multipart form without its one file)."""

    code = "invalid_request"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid upload: {reason}.")
        self.reason = reason


class InvalidJupyterRequest(ServiceError):
    """A request on Jupyter's REST API whose body is not what it takes."""

    code = "invalid_request"

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid request: {reason}.")
        self.reason = reason


class NoSuchKernelSpec(ServiceError):
    code = "no_such_kernel"

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"No kernel spec {name!r}: this service has {', '.join(map(repr, known))} "
            "(GET /api/kernelspecs lists them)."
        )
        self.name = name


class NoJupyterSession(ServiceError):
    code = "no_jupyter_session"

    def __init__(self, session_id: str) -> None:
        super().__init__(
            f"No Jupyter session {session_id!r}: its kernel, if there is one, was not given a "
            "notebook path (POST /api/sessions gives it one; GET /api/kernels lists kernels)."
        )
        self.session_id = session_id


class RefusedOrigin(ServiceError):
    code = "origin_refused"

    def __init__(self, why: str) -> None:
        super().__init__(
            f"Refused: {why}. Without API keys, only clients on this machine (and pages served "
            "from the service's own address) may use the service, so that a web page in a "
            "browser cannot drive kernels here. Set KERNEL_SERVICE_API_KEY and send the key."
        )
        self.why = why


# A subclass answers with its base's status unless it is given its own here.
STATUS_OF: dict[type[ServiceError], int] = {
    Unauthorized: 401,
    SessionNotFound: 404,
    ImageNotFound: 404,
    SessionExists: 409,
    CodeTooLarge: 413,
    TooManySessions: 429,
    WrongCell: 400,
    Draining: 503,
    SessionLostWithCell: 410,
    SessionOfAnotherCell: 421,
    KernelUnavailable: 503,
    UnknownLanguage: 400,
    LanguageUnavailable: 503,
    LanguageMismatch: 409,
    StateFull: 507,
    InvalidFilePath: 400,
    SymlinkRefused: 400,
    NotAFile: 400,
    FileNotFound: 404,
    FileChanged: 409,
    FileTooLarge: 413,
    InvalidUpload: 422,
    WorkspaceFull: 507,
    InvalidJupyterRequest: 400,
    NoSuchKernelSpec: 404,
    NoJupyterSession: 404,
    RefusedOrigin: 403,
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def error_response(
    status: int, detail: object, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"detail": jsonable_encoder(detail), "code": code}, status_code=status, headers=headers
    )


def is_jupyter_path(path: str) -> bool:
    """A path of Jupyter's API (`jupyter/rest.py`, `jupyter/channels.py`)."""
    return path == "/api" or path.startswith(("/api/", "/kernelspecs/"))


def jupyter_error_response(
    status: int, detail: object, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error on Jupyter's paths: the service's body, with Jupyter's `reason` (the
    status's phrase) and `message` (what went wrong, as text) too."""
    detail = jsonable_encoder(detail)
    message = detail if isinstance(detail, str) else str(detail)
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    body = {"reason": reason, "message": message, "detail": detail, "code": code}
    return JSONResponse(body, status_code=status, headers=headers)


def error_response_for(
    path: str, status: int, detail: object, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error in the shape the path's clients read."""
    make = jupyter_error_response if is_jupyter_path(path) else error_response
    return make(status, detail, code, headers)


def status_of(exc: ServiceError) -> int:
    """The status of the nearest class in `exc`'s hierarchy that has one (500 if none has)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 500


def detail_of(exc: ServiceError, jupyter: bool = False) -> str:
    """What the error says, and what to do next in HTTP's words where that helps (in the
    words of Jupyter's API for its clients)."""
    advice = _jupyter_advice(exc) if jupyter else _advice(exc)
    return f"{exc} {advice}" if advice else str(exc)


def _jupyter_advice(exc: ServiceError) -> str | None:
    match exc:
        case SessionOfAnotherCell():
            return None
        case SessionNotFound():
            return "Start a new kernel: POST /api/kernels."
        case TooManySessions():
            return "Shut down a kernel you no longer need (DELETE /api/kernels/{id})."
        case Unauthorized():
            return (
                "Send the header `Authorization: token <key>` (or `Bearer <key>`), or "
                "`?token=<key>` in the URL."
            )
    return _advice(exc)


def _advice(exc: ServiceError) -> str | None:
    match exc:
        case SessionOfAnotherCell():
            return None  # it exists, on another cell: its message says where to send it
        case SessionNotFound():
            return "Create a new one: POST /sessions, or POST /execute without session_id."
        case TooManySessions():
            return "Delete a session you no longer need (DELETE /sessions/{id}) or try again later."
        case Unauthorized():
            return "Send the header `Authorization: Bearer <key>` (or `token <key>`)."
        case UnknownLanguage() | LanguageUnavailable():
            return "GET /kernelspecs lists the languages and whether each can run."
        case IsADirectory() | FileNotFound():
            return "GET /sessions/{id}/files lists the files."
        case FileChanged(partly_done=True):
            return "GET /sessions/{id}/files lists what is left."
        case WorkspaceFull():
            return (
                "Delete files you no longer need (DELETE /sessions/{id}/files/{path}) and try "
                "again."
            )
    return None


def install_error_handlers(app: FastAPI) -> None:
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        jupyter = is_jupyter_path(request.url.path)
        make = jupyter_error_response if jupyter else error_response
        return make(status_of(exc), detail_of(exc, jupyter), exc.code)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        wrong_type = _not_json(request)
        if wrong_type is not None and any(e.get("loc", ())[:1] == ("body",) for e in exc.errors()):
            detail = (
                f"The body was sent as {wrong_type!r}: send it as JSON, with the header "
                "`Content-Type: application/json`."
            )
            return error_response_for(request.url.path, 422, detail, "invalid_request")
        errors = [
            {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()
        ]
        return error_response_for(request.url.path, 422, errors, "invalid_request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        path = request.url.path
        if exc.status_code == 400:  # FastAPI's word for a body it could not parse
            return error_response_for(path, 422, _unparsable(exc), "invalid_request")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return error_response_for(path, exc.status_code, exc.detail, code, headers)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response_for(
            request.url.path, 500, "Internal error in kernel-service; see its log.",
            "internal_error",
        )  # fmt: skip

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


def _not_json(request: Request) -> str | None:
    """The request's Content-Type when it is there and not JSON (FastAPI then takes the body
    for bytes, and says only that they are not an object)."""
    content_type = request.headers.get("content-type")
    if content_type is None:
        return None
    media_type = content_type.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return None
    return content_type


def _unparsable(exc: StarletteHTTPException) -> str:
    """Why a body could not be parsed, when FastAPI only says that it could not."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"The body is not valid {cause.encoding} text ({cause.reason} at byte "
            f"{cause.start}): send JSON encoded as UTF-8."
        )
    return str(exc.detail)


def _allowed_methods(request: Request) -> list[str]:
    """Every method a route at this path takes (Starlette's 405 names only the first route's;
    routing is asked for each method, as included routers are not plain lists of routes)."""
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL
            for route in request.app.router.routes
        )
    ]


class BodySizeLimit:
    """Refuses a request body larger than `limit` bytes without holding more than that.

    A body whose Content-Length says it is too large is refused before it is read; a body
    of unannounced length (chunked) is read up to the limit and refused past it.
    """

    def __init__(
        self, app: ASGIApp, limit: int, exempt: Callable[[Scope], bool] | None = None
    ) -> None:
        """`exempt`: requests that limit their bodies themselves (file uploads)."""
        self._app = app
        self._limit = limit
        self._exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self._exempt is not None and self._exempt(scope)):
            await self._app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self._limit:
                await self._refuse(int(length), scope, receive, send)
                return
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self._limit:
                await self._refuse(size, scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self._app(scope, replay, send)

    async def _refuse(self, size: int, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = CodeTooLarge(size, self._limit, what="request")
        await error_response_for(
            scope["path"], status_of(refusal), detail_of(refusal), refusal.code
        )(scope, receive, send)
