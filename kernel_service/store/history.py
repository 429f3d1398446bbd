"""A session's history, from the state store's execution records: as entries for the API,
and as a Jupyter notebook (nbformat v4) with one code cell per execution.

No I/O here; both are pure functions of the records, so the routes can run them off the
event loop (a history can hold tens of megabytes of base64 images).
"""

import json
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import nbformat
from nbformat import NotebookNode, v4

from kernel_service.store.records import ExecutionRecord
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    HistoryEntry,
    Output,
    SessionHistory,
    StreamOutput,
    TruncatedOutput,
    truncation_note,
)

# nbformat's builders, typed (its own annotations leave them out)
_new_notebook = cast(Callable[..., NotebookNode], v4.new_notebook)
_new_code_cell = cast(Callable[..., NotebookNode], v4.new_code_cell)
_new_output = cast(Callable[..., NotebookNode], v4.new_output)
_writes = cast(Callable[[NotebookNode], str], nbformat.writes)

# Statuses that end with a stored result: one that is NULL was dropped for room.
_WITH_RESULT = ("ok", "error", "timeout")
# MIME types whose notebook data may be any JSON value (nbformat's mimebundle schema).
_JSON_MIME = re.compile(r"^application/(.*\+)?json$")


_PYTHON_METADATA = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


def history_entry(record: ExecutionRecord) -> HistoryEntry:
    result: dict[str, Any] = json.loads(record.result) if record.result is not None else {}
    return HistoryEntry.model_validate(
        {
            "seq": record.seq,
            "code": record.code,
            "status": record.status,
            "started_at": record.started_at,
            "duration_ms": record.duration_ms,
            "execution_count": record.execution_count,
            "outputs": result.get("outputs"),
            "error": result.get("error"),
            "state_lost": result.get("state_lost"),
            "result_dropped": record.result is None and record.status in _WITH_RESULT,
        }
    )


def session_history(session_id: str, records: Sequence[ExecutionRecord]) -> SessionHistory:
    return SessionHistory(session_id=session_id, executions=[history_entry(r) for r in records])


def notebook(
    session_id: str, records: Sequence[ExecutionRecord], metadata: dict[str, Any] | None = None
) -> str:
    """The session as an nbformat v4 notebook, validated, as JSON text.

    Each execution is a code cell with its outputs and `In[n]` number; what the outputs
    cannot say (its status, when it ran, a result dropped for room) is in the cell's
    `kernel_service` metadata. A timeout or a kernel death, which the service reports in
    the result's `error` only (after the kernel's KeyboardInterrupt, if any), becomes an
    error output of its own. `metadata`: the notebook's kernelspec and language_info
    (Python's when None).
    """
    cells = [_cell(history_entry(record)) for record in records]
    nb = _new_notebook(
        cells=cells,
        metadata={
            **(metadata or _PYTHON_METADATA),
            "kernel_service": {"session_id": session_id},
        },
    )
    nbformat.validate(nb)
    return _writes(nb)


def _cell(entry: HistoryEntry) -> NotebookNode:
    outputs = [_output(o) for o in entry.outputs or []]
    error = entry.error
    if error is not None and not any(
        isinstance(o, ErrorOutput) and (o.ename, o.evalue) == (error.ename, error.evalue)
        for o in entry.outputs or []
    ):
        outputs.append(
            _new_output(
                "error",
                ename=error.ename,
                evalue=error.evalue,
                traceback=list(error.traceback),
            )
        )
    metadata: dict[str, Any] = {
        "seq": entry.seq,
        "status": entry.status,
        "started_at": entry.started_at.isoformat(),
        "duration_ms": entry.duration_ms,
    }
    if entry.result_dropped:
        metadata["result_dropped"] = True
    if entry.state_lost:
        metadata["state_lost"] = True
    return _new_code_cell(
        source=entry.code,
        id=f"exec-{entry.seq}",
        execution_count=entry.execution_count,
        outputs=[o for o in outputs if o is not None],
        metadata={"kernel_service": metadata},
    )


def _output(output: Output) -> NotebookNode | None:
    if isinstance(output, StreamOutput):
        return _new_output("stream", name=output.name, text=output.text)
    if isinstance(output, DisplayDataOutput):
        return _new_output(
            "display_data", data=_bundle(output.data), metadata=dict(output.metadata)
        )
    if isinstance(output, ExecuteResultOutput):
        return _new_output(
            "execute_result",
            data=_bundle(output.data),
            metadata=dict(output.metadata),
            execution_count=output.execution_count,
        )
    if isinstance(output, ErrorOutput):
        return _new_output(
            "error", ename=output.ename, evalue=output.evalue, traceback=list(output.traceback)
        )
    if isinstance(output, TruncatedOutput):  # the same words the result's stdout shows
        note = truncation_note(output.omitted_chars, output.omitted_outputs)
        return _new_output("stream", name="stderr", text=f"\n{note}\n")
    return None


def _bundle(data: dict[str, Any]) -> dict[str, Any]:
    """A MIME bundle nbformat accepts: text (or lines of text) but for JSON types."""
    bundle: dict[str, Any] = {}
    for mime, value in data.items():
        text_lines = isinstance(value, list) and all(isinstance(line, str) for line in value)
        if _JSON_MIME.match(mime) or isinstance(value, str) or text_lines:
            bundle[mime] = value
        else:
            bundle[mime] = json.dumps(value)
    return bundle
