"""Runs inside each kernel at start: preload the data stack, make plots ready (CJK included),
and make `input()` and `getpass()` say in one sentence that nobody can answer them.

The kernel executes this file (`IPKernelApp.exec_lines`) in a namespace of its own, with
`PRELOAD` set; it must never fail the kernel's start.
"""

import importlib
import sys

# Families that carry CJK glyphs, most preferred first. They come after the default
# family, so Latin text looks as usual and matplotlib falls back to them per glyph.
CJK_FAMILIES = (
    "Noto Sans CJK SC",
    "Noto Sans CJK JP",
    "Noto Sans CJK TC",
    "Source Han Sans SC",
    "WenQuanYi Micro Hei",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "SimHei",
    "Microsoft YaHei",
)

NO_INPUT = (
    "{}() is not available: this kernel has no one to type an answer; pass the value in the "
    "code instead."
)


# Characters of printed text per stream message (a few hundred kB on the wire): the service
# refuses any message larger than the output it could keep, so a long print is sent in
# pieces, of which it keeps the first and the last and counts the rest.
STREAM_PIECE = 256 * 1024


def prepare(preload: list[str]) -> None:
    """Import the given modules (so user imports are instant) and configure matplotlib."""
    _send_long_prints_in_pieces()
    for name in preload:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a missing optional module must not stop the kernel
            print(f"kernel-service: could not preload {name}: {exc}", file=sys.__stderr__)
    _configure_matplotlib()
    _refuse_input()


def _refuse_input() -> None:
    """No client answers the kernel's input requests: `input()` and `getpass()` raise
    StdinNotImplementedError with one plain sentence as all of its traceback, not
    ipykernel's. (ipykernel points both at its kernel's methods for each execution: those
    are replaced.)"""
    try:
        from IPython import get_ipython
        from IPython.core import error
    except ImportError:
        return
    kernel = getattr(get_ipython(), "kernel", None)
    if kernel is None:
        return

    class StdinNotImplementedError(error.StdinNotImplementedError):
        """IPython's, shown as its one line (IPython asks an error for its traceback)."""

        def _render_traceback_(self) -> list[str]:
            return [f"StdinNotImplementedError: {self}"]

    def refuse(name: str) -> object:
        def refused(*args: object, **kwargs: object) -> str:
            raise StdinNotImplementedError(NO_INPUT.format(name))

        return refused

    kernel.raw_input = refuse("input")
    kernel.getpass = refuse("getpass")


def _send_long_prints_in_pieces() -> None:
    try:
        session = get_ipython().kernel.session  # type: ignore[name-defined]  # noqa: F821
    except Exception:  # not in a kernel
        return
    send = session.send

    def send_in_pieces(stream, msg_or_type, *args, **kwargs):  # type: ignore[no-untyped-def]
        text = None
        if isinstance(msg_or_type, dict) and msg_or_type.get("msg_type") == "stream":
            text = msg_or_type.get("content", {}).get("text")
        if not isinstance(text, str) or len(text) <= STREAM_PIECE:
            return send(stream, msg_or_type, *args, **kwargs)
        content, parent = msg_or_type["content"], msg_or_type["parent_header"]
        for start in range(0, len(text), STREAM_PIECE):
            piece = {**content, "text": text[start : start + STREAM_PIECE]}
            sent = send(stream, session.msg("stream", piece, parent=parent), *args, **kwargs)
        return sent

    session.send = send_in_pieces


def _configure_matplotlib() -> None:
    try:
        from matplotlib import font_manager, rcParams
    except ImportError:
        return
    installed = {font.name for font in font_manager.fontManager.ttflist}
    cjk = [family for family in CJK_FAMILIES if family in installed]
    if cjk:
        # A generic family ("sans-serif") resolves to one font; glyph fallback only walks
        # the families named in font.family, so the CJK ones are named there.
        families = [f for f in rcParams["font.family"] if f not in cjk]
        rcParams["font.family"] = [*families, *cjk]


if __name__ == "__kernel_service_startup__":
    prepare(globals().get("PRELOAD", []))
