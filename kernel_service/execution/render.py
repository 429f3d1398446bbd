"""Renders outputs as the concise text an LLM reads: printed text, the value, the error's
last lines, image references, the service's notice; long text cut in the middle."""

from collections.abc import Iterator, Sequence

from kernel_service.execution.text import strip_ansi
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
from kernel_service_client.outputs import cut_middle, image_payload

# Of a traceback, the last lines say what went wrong and where.
TRACEBACK_LINES = 20
NO_OUTPUT = "[no output]"
# Of the files an execution changed, the text names the first ones.
FILES_IN_TEXT = 10


def render_text(
    outputs: Sequence[Output],
    images: Sequence[Image],
    notice: str | None,
    limit: int,
    *,
    files: Sequence[FileRef] = (),
    full_output: FullOutput | None = None,
) -> str:
    """Text for a model, at most about `limit` characters."""
    return fit_text(uncut_text(outputs, images, notice, files), limit, full_output)


def uncut_text(
    outputs: Sequence[Output],
    images: Sequence[Image],
    notice: str | None,
    files: Sequence[FileRef] = (),
) -> str:
    """The text for a model before it is cut to its limit."""
    pending_images = iter(images)
    parts: list[str] = []
    for output in outputs:
        if isinstance(output, StreamOutput):
            text = strip_ansi(output.text).rstrip("\n")
            if text:
                parts.append(text if output.name == "stdout" else f"[stderr]\n{text}")
        elif isinstance(output, ExecuteResultOutput | DisplayDataOutput):
            parts.append(_render_display(output, pending_images))
        elif isinstance(output, ErrorOutput):
            parts.append(_render_error(output))
        elif isinstance(output, TruncatedOutput):
            parts.append(truncation_note(output.omitted_chars, output.omitted_outputs))
    if files:
        parts.append(_files_line(files))
    if notice:
        parts.append(notice)
    return "\n".join(part for part in parts if part) or NO_OUTPUT


def fit_text(
    text: str,
    limit: int,
    full_output: FullOutput | None = None,
    truncated: TruncatedOutput | None = None,
) -> str:
    """`text` cut in the middle to about `limit` characters; with `full_output`, its last
    line says where the whole output is. `truncated`: the outputs' own cut, whose count the
    note of this cut includes when this cut removes its note."""
    inner = ("", 0)
    if truncated is not None:
        note = truncation_note(truncated.omitted_chars, truncated.omitted_outputs)
        inner = (note, truncated.omitted_chars)
    if full_output is None:
        return cut_middle(text, limit, inner)[0]
    whole = "full output" if full_output.complete else "start of the full output"
    note = (
        f"[output truncated; the {whole} ({human_size(full_output.size)}): "
        f"{full_output.url}, or open({full_output.path!r}) in code]"
    )
    return f"{cut_middle(text, max(limit - len(note) - 1, 2), inner)[0]}\n{note}"


def human_size(size: int) -> str:
    """`1.2 kB`: bytes in decimal units."""
    if size < 1000:
        return f"{size} B"
    scaled = float(size)
    for unit in ("kB", "MB", "GB"):
        scaled /= 1000
        if scaled < 999.95:
            return f"{scaled:.1f} {unit}"
    return f"{scaled / 1000:.1f} TB"


def _files_line(files: Sequence[FileRef]) -> str:
    shown = [f"{f.path} ({human_size(f.size)}) {f.url}" for f in files[:FILES_IN_TEXT]]
    if len(files) > FILES_IN_TEXT:
        shown.append(f"and {len(files) - FILES_IN_TEXT} more")
    return f"[files changed: {', '.join(shown)}]"


def _render_display(
    output: ExecuteResultOutput | DisplayDataOutput, pending_images: Iterator[Image]
) -> str:
    if image_payload(output) is not None:
        image = next(pending_images, None)
        if image is not None:
            size = f" {image.width}x{image.height}" if image.width and image.height else ""
            return f"[image: {image.mime}{size}, {image.url}]"
    plain = output.data.get("text/plain")
    text = plain if isinstance(plain, str) else ""
    if not text:
        kinds = ", ".join(sorted(output.data)) or "empty"
        text = f"[display: {kinds}]"
    if isinstance(output, ExecuteResultOutput):
        return f"Out[{output.execution_count}]: {text}" if output.execution_count else text
    return text


def _render_error(output: ErrorOutput) -> str:
    # IPython opens a traceback with a rule of dashes: noise to a model.
    lines = [line for line in "\n".join(output.traceback).splitlines() if line.strip("- ")]
    head = f"{output.ename}: {output.evalue}"
    if not lines:
        return head
    tail = lines[-TRACEBACK_LINES:]
    if len(lines) > TRACEBACK_LINES:
        tail = ["[... traceback start omitted ...]", *tail]
    return "\n".join(tail)
