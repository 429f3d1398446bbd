"""build_result alone (no kernel): how an execution ended, its outputs and the service's
notices become the ExecutionResult a caller receives. User failures are data: a status and
an error, never an exception."""

from collections.abc import Callable
from typing import Any

from kernel_service.execution.collector import ExecutionCollector, OutputLimits
from kernel_service.execution.outcome import Ending, RunOutcome
from kernel_service.execution.results import STATE_LOST, build_result
from kernel_service_client.models import (
    ErrorOutput,
    ExecutionResult,
    FullOutput,
    Output,
    StreamOutput,
    TruncatedOutput,
)

FULL = FullOutput(
    path=".outputs/1.txt", url="/sessions/s/files/.outputs/1.txt", size=9, complete=True
)


def replied(**reply: Any) -> ExecutionCollector:
    """A collector that saw the kernel's execute_reply with this content."""
    collector = ExecutionCollector("req-1", OutputLimits(text=10_000, rich=10_000))
    collector.feed(
        {
            "header": {"msg_type": "execute_reply", "msg_id": "reply-1"},
            "parent_header": {"msg_id": "req-1"},
            "content": reply,
        }
    )
    return collector


def result(
    outputs: list[Output],
    ending: Ending = "done",
    reply: dict[str, Any] | None = None,
    *,
    exit_reason: str | None = None,
    lost: str | None = None,
    timeout: float = 30.0,
    timeout_capped: bool = False,
    lost_before: str | None = None,
    notice: str | None = None,
    text_limit: int = 10_000,
    keep_full_output: Callable[[], FullOutput | None] | None = None,
) -> ExecutionResult:
    """The result of an execution that ended so, its reply `reply` (by default an ok one)."""
    collector = replied(**(reply if reply is not None else {"status": "ok", "execution_count": 1}))
    draft = build_result(
        session_id="s",
        outcome=RunOutcome(collector, ending, exit_reason=exit_reason, lost=lost),
        outputs=outputs,
        timeout=timeout,
        timeout_capped=timeout_capped,
        images=[],
        duration_ms=12.34567,
        lost_before=lost_before,
        text_limit=text_limit,
        notice=notice,
    )
    keep = keep_full_output if draft.needs_full_output else None
    return draft.finish(keep() if keep is not None else None)


ZERO_DIVISION = ErrorOutput(
    ename="ZeroDivisionError",
    evalue="division by zero",
    traceback=["ZeroDivisionError: division by zero"],
)


def test_an_execution_that_ran_is_ok() -> None:
    done = result([StreamOutput(name="stdout", text="hi\n")])
    assert (done.status, done.error, done.execution_count) == ("ok", None, 1)
    assert (done.text, done.stdout, done.state_lost) == ("hi", "hi\n", False)
    assert done.duration_ms == 12.346
    assert done.session_id == "s" and done.full_output is None


def test_a_users_exception_is_an_error_result_from_its_output() -> None:
    failed = result([ZERO_DIVISION], reply={"status": "error", "execution_count": 2})
    assert failed.status == "error"
    assert failed.error is not None
    assert (failed.error.ename, failed.error.evalue) == ("ZeroDivisionError", "division by zero")
    assert failed.error.traceback == ["ZeroDivisionError: division by zero"]
    assert failed.text == "ZeroDivisionError: division by zero"  # said once, not twice


def test_the_replys_error_stands_in_when_its_output_never_came() -> None:
    reply = {
        "status": "error",
        "ename": "ValueError",
        "evalue": "bad",
        "traceback": ["\x1b[31mValueError\x1b[0m: bad"],
    }
    failed = result([], reply=reply)
    assert failed.status == "error"
    assert failed.error is not None
    assert (failed.error.ename, failed.error.traceback) == ("ValueError", ["ValueError: bad"])
    assert failed.text == "ValueError: bad"


def test_an_aborted_execution_is_an_error() -> None:
    aborted = result([], reply={"status": "aborted"})
    assert aborted.status == "error"
    assert aborted.error is not None and aborted.error.ename == "ExecutionAborted"


def test_a_memory_error_says_what_to_do() -> None:
    oom = ErrorOutput(ename="MemoryError", evalue="", traceback=["MemoryError"])
    failed = result([oom], reply={"status": "error"})
    assert failed.status == "error"
    assert "Out of memory" in failed.text and "free memory" in failed.text


def test_an_interrupted_timeout_keeps_the_state() -> None:
    timed_out = result(
        [StreamOutput(name="stdout", text="partial\n")], ending="interrupted", timeout=5.0
    )
    assert timed_out.status == "timeout"
    assert timed_out.error is not None and timed_out.error.ename == "TimeoutError"
    assert "exceeded the 5 s time limit and was interrupted" in timed_out.error.evalue
    assert timed_out.state_lost is False
    assert timed_out.text.startswith("partial\nTimeoutError: ")


def test_a_timeout_above_the_services_cap_says_so() -> None:
    capped = result([], ending="interrupted", timeout=60.0, timeout_capped=True)
    assert capped.error is not None
    assert "the 60 s time limit (the most this service allows)" in capped.error.evalue


def test_a_killed_kernel_is_a_timeout_that_lost_the_state() -> None:
    killed = result([], ending="killed", reply={})
    assert killed.status == "timeout"
    assert killed.state_lost is True
    assert killed.error is not None and STATE_LOST in killed.error.evalue


def test_a_kernel_death_is_an_error_that_says_why() -> None:
    died = result([], ending="died", reply={}, exit_reason="it was killed by SIGKILL")
    assert died.status == "error"
    assert died.error is not None and died.error.ename == "KernelDied"
    assert "The kernel died during execution: it was killed by SIGKILL." in died.error.evalue
    assert died.state_lost is True


def test_lost_output_is_never_ok() -> None:
    lost = result(
        [StreamOutput(name="stdout", text="a\n")],
        ending="output_lost",
        lost="a message was too large",
    )
    assert lost.status == "error"
    assert lost.error is not None and lost.error.ename == "OutputLost"
    assert "a message was too large" in lost.error.evalue
    # the code's own error, if it raised, is the one reported
    both = result([ZERO_DIVISION], ending="output_lost", reply={"status": "error"}, lost="x")
    assert both.error is not None and both.error.ename == "ZeroDivisionError"
    assert "OutputLost: " in both.text


def test_state_lost_before_the_run_comes_first_in_the_text() -> None:
    restarted = result(
        [StreamOutput(name="stdout", text="hi\n")],
        lost_before="The kernel was replaced.",
        notice="An earlier execution was cut short.",
    )
    assert restarted.state_lost is True
    assert restarted.text == "hi\nThe kernel was replaced.\nAn earlier execution was cut short."


def test_the_full_output_is_kept_only_when_something_was_cut() -> None:
    asked: list[bool] = []

    def keep() -> FullOutput:
        asked.append(True)
        return FULL

    short = result([StreamOutput(name="stdout", text="short\n")], keep_full_output=keep)
    assert short.full_output is None and asked == []
    long = result(
        [StreamOutput(name="stdout", text="x" * 200)], text_limit=100, keep_full_output=keep
    )
    assert long.full_output == FULL and asked == [True]
    assert long.text.endswith("or open('.outputs/1.txt') in code]")
    cut = result([TruncatedOutput(omitted_chars=5, omitted_outputs=0)], keep_full_output=keep)
    assert cut.full_output == FULL and asked == [True, True]
