"""The `code_interpreter` tool over the Model Context Protocol: at `/mcp` of the HTTP app
(streamable HTTP) and over stdio (`kernel-service mcp`), on the same session registry.

Built on the SDK's low-level `Server`. Each MCP session is a conversation with a kernel
session of its own, made at its first call and closed when the MCP session ends (over HTTP
the MCP session is the `Mcp-Session-Id`; over stdio it is the life of the process). A call
may name another session with `session_id` instead, for clients that hide the MCP session.

An MCP session belongs to the API key that opened it: with another key its `Mcp-Session-Id`
answers 404 to POST, GET and DELETE, as if it did not exist (the SDK's own check, given the
key's owner as the request's user). MCP session ids are capabilities: they are never logged
above debug, by this module or the SDK (see `mcp_guards.SessionIdsAtDebug`).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from mcp.server import Server, ServerRequestContext
from mcp.server.connection import Connection
from mcp.server.stdio import stdio_server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.types import (
    CallToolRequestParams,
    CallToolResult,
    ContentBlock,
    DiscoverResult,
    ImageContent,
    ListToolsResult,
    PaginatedRequestParams,
    RequestParams,
    TextContent,
    Tool,
)
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp

from kernel_service import __version__
from kernel_service.api.mcp_guards import (
    CellSessionIds,
    OwnedSessions,
    SessionIdsAtDebug,
    loopback_only,
)
from kernel_service.config import Settings
from kernel_service.errors import (
    CodeTooLarge,
    ServiceError,
    SessionNotFound,
    SessionOfAnotherCell,
    TooManySessions,
)
from kernel_service.runtime import Runtime
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.sessions.session import Session
from kernel_service.tool_spec import languages_description, tool_parameters
from kernel_service_client.models import RASTER_IMAGE_MIMES, ExecuteRequest, ExecutionResult
from kernel_service_client.tools.spec import TOOL_NAME

log = logging.getLogger(__name__)

_PROGRESS_INTERVAL = 1.0  # seconds between progress notifications during a run
_CONVERSATION = "kernel_service.conversation"  # its key in the MCP connection's state

Context = ServerRequestContext[Any, Any]


@dataclass
class _Conversation:
    """The kernel sessions one MCP session runs its calls in, one per language, each made at
    its language's first call."""

    owner: str | None  # the API key's owner name that opened it (None without keys)
    session_ids: dict[str, str] = field(default_factory=dict)  # by kernelspec name
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class McpServer:
    """The MCP face of the service: one tool, `code_interpreter`, on the session registry.

    An instance serves one transport: `http_app()` with `serving_http()`, or stdio
    (`serve_stdio()`).
    """

    def __init__(
        self, settings: Settings, registry: SessionRegistry, *, stdio: bool = False
    ) -> None:
        self._settings = settings
        self._registry = registry
        # the languages a call may name, Python first (the default)
        self._languages = registry.catalog.ready_languages()
        self._tool = _tool(settings, self._languages)
        # A stdio server has one client for its whole life, whichever protocol version it
        # speaks (2026-07-28 has no session): all its calls share one conversation.
        self._stdio_conversation = _Conversation(owner=None) if stdio else None
        self._closing: set[asyncio.Task[None]] = set()
        self._manager: StreamableHTTPSessionManager | None = None
        self.server: Server[Any] = Server(
            "kernel-service",
            version=__version__,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )

    # ------------------------------------------------------------ transports

    def http_app(self, host: str) -> ASGIApp:
        """The ASGI app to route `/mcp` to; `serving_http()` must run in the app's lifespan.

        Only the initialize handshake has MCP sessions (the 2026-07-28 protocol has none), so
        `server/discover` advertises the handshake versions: the SDK's clients then fall back
        to `initialize`, as they do for any stateful server. A client pinned to 2026-07-28 is
        still served, each of its calls a conversation of its own.
        """
        self.server.add_request_handler("server/discover", RequestParams, self._discover)
        ttl = self._settings.session_ttl
        self._manager = StreamableHTTPSessionManager(
            app=self.server,
            # DNS rebinding threatens a service that trusts whoever reaches it: one with
            # API keys does not, and may sit behind a proxy that sends its own Host
            security_settings=None if self._settings.api_keys() else loopback_only(host),
            # a silent MCP session ends when its kernel session would be culled
            session_idle_timeout=ttl if ttl > 0 else None,
        )
        SessionIdsAtDebug.install()
        return CellSessionIds(
            OwnedSessions(StreamableHTTPASGIApp(self._manager)), self._registry.cell
        )

    @contextlib.asynccontextmanager
    async def serving_http(self) -> AsyncIterator[None]:
        """Serve MCP sessions; on exit every one is ended, and with it its kernel session."""
        if self._manager is None:
            raise RuntimeError("serving_http() needs http_app() first")
        try:
            async with self._manager.run():
                yield
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """End the stdio conversation, and wait until ended MCP sessions' kernel sessions close."""
        if self._stdio_conversation is not None:
            await self._end(self._stdio_conversation)
        if self._closing:
            await asyncio.wait(set(self._closing))

    # ------------------------------------------------------------ handlers

    async def _discover(self, ctx: Context, params: RequestParams) -> DiscoverResult:
        return DiscoverResult(
            supported_versions=list(HANDSHAKE_PROTOCOL_VERSIONS),
            capabilities=self.server.get_capabilities(),
        )

    async def _list_tools(
        self, ctx: Context, params: PaginatedRequestParams | None
    ) -> ListToolsResult:
        return ListToolsResult(tools=[self._tool])

    async def _call_tool(self, ctx: Context, params: CallToolRequestParams) -> CallToolResult:
        """Run the code; a failure of the call itself comes back as an error result, not a crash."""
        if params.name != TOOL_NAME:
            return _error(f"Unknown tool {params.name!r}: the only tool here is {TOOL_NAME!r}.")
        try:
            request = ExecuteRequest.model_validate(params.arguments or {})
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in e['loc']) or 'arguments'}: {e['msg']}"
                for e in exc.errors()
            )
            return _error(f"Invalid arguments for {TOOL_NAME}: {problems}")
        size = len(request.code.encode())
        owner = _owner_of(ctx)
        try:
            if size > self._settings.max_code_bytes:
                raise CodeTooLarge(size, self._settings.max_code_bytes)
            session, notice = await self._session_for(ctx, request, owner)
            result = await self._execute(ctx, params, session, request)
        except ServiceError as exc:
            return _error(_message_of(exc))
        return _tool_result(result, notice)

    # ------------------------------------------------------------ sessions

    async def _session_for(
        self, ctx: Context, request: ExecuteRequest, owner: str | None
    ) -> tuple[Session, str | None]:
        """The session to run in, and a notice for the model when it is not the one it had."""
        registry = self._registry
        if request.session_id is not None:
            named = registry.get(request.session_id, owner)
            registry.check_language(named, request.language)
            return named, None
        kind, language = registry.catalog.resolve(request.language)
        conversation = self._conversation_of(ctx, owner)
        async with conversation.lock:  # calls that arrive together make one session
            notice = None
            session_id = conversation.session_ids.get(kind.name)
            if session_id is not None:
                try:
                    return registry.get(session_id, owner), None
                except SessionNotFound:
                    notice = (
                        f"[Notice: this conversation's session {session_id} had "
                        "ended (culled after being idle, or deleted); the code ran in a new "
                        "session: earlier variables, imports and files are gone.]"
                    )
            session = await registry.create(owner=owner, language=language)
            conversation.session_ids[kind.name] = session.session_id
            log.info("MCP conversation runs %s in session %s", language, session.session_id)
            return session, notice

    def _conversation_of(self, ctx: Context, owner: str | None) -> _Conversation:
        if self._stdio_conversation is not None:
            return self._stdio_conversation
        connection = _connection_of(ctx)
        # one owner per MCP session: another key's requests never reach it (OwnedSessions)
        conversation: _Conversation | None = connection.state.get(_CONVERSATION)
        if conversation is None:
            conversation = connection.state[_CONVERSATION] = _Conversation(owner)
            # unwound when the MCP session ends: deleted, timed out, broken or shut down
            connection.exit_stack.push_async_callback(self._end, conversation)
        return conversation

    async def _end(self, conversation: _Conversation) -> None:
        """Close the conversation's kernel session, to the end even if the caller stops waiting
        (the SDK bounds connection clean-up; `aclose` waits for what it left)."""
        task = asyncio.create_task(self._close(conversation))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        await asyncio.shield(task)

    async def _close(self, conversation: _Conversation) -> None:
        async with conversation.lock:  # a session being made is closed once it is made
            session_ids = list(conversation.session_ids.values())
            conversation.session_ids.clear()
            # each closed whatever becomes of the others
            await asyncio.gather(
                *(self._close_session(s, conversation.owner) for s in session_ids),
                return_exceptions=True,
            )

    async def _close_session(self, session_id: str, owner: str | None) -> None:
        with contextlib.suppress(SessionNotFound):  # culled or deleted already
            await self._registry.close(session_id, owner)
        log.info("MCP conversation ended; session %s closed", session_id)

    # ------------------------------------------------------------ execution

    async def _execute(
        self, ctx: Context, params: CallToolRequestParams, session: Session, request: ExecuteRequest
    ) -> ExecutionResult:
        """Run the code, telling the client it is alive while it runs if it asked for progress."""
        if (params.meta or {}).get("progress_token") is None:
            return await session.execute(request.code, request.timeout)
        ticker = asyncio.create_task(_report_progress(ctx), name="mcp-progress")
        try:
            return await session.execute(request.code, request.timeout)
        finally:
            ticker.cancel()
            await asyncio.wait([ticker])


async def serve_stdio(runtime: Runtime, on_stopped: Callable[[], None] | None = None) -> None:
    """`kernel-service mcp`: one client over stdin and stdout, kernels in this process; when
    the client goes, its kernel session and every other end. `on_stopped` is called once
    every kernel has ended (before the stdin reader is let go of)."""
    mcp = McpServer(runtime.settings, runtime.registry, stdio=True)
    # stdout carries the protocol from the start: what starting kernels print goes to stderr
    async with stdio_server() as (read_stream, write_stream):
        try:
            async with runtime.running():
                try:
                    await mcp.server.run(
                        read_stream, write_stream, mcp.server.create_initialization_options()
                    )
                finally:
                    await mcp.aclose()
        finally:
            if on_stopped is not None:
                on_stopped()


async def _report_progress(ctx: Context) -> None:
    """A progress notification every _PROGRESS_INTERVAL, so clients don't time out a long run.

    Notifications are fire-and-forget in the SDK: a client that went away drops them.
    """
    started = time.monotonic()
    while True:
        await asyncio.sleep(_PROGRESS_INTERVAL)
        elapsed = time.monotonic() - started
        await ctx.session.report_progress(elapsed, None, f"running, {elapsed:.0f} s")


def _tool(settings: Settings, languages: list[str]) -> Tool:
    schema = tool_parameters(languages=languages)
    schema["properties"] |= {
        "session_id": {
            "type": "string",
            "description": "Leave it out to run in this conversation's own session. Set it to "
            "run in another existing session: one made with POST /sessions, or another "
            "conversation's (results name their session in _meta.session_id).",
        },
        "timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "description": f"Seconds before the code is interrupted (default "
            f"{settings.default_timeout:g}, at most {settings.max_timeout:g}).",
        },
    }
    schema["additionalProperties"] = False
    return Tool(
        name=TOOL_NAME,
        title="Python code interpreter" if len(languages) < 2 else "Code interpreter",
        description=languages_description(settings, languages),
        input_schema=schema,
    )


def _tool_result(result: ExecutionResult, notice: str | None) -> CallToolResult:
    content: list[ContentBlock] = [TextContent(type="text", text=notice)] if notice else []
    content.append(TextContent(type="text", text=result.text))
    # raster images only: clients pass them to models, which take no SVG (a Claude
    # conversation fails on one); an SVG stays a reference in the text
    content += [
        ImageContent(type="image", data=image.data, mime_type=image.mime)
        for image in result.images
        if image.mime in RASTER_IMAGE_MIMES
    ]
    return CallToolResult(
        content=content,
        is_error=result.status != "ok",
        _meta={"session_id": result.session_id},
    )


def _message_of(exc: ServiceError) -> str:
    """What the error says, and what to do next in the tool's words where that helps."""
    match exc:
        case SessionOfAnotherCell():
            return (
                f"Session {exc.session_id!r} is on another cell of this cluster than this MCP "
                f"conversation, and {TOOL_NAME} reaches only the sessions of its own cell. "
                f"Call {TOOL_NAME} without session_id to run in this conversation's own "
                "session (or use the REST API for that session)."
            )
        case SessionNotFound():
            advice = (
                f"Call {TOOL_NAME} without session_id to run in this conversation's own session."
            )
        case TooManySessions():
            advice = "Try again later, once another session has ended."
        case _:
            return str(exc)
    return f"{exc} {advice}"


def _error(message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)


def _owner_of(ctx: Context) -> str | None:
    """Whose sessions this call may use: set on the HTTP request by the API key check."""
    request = ctx.request
    if not isinstance(request, Request):  # stdio: no keys
        return None
    owner: str | None = getattr(request.state, "owner", None)
    return owner


def _connection_of(ctx: Context) -> Connection:
    """The MCP connection the call came on: its `state` and `exit_stack` live as long as it.

    mcp 2.3 builds each request's ServerSession on the Connection but gives handlers no
    public way to it yet (its migration guide's `ctx.connection` is not there; its own
    tests read `ctx.session._connection`), so it is read here, in this one place.
    """
    connection = getattr(ctx.session, "_connection", None)
    if not isinstance(connection, Connection):
        raise RuntimeError("this mcp SDK does not give handlers the connection (mcp 2.3 did)")
    return connection
