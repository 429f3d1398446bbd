"""Pydantic models of what goes in and out: requests, outputs in the kernel's own terms, results.

No I/O here. Outputs keep the Jupyter protocol's words (`output_type`, `name`, `data`,
`ename`/`evalue`/`traceback`, MIME keys); views such as `stdout` are derived from them.
"""

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
IMAGE_URL_TEMPLATE = "/sessions/{session_id}/images/{image_id}"
RASTER_IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")
IMAGE_MIMES = (*RASTER_IMAGE_MIMES, "image/svg+xml")
# A character that is not blank (blank as `str.isspace` has it), spelt out so that the
# schema's pattern means the same in every regex dialect (`\s` differs between them).
_NOT_BLANK = r"[^\x09-\x0d\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


# ---------------------------------------------------------------- outputs


class _Output(BaseModel):
    model_config = ConfigDict(frozen=True)


class StreamOutput(_Output):
    output_type: Literal["stream"] = "stream"
    name: Literal["stdout", "stderr"]
    text: str


class DisplayDataOutput(_Output):
    output_type: Literal["display_data"] = "display_data"
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)
    display_id: str | None = None


class ExecuteResultOutput(_Output):
    output_type: Literal["execute_result"] = "execute_result"
    execution_count: int | None = None
    data: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)


class ErrorOutput(_Output):
    output_type: Literal["error"] = "error"
    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


class TruncatedOutput(_Output):
    """Where outputs were cut to keep an execution's output within the configured limit."""

    output_type: Literal["truncated"] = "truncated"
    omitted_chars: int
    omitted_outputs: int


Output = Annotated[
    StreamOutput | DisplayDataOutput | ExecuteResultOutput | ErrorOutput | TruncatedOutput,
    Field(discriminator="output_type"),
]


# ---------------------------------------------------------------- results


class ExecutionError(BaseModel):
    """A result's `error`: the user's exception, or the service's words on a timeout or death."""

    model_config = ConfigDict(frozen=True)

    ename: str
    evalue: str
    traceback: list[str] = Field(default_factory=list)


class Image(BaseModel):
    """An image the code displayed, also served at `url` until the session ends."""

    model_config = ConfigDict(frozen=True)

    mime: str
    data: str = Field(description="Base64 of the image bytes (of the UTF-8 text for SVG).")
    url: str
    width: int | None = None
    height: int | None = None


Status = Literal["ok", "error", "timeout"]


def truncation_note(omitted_chars: int, omitted_outputs: int) -> str:
    """The words that stand where output was cut."""
    parts = [f"{omitted_chars:,} characters"]
    if omitted_outputs:
        parts.append(f"{omitted_outputs:,} outputs")
    return f"[... output truncated: {' and '.join(parts)} omitted ...]"


class ExecutionResult(BaseModel):
    """Everything one `POST /execute` produced, in order, plus views for people and models."""

    model_config = ConfigDict(frozen=True)

    session_id: str
    status: Status
    execution_count: int | None
    outputs: list[Output]
    error: ExecutionError | None
    images: list[Image]
    text: str = Field(description="A concise rendering for an LLM.")
    duration_ms: float
    state_lost: bool = Field(
        description="The kernel was restarted during this request: earlier variables are gone."
    )
    files: list["FileRef"] = Field(
        default_factory=list,
        description="Files in the work directory this execution created or changed (hidden "
        "ones not included), each with the URL to download it.",
    )
    full_output: "FullOutput | None" = Field(
        None,
        description="Where the whole text output is kept when this result had to cut it "
        "(`outputs` or `text`); null when nothing was cut.",
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def stdout(self) -> str:
        return self._stream_text("stdout")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def stderr(self) -> str:
        return self._stream_text("stderr")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def result(self) -> str | None:
        for output in self.outputs:
            if isinstance(output, ExecuteResultOutput):
                plain = output.data.get("text/plain")
                return plain if isinstance(plain, str) else None
        return None

    def _stream_text(self, name: str) -> str:
        parts: list[str] = []
        for output in self.outputs:
            if isinstance(output, StreamOutput) and output.name == name:
                parts.append(output.text)
            elif isinstance(output, TruncatedOutput) and parts:
                parts.append(f"\n{truncation_note(output.omitted_chars, output.omitted_outputs)}\n")
        return "".join(parts)


# ---------------------------------------------------------------- requests and session views


class ExecuteInSessionRequest(BaseModel):
    """POST /sessions/{id}/execute: the path names the session."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        description="Source to run in the session's kernel, in its language (not empty or "
        "only blanks).",
        strict=True,
        # checked by the validator below, with a clearer message than a pattern's
        json_schema_extra={"pattern": _NOT_BLANK},
    )
    timeout: float | None = Field(
        None,
        gt=0,
        strict=True,
        description="Seconds before the execution is interrupted (capped by the server).",
    )
    stream: bool = Field(
        False,
        strict=True,
        description="Answer with Server-Sent Events as outputs arrive (`output` events), then "
        "the whole result (`result`); also when the request accepts text/event-stream.",
    )

    @field_validator("code")
    @classmethod
    def _code_is_runnable_text(cls, code: str) -> str:
        if re.search(_NOT_BLANK, code) is None:
            raise ValueError("code is empty: send the source to run, in the session's language")
        try:
            code.encode()
        except UnicodeEncodeError:
            raise ValueError("code is not valid Unicode text (it holds a lone surrogate)") from None
        return code


class ExecuteRequest(ExecuteInSessionRequest):
    """POST /execute."""

    session_id: str | None = Field(
        None, description="Session to run in; a new session is created when null."
    )
    language: str | None = Field(
        None,
        max_length=64,
        description="The language of `code`, for a new session: python (the default), "
        "bash, javascript, typescript, r, or an installed kernelspec's name (GET "
        "/kernelspecs lists them). For an existing session it must be its own, or null.",
    )


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    session_id: str | None = Field(
        None,
        pattern=SESSION_ID_PATTERN,
        description="Client-chosen id (letters, digits, '_', '.', '-'; at most 128).",
    )
    language: str | None = Field(
        None,
        max_length=64,
        description="The session's language: python (the default), bash, javascript, "
        "typescript, r, or an installed kernelspec's name (GET /kernelspecs lists them).",
    )


SessionStatus = Literal["starting", "idle", "busy", "dead"]


class SessionInfo(BaseModel):
    session_id: str
    status: SessionStatus
    execution_count: int
    created_at: datetime
    last_activity: datetime
    notice: str | None = Field(
        None,
        description="What the session's next execution will say first: why its kernel was "
        "replaced, or that an execution was cut short by a restart of the service.",
    )
    language: str = Field(
        "python", description="The language its code is in: python, bash, javascript, ..."
    )
    kernel: str = Field("python3", description="The Jupyter kernelspec that runs it.")


class KernelSpecInfo(BaseModel):
    name: str = Field(description="The Jupyter kernelspec's name: python3, bash, deno, ir, ...")
    display_name: str
    language: str = Field(description="The language its kernel runs, as its kernelspec says.")
    languages: list[str] = Field(
        description="The names `language` may take to choose it (POST /sessions, POST /execute)."
    )
    ready: bool = Field(description="Whether it can run here.")
    problem: str | None = Field(None, description="Why it cannot run here, when it cannot.")
    warm_kernels: int = Field(0, description="Its kernels started and waiting for new sessions.")


class KernelSpecList(BaseModel):
    default: str = Field(description="The language of a session that names none.")
    kernelspecs: list[KernelSpecInfo]


class SessionList(BaseModel):
    sessions: list[SessionInfo]


class InterruptResult(BaseModel):
    session_id: str
    interrupted: bool = Field(description="Whether an execution was running and was interrupted.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    sessions: int
    max_sessions: int
    warm_kernels: int = Field(description="Kernels started and waiting for new sessions.")
    sandbox: str = Field(description="The isolation of kernels: `bubblewrap` or `none`.")
    isolation: dict[str, Any] = Field(description="What is isolated and the limits in force.")
    executing: int = Field(0, description="Sessions running or queueing an execution now.")
    languages: list[str] = Field(
        ["python"],
        description="The languages sessions may use here (GET /kernelspecs says more).",
    )
    accepting: bool = Field(
        True, description="Whether it makes new sessions (not full, not draining)."
    )
    cell: dict[str, Any] | None = Field(
        None, description="As a cell of a cluster: its `index` and `tag` (ids start with it)."
    )


class Readiness(BaseModel):
    """GET /readyz: whether the service makes new sessions now (a proxy's placement check)."""

    status: Literal["ready", "full", "draining"]
    sessions: int
    max_sessions: int


class ErrorBody(BaseModel):
    """Every non-2xx answer of the API."""

    detail: Any
    code: str


# ---------------------------------------------------------------- history


ExecutionStatus = Literal["running", "ok", "error", "timeout", "cancelled", "failed", "lost"]


class HistoryEntry(BaseModel):
    """One execution of a session, as the state store keeps it."""

    seq: int = Field(description="Its number in the session, from 1, in the order they ran.")
    code: str
    status: ExecutionStatus = Field(
        description="`ok`, `error`, `timeout` (as in the result); `running` now; `cancelled` "
        "(its client left, or the session ended while it ran); `failed` (the service could "
        "not run it); `lost` (cut short by a restart of the service)."
    )
    started_at: datetime
    duration_ms: float | None = Field(description="As in the result; null without one.")
    execution_count: int | None = Field(description="The kernel's `In[n]` number, or null.")
    outputs: list[Output] | None = Field(
        description="As in the result's `outputs` (images base64 inside display_data); null "
        "when no result is stored: running, cancelled, failed, lost, or dropped for room."
    )
    error: ExecutionError | None = Field(
        None, description="As in the result (timeouts and kernel deaths are only here)."
    )
    state_lost: bool | None = Field(None, description="As in the result; null without one.")
    result_dropped: bool = Field(
        description="It ended with a result, since dropped to keep the session's history "
        "within `KERNEL_SERVICE_HISTORY_MB`: its code and status remain."
    )


class SessionHistory(BaseModel):
    session_id: str
    executions: list[HistoryEntry]


# ---------------------------------------------------------------- files

FILE_URL_TEMPLATE = "/sessions/{session_id}/files/{path}"


class FileRef(BaseModel):
    """A file in a session's work directory."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(
        description="Relative to the work directory, the code's current directory "
        "(`/workspace` in the sandbox): `open(path)` reads it."
    )
    size: int = Field(description="Bytes.")
    modified: datetime | None = Field(None, description="When it was last written.")
    url: str = Field(description="Where to download it (GET).")


class FileList(BaseModel):
    session_id: str
    files: list[FileRef] = Field(description="Regular files, in path order.")
    limit: int = Field(description="The most files one listing gives.")
    truncated: bool = Field(description="There are more files than listed.")


class FullOutput(BaseModel):
    """An execution's whole text output, kept as a file when its result had to cut it."""

    model_config = ConfigDict(frozen=True)

    path: str = Field(description="Relative to the work directory, e.g. `.outputs/3.txt`.")
    url: str = Field(description="Where to download it (GET).")
    size: int = Field(description="Bytes of the file.")
    complete: bool = Field(
        description="False when only its start is kept: past `KERNEL_SERVICE_FULL_OUTPUT_MB` "
        "(its last line then says how much more there was), or the work directory was full."
    )


ExecutionResult.model_rebuild()
