"""The OpenAI tool-call loop (OpenAI SDK against OpenAI, vLLM, SGLang, Ollama and the like).

    from kernel_service.client import Client
    from kernel_service.integrations.openai import openai_tools, run_tool_call

    service = Client("http://127.0.0.1:8000")
    session = service.session()                      # one per conversation
    tools = openai_tools(service)                    # pass as tools=
    ...
    for call in reply.tool_calls or []:
        messages.append(run_tool_call(call, session))   # the role "tool" message

`run_tool_call` answers with text: what was printed, the value, the error, and for each
plot a note with its URL. With `vision=True` the plots are added as `image_url` parts with
data URLs, for models that can look at images.
"""

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from kernel_service.client import AsyncClient, AsyncSession, Client, Session
from kernel_service.integrations.common import (
    BadToolCall,
    code_argument,
    data_url,
    text_with_urls,
)
from kernel_service.models import ExecutionResult
from kernel_service.tool import TOOL_NAME, openai_format


class _FunctionLike(Protocol):
    name: str
    arguments: str


class ToolCallLike(Protocol):
    """What the OpenAI SDK's `ChatCompletionMessageToolCall` has (a dict works too)."""

    id: str
    function: _FunctionLike


ToolCall = ToolCallLike | Mapping[str, Any]


def openai_tools(client: Client) -> list[dict[str, Any]]:
    """The `tools` list to pass to `chat.completions.create`, as the service describes it."""
    return [openai_format(client.tool_spec())]


async def aopenai_tools(client: AsyncClient) -> list[dict[str, Any]]:
    return [openai_format(await client.tool_spec())]


def run_tool_call(tool_call: ToolCall, session: Session, *, vision: bool = False) -> dict[str, Any]:
    """Run one tool call in `session`; the `role: "tool"` message that answers it."""
    call_id, name, arguments = _unpack(tool_call)
    try:
        code = _code(name, arguments)
    except BadToolCall as exc:
        return tool_message(call_id, str(exc))
    return result_message(call_id, session.execute(code), session.client.url, vision=vision)


def run_tool_calls(
    tool_calls: Iterable[ToolCall], session: Session, *, vision: bool = False
) -> list[dict[str, Any]]:
    """Parallel tool calls of one reply, run in order (they share the session's state)."""
    return [run_tool_call(call, session, vision=vision) for call in tool_calls]


async def arun_tool_call(
    tool_call: ToolCall, session: AsyncSession, *, vision: bool = False
) -> dict[str, Any]:
    """The asyncio twin of `run_tool_call`."""
    call_id, name, arguments = _unpack(tool_call)
    try:
        code = _code(name, arguments)
    except BadToolCall as exc:
        return tool_message(call_id, str(exc))
    result = await session.execute(code)
    return result_message(call_id, result, session.client.url, vision=vision)


def result_message(
    call_id: str,
    result: ExecutionResult,
    absolute: Callable[[str], str],
    *,
    vision: bool = False,
) -> dict[str, Any]:
    """The tool message for a result: text, plus image parts when `vision`."""
    text = text_with_urls(result, absolute)
    if not vision or not result.images:
        return tool_message(call_id, text)
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [
        {"type": "image_url", "image_url": {"url": data_url(image.mime, image.data)}}
        for image in result.images
        if image.mime != "image/svg+xml"  # vision models take raster images
    ]
    return {"role": "tool", "tool_call_id": call_id, "content": parts}


def tool_message(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _unpack(tool_call: ToolCall) -> tuple[str, str, Any]:
    if isinstance(tool_call, Mapping):
        function = tool_call.get("function") or {}
        return str(tool_call.get("id", "")), function.get("name", ""), function.get("arguments")
    return tool_call.id, tool_call.function.name, tool_call.function.arguments


def _code(name: str, arguments: Any) -> str:
    if name != TOOL_NAME:
        raise BadToolCall(f"There is no tool {name!r}; the only tool is {TOOL_NAME!r}.")
    return code_argument(arguments)
