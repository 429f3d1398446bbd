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

# An execution's status, its error, what its text must say of how it ended, and the ending
# the service saw itself (a timeout, the kernel's death, lost output), if it saw one.
_Ending = tuple[Status, ExecutionError | None, list[str], ExecutionError | None]

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
    # What the service saw end the execution (not the code's own error): a timeout, the
    # kernel's death, lost output. A front door that relays the kernel's own messages says
    # it in its own (the code's error is already among them).
    service_error: ExecutionError | None = None

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
    notices = [words for words in (lost_before, notice) if words]
    limit_words = f"{timeout:g} s time limit" + (
        " (the most this service allows)" if timeout_capped else ""
    )
    status, error, said, service_error = _ending(outcome, outputs, limit_words)
    notices += said

    return ResultDraft(
        fields={
            "session_id": session_id,
            "status": status,
            "execution_count": outcome.collector.execution_count,
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
        service_error=service_error,
    )


def _ending(outcome: RunOutcome, outputs: Sequence[Output], limit_words: str) -> _Ending:
    """The status and error of an execution that ended so, and what the text must say."""
    if outcome.ending == "interrupted":
        message = (
            f"Execution exceeded the {limit_words} and was interrupted. The kernel survived: "
            "variables from earlier calls are intact, but this call stopped part-way."
        )
        return _said("timeout", "TimeoutError", message)
    if outcome.ending == "killed":
        message = (
            f"Execution exceeded the {limit_words} and did not respond to the interrupt "
            f"(e.g. a long call inside C code). {STATE_LOST}"
        )
        return _said("timeout", "TimeoutError", message)
    if outcome.ending == "interrupt_ended":
        message = (
            f"Execution exceeded the {limit_words} and was interrupted, and the interrupt "
            f"ended the kernel ({outcome.exit_reason}). {STATE_LOST}"
        )
        return _said("timeout", "TimeoutError", message)
    if outcome.ending == "died":
        message = f"The kernel died during execution: {outcome.exit_reason}. {STATE_LOST}"
        return _said("error", "KernelDied", message)
    return _code_ending(outcome, outputs)


def _said(status: Status, ename: str, message: str) -> _Ending:
    """An ending the service saw (not the code's error), said first in the text too."""
    error = ExecutionError(ename=ename, evalue=message)
    return status, error, [f"{ename}: {message}"], error


def _code_ending(outcome: RunOutcome, outputs: Sequence[Output]) -> _Ending:
    """An execution that ran to its end (its output perhaps partly lost): the code's error,
    if it raised."""
    notices: list[str] = []
    collector = outcome.collector
    error = _user_error(outputs) or _as_error(collector.reply_error())
    if (collector.reply or {}).get("status") == "aborted" and error is None:
        error = ExecutionError(
            ename="ExecutionAborted", evalue="The kernel aborted this execution."
        )
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
        return "error", error or lost, notices, lost
    return ("error" if error is not None else "ok"), error, notices, None


def _user_error(outputs: Sequence[Output]) -> ExecutionError | None:
    errors = [o for o in outputs if isinstance(o, ErrorOutput)]
    return _as_error(errors[-1]) if errors else None


def _as_error(output: ErrorOutput | None) -> ExecutionError | None:
    if output is None:
        return None
    return ExecutionError(ename=output.ename, evalue=output.evalue, traceback=output.traceback)
