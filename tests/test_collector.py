"""The collector is pure: fed recorded kernel messages, it must give the outputs a person saw."""

from typing import Any

from kernel_service.collector import ExecutionCollector, apply_terminal_controls, strip_ansi
from kernel_service.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    StreamOutput,
    TruncatedOutput,
)


def msg(msg_type: str, content: dict[str, Any], parent: str = "req-1") -> dict[str, Any]:
    return {
        "header": {"msg_type": msg_type, "msg_id": f"{msg_type}-x"},
        "parent_header": {"msg_id": parent},
        "msg_type": msg_type,
        "content": content,
        "metadata": {},
    }


def stream(text: str, name: str = "stdout", parent: str = "req-1") -> dict[str, Any]:
    return msg("stream", {"name": name, "text": text}, parent)


IDLE = msg("status", {"execution_state": "idle"})
BUSY = msg("status", {"execution_state": "busy"})
REPLY_OK = msg("execute_reply", {"status": "ok", "execution_count": 3})


def collect(*msgs: dict[str, Any], limit: int = 10_000) -> ExecutionCollector:
    collector = ExecutionCollector("req-1", limit)
    collector.feed_all(msgs)
    return collector


def test_done_needs_both_the_reply_and_iopub_idle() -> None:
    collector = collect(BUSY, stream("a"))
    assert not collector.done
    collector.feed(REPLY_OK)
    assert not collector.done
    collector.feed(IDLE)
    assert collector.done
    assert collector.execution_count == 3


def test_idle_before_the_reply_is_not_done_yet() -> None:
    collector = collect(IDLE)
    assert not collector.done
    collector.feed(REPLY_OK)
    assert collector.done


def test_messages_of_other_requests_are_ignored() -> None:
    collector = collect(
        stream("stale", parent="old"),
        msg("status", {"execution_state": "idle"}, parent="old"),
        stream("mine"),
    )
    assert not collector.idle
    assert collector.outputs() == [StreamOutput(name="stdout", text="mine")]


def test_outputs_keep_arrival_order_and_streams_coalesce() -> None:
    collector = collect(
        stream("a\n"),
        stream("b\n"),
        stream("oops\n", "stderr"),
        stream("c\n"),
        msg("execute_result", {"execution_count": 3, "data": {"text/plain": "42"}, "metadata": {}}),
    )
    assert collector.outputs() == [
        StreamOutput(name="stdout", text="a\nb\n"),
        StreamOutput(name="stderr", text="oops\n"),
        StreamOutput(name="stdout", text="c\n"),
        ExecuteResultOutput(execution_count=3, data={"text/plain": "42"}),
    ]


def test_carriage_return_and_backspace_are_applied() -> None:
    assert apply_terminal_controls("10%\r50%\r100%\ndone\n") == "100%\ndone\n"
    assert apply_terminal_controls("abc\x08\x08d\n") == "ad\n"
    assert apply_terminal_controls("line\r\nnext") == "line\nnext"
    assert collect(stream("1/3\r"), stream("2/3\r"), stream("3/3\n")).outputs() == [
        StreamOutput(name="stdout", text="3/3\n")
    ]


def test_error_traceback_loses_its_ansi_colours() -> None:
    collector = collect(
        msg(
            "error",
            {
                "ename": "ZeroDivisionError",
                "evalue": "division by zero",
                "traceback": ["\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"],
            },
        )
    )
    assert collector.outputs() == [
        ErrorOutput(
            ename="ZeroDivisionError",
            evalue="division by zero",
            traceback=["ZeroDivisionError: division by zero"],
        )
    ]
    assert strip_ansi("\x1b[1;32mgreen\x1b[0m") == "green"


def test_clear_output_now_and_with_wait() -> None:
    now = collect(stream("old"), msg("clear_output", {"wait": False}), stream("new"))
    assert now.outputs() == [StreamOutput(name="stdout", text="new")]
    waiting = collect(stream("old"), msg("clear_output", {"wait": True}))
    assert waiting.outputs() == [StreamOutput(name="stdout", text="old")]
    waiting.feed(stream("new"))
    assert waiting.outputs() == [StreamOutput(name="stdout", text="new")]


def test_update_display_data_replaces_the_display_with_that_id() -> None:
    collector = collect(
        msg("display_data", {"data": {"text/plain": "0%"}, "transient": {"display_id": "bar"}}),
        msg("display_data", {"data": {"text/plain": "other"}}),
        msg(
            "update_display_data",
            {"data": {"text/plain": "100%"}, "metadata": {}, "transient": {"display_id": "bar"}},
        ),
    )
    assert collector.outputs() == [
        DisplayDataOutput(data={"text/plain": "100%"}, display_id="bar"),
        DisplayDataOutput(data={"text/plain": "other"}),
    ]


def test_huge_output_keeps_head_and_tail_and_counts_the_rest() -> None:
    lines = [stream(f"{i}\n") for i in range(100_000)]
    collector = collect(*lines, limit=1000)
    outputs = collector.outputs()
    assert isinstance(outputs[0], StreamOutput)
    assert isinstance(outputs[1], TruncatedOutput)
    assert isinstance(outputs[2], StreamOutput)
    assert outputs[0].text.startswith("0\n1\n2\n")
    assert outputs[2].text.endswith("99998\n99999\n")
    assert len(outputs[0].text) + len(outputs[2].text) == 1000
    total = sum(len(f"{i}\n") for i in range(100_000))
    assert outputs[1].omitted_chars == total - 1000


def test_one_giant_message_is_split_into_head_and_tail() -> None:
    collector = collect(stream("a" * 500 + "b" * 10_000 + "c" * 500), limit=1000)
    head, cut, tail = collector.outputs()
    assert head == StreamOutput(name="stdout", text="a" * 500)
    assert tail == StreamOutput(name="stdout", text="c" * 500)
    assert cut == TruncatedOutput(omitted_chars=10_000, omitted_outputs=0)


def test_displays_in_the_cut_middle_are_counted() -> None:
    displays = [msg("display_data", {"data": {"text/plain": "x" * 100}}) for _ in range(50)]
    outputs = collect(*displays, limit=1000).outputs()
    kept = [o for o in outputs if isinstance(o, DisplayDataOutput)]
    cut = next(o for o in outputs if isinstance(o, TruncatedOutput))
    assert len(kept) == 10
    assert cut.omitted_outputs == 40


def test_reply_error_stands_in_for_a_lost_error_message() -> None:
    collector = collect(
        msg(
            "execute_reply",
            {
                "status": "error",
                "ename": "ValueError",
                "evalue": "bad",
                "traceback": ["\x1b[31mValueError\x1b[0m: bad"],
            },
        ),
    )
    assert collector.reply_error() == ErrorOutput(
        ename="ValueError", evalue="bad", traceback=["ValueError: bad"]
    )
    assert collect(REPLY_OK).reply_error() is None


def test_terminal_controls_on_one_huge_line() -> None:
    # a backtracking regex would take hours on this; the line scan takes milliseconds
    assert apply_terminal_controls("x" * 2_000_000 + "\rdone") == "done"
    assert apply_terminal_controls("x" * 2_000_000 + "\x08") == "x" * 1_999_999
