"""Turns how a kernel run ended (RunOutcome) into the ExecutionResult callers receive:
status, error, the service's notice in plain words, images and the LLM text."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kernel_service.execution.outcome import RunOutcome
from kernel_service.execution.render import fit_text, uncut_text
from kernel_service_client.models import (
    ErrorOutput,
    ExecutionError,
    ExecutionResult,
    FileRef,
    FullOutput,
    Image,
    Output,
    Status,
    TruncatedOutput,
)

STATE_LOST = (
    "The kernel was restarted: all variables, imports and definitions from earlier calls "
    "are lost; re-run the code they depend on."
)


@dataclass(frozen=True)
class ResultDraft:
    """An execution's result before it is known where its whole output is kept.

    `needs_full_output` says whether its outputs or text had to be cut: then the caller
    keeps the whole output (off the event loop) and `finish`es with where it is."""

    fields: dict[str, Any]  # the ExecutionResult's fields but text and full_output
    uncut: str
    text_limit: int
    truncated: TruncatedOutput | None

    @property
    def needs_full_output(self) -> bool:
        return len(self.uncut) > self.text_limit or self.truncated is not None

    def finish(self, full_output: FullOutput | None = None) -> ExecutionResult:
        text = fit_text(self.uncut, self.text_limit, full_output, self.truncated)
        return ExecutionResult(**self.fields, text=text, full_output=full_output)


def build_result(
    *,
    session_id: str,
    outcome: RunOutcome,
    outputs: list[Output],
    timeout: float,
    timeout_capped: bool,
    images: list[Image],
    duration_ms: float,
    lost_before: str | None,
    text_limit: int,
    notice: str | None = None,
    files: Sequence[FileRef] = (),
) -> ResultDraft:
    """The result of one execution, from its outcome and the outputs gathered for it.

    `lost_before` says why state was lost before the execution ran, if it was; `notice`,
    anything else the caller should know first (an earlier execution cut short). `files`:
    those it created or changed.
    """
    collector = outcome.collector
    status: Status
    error: ExecutionError | None
    notices: list[str] = []
    if lost_before:
        notices.append(lost_before)
    if notice:
        notices.append(notice)
    limit_words = f"{timeout:g} s time limit" + (
        " (the most this service allows)" if timeout_capped else ""
    )

    if outcome.ending == "interrupted":
        status = "timeout"
        message = (
            f"Execution exceeded the {limit_words} and was interrupted. The kernel survived: "
            "variables from earlier calls are intact, but this call stopped part-way."
        )
        error = ExecutionError(ename="TimeoutError", evalue=message)
        notices.append(f"TimeoutError: {message}")
    elif outcome.ending == "killed":
        status = "timeout"
        message = (
            f"Execution exceeded the {limit_words} and did not respond to the interrupt "
            f"(e.g. a long call inside C code). {STATE_LOST}"
        )
        error = ExecutionError(ename="TimeoutError", evalue=message)
        notices.append(f"TimeoutError: {message}")
    elif outcome.ending == "died":
        status = "error"
        message = f"The kernel died during execution: {outcome.exit_reason}. {STATE_LOST}"
        error = ExecutionError(ename="KernelDied", evalue=message)
        notices.append(f"KernelDied: {message}")
    else:
        error = _user_error(outputs) or _as_error(collector.reply_error())
        reply_status = (collector.reply or {}).get("status")
        if reply_status == "aborted" and error is None:
            error = ExecutionError(
                ename="ExecutionAborted", evalue="The kernel aborted this execution."
            )
        status = "error" if error is not None else "ok"
        if error is not None and error.ename == "MemoryError":
            notices.append(
                "Out of memory: the code needed more memory than this session may use. The "
                "kernel survived; free memory (del large objects) or work on smaller pieces."
            )
        if error is not None and not any(isinstance(o, ErrorOutput) for o in outputs):
            notices.append(f"{error.ename}: {error.evalue}")
        if outcome.ending == "output_lost":
            # never an "ok" with output missing: a lost output is an error of its own
            lost = ExecutionError(
                ename="OutputLost",
                evalue=f"Part of this call's output was lost: {outcome.lost}. The code "
                "ran to its end, but what it printed or displayed after that point, the "
                "value included, is missing here. Print or display less at once.",
            )
            notices.append(f"OutputLost: {lost.evalue}")
            status = "error"
            error = error or lost

    return ResultDraft(
        fields={
            "session_id": session_id,
            "status": status,
            "execution_count": collector.execution_count,
            "outputs": outputs,
            "error": error,
            "images": images,
            "duration_ms": round(duration_ms, 3),
            "state_lost": outcome.kernel_lost or lost_before is not None,
            "files": list(files),
        },
        uncut=uncut_text(outputs, images, "\n".join(notices) or None, files),
        text_limit=text_limit,
        truncated=next((o for o in outputs if isinstance(o, TruncatedOutput)), None),
    )


def _user_error(outputs: Sequence[Output]) -> ExecutionError | None:
    errors = [o for o in outputs if isinstance(o, ErrorOutput)]
    return _as_error(errors[-1]) if errors else None


def _as_error(output: ErrorOutput | None) -> ExecutionError | None:
    if output is None:
        return None
    return ExecutionError(ename=output.ename, evalue=output.evalue, traceback=output.traceback)
