"""Text as a notebook shows it: terminal colour escapes removed, carriage returns and
backspaces applied (so progress bars read well)."""

import re

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")


def strip_ansi(text: str) -> str:
    """Text without terminal colour and cursor escapes."""
    return _ANSI_ESCAPE.sub("", text)


def apply_terminal_controls(text: str) -> str:
    """Apply `\\r` and `\\b` as Jupyter shows them, so progress bars read well.

    A `\\r` starts the line afresh (what came before it on the line is dropped, unless
    nothing follows yet); a backspace removes the character before it. Linear in the text.
    """
    if "\r" not in text and "\x08" not in text:
        return text
    return "\n".join(_apply_line_controls(line) for line in text.replace("\r\n", "\n").split("\n"))


def _apply_line_controls(line: str) -> str:
    if "\r" in line:
        parts = line.split("\r")
        while len(parts) > 1 and parts[-1] == "":
            parts.pop()
        line = parts[-1]
    if "\x08" in line:
        kept: list[str] = []
        for char in line:
            if char == "\x08":
                if kept:
                    kept.pop()
            else:
                kept.append(char)
        line = "".join(kept)
    return line
