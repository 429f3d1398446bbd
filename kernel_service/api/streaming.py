"""`POST /execute` as Server-Sent Events: each output as it arrives, then the whole result.

Events (each `data` is one line of JSON):

- `output`: one output in ExecutionResult's terms; a `stream` output carries only the text
  that just arrived. What the final result drops (outputs past the limits, a later
  `clear_output`, display updates) is not taken back here: the result is the truth.
- `result`: the complete ExecutionResult, as the non-streaming answer has it; the last event.
- `error`: `{"detail", "code"}` when the execution failed after the stream began (an error
  before it, such as an unknown session, is an ordinary HTTP error).

A comment line is sent every few seconds while nothing else is, so proxies keep the
connection open. The outputs waiting for a slow client are bounded (PENDING_LIMIT bytes, or
one output when none waits); past the bound, outputs are dropped (and said), never the
result.
"""

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from kernel_service.api.errors import detail_of, status_of
from kernel_service.errors import ServiceError
from kernel_service_client.models import ExecutionResult, Output, StreamOutput, truncation_note

# While nothing else is sent, a comment this often (seconds).
KEEPALIVE = 10.0
# Bytes of outputs held for a client that reads slowly; outputs past it are dropped.
PENDING_LIMIT = 8 * 1024 * 1024

Run = Callable[[Callable[[Output], None]], Awaitable[ExecutionResult]]


def event(name: str, data: str) -> bytes:
    return f"event: {name}\ndata: {data}\n\n".encode()


class _EventQueue:
    """The events waiting for the client, at most PENDING_LIMIT bytes of outputs (or one
    output when none waits); outputs past that are dropped and a note says so."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._pending = 0  # bytes of output events waiting
        self._dropped_chars = self._dropped_outputs = 0

    def put_output(self, output: Output) -> None:
        item = event("output", output.model_dump_json())
        if self._pending and self._pending + len(item) > PENDING_LIMIT:
            if isinstance(output, StreamOutput):
                self._dropped_chars += len(output.text)
            else:
                self._dropped_outputs += 1
            return
        if self._dropped_chars or self._dropped_outputs:
            note = truncation_note(self._dropped_chars, self._dropped_outputs).replace(
                "output truncated", "not streamed (the client read too slowly)"
            )
            self.put(event("output", StreamOutput(name="stderr", text=note).model_dump_json()))
            self._dropped_chars = self._dropped_outputs = 0
        self._pending += len(item)
        self.put(item)

    def put(self, item: bytes | None) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> bytes | None:
        item = await self._queue.get()
        if item is not None and item.startswith(b"event: output"):
            self._pending = max(self._pending - len(item), 0)
        return item


async def execution_events(run: Run, interrupt_on_disconnect: bool) -> AsyncIterator[bytes]:
    """The events of one execution: `run(listener)` executes, telling `listener` of each
    output. If the client goes (this generator is closed early), the execution is cancelled
    when `interrupt_on_disconnect` (which interrupts the kernel), else left to finish."""
    queue = _EventQueue()

    async def execute() -> None:
        try:
            result = await run(queue.put_output)
        except ServiceError as exc:
            body = {"detail": detail_of(exc), "code": exc.code, "status": status_of(exc)}
            queue.put(event("error", json.dumps(body)))
        else:
            queue.put(event("result", result.model_dump_json()))
        finally:
            queue.put(None)

    task = asyncio.create_task(execute(), name="streamed-execution")
    finished = False
    try:
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE):
                    item = await queue.get()
            except TimeoutError:
                yield b": keep-alive\n\n"
                continue
            if item is None:
                finished = True
                break
            yield item
    finally:
        if not finished:  # the client went away (or the service is stopping)
            if interrupt_on_disconnect:
                task.cancel()  # interrupts the kernel; ends on its own
            _unattended.add(task)
            task.add_done_callback(_unattended.discard)


# Executions whose client has gone, still ending: held here, as the loop holds tasks weakly.
_unattended: set["asyncio.Task[None]"] = set()


def wants_stream(body_stream: bool, accept: str | None) -> bool:
    return body_stream or "text/event-stream" in (accept or "")


STREAM_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The result; with `stream`, Server-Sent Events (docs/http-api.md).",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "description": "Each event's data: an output (`output`), the "
                    "ExecutionResult (`result`) or an ErrorBody with `status` (`error`).",
                }
            }
        },
    }
}
