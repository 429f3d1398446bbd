"""kernel-service as a Lagent action (Lagent 0.2.x: `BaseAction`, `@tool_api`, `ActionReturn`).

    from lagent.actions import ActionExecutor
    from lagent.agents import ReAct
    from lagent.llms import GPTAPI
    from kernel_service_client.tools.lagent import KernelServiceInterpreter

    with KernelServiceInterpreter("http://127.0.0.1:8000") as interpreter:   # one kernel session
        agent = ReAct(llm=GPTAPI(...), action_executor=ActionExecutor([interpreter]))
        print(agent.chat("Plot sin(x) on [0, 2π]").response)

The action's name, description and argument come from the service (`GET /tools`), so the
model reads the service's real limits. It works in any Lagent agent: as a plugin
(`ReAct`, `Internlm2Agent(plugin_executor=...)`, called with `{"code": ...}`) and as
`Internlm2Agent`'s interpreter (`<|action_start|><|interpreter|>`, whose code arrives as
`{"command": ...}`, the argument of Lagent's own `IPythonInterpreter`).

Results take the shape Lagent's `IPythonInterpreter` gives: `ActionReturn.result` is
`[{"type": "text", "content": ...}, {"type": "image", "content": path}, ...]`. The text is
what a model reads (printed text, the value, the error, image URLs on the service). Images
are saved as files in `work_dir` and given by path, because that is what Lagent's UIs and
code expect (its web demos `open()` the content of image items). Code that fails or times
out gives `state=ActionStatusCode.API_ERROR` with the text in `errmsg` (what the agents send
the model); a service that refuses or cannot be reached gives `HTTP_ERROR`.
"""

import base64
import os
import re
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from lagent.actions.base_action import BaseAction, tool_api
from lagent.actions.parser import JsonParser, ParseError
from lagent.schema import ActionReturn, ActionStatusCode

from kernel_service_client.client import DEFAULT_URL, Client, KernelServiceError, Session
from kernel_service_client.models import ExecutionResult, Image
from kernel_service_client.tools.common import BadToolCall, code_argument, text_with_urls
from kernel_service_client.tools.spec import ToolSpec

# Where Lagent's own IPythonInterpreter saves images; the same default, so switching keeps it.
DEFAULT_WORK_DIR = "./work_dir/tmp_dir"
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
}
_LAGENT_TYPES = {"string": "STRING", "integer": "NUMBER", "number": "FLOAT", "boolean": "BOOLEAN"}
# A whole input in one Markdown fence: models often wrap code (or JSON) in one.
_FENCED = re.compile(r"\A\s*```(?P<lang>[^\n`]*)\n(?P<body>.*?)\n?[ \t]*```\s*\Z", re.DOTALL)
_PYTHON_FENCES = {"python", "python3", "py", "ipython"}


def lagent_description(spec: ToolSpec) -> dict[str, Any]:
    """The tool as Lagent describes a single-API action (what `get_actions_info` shows)."""
    return {
        "name": spec.name,
        "description": spec.description,
        "parameters": [
            {
                "name": name,
                "type": _LAGENT_TYPES.get(schema.get("type", "string"), "STRING"),
                "description": schema.get("description", ""),
            }
            for name, schema in spec.parameters["properties"].items()
        ],
        "required": list(spec.parameters.get("required", [])),
    }


class CodeParser(JsonParser):  # type: ignore[misc]
    """Reads the code out of what an agent hands the action: a JSON object or its text,
    `Internlm2Agent`'s `{"command": code}`, or a ```python fence; errors are worded for
    the model."""

    def parse_inputs(self, inputs: str | dict[str, Any], name: str = "run") -> dict[str, Any]:
        if isinstance(inputs, dict) and "code" not in inputs and "command" in inputs:
            inputs = {"code": inputs["command"]}
        elif isinstance(inputs, str) and (fenced := _FENCED.match(inputs)):
            if fenced["lang"].strip().lower() in _PYTHON_FENCES:
                inputs = {"code": fenced["body"]}
            else:
                inputs = fenced["body"]
        try:
            return {"code": _unfenced(code_argument(inputs))}
        except BadToolCall as exc:
            raise ParseError(str(exc)) from None


class KernelServiceInterpreter(BaseAction):  # type: ignore[misc]
    """Run Python in a persistent kernel session of kernel-service.

    Args:
        url (str): The service's base URL.
        api_key (str, optional): The service's API key, if it has keys.
        client (Client, optional): A client to use instead of one of its own (not closed here).
        session_id (str, optional): The session to run in (made on first use); by default
            the service picks one.
        timeout (float, optional): Seconds each call may run (capped by the service); by
            default the service's own.
        work_dir (str): Where images are saved. Defaults to ``./work_dir/tmp_dir``.
        description (dict, optional): Lagent's tool description; by default the service's.
        enable (bool): Whether the action is enabled. Defaults to ``True``.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        api_key: str | None = None,
        *,
        client: Client | None = None,
        session_id: str | None = None,
        timeout: float | None = None,
        work_dir: str | os.PathLike[str] = DEFAULT_WORK_DIR,
        description: dict[str, Any] | None = None,
        enable: bool = True,
    ) -> None:
        self._owns_client = client is None
        self._client = client or Client(url, api_key)
        try:
            if description is None:
                description = lagent_description(self._client.tool_spec())
            super().__init__(description, CodeParser, enable)
        except BaseException:
            self._close_client()
            raise
        self._session = self._client.session(session_id)
        self.timeout = timeout
        self.work_dir = Path(work_dir)

    @property
    def session(self) -> Session:
        """The kernel session this action runs in."""
        return self._session

    @tool_api  # type: ignore[untyped-decorator]
    def run(self, code: str) -> ActionReturn:
        """Run Python code in this action's kernel session.

        Args:
            code (str): The Python code to run. Its last expression's value is shown.
        """
        try:
            result = self._session.execute(code, self.timeout)
        except KernelServiceError as exc:
            if exc.code == "service_unreachable":
                return self._failed(code, f"{exc.message} The code did not run.")
            return self._failed(code, f"kernel-service refused the call: {exc}")
        return self.action_return(code, result)

    def action_return(self, code: str, result: ExecutionResult) -> ActionReturn:
        """A result in Lagent's form; its images are saved in `work_dir`."""
        text = text_with_urls(result, self._client.url)
        items: list[dict[str, str]] = [{"type": "text", "content": text}]
        items += [{"type": "image", "content": self._save(image)} for image in result.images]
        if result.status == "ok":
            return ActionReturn(
                args={"code": code}, type=self.name, result=items, state=ActionStatusCode.SUCCESS
            )
        # agents send `errmsg` to the model when the state is not SUCCESS; `result` keeps
        # what the code printed and plotted before it failed, for a UI
        return ActionReturn(
            args={"code": code},
            type=self.name,
            result=items,
            errmsg=text,
            state=ActionStatusCode.API_ERROR,
        )

    def reset(self) -> None:
        """A fresh kernel: every variable is gone (as `IPythonInterpreter.reset`)."""
        self._session.restart()

    def close(self) -> None:
        """End the kernel session (and the client, when the action made it)."""
        try:
            self._session.close()
        finally:
            self._close_client()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _save(self, image: Image) -> str:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        path = self.work_dir / f"{uuid.uuid4().hex}{_EXTENSIONS.get(image.mime, '')}"
        path.write_bytes(base64.b64decode(image.data))
        return str(path.resolve())

    def _failed(self, code: str, message: str) -> ActionReturn:
        return ActionReturn(
            args={"code": code},
            type=self.name,
            errmsg=message,
            state=ActionStatusCode.HTTP_ERROR,
        )

    def _close_client(self) -> None:
        if self._owns_client:
            self._client.close()


def _unfenced(code: str) -> str:
    fenced = _FENCED.match(code)
    return fenced["body"] if fenced else code
