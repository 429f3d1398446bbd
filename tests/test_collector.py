"""The collector is pure: fed recorded kernel messages, it must give the outputs a person saw."""

from typing import Any

from kernel_service.execution.collector import ExecutionCollector, OutputLimits
from kernel_service.execution.text import apply_terminal_controls, strip_ansi
from kernel_service_client.models import (
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


def collect(*msgs: dict[str, Any], limit: int = 10_000, rich: int = 10_000) -> ExecutionCollector:
    collector = ExecutionCollector("req-1", OutputLimits(text=limit, rich=rich))
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


PNG = "iVBORw0KGgo" + "A" * 5000


def test_images_have_their_own_budget_so_long_prints_do_not_drop_plots() -> None:
    collector = collect(
        stream("x" * 50_000),
        msg("display_data", {"data": {"image/png": PNG, "text/plain": "<Figure>"}}),
        stream("y" * 50_000),
        limit=1000,
        rich=20_000,
    )
    images = [o for o in collector.outputs() if isinstance(o, DisplayDataOutput)]
    assert [i.data["image/png"] for i in images] == [PNG]


def test_many_images_keep_the_first_and_the_last() -> None:
    figures = [
        msg("display_data", {"data": {"image/png": PNG, "text/plain": f"fig {i}"}})
        for i in range(20)
    ]
    outputs = collect(*figures, rich=25_000).outputs()
    kept = [o.data["text/plain"] for o in outputs if isinstance(o, DisplayDataOutput)]
    assert kept == ["fig 0", "fig 1", "fig 18", "fig 19"]
    cut = next(o for o in outputs if isinstance(o, TruncatedOutput))
    assert cut.omitted_outputs == 16


def test_an_image_too_large_for_the_budget_is_left_out_with_a_note() -> None:
    output, _ = collect(msg("display_data", {"data": {"image/png": PNG}}), rich=1000).outputs()
    assert isinstance(output, DisplayDataOutput)
    assert "image/png" not in output.data
    assert "omitted" in output.data["text/plain"]


def test_a_huge_value_is_cut_to_head_and_tail_not_dropped() -> None:
    value = "[" + ", ".join(str(i) for i in range(100_000)) + "]"
    [output, cut] = collect(
        msg("execute_result", {"execution_count": 1, "data": {"text/plain": value}})
    ).outputs()
    assert isinstance(output, ExecuteResultOutput)
    plain = output.data["text/plain"]
    assert plain.startswith("[0, 1, 2") and plain.endswith("99998, 99999]")
    assert "characters omitted" in plain
    assert len(plain) < 3000
    assert isinstance(cut, TruncatedOutput)


def test_display_updates_cannot_grow_past_the_budget() -> None:
    displays = [
        msg("display_data", {"data": {"text/plain": "."}, "transient": {"display_id": f"d{i}"}})
        for i in range(100)
    ]
    updates = [
        msg(
            "update_display_data",
            {"data": {"text/plain": "z" * 2000}, "transient": {"display_id": f"d{i}"}},
        )
        for i in range(100)
    ]
    outputs = collect(*displays, *updates, limit=10_000).outputs()
    kept = sum(len(o.data["text/plain"]) for o in outputs if isinstance(o, DisplayDataOutput))
    assert kept <= 10_000
    assert any(isinstance(o, TruncatedOutput) for o in outputs)


def test_a_huge_error_message_is_cut() -> None:
    [error, _] = collect(
        msg("error", {"ename": "ValueError", "evalue": "v" * 100_000, "traceback": ["t" * 100_000]})
    ).outputs()
    assert isinstance(error, ErrorOutput)
    assert len(error.evalue) < 2000
    assert sum(len(line) for line in error.traceback) < 3000


def test_odd_messages_from_user_code_do_not_break_collection() -> None:
    collector = collect(
        msg("display_data", {"data": {"text/plain": "a"}, "transient": {"display_id": 5}}),
        msg("display_data", {"data": "not a dict", "transient": None, "metadata": []}),
        msg("update_display_data", {"data": {"text/plain": "b"}, "transient": {"display_id": 5}}),
        msg("error", {"ename": 3, "traceback": "not a list"}),
        msg("execute_result", {"execution_count": "x", "data": {"text/plain": "v"}}),
    )
    first, second, error, value = collector.outputs()
    assert first == DisplayDataOutput(data={"text/plain": "b"}, display_id="5")
    assert second == DisplayDataOutput(data={})
    assert error == ErrorOutput(ename="3", evalue="", traceback=[])
    assert value == ExecuteResultOutput(execution_count=None, data={"text/plain": "v"})


def test_budgets_hold_for_any_mix_of_messages() -> None:
    import random

    rng = random.Random(7)
    for _ in range(300):
        msgs = []
        for _ in range(rng.randint(1, 60)):
            kind = rng.choice(["out", "err", "img", "text", "update", "error"])
            size = rng.choice([1, 10, 300, 3000])
            if kind in ("out", "err"):
                msgs.append(stream("s" * size, "stdout" if kind == "out" else "stderr"))
            elif kind == "img":
                data = {"image/png": "i" * size * 3, "text/plain": "<fig>"}
                msgs.append(msg("display_data", {"data": data, "transient": {"display_id": "i"}}))
            elif kind == "text":
                msgs.append(msg("display_data", {"data": {"text/html": "h" * size}}))
            elif kind == "update":
                data = {"image/png": "u" * size * 3}
                msgs.append(
                    msg("update_display_data", {"data": data, "transient": {"display_id": "i"}})
                )
            else:
                msgs.append(
                    msg("error", {"ename": "E", "evalue": "v" * size, "traceback": ["t" * size]})
                )
        outputs = collect(*msgs, limit=2000, rich=6000).outputs()
        text = rich = 0
        for output in outputs:
            if isinstance(output, StreamOutput):
                text += len(output.text)
            elif isinstance(output, ErrorOutput):
                text += len(output.evalue) + sum(len(line) for line in output.traceback)
            elif isinstance(output, DisplayDataOutput | ExecuteResultOutput):
                for mime, value in output.data.items():
                    if mime.startswith("image/"):
                        rich += len(value)
                    else:
                        text += len(value)
        assert text <= 2000 + 200  # the notes that stand where text was cut
        assert rich <= 6000
