"""kernel-service as a Qwen-Agent tool, in place of Qwen-Agent's own `code_interpreter`.

    from qwen_agent.agents import Assistant
    from kernel_service_client.tools.qwen_agent import KernelServiceCodeInterpreter

    tool = KernelServiceCodeInterpreter({"base_url": "http://127.0.0.1:8000"})
    bot = Assistant(llm=llm_cfg, function_list=[tool])        # one tool per conversation
    ...
    tool.close()                                              # ends the kernel session

The tool is registered as `kernel_service_code_interpreter`, so a config works too:
`function_list=[{"name": "kernel_service_code_interpreter", "base_url": ...}]`. To keep the
name `code_interpreter` (the one Qwen's models and prompts know), pass `"name":
"code_interpreter"` in the config, or call `register(base_url=...)`, which makes
`function_list=["code_interpreter"]` mean this tool instead of Qwen-Agent's built-in.

The answer has the built-in's shape (`stdout:`, `stderr:`, `execute_result:`, `error:`
sections in fenced blocks, plots as `![fig-001](url)`, `Finished execution.` when there is
nothing to show), with absolute image URLs served by kernel-service. Arguments are taken as
Qwen-Agent's own tool takes them: a JSON (or json5) object with `code`, or the code in a
``` block, or the bare code. Arguments that cannot be run get a message the model can act
on; a fault of the service itself raises Qwen-Agent's `ToolServiceError`, which reaches
the application rather than the model.
"""

import re
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar

import json5
from qwen_agent.tools.base import TOOL_REGISTRY, BaseTool, ToolServiceError
from qwen_agent.tools.code_interpreter import CodeInterpreter as _BuiltinCodeInterpreter

from kernel_service_client.client import DEFAULT_URL, Client, KernelServiceError, Session
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    ExecutionResult,
    StreamOutput,
    TruncatedOutput,
    truncation_note,
)
from kernel_service_client.outputs import cut_middle, image_payload
from kernel_service_client.tools.common import BadToolCall, code_argument

TOOL_NAME = "kernel_service_code_interpreter"
BUILTIN_NAME = "code_interpreter"
# Each block (a stream, a value, a traceback) is cut in the middle past this many characters.
BLOCK_LIMIT = 10_000
NOTHING_TO_SHOW = "Finished execution."  # the built-in's words for a call without output
STATE_LOST = (
    "[The kernel's state was lost before or during this call (its session had expired, or "
    "the kernel was restarted): variables, imports and files from earlier calls are gone. "
    "Re-run what this code depends on.]"
)
_FENCED = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)
_ONLY_FENCED = re.compile(r"\s*```[^\n`]*\n(.*?)```\s*", re.DOTALL)
T = TypeVar("T")


class KernelServiceCodeInterpreter(BaseTool):  # type: ignore[misc]
    """Runs Python in one persistent, sandboxed kernel session of a kernel-service.

    Config (a dict, as Qwen-Agent passes tool configs): `base_url` (default
    http://127.0.0.1:8000), `api_key`, `session_id` (a session of your choosing, e.g. one
    per conversation id; made when missing), `timeout` (seconds per call; default the
    service's), `name` (what the model calls the tool). The description and arguments are
    the service's own (`GET /tools`), so the model is told the real limits.
    """

    name = TOOL_NAME
    defaults: ClassVar[dict[str, Any]] = {}  # what `register` bakes into its class

    def __init__(self, cfg: dict[str, Any] | None = None) -> None:
        cfg = {**self.defaults, **(cfg or {})}
        if cfg.get("name"):
            self.name = str(cfg["name"])
        self.base_url = str(cfg.get("base_url") or DEFAULT_URL)
        self.timeout: float | None = cfg.get("timeout")
        self._api_key: str | None = cfg.get("api_key")
        self._session_id: str | None = cfg.get("session_id")
        self._session: Session | None = None
        with Client(self.base_url, self._api_key) as client:
            spec = _service_call(client.tool_spec, self.base_url)
        self.description = spec.description
        self.parameters = spec.parameters
        super().__init__({key: value for key, value in cfg.items() if key != "api_key"})

    @property
    def session_id(self) -> str | None:
        """The kernel session's id; None until the first call (unless one was chosen)."""
        return self._session.id if self._session is not None else self._session_id

    def call(
        self, params: str | dict[str, Any], timeout: float | None = None, **kwargs: Any
    ) -> str:
        """Run the call's code in this tool's session; the text for the model."""
        try:
            code = code_from_params(params)
        except BadToolCall as exc:
            return str(exc)
        session = self._open_session()
        result = _service_call(
            lambda: session.execute(code, timeout or self.timeout), self.base_url
        )
        return result_text(result, session.client.url)

    def close(self) -> None:
        """End the kernel session (its variables and files) and the connections. A later
        call starts a new session."""
        if self._session is None:
            if self._session_id is None:
                return
            self._session = Client(self.base_url, self._api_key).session(self._session_id)
        session, self._session = self._session, None
        try:
            _service_call(session.close, self.base_url)
        finally:
            session.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_session(self) -> Session:
        if self._session is None:
            self._session = Client(self.base_url, self._api_key).session(self._session_id)
        return self._session


# The tool under its own name, for `{"name": "kernel_service_code_interpreter", ...}` configs.
TOOL_REGISTRY[TOOL_NAME] = KernelServiceCodeInterpreter


def register(
    name: str = BUILTIN_NAME,
    *,
    base_url: str = DEFAULT_URL,
    api_key: str | None = None,
    timeout: float | None = None,
) -> type[KernelServiceCodeInterpreter]:
    """Register the tool in Qwen-Agent's registry as `name`, with these settings, so that
    `function_list=[name]` (or `{"name": name, ...}`) makes it. The default name replaces
    Qwen-Agent's built-in `code_interpreter`; a name held by any other tool is refused."""
    held = TOOL_REGISTRY.get(name)
    if held is not None and not _replaceable(held):
        raise ValueError(
            f"Qwen-Agent already has a tool {name!r} ({held.__module__}.{held.__qualname__}); "
            "register kernel-service's code interpreter under another name."
        )
    defaults = {"base_url": base_url, "api_key": api_key, "timeout": timeout}
    tool = type(
        KernelServiceCodeInterpreter.__name__,
        (KernelServiceCodeInterpreter,),
        {"name": name, "defaults": defaults, "__module__": __name__},
    )
    TOOL_REGISTRY[name] = tool
    return tool


def _replaceable(tool: object) -> bool:
    return isinstance(tool, type) and issubclass(
        tool, KernelServiceCodeInterpreter | _BuiltinCodeInterpreter
    )


def code_from_params(params: str | dict[str, Any]) -> str:
    """The code of a call, taken as Qwen-Agent's own tool takes it: a JSON or json5 object
    with `code`, the first ``` block, or else the text itself."""
    if isinstance(params, dict):
        return _unfenced(code_argument(params))
    if not isinstance(params, str) or not params.strip():
        raise BadToolCall(
            'The call has no code: send {"code": "<python source>"}, or the code in a ``` block.'
        )
    text = params.strip()
    parsed: Any = None
    error: ValueError | None = None
    try:
        parsed = json5.loads(text)
    except ValueError as exc:
        error = exc
    if isinstance(parsed, dict):
        return _unfenced(code_argument(parsed))
    if isinstance(parsed, str) and parsed.strip():
        return _unfenced(parsed)
    fenced = _FENCED.search(text)
    if fenced is not None:
        if not fenced.group(1).strip():
            raise BadToolCall("The ``` block is empty: put the Python code to run inside it.")
        return fenced.group(1)
    if error is not None and text.startswith("{"):
        # meant as a JSON object (cut short, or badly quoted): running it would only confuse
        raise BadToolCall(
            f"The arguments are not a valid JSON object ({error}). Send "
            '{"code": "<python source>"} with the code as one JSON string, or the code in a '
            "``` block."
        )
    return text


def _unfenced(code: str) -> str:
    # models often wrap the code in a ``` block even inside the JSON string
    whole = _ONLY_FENCED.fullmatch(code)
    return whole.group(1) if whole is not None and whole.group(1).strip() else code


def result_text(result: ExecutionResult, absolute: Callable[[str], str]) -> str:
    """The result as Qwen-Agent's code interpreter words it, outputs in the order they came."""
    blocks: list[str] = []
    pending_images = iter(result.images)
    figures = 0
    for output in result.outputs:
        if isinstance(output, StreamOutput):
            blocks.append(_section(output.name, output.text))
        elif isinstance(output, ExecuteResultOutput | DisplayDataOutput):
            image = next(pending_images, None) if image_payload(output) is not None else None
            if image is not None:
                figures += 1
                blocks.append(f"![fig-{figures:03d}]({absolute(image.url)})")
            else:
                blocks.append(_section(output.output_type, _plain(output.data)))
        elif isinstance(output, ErrorOutput):
            blocks.append(_section("error", _traceback(output)))
        elif isinstance(output, TruncatedOutput):
            blocks.append(truncation_note(output.omitted_chars, output.omitted_outputs))
    error = result.error
    if error is not None and not any(
        isinstance(o, ErrorOutput) and o.ename == error.ename for o in result.outputs
    ):
        # the service's own words: a timeout, a dead kernel, an aborted execution
        blocks.append(_section("error", f"{error.ename}: {error.evalue}"))
    if result.state_lost:
        blocks.append(STATE_LOST)
    return "\n\n".join(block for block in blocks if block) or NOTHING_TO_SHOW


def _section(kind: str, text: str) -> str:
    text = text.rstrip("\n")
    if not text.strip():
        return ""
    return f"{kind}:\n\n```\n{cut_middle(text, BLOCK_LIMIT)[0]}\n```"


def _plain(data: dict[str, Any]) -> str:
    plain = data.get("text/plain")
    if isinstance(plain, str) and plain:
        return plain
    return f"[display: {', '.join(sorted(data)) or 'empty'}]"


def _traceback(output: ErrorOutput) -> str:
    # IPython opens a traceback with a rule of dashes: noise to a model
    lines = [line for line in "\n".join(output.traceback).splitlines() if line.strip("- ")]
    return "\n".join(lines) or f"{output.ename}: {output.evalue}"


def _service_call(call: Callable[[], T], base_url: str) -> T:
    """Run a request to the service; its faults become Qwen-Agent's ToolServiceError, which
    Qwen-Agent raises to the application instead of showing it to the model."""
    try:
        return call()
    except KernelServiceError as exc:  # unreachable too (status 0)
        raise ToolServiceError(
            code=exc.code, message=f"kernel-service at {base_url}: {exc.message}"
        ) from exc
