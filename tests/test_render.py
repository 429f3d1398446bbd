"""Rendering alone (no kernel): the text a model reads, made from outputs, images, changed
files and the service's notice, and cut to its limit."""

import base64

import pytest

from kernel_service.execution.render import (
    FILES_IN_TEXT,
    NO_OUTPUT,
    TRACEBACK_LINES,
    fit_text,
    human_size,
    render_text,
    uncut_text,
)
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    FileRef,
    FullOutput,
    Image,
    Output,
    StreamOutput,
    TruncatedOutput,
    truncation_note,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
IMAGE = Image(mime="image/png", data=PNG, url="/sessions/s/images/1", width=640, height=480)


def test_nothing_printed_says_so() -> None:
    assert uncut_text([], [], None) == NO_OUTPUT
    assert uncut_text([StreamOutput(name="stdout", text="\n")], [], None) == NO_OUTPUT


def test_streams_in_order_stderr_marked_escapes_and_trailing_newlines_gone() -> None:
    outputs = [
        StreamOutput(name="stdout", text="\x1b[32mhello\x1b[0m\n\n"),
        StreamOutput(name="stderr", text="a warning\n"),
        StreamOutput(name="stdout", text="bye\n"),
    ]
    assert uncut_text(outputs, [], None) == "hello\n[stderr]\na warning\nbye"


def test_a_value_is_shown_with_its_execution_count() -> None:
    value = ExecuteResultOutput(execution_count=7, data={"text/plain": "42"})
    assert uncut_text([value], [], None) == "Out[7]: 42"
    uncounted = ExecuteResultOutput(execution_count=None, data={"text/plain": "42"})
    assert uncut_text([uncounted], [], None) == "42"


def test_a_display_without_plain_text_names_its_kinds() -> None:
    html = DisplayDataOutput(data={"text/html": "<b>x</b>", "application/json": {"a": 1}})
    assert uncut_text([html], [], None) == "[display: application/json, text/html]"
    assert uncut_text([DisplayDataOutput(data={})], [], None) == "[display: empty]"


def test_an_image_is_referenced_by_its_url_and_size() -> None:
    plot = DisplayDataOutput(data={"image/png": PNG, "text/plain": "<Figure>"})
    assert uncut_text([plot], [IMAGE], None) == "[image: image/png 640x480, /sessions/s/images/1]"
    unsized = IMAGE.model_copy(update={"width": None, "height": None})
    assert uncut_text([plot], [unsized], None) == "[image: image/png, /sessions/s/images/1]"


def test_an_output_whose_image_is_not_valid_takes_no_other_outputs_image() -> None:
    broken = DisplayDataOutput(data={"image/png": "not base64!", "text/plain": "<broken>"})
    plot = DisplayDataOutput(data={"image/png": PNG, "text/plain": "<Figure>"})
    assert uncut_text([broken, plot], [IMAGE], None) == (
        "<broken>\n[image: image/png 640x480, /sessions/s/images/1]"
    )


def test_an_error_shows_its_traceback_without_ipythons_rule() -> None:
    error = ErrorOutput(
        ename="ZeroDivisionError",
        evalue="division by zero",
        traceback=[
            "-" * 40,
            "Cell In[1], line 1\n----> 1 1/0",
            "ZeroDivisionError: division by zero",
        ],
    )
    assert uncut_text([error], [], None) == (
        "Cell In[1], line 1\n----> 1 1/0\nZeroDivisionError: division by zero"
    )


def test_an_error_without_a_traceback_shows_its_name_and_value() -> None:
    error = ErrorOutput(ename="KeyboardInterrupt", evalue="", traceback=[])
    assert uncut_text([error], [], None) == "KeyboardInterrupt: "


def test_a_long_traceback_keeps_its_last_lines() -> None:
    lines = [f"frame {i}" for i in range(TRACEBACK_LINES + 5)]
    text = uncut_text([ErrorOutput(ename="E", evalue="v", traceback=lines)], [], None)
    assert text.splitlines() == ["[... traceback start omitted ...]", *lines[5:]]


def test_outputs_the_collector_cut_say_how_much_went() -> None:
    outputs: list[Output] = [
        StreamOutput(name="stdout", text="start\n"),
        TruncatedOutput(omitted_chars=1234, omitted_outputs=2),
        StreamOutput(name="stdout", text="end\n"),
    ]
    note = truncation_note(1234, 2)
    assert note == "[... output truncated: 1,234 characters and 2 outputs omitted ...]"
    assert uncut_text(outputs, [], None) == f"start\n{note}\nend"


def test_changed_files_are_listed_before_the_notice() -> None:
    files = [FileRef(path="out.csv", size=1500, url="/sessions/s/files/out.csv")]
    text = uncut_text([StreamOutput(name="stdout", text="done\n")], [], "a notice", files)
    assert text == "done\n[files changed: out.csv (1.5 kB) /sessions/s/files/out.csv]\na notice"


def test_many_changed_files_name_the_first_and_count_the_rest() -> None:
    files = [
        FileRef(path=f"f{i}.txt", size=1, url=f"/sessions/s/files/f{i}.txt")
        for i in range(FILES_IN_TEXT + 3)
    ]
    text = uncut_text([], [], None, files)
    assert text.startswith("[files changed: f0.txt (1 B) /sessions/s/files/f0.txt, ")
    assert text.endswith(f"f{FILES_IN_TEXT - 1}.txt, and 3 more]")
    assert f"f{FILES_IN_TEXT}.txt" not in text


def test_render_text_cuts_long_output_in_the_middle() -> None:
    outputs = [StreamOutput(name="stdout", text="A" * 500 + "B" * 500)]
    text = render_text(outputs, [], None, 100)
    assert text == "A" * 50 + "\n[... 900 characters omitted ...]\n" + "B" * 50


def test_a_cut_text_ends_with_where_the_full_output_is() -> None:
    full = FullOutput(
        path=".outputs/3.txt", url="/sessions/s/files/.outputs/3.txt", size=2_500_000, complete=True
    )
    text = fit_text("A" * 5000 + "B" * 5000, 400, full)
    body, note = text.rsplit("\n", 1)
    assert note == (
        "[output truncated; the full output (2.5 MB): /sessions/s/files/.outputs/3.txt, "
        "or open('.outputs/3.txt') in code]"
    )
    assert body.startswith("AAA") and body.endswith("BBB")
    assert len(body) < 400  # the note's room is taken from the text's
    partial = full.model_copy(update={"complete": False})
    assert "the start of the full output (2.5 MB)" in fit_text("x" * 5000, 400, partial)


def test_a_cut_that_removes_the_collectors_note_counts_what_it_stood_for() -> None:
    truncated = TruncatedOutput(omitted_chars=10_000, omitted_outputs=0)
    note = truncation_note(10_000, 0)
    text = "A" * 100 + note + "B" * 100
    cut = fit_text(text, 40, truncated=truncated)
    assert note not in cut
    assert f"[... {len(text) - 40 - len(note) + 10_000:,} characters omitted ...]" in cut


@pytest.mark.parametrize(
    ("size", "words"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 kB"),
        (1_234_567, "1.2 MB"),
        (999_949, "999.9 kB"),
        (999_950, "1.0 MB"),  # never "1000.0 kB"
        (3 * 10**9, "3.0 GB"),
        (1_500 * 10**9, "1.5 TB"),
    ],
)
def test_human_size_in_decimal_units(size: int, words: str) -> None:
    assert human_size(size) == words
