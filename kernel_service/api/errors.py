"""Every error the API answers with, mapped to its HTTP status in this one place, as JSON
`{"detail": ..., "code": ...}`."""

import logging
from collections.abc import Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel_service.errors import (
    CodeTooLarge,
    FileChanged,
    FileNotFound,
    FileTooLarge,
    ImageNotFound,
    InvalidFilePath,
    InvalidUpload,
    KernelUnavailable,
    NotAFile,
    ServiceError,
    SessionExists,
    SessionNotFound,
    StateFull,
    SymlinkRefused,
    TooManySessions,
    Unauthorized,
    WorkspaceFull,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[ServiceError], int] = {
    Unauthorized: 401,
    SessionNotFound: 404,
    ImageNotFound: 404,
    SessionExists: 409,
    CodeTooLarge: 413,
    TooManySessions: 429,
    KernelUnavailable: 503,
    StateFull: 507,
    InvalidFilePath: 400,
    SymlinkRefused: 400,
    NotAFile: 400,
    FileNotFound: 404,
    FileChanged: 409,
    FileTooLarge: 413,
    InvalidUpload: 422,
    WorkspaceFull: 507,
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def error_response(
    status: int, detail: object, code: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"detail": jsonable_encoder(detail), "code": code}, status_code=status, headers=headers
    )


def status_of(exc: ServiceError) -> int:
    return STATUS_OF.get(type(exc), 500)


def install_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(status_of(exc), str(exc), exc.code)

    async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        wrong_type = _not_json(request)
        if wrong_type is not None and any(e.get("loc", ())[:1] == ("body",) for e in exc.errors()):
            detail = (
                f"The body was sent as {wrong_type!r}: send it as JSON, with the header "
                "`Content-Type: application/json`."
            )
            return error_response(422, detail, "invalid_request")
        errors = [
            {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()
        ]
        return error_response(422, errors, "invalid_request")

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # FastAPI's word for a body it could not parse
            return error_response(422, _unparsable(exc), "invalid_request")
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        headers = exc.headers
        if exc.status_code == 405:
            headers = {"Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, exc.detail, code, headers)

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            500, "Internal error in kernel-service; see its log.", "internal_error"
        )

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
        detail = str(CodeTooLarge(size, self._limit)).replace("The code is", "The request is", 1)
        await error_response(413, detail, "code_too_large")(scope, receive, send)
