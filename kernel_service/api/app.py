"""The app factory: the service's runtime (launcher, session registry) behind the routes,
the MCP server at `/mcp` and Jupyter's kernel API (`/api/...`); the app's lifespan runs
them and ends every kernel at shutdown."""

import contextlib
import gc
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from starlette.routing import Route

from kernel_service import __version__
from kernel_service.api.auth import ApiKeyAuth, LocalPagesOnly
from kernel_service.api.errors import BodySizeLimit, install_error_handlers
from kernel_service.api.files import is_upload
from kernel_service.api.files import router as files_router
from kernel_service.api.history import router as history_router
from kernel_service.api.inspector import router as inspector_router
from kernel_service.api.jupyter.bridge import Connections
from kernel_service.api.jupyter.channels import router as jupyter_channels_router
from kernel_service.api.jupyter.rest import router as jupyter_router
from kernel_service.api.mcp import McpServer
from kernel_service.api.routes import router
from kernel_service.config import Settings
from kernel_service.kernel import KernelLauncher
from kernel_service.runtime import Runtime

# Allocations between two collections of the youngest generation (CPython's default: 700).
_YOUNG_GENERATION = 10_000
# Room for JSON escaping around the code (a "\u0000" is six bytes for one).
_BODY_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None, launcher: KernelLauncher | None = None) -> FastAPI:
    """A ready-to-serve app; kernels start on demand and all end when the app shuts down.

    Raises SandboxUnavailable when the configured sandbox cannot work on this host.
    """
    settings = settings or Settings()
    runtime = Runtime(settings, launcher)
    mcp = McpServer(settings, runtime.registry)
    mcp_app = mcp.http_app(settings.host)
    jupyter_connections = Connections()
    runtime.metrics.gauge(
        "kernel_service_jupyter_websockets",
        "Open WebSockets of Jupyter clients on kernels.",
        jupyter_connections.total,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # MCP sessions end first, closing their kernel sessions; then every other one
        async with runtime.running(), mcp.serving_http():
            if getattr(app.state, "freeze_heap", False):
                gc.freeze()  # see server.serve
                # Most of a request's objects die young: with a larger youngest generation
                # far fewer are scanned, and the collector's share of the hot path falls.
                gc.set_threshold(_YOUNG_GENERATION, *gc.get_threshold()[1:])
            try:
                yield
            finally:  # what Jupyter clients left running, before the sessions end
                await jupyter_connections.stop()

    app = FastAPI(
        title="kernel-service",
        version=__version__,
        summary="Persistent IPython kernels behind HTTP: a code interpreter for LLM agents.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = runtime  # its claim() may come before the server starts (cli.py)
    app.state.registry = runtime.registry
    app.state.metrics = runtime.metrics
    app.state.sandbox = runtime.launcher.isolation
    app.state.isolation = runtime.isolation
    app.state.jupyter_connections = jupyter_connections  # the kernels' WebSockets
    app.state.jupyter_notebooks = {}  # session key → the notebook path of its Jupyter session
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(history_router)
    app.include_router(inspector_router)
    app.include_router(files_router)
    app.include_router(jupyter_router)  # Jupyter's kernel API: docs/jupyter.md
    app.include_router(jupyter_channels_router)
    # MCP (streamable HTTP): inside the API key check like every route but /healthz
    app.router.routes.append(Route("/mcp", mcp_app, include_in_schema=False))
    app.add_middleware(
        BodySizeLimit, limit=settings.max_code_bytes * 6 + _BODY_OVERHEAD, exempt=is_upload
    )
    if settings.api_keys():
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys())  # outermost: checked first
    else:
        app.add_middleware(LocalPagesOnly, listen_host=settings.host)
    _name_languages_in_schema(app, runtime.catalog.accepted_names())
    return app


def _name_languages_in_schema(app: FastAPI, names: list[str]) -> None:
    """The OpenAPI schema's `language` fields list the names this service takes: which
    kernels are installed is known when the app is made, not when its models are written."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = make_schema()
        named = {"type": "string", "enum": names}
        for model in ("ExecuteRequest", "ExecuteInSessionRequest", "CreateSessionRequest"):
            field = schema["components"]["schemas"][model]["properties"]["language"]
            field["anyOf"] = [named, {"type": "null"}]
        for parameter in schema["paths"]["/tools"]["get"]["parameters"]:
            if parameter["name"] == "language":
                parameter["schema"]["anyOf"] = [named, {"type": "null"}]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
