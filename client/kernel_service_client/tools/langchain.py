"""kernel-service as a LangChain tool, sync (`invoke`) and async (`ainvoke`).

    from kernel_service_client.tools.langchain import KernelServiceTool

    tool = KernelServiceTool.from_service("http://127.0.0.1:8000")   # one per conversation
    agent = create_agent(model, tools=[tool])                          # or llm.bind_tools([tool])
    ...
    tool.close()                                                       # ends the kernel session

Unlike LangChain's one-shot Python REPL tool, state persists between calls: the tool holds
one kernel session (sync and async calls share it). The tool's content is the text a model
reads (printed text, value, error, image URLs); its artifact is the whole
`ExecutionResult` (images as base64 included), for code that wants more.
"""

import uuid
from collections.abc import Callable
from typing import Any, Literal

import httpx
from langchain_core.tools import BaseTool
from pydantic import BaseModel, Field, PrivateAttr, SecretStr, ValidationError
from pydantic.v1 import ValidationError as ValidationErrorV1

from kernel_service_client.client import AsyncClient, AsyncSession, Client, Session
from kernel_service_client.models import ExecutionResult
from kernel_service_client.tools.common import text_with_urls
from kernel_service_client.tools.spec import ToolSpec


class CodeInput(BaseModel):
    code: str = Field(description="The Python code to run. Its last expression's value is shown.")


def _explain_bad_arguments(error: ValidationError | ValidationErrorV1) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or 'arguments'}: {e['msg']}"
        for e in error.errors()
    )
    return f'Invalid arguments ({problems}). Call the tool with {{"code": "<python source>"}}.'


class KernelServiceTool(BaseTool):
    """Runs Python in one persistent, sandboxed kernel session of a kernel-service."""

    name: str = "code_interpreter"
    description: str = "Run Python code in a persistent IPython kernel."
    args_schema: type[BaseModel] = CodeInput
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    # arguments that do not fit the schema are answered to the model, not raised
    handle_validation_error: Callable[[ValidationError | ValidationErrorV1], str] = (
        _explain_bad_arguments
    )

    base_url: str = "http://127.0.0.1:8000"
    api_key: SecretStr | None = None
    session_id: str = Field(
        default_factory=lambda: f"langchain-{uuid.uuid4().hex}",
        description="The kernel session this tool runs in; made on first use.",
    )
    timeout: float | None = Field(None, description="Seconds per call (None: the service's).")

    _session: Session | None = PrivateAttr(None)
    _async_session: AsyncSession | None = PrivateAttr(None)

    @classmethod
    def from_service(
        cls, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, **fields: Any
    ) -> "KernelServiceTool":
        """The tool with the name, description and arguments the service gives (its limits)."""
        with Client(base_url, api_key) as client:
            spec: ToolSpec = client.tool_spec()
        return cls(
            name=spec.name,
            description=spec.description,
            base_url=base_url,
            api_key=SecretStr(api_key) if api_key else None,
            **fields,
        )

    def _run(self, code: str, **_: Any) -> tuple[str, ExecutionResult]:
        session = self._sync_session()
        result = session.execute(code, self.timeout)
        return text_with_urls(result, session.client.url), result

    async def _arun(self, code: str, **_: Any) -> tuple[str, ExecutionResult]:
        session = self._asession()
        result = await session.execute(code, self.timeout)
        return text_with_urls(result, session.client.url), result

    def close(self) -> None:
        """End the kernel session and the connections."""
        session = self._sync_session()
        session.close()
        session.client.close()
        self._session = self._async_session = None  # the async client keeps no connection

    async def aclose(self) -> None:
        session = self._asession()
        await session.close()
        await session.client.close()
        self._async_session = None
        if self._session is not None:
            self._session.client.close()
            self._session = None

    def _sync_session(self) -> Session:
        if self._session is None:
            self._session = Client(self.base_url, self._key()).session(self.session_id)
        return self._session

    def _asession(self) -> AsyncSession:
        if self._async_session is None:
            # No connection is kept between calls: a pooled one would belong to the event
            # loop that made it, and each `asyncio.run` has another.
            http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0))
            client = AsyncClient(self.base_url, self._key(), http=http)
            self._async_session = client.session(self.session_id)
        return self._async_session

    def _key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None
