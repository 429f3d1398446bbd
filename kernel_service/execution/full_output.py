"""An execution's whole text output, kept when its result has to cut it.

The collector keeps a head and a tail of `output_limit` characters, and the `text` for the
model is smaller still (`text_limit`). What they leave out is not lost: each output's text
goes, as it arrives, to the execution's FullOutputSpill (told of it by the collector's
listener, so the collector stays pure), held in memory up to MEMORY_BYTES and from then
on written to `.outputs/<seq>.txt` in the session's work directory as it comes, up to
`full_output_mb`. When the result was cut the session keeps the file and says where
(`full_output`, and a line at the end of `text`); otherwise the file is removed. The code
reads it as `open('.outputs/3.txt')`; the files API serves it.

The listener is called from the kernel's message pump, on the event loop: the file is
written by a thread of the spill's own, in the order the text came. At most MAX_PENDING
bytes wait for it; past that the listener waits for the disk (the loop then waits only as
long as the disk is slower than the kernel's output).
"""

import asyncio
import contextlib
import logging
import os
import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kernel_service.execution.collector import OutputListener
from kernel_service.workdir.listing import file_url
from kernel_service.workdir.paths import own_dir
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    FullOutput,
    Output,
    StreamOutput,
)

log = logging.getLogger(__name__)

OUTPUTS_DIR = ".outputs"
# Held in memory before the file is opened: most outputs are shorter, and need no file.
MEMORY_BYTES = 256 * 1024
# Handed to the writing thread and not written yet, at most.
MAX_PENDING = 16 * MEMORY_BYTES
# A session keeps the full outputs of its last this many cut executions.
KEPT_FILES = 20
_KEPT_NAME = re.compile(r"^([0-9]+)\.txt$")


class FullOutputSpill:
    """The text of one execution's outputs, in arrival order, at most `max_bytes` of it
    (0: none). Streams as printed; a value, display or traceback as its text, on lines of
    its own. `close` removes the file unless `keep` kept it."""

    def __init__(self, work_dir: Path, session_id: str, seq: int, max_bytes: int) -> None:
        self._work_dir = work_dir
        self._session_id = session_id
        self._name = f"{seq}.txt"
        self._max = max_bytes
        # on the event loop
        self._buffer = bytearray()
        self._stored = 0  # bytes taken, in the buffer or handed to the writer
        self._omitted = 0  # characters past max_bytes
        self._at_line_start = True  # of the text received
        self._kept_ends_line = True  # of the text kept
        self._writer: ThreadPoolExecutor | None = None  # made when there is a file to write
        self._closed = False  # output arriving later (code still ending) is not kept
        self._pending: deque[tuple[Future[None], int]] = deque()  # handed over: (job, bytes)
        self._pending_bytes = 0
        # on the writer's thread (read by the loop only once it has waited for the writer)
        self._dir: int | None = None
        self._fd: int | None = None
        self._written = 0  # bytes in the file
        self._failed: str | None = None
        self._created = False
        self._kept = False

    def listener(self, then: OutputListener | None = None) -> OutputListener | None:
        """What the collector tells of each output: this spill, then `then`."""
        if self._max <= 0:
            return then

        def listen(output: Output) -> None:
            self.add(output)
            if then is not None:
                then(output)

        return listen

    def add(self, output: Output) -> None:
        """Take one output's text; never raises (a failure is logged, and ends spilling)."""
        if self._closed:
            return
        try:
            self._add(output)
        except Exception as exc:
            self._fail(exc)

    def _add(self, output: Output) -> None:
        text = _text_of(output)
        if not text:
            return
        if not isinstance(output, StreamOutput):
            text = ("" if self._at_line_start else "\n") + text + "\n"
        self._at_line_start = text.endswith("\n")
        if self._omitted or self._failed:
            self._omitted += len(text)
            return
        data = text.encode("utf-8", "replace")
        room = self._max - self._stored
        if len(data) > room:
            kept = data[:room].decode("utf-8", "ignore")  # not half a character
            self._omitted += len(text) - len(kept)
            data = kept.encode()
        self._stored += len(data)
        if data:
            self._kept_ends_line = data.endswith(b"\n")
        if len(data) >= MEMORY_BYTES:  # a large message goes straight on, not copied
            self._hand_over(self._take_buffer())
            self._hand_over(data)
            return
        self._buffer += data
        if len(self._buffer) >= MEMORY_BYTES:
            self._hand_over(self._take_buffer())

    async def keep(self) -> FullOutput | None:
        """Keep the file (written now if it was all in memory); where it is, or None when
        there was no text or it could not be written."""
        if self._max <= 0 or self._stored == 0:
            return None
        note = None
        if self._omitted:
            note = (
                f"{'' if self._kept_ends_line else chr(10)}[... {self._omitted:,} more "
                f"characters of output not kept: an execution keeps its first "
                f"{self._max:,} bytes (KERNEL_SERVICE_FULL_OUTPUT_MB) ...]\n"
            ).encode()
        rest = self._take_buffer()
        return await asyncio.wrap_future(self._thread().submit(self._keep, rest, note))

    def close(self) -> None:
        """Remove the file unless kept, and let go of the descriptors (on the writer's
        thread, after what was handed to it)."""
        self._closed = True
        self._buffer.clear()
        if self._writer is not None:
            self._writer.submit(self._close)
            self._writer.shutdown(wait=False)

    # ------------------------------------------------------------ handing over

    def _take_buffer(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def _thread(self) -> ThreadPoolExecutor:
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="full-output")
        return self._writer

    def _hand_over(self, data: bytes) -> None:
        """Queue `data` for the file; past MAX_PENDING bytes queued, wait for the oldest."""
        if not data:
            return
        self._pending.append((self._thread().submit(self._write_now, data), len(data)))
        self._pending_bytes += len(data)
        while self._pending and (self._pending[0][0].done() or self._pending_bytes > MAX_PENDING):
            job, size = self._pending.popleft()
            job.result()  # returns at once unless the disk is behind by MAX_PENDING
            self._pending_bytes -= size

    # ------------------------------------------------------------ the file (writer's thread)

    def _write_now(self, data: bytes) -> None:
        if self._failed:
            return
        try:
            if self._fd is None:
                self._open()
            self._write(data)
        except Exception as exc:
            self._fail(exc)

    def _keep(self, rest: bytes, note: bytes | None) -> FullOutput | None:
        if rest or self._fd is None:
            self._write_now(rest)
        if note is not None and self._fd is not None and not self._failed:
            self._write_now(note)
        if self._fd is None or self._written == 0:
            return None
        os.close(self._fd)
        self._fd = None
        self._kept = True
        self._prune()
        path = f"{OUTPUTS_DIR}/{self._name}"
        return FullOutput(
            path=path,
            url=file_url(self._session_id, path),
            size=self._written,
            complete=not self._omitted and not self._failed,
        )

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._dir is not None:
            if self._created and not self._kept:
                with contextlib.suppress(OSError):
                    os.unlink(self._name, dir_fd=self._dir)
            os.close(self._dir)
            self._dir = None

    def _open(self) -> None:
        self._dir, uid, gid = own_dir(self._work_dir, OUTPUTS_DIR)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(self._name, flags, 0o644, dir_fd=self._dir)
        except FileExistsError:  # left by an earlier run, or planted: ours to replace
            os.unlink(self._name, dir_fd=self._dir)
            fd = os.open(self._name, flags, 0o644, dir_fd=self._dir)
        self._fd, self._created = fd, True
        os.fchown(fd, uid, gid)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self._written += written
            view = view[written:]

    def _fail(self, exc: Exception) -> None:
        if self._failed is None:
            log.warning("full output %s of %s not kept whole: %s", self._name, self._work_dir, exc)
        self._failed = str(exc) or type(exc).__name__

    def _prune(self) -> None:
        """Remove the session's older full outputs: the last KEPT_FILES stay."""
        assert self._dir is not None
        try:
            with os.scandir(self._dir) as listing:
                numbers = sorted(
                    int(found[1]) for entry in listing if (found := _KEPT_NAME.match(entry.name))
                )
            for number in numbers[:-KEPT_FILES]:
                with contextlib.suppress(OSError):
                    os.unlink(f"{number}.txt", dir_fd=self._dir)
        except OSError as exc:
            log.warning("old full outputs of %s not removed: %s", self._work_dir, exc)


def _text_of(output: Output) -> str:
    if isinstance(output, StreamOutput):
        return output.text
    if isinstance(output, ErrorOutput):
        return "\n".join(output.traceback) or f"{output.ename}: {output.evalue}"
    if isinstance(output, ExecuteResultOutput | DisplayDataOutput):
        plain = output.data.get("text/plain")
        text = plain if isinstance(plain, str) else f"[display: {', '.join(sorted(output.data))}]"
        if isinstance(output, ExecuteResultOutput) and output.execution_count:
            return f"Out[{output.execution_count}]: {text}"
        return text
    return ""
