"""The OpenAI tool-call loop (OpenAI SDK against OpenAI, vLLM, SGLang, Ollama and the like).

    from kernel_service_client.client import Client
    from kernel_service_client.tools.openai import openai_tools, run_tool_call

    service = Client("http://127.0.0.1:8000")
    session = service.session()                      # one per conversation
    tools = openai_tools(service)                    # pass as tools=
    ...
    for call in reply.tool_calls or []:
        messages.append(run_tool_call(call, session))   # the role "tool" message

`run_tool_call` answers with text: what was printed, the value, the error, and for each
plot a note with its URL. `run_tool_calls(..., vision=True)` also shows the plots to a
vision model: the OpenAI API takes images only in user messages, so after the tool
messages comes one user message with the plots as `image_url` parts (data URLs).
"""

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from kernel_service_client.client import AsyncClient, AsyncSession, Client, Session
from kernel_service_client.models import RASTER_IMAGE_MIMES, ExecutionResult, Image
from kernel_service_client.tools.common import (
    BadToolCall,
    code_argument,
    data_url,
    text_with_urls,
)
from kernel_service_client.tools.spec import TOOL_NAME, openai_format


class _FunctionLike(Protocol):
    name: str
    arguments: str


class ToolCallLike(Protocol):
    """What the OpenAI SDK's `ChatCompletionMessageToolCall` has (a dict works too)."""

    id: str
    function: _FunctionLike


# What a reply's `tool_calls` hold: the SDK's objects (a function call is a `ToolCallLike`;
# a custom tool call has none of its fields and is answered as an unknown tool) or dicts.
ToolCall = ToolCallLike | Mapping[str, Any] | object


def openai_tools(client: Client) -> list[dict[str, Any]]:
    """The `tools` list to pass to `chat.completions.create`, as the service describes it."""
    return [openai_format(client.tool_spec())]


async def aopenai_tools(client: AsyncClient) -> list[dict[str, Any]]:
    return [openai_format(await client.tool_spec())]


def run_tool_call(tool_call: ToolCall, session: Session) -> dict[str, Any]:
    """Run one tool call in `session`; the `role: "tool"` message that answers it."""
    return _answer(tool_call, session)[0]


def run_tool_calls(
    tool_calls: Iterable[ToolCall], session: Session, *, vision: bool = False
) -> list[dict[str, Any]]:
    """The messages answering one reply's tool calls, run in order (they share the session's
    state): a tool message per call, and with `vision` a user message with their plots."""
    answers = [_answer(call, session) for call in tool_calls]
    return _with_images(answers, vision)


async def arun_tool_call(tool_call: ToolCall, session: AsyncSession) -> dict[str, Any]:
    """The asyncio twin of `run_tool_call`."""
    return (await _aanswer(tool_call, session))[0]


async def arun_tool_calls(
    tool_calls: Iterable[ToolCall], session: AsyncSession, *, vision: bool = False
) -> list[dict[str, Any]]:
    """The asyncio twin of `run_tool_calls`."""
    answers = [await _aanswer(call, session) for call in tool_calls]
    return _with_images(answers, vision)


_Answer = tuple[dict[str, Any], ExecutionResult | None]


def _answer(tool_call: ToolCall, session: Session) -> _Answer:
    call_id, name, arguments = _unpack(tool_call)
    try:
        code = _code(name, arguments)
    except BadToolCall as exc:
        return tool_message(call_id, str(exc)), None
    result = session.execute(code)
    return tool_message(call_id, text_with_urls(result, session.client.url)), result


async def _aanswer(tool_call: ToolCall, session: AsyncSession) -> _Answer:
    call_id, name, arguments = _unpack(tool_call)
    try:
        code = _code(name, arguments)
    except BadToolCall as exc:
        return tool_message(call_id, str(exc)), None
    result = await session.execute(code)
    return tool_message(call_id, text_with_urls(result, session.client.url)), result


def _with_images(answers: list[_Answer], vision: bool) -> list[dict[str, Any]]:
    messages = [message for message, _ in answers]
    if vision:
        images = [image for _, result in answers if result for image in result.images]
        if (message := image_message(images)) is not None:
            messages.append(message)
    return messages


def image_message(images: Iterable[Image]) -> dict[str, Any] | None:
    """A user message showing plots to a vision model (tool messages may not carry images in
    the OpenAI API), or None when there is no raster image to show."""
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(image.mime, image.data)}}
        for image in images
        if image.mime in RASTER_IMAGE_MIMES  # vision models take no SVG
    ]
    if not parts:
        return None
    text = "The plots made by the code_interpreter calls above, in order:"
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


def tool_message(call_id: str, text: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _unpack(tool_call: ToolCall) -> tuple[str, str, Any]:
    if isinstance(tool_call, Mapping):
        function = tool_call.get("function") or {}
        return str(tool_call.get("id", "")), function.get("name", ""), function.get("arguments")
    function = getattr(tool_call, "function", None)
    call_id = str(getattr(tool_call, "id", ""))
    if function is None:  # not a function call (e.g. a custom tool's free-form input)
        return call_id, str(getattr(getattr(tool_call, "custom", None), "name", "")), None
    return call_id, function.name, function.arguments


def _code(name: str, arguments: Any) -> str:
    if name != TOOL_NAME:
        raise BadToolCall(f"There is no tool {name!r}; the only tool is {TOOL_NAME!r}.")
    return code_argument(arguments)
