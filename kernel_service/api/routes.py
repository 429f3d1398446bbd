"""The HTTP routes: thin translations between HTTP and the session registry."""

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Coroutine
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import Receive

from kernel_service import __version__
from kernel_service.api.errors import RefusedOrigin
from kernel_service.api.streaming import STREAM_RESPONSE, execution_events, wants_stream
from kernel_service.config import Settings
from kernel_service.errors import CodeTooLarge, SessionNotFound
from kernel_service.execution.collector import OutputListener
from kernel_service.metrics import Metrics
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.sessions.session import Answer
from kernel_service.tool_spec import tool_spec
from kernel_service_client.models import (
    IMAGE_MIMES,
    CreateSessionRequest,
    ErrorBody,
    ExecuteInSessionRequest,
    ExecuteRequest,
    ExecutionResult,
    Health,
    InterruptResult,
    KernelSpecInfo,
    KernelSpecList,
    Readiness,
    SessionInfo,
    SessionList,
)
from kernel_service_client.tools.spec import ToolFormat, render_tool

log = logging.getLogger(__name__)

router = APIRouter()

T = TypeVar("T")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route can give, each an ErrorBody; 401 (with API keys) in all.

    422 is declared wherever a request has parameters, so FastAPI does not add its own
    (of another shape)."""
    return {code: {"model": ErrorBody} for code in (401, *codes)}


# Dependencies are `async def`: FastAPI runs a plain `def` one in a worker thread, a
# thread hop per dependency per request on the hot path. POST /execute reads them from the
# request instead: solving its three dependencies was a sixth of FastAPI's CPU per execution.


def registry_in(request: Request) -> SessionRegistry:
    registry: SessionRegistry = request.app.state.registry
    return registry


def settings_in(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def owner_in(request: Request) -> str | None:
    """Whose sessions this request may see: set by the API key check, None without keys."""
    owner: str | None = getattr(request.state, "owner", None)
    return owner


async def registry_of(request: Request) -> SessionRegistry:
    return registry_in(request)


async def settings_of(request: Request) -> Settings:
    return settings_in(request)


async def owner_of(request: Request) -> str | None:
    return owner_in(request)


Registry = Annotated[SessionRegistry, Depends(registry_of)]
Config = Annotated[Settings, Depends(settings_of)]
Owner = Annotated[str | None, Depends(owner_of)]
SessionId = Annotated[str, Path(description="The session's id.")]


def _json(model: SessionInfo) -> Response:
    # Serialised once, straight from the model: results can carry megabytes of images.
    return Response(model.model_dump_json(), media_type="application/json")


async def _cancel_on_disconnect(receive: Receive, task: "asyncio.Task[Any]") -> bool:
    """Cancel `task` when the client disconnects; True if it did.

    Called once the body has been read: the server's receive then blocks until the client
    goes (or the response is sent), so this costs no polling and consumes no body.
    """
    message = await receive()
    if message["type"] != "http.disconnect":
        return False  # not what ASGI promises after the body: stop watching
    task.cancel()
    return True


async def _unless_client_leaves(receive: Receive, work: Coroutine[Any, Any, T]) -> T | None:
    """`work`'s result, or None if the client disconnected first: `work` was then cancelled
    and has ended (an execution's cancellation interrupts the kernel and frees the session).
    """
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
    try:
        # If this request is itself cancelled (the service stopping), so is `task`, and
        # this await returns only once it has ended.
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        left = watcher.done() and not watcher.cancelled() and watcher.exception() is None
        if left and watcher.result() and current is not None and not current.cancelling():
            return None
        raise
    finally:
        watcher.cancel()
        await asyncio.wait((watcher,))  # never left behind; its cancellation is not ours


@router.post(
    "/execute",
    response_model=ExecutionResult,
    responses={**_errors(400, 404, 409, 413, 422, 429, 503, 507), **STREAM_RESPONSE},
)
async def execute(body: ExecuteRequest, request: Request) -> Response:
    """Run code in a session (a new one when `session_id` is null) and return all it produced."""
    registry, settings, owner = registry_in(request), settings_in(request), owner_in(request)
    size = len(body.code.encode())
    if size > settings.max_code_bytes:
        raise CodeTooLarge(size, settings.max_code_bytes)
    session = registry.get(body.session_id, owner) if body.session_id is not None else None
    if session is not None:
        registry.check_language(session, body.language)
    if wants_stream(body.stream, request.headers.get("accept")):
        if session is None:  # made before the stream begins: its errors are HTTP errors
            session = await registry.create(owner=owner, language=body.language)
        streamed = session

        def run_streamed(listener: OutputListener) -> Awaitable[ExecutionResult]:
            return streamed.execute(body.code, body.timeout, listener)

        events = execution_events(run_streamed, settings.interrupt_on_disconnect)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def run() -> Answer:
        nonlocal session
        if session is None:
            session = await registry.create(owner=owner, language=body.language)
        return await session.execute_answer(body.code, body.timeout)

    answer: Answer | None
    if not settings.interrupt_on_disconnect:
        answer = await run()  # if the client has left, the result goes nowhere
    else:
        answer = await _unless_client_leaves(request.receive, run())
    if answer is None:
        log.info(
            "session %s: the client disconnected; its execution was cancelled",
            session.session_id if session is not None else "(not made)",
        )
        if session is not None and body.session_id is None:
            # made for this request, and its id never reached anyone: nobody can use it
            with contextlib.suppress(SessionNotFound):
                await registry.close(session.session_id, owner)
        return Response(status_code=499)  # nobody reads it ("client closed request")
    # the result's JSON as the state store keeps it: made once (results can be 32 MiB)
    return Response(answer.json, media_type="application/json")


@router.post(
    "/sessions",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionInfo,
    responses=_errors(400, 409, 413, 422, 429, 503),
)
async def create_session(
    registry: Registry, owner: Owner, body: CreateSessionRequest | None = None
) -> Response:
    """A new session, in Python or the language asked for, with its kernel ready."""
    session = await registry.create(
        body.session_id if body else None, owner, language=body.language if body else None
    )
    response = _json(session.info())
    response.status_code = status.HTTP_201_CREATED
    return response


@router.post(
    "/sessions/{session_id}/execute",
    response_model=ExecutionResult,
    responses={**_errors(404, 413, 422, 429, 503, 507), **STREAM_RESPONSE},
)
async def execute_in(
    session_id: SessionId, body: ExecuteInSessionRequest, request: Request
) -> Response:
    """`POST /execute` in the session the path names: the same body (but `session_id`) and
    answer, in a form a proxy routes by its path alone, without reading the body
    (docs/scaling.md)."""
    named = ExecuteRequest.model_construct(**dict(body), session_id=session_id)
    return await execute(named, request)


@router.get("/sessions", response_model=SessionList, responses=_errors())
async def list_sessions(registry: Registry, owner: Owner) -> SessionList:
    return SessionList(sessions=[s.info() for s in registry.sessions(owner)])


@router.get("/sessions/{session_id}", response_model=SessionInfo, responses=_errors(404, 422))
async def get_session(session_id: SessionId, registry: Registry, owner: Owner) -> SessionInfo:
    return registry.get(session_id, owner).info()


@router.delete(
    "/sessions/{session_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_errors(404, 422)
)
async def delete_session(session_id: SessionId, registry: Registry, owner: Owner) -> Response:
    await registry.close(session_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/sessions/{session_id}/interrupt", response_model=InterruptResult, responses=_errors(404, 422)
)
async def interrupt_session(
    session_id: SessionId, registry: Registry, owner: Owner
) -> InterruptResult:
    """Interrupt the running execution (KeyboardInterrupt in the kernel); state is kept."""
    return InterruptResult(
        session_id=session_id, interrupted=registry.get(session_id, owner).interrupt()
    )


@router.post(
    "/sessions/{session_id}/restart", response_model=SessionInfo, responses=_errors(404, 422, 503)
)
async def restart_session(session_id: SessionId, registry: Registry, owner: Owner) -> SessionInfo:
    """Replace the session's kernel by a fresh one: all its variables are gone."""
    session = registry.get(session_id, owner)
    await session.restart()
    return session.info()


@router.get(
    "/sessions/{session_id}/images/{image_id}",
    response_class=Response,
    responses={
        200: {
            "content": {
                mime: {"schema": {"type": "string", "format": "binary"}} for mime in IMAGE_MIMES
            },
            "description": "The image's bytes (SVG: its UTF-8 text).",
        },
        **_errors(404, 422),
    },
)
async def get_image(
    session_id: SessionId, image_id: str, registry: Registry, owner: Owner
) -> Response:
    """An image a session's code displayed, as long as the session lives."""
    image = await registry.get(session_id, owner).image(image_id)
    # An SVG is a document written by user code: never let it run script on our origin.
    headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
    return Response(image.content(), media_type=image.mime, headers=headers)


@router.get(
    "/tools",
    response_model=list[dict[str, Any]],
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        **_errors(400, 422, 503),
    },
)
async def tools(
    settings: Config,
    registry: Registry,
    fmt: Annotated[
        ToolFormat,
        Query(
            alias="format",
            description="`openai` (default): the `tools` list of the OpenAI API, vLLM, SGLang "
            "and Ollama; `qwen`: Qwen-Agent's form; `toolbench`: ToolBench's form; `react` or "
            "`react_zh`: a ReAct system prompt, as text.",
        ),
    ] = "openai",
    language: Annotated[
        str | None,
        Query(
            max_length=64,
            description="The language of the sessions the tool runs in (default python; GET "
            "/kernelspecs lists them): its description and arguments are in its terms.",
        ),
    ] = None,
) -> Response:
    """The `code_interpreter` tool, ready to pass to a model."""
    _, name = registry.catalog.resolve(language)
    rendered = render_tool(tool_spec(settings, name), fmt)
    if isinstance(rendered, str):
        return PlainTextResponse(rendered)
    return JSONResponse([rendered])


@router.get("/kernelspecs", response_model=KernelSpecList, responses=_errors())
async def list_kernelspecs(registry: Registry) -> KernelSpecList:
    """The kernels this service has: the languages each runs, and whether it can run here
    (and why not, if it cannot)."""
    catalog = registry.catalog
    return KernelSpecList(
        default="python",
        kernelspecs=[
            KernelSpecInfo(
                name=kind.name,
                display_name=kind.display_name,
                language=kind.language,
                languages=catalog.languages_of(kind),
                ready=kind.ready,
                problem=kind.problem,
                warm_kernels=len(registry.pools[kind.name]) if kind.name in registry.pools else 0,
            )
            for kind in catalog.kinds.values()
        ],
    )


@router.get("/healthz", response_model=Health)
async def healthz(request: Request, registry: Registry, settings: Config) -> Health:
    """Liveness: the service serves (200 whenever it answers)."""
    return Health(
        version=__version__,
        sessions=len(registry),
        max_sessions=settings.max_sessions,
        warm_kernels=sum(len(pool) for pool in registry.pools.values()),
        languages=registry.catalog.ready_languages(),
        sandbox=request.app.state.sandbox,
        isolation=request.app.state.isolation,
        executing=registry.executing(),
        accepting=_readiness(registry, settings).status == "ready",
        cell=registry.cell.describe(),
    )


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Full or draining."}},
)
async def readyz(registry: Registry, settings: Config) -> Response:
    """Whether new sessions may be sent here: 200, or 503 when full or draining (a proxy's
    placement check; a cell that answers 503 still serves its own sessions)."""
    readiness = _readiness(registry, settings)
    status_code = 200 if readiness.status == "ready" else 503
    return Response(readiness.model_dump_json(), status_code, media_type="application/json")


@router.post("/drain", response_model=Health, responses=_errors(403))
async def drain(request: Request, registry: Registry, settings: Config) -> Health:
    """From now on the service makes no new sessions (503 `draining`); its own go on. For a
    cell about to be stopped or moved (`kernel-service drain`, a preStop hook). Only a client
    on this machine may (an operator's act, not any key holder's: a key is a tenant's), with
    a key where keys are set; through a proxy on another host, never."""
    client = request.client.host if request.client else ""
    if not _on_this_machine(client):
        raise RefusedOrigin(f"POST /drain came from {client!r}, not from this machine")
    registry.cell.draining = True
    log.info("draining: no new sessions from now on")
    return await healthz(request, registry, settings)


def _readiness(registry: SessionRegistry, settings: Settings) -> Readiness:
    status: Literal["ready", "full", "draining"] = "ready"
    if registry.cell.draining:
        status = "draining"
    elif registry.full():
        status = "full"
    return Readiness(status=status, sessions=len(registry), max_sessions=settings.max_sessions)


def _on_this_machine(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get(
    "/metrics",
    # not PlainTextResponse: FastAPI would declare the (JSON) 401 as text/plain
    response_class=Response,
    responses={
        200: {
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
            "description": "Prometheus text format (OpenMetrics when the Accept header asks).",
        },
        **_errors(),
    },
)
async def metrics(request: Request) -> Response:
    """The service's metrics for Prometheus: executions, kernels, sessions (docs/operations.md)."""
    # On the event loop on purpose: the live figures are read from the session registry.
    collected: Metrics = request.app.state.metrics
    body, content_type = collected.exposition(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
