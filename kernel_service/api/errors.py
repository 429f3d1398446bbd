"""Every error the API answers with, mapped to its HTTP status in this one place, as JSON
`{"detail": ..., "code": ...}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kernel_service.errors import (
    CodeTooLarge,
    ImageNotFound,
    KernelUnavailable,
    ServiceError,
    SessionExists,
    SessionNotFound,
    TooManySessions,
)

log = logging.getLogger(__name__)

STATUS_OF: dict[type[ServiceError], int] = {
    SessionNotFound: 404,
    ImageNotFound: 404,
    SessionExists: 409,
    CodeTooLarge: 413,
    TooManySessions: 429,
    KernelUnavailable: 503,
}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def error_response(status: int, detail: object, code: str) -> JSONResponse:
    return JSONResponse({"detail": jsonable_encoder(detail), "code": code}, status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    async def service_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        return error_response(STATUS_OF.get(type(exc), 500), str(exc), exc.code)

    async def invalid_request(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()
        ]
        return error_response(422, errors, "invalid_request")

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, exc.detail, code)

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(
            500, "Internal error in kernel-service; see its log.", "internal_error"
        )

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)


class BodySizeLimit:
    """Refuses, before reading it, a request body announced as larger than `limit` bytes."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and value.isdigit() and int(value) > self._limit:
                    size = int(value)
                    response = error_response(
                        413, str(CodeTooLarge(size, self._limit)), "code_too_large"
                    )
                    await response(scope, receive, send)
                    return
        await self._app(scope, receive, send)
