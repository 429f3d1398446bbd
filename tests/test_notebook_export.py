"""The history and its notebook alone (no kernel, no store): execution records in, history
entries and a valid nbformat v4 notebook out. tests/test_history.py covers the routes."""

import json
from datetime import UTC, datetime

from kernel_service.store.history import notebook, session_history
from kernel_service.store.records import ExecutionRecord
from tests.conftest import read_notebook

STARTED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def record(seq: int, code: str, status: str, result: dict[str, object] | None) -> ExecutionRecord:
    return ExecutionRecord(
        seq=seq,
        code=code,
        status=status,
        started_at=STARTED,
        duration_ms=1.5,
        execution_count=seq,
        result=None if result is None else json.dumps(result),
    )


PRINTED = record(
    1,
    "print('hi')",
    "ok",
    {"outputs": [{"output_type": "stream", "name": "stdout", "text": "hi\n"}]},
)
VALUE = record(
    2,
    "{'a': 1}",
    "ok",
    {
        "outputs": [
            {
                "output_type": "execute_result",
                "execution_count": 2,
                "data": {"text/plain": "{'a': 1}", "application/json": {"a": 1}},
                "metadata": {},
            }
        ]
    },
)
TIMED_OUT = record(
    3,
    "while True: pass",
    "timeout",
    {
        "outputs": [
            {"output_type": "error", "ename": "KeyboardInterrupt", "evalue": "", "traceback": []}
        ],
        "error": {
            "ename": "TimeoutError",
            "evalue": "Execution exceeded the 1 s time limit",
            "traceback": [],
        },
    },
)
DROPPED = record(4, "big()", "ok", None)
RUNNING = record(5, "slow()", "running", None)


def test_the_history_says_which_results_were_dropped() -> None:
    history = session_history("s", [PRINTED, DROPPED, RUNNING])
    assert history.session_id == "s"
    assert [e.seq for e in history.executions] == [1, 4, 5]
    printed, dropped, running = history.executions
    assert printed.outputs is not None and printed.result_dropped is False
    assert (dropped.outputs, dropped.result_dropped) == (None, True)
    assert (running.outputs, running.result_dropped) == (None, False)  # not yet, not dropped


def test_one_code_cell_per_execution_with_its_number_and_outputs() -> None:
    nb = read_notebook(notebook("s", [PRINTED, VALUE]))
    assert nb.nbformat == 4
    assert nb.metadata["kernel_service"] == {"session_id": "s"}
    assert nb.metadata["kernelspec"]["name"] == "python3"
    printed, value = nb.cells
    assert (printed.cell_type, printed.source, printed.execution_count) == (
        "code",
        "print('hi')",
        1,
    )
    assert printed.id == "exec-1"
    assert [(o.output_type, o.name, o.text) for o in printed.outputs] == [
        ("stream", "stdout", "hi\n")
    ]
    assert value.outputs[0].output_type == "execute_result"
    assert value.outputs[0].data["application/json"] == {"a": 1}  # JSON stays JSON
    assert printed.metadata["kernel_service"] == {
        "seq": 1,
        "status": "ok",
        "started_at": "2025-01-02T03:04:05+00:00",
        "duration_ms": 1.5,
    }


def test_a_timeout_becomes_an_error_output_after_the_kernels_own() -> None:
    [cell] = read_notebook(notebook("s", [TIMED_OUT])).cells
    assert [(o.output_type, o.ename) for o in cell.outputs] == [
        ("error", "KeyboardInterrupt"),
        ("error", "TimeoutError"),
    ]
    assert cell.metadata["kernel_service"]["status"] == "timeout"


def test_an_error_already_among_the_outputs_is_not_repeated() -> None:
    error = {
        "output_type": "error",
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": ["ValueError: bad"],
    }
    failed = record(
        1,
        "raise ValueError('bad')",
        "error",
        {"outputs": [error], "error": {k: error[k] for k in ("ename", "evalue", "traceback")}},
    )
    [cell] = read_notebook(notebook("s", [failed])).cells
    assert [o.ename for o in cell.outputs] == ["ValueError"]


def test_dropped_and_running_executions_are_cells_without_outputs() -> None:
    dropped, running = read_notebook(notebook("s", [DROPPED, RUNNING])).cells
    assert dropped.outputs == [] and dropped.metadata["kernel_service"]["result_dropped"] is True
    assert running.outputs == [] and "result_dropped" not in running.metadata["kernel_service"]
    assert running.metadata["kernel_service"]["status"] == "running"


def test_a_cut_in_the_outputs_is_a_note_on_stderr() -> None:
    cut = record(
        1,
        "print('x' * 10**6)",
        "ok",
        {"outputs": [{"output_type": "truncated", "omitted_chars": 2000, "omitted_outputs": 1}]},
    )
    [cell] = read_notebook(notebook("s", [cut])).cells
    [note] = cell.outputs
    assert (note.output_type, note.name) == ("stream", "stderr")
    assert "2,000 characters and 1 outputs omitted" in note.text


def test_non_text_values_of_text_types_are_written_as_json_text() -> None:
    odd = record(
        1,
        "display(...)",
        "ok",
        {"outputs": [{"output_type": "display_data", "data": {"text/plain": 42}, "metadata": {}}]},
    )
    [cell] = read_notebook(notebook("s", [odd])).cells
    assert cell.outputs[0].data["text/plain"] == "42"


def test_no_executions_is_an_empty_valid_notebook() -> None:
    assert read_notebook(notebook("s", [])).cells == []
