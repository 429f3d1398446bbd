"""The collector's text helpers, alone: escapes removed, carriage returns and backspaces
applied as a notebook shows them, long text cut in the middle with a count of what went.
(tests/test_collector.py covers them as the collector uses them.)"""

import pytest

from kernel_service.execution.text import apply_terminal_controls, strip_ansi
from kernel_service_client.outputs import cut_middle


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text", "plain text"),
        ("\x1b[31mred\x1b[0m and \x1b[1;4mbold\x1b[m", "red and bold"),
        ("\x1b[2K\x1b[1Gredrawn", "redrawn"),  # erase the line, cursor to column 1
        ("\x1b]0;a window title\x07after", "after"),  # an OSC sequence ends with BEL
    ],
)
def test_strip_ansi_leaves_the_text_without_escapes(raw: str, shown: str) -> None:
    assert strip_ansi(raw) == shown


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("no controls\n", "no controls\n"),
        ("10%\r50%\r100%", "100%"),
        ("10%\r", "10%"),  # nothing after the \r yet: the line still reads 10%
        ("a\rb\r\r", "b"),
        ("first\nsecond 1\rsecond 2\nthird", "first\nsecond 2\nthird"),
        ("abc\x08\x08d", "ad"),
        ("\x08\x08x", "x"),  # backspaces at the start of a line remove nothing
        ("line\r\nnext", "line\nnext"),  # Windows line ends are line ends, not returns
    ],
)
def test_apply_terminal_controls_shows_the_last_state_of_each_line(raw: str, shown: str) -> None:
    assert apply_terminal_controls(raw) == shown


def test_cut_middle_leaves_short_text_alone() -> None:
    assert cut_middle("abcdef", 6) == ("abcdef", 0)
    assert cut_middle("", 0) == ("", 0)


def test_cut_middle_keeps_both_ends_and_counts_what_went() -> None:
    text = "a" * 10 + "m" * 80 + "z" * 10
    cut, omitted = cut_middle(text, 20)
    assert omitted == 80
    assert cut == "a" * 10 + "\n[... 80 characters omitted ...]\n" + "z" * 10


def test_cut_middle_with_an_odd_limit_keeps_equal_halves() -> None:
    cut, omitted = cut_middle("0123456789", 5)
    assert (cut, omitted) == ("01\n[... 6 characters omitted ...]\n89", 6)


def test_cut_middle_counts_with_thousands_separators() -> None:
    cut, omitted = cut_middle("x" * 12_000, 1000)
    assert omitted == 11_000
    assert "[... 11,000 characters omitted ...]" in cut


def test_a_note_of_an_earlier_cut_that_this_cut_removes_adds_its_count() -> None:
    note = "[... 500 characters omitted earlier ...]"
    text = "a" * 50 + note + "z" * 50
    cut, omitted = cut_middle(text, 20, (note, 500))
    assert note not in cut
    # what this cut removed, less the note's own characters, plus what the note stood for
    assert omitted == len(text) - 20 - len(note) + 500


def test_a_note_of_an_earlier_cut_that_stays_is_not_counted_again() -> None:
    note = "[earlier cut: 500]"
    text = note + "m" * 100
    cut, omitted = cut_middle(text, 40, (note, 500))
    assert cut.startswith(note)
    assert omitted == len(text) - 40
