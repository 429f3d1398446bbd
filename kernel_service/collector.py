"""Pure: turns the messages of one `execute_request` into ordered, size-bounded outputs.

Feed it every shell and iopub message as jupyter_client delivers them (dicts with
`header`, `parent_header`, `msg_type`, `content`); it keeps only those whose parent is
its request. The execution is complete when the `execute_reply` has arrived *and*
iopub has gone `idle` for the request (as nbclient does).

Memory is bounded: the first half of `output_limit` characters is kept from the start,
the other half from the end, and what lies between is counted, not kept.
"""

import json
import re
from collections import deque
from collections.abc import Iterable
from typing import Any

from kernel_service.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    Output,
    StreamOutput,
    TruncatedOutput,
)

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07")

Entry = dict[str, Any]


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


def _size(entry: Entry) -> int:
    kind = entry["output_type"]
    if kind == "stream":
        return len(entry["text"])
    if kind == "error":
        return sum(len(line) for line in entry["traceback"]) + len(entry["evalue"])
    return sum(
        len(value) if isinstance(value, str) else len(json.dumps(value))
        for value in entry["data"].values()
    )


def _is_stream(entry: Entry, name: str | None = None) -> bool:
    return entry["output_type"] == "stream" and (name is None or entry["name"] == name)


class _BoundedOutputs:
    """An ordered list of outputs that keeps a head and a tail within a character budget."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit // 2
        self._tail_limit = limit - self._head_limit
        self.clear()

    def clear(self) -> None:
        self._head: list[Entry] = []
        self._head_size = 0
        self._tail: deque[Entry] = deque()
        self._tail_size = 0
        self._cutting = False
        self.omitted_chars = 0
        self.omitted_outputs = 0

    def add(self, entry: Entry) -> None:
        size = _size(entry)
        if not self._cutting:
            room = self._head_limit - self._head_size
            if size <= room:
                self._append(self._head, entry)
                self._head_size += size
                return
            self._cutting = True
            if _is_stream(entry) and room > 0:
                self._append(self._head, {**entry, "text": entry["text"][:room]})
                self._head_size += room
                entry = {**entry, "text": entry["text"][room:]}
                size -= room
        self._append(self._tail, entry)
        self._tail_size += size
        self._trim_tail()

    def _trim_tail(self) -> None:
        while self._tail_size > self._tail_limit and self._tail:
            first = self._tail[0]
            excess = self._tail_size - self._tail_limit
            if _is_stream(first) and len(first["text"]) > excess:
                first["text"] = first["text"][excess:]
                self.omitted_chars += excess
                self._tail_size -= excess
                return
            self._tail.popleft()
            size = _size(first)
            self._tail_size -= size
            self.omitted_chars += size
            if not _is_stream(first):
                self.omitted_outputs += 1

    @staticmethod
    def _append(region: list[Entry] | deque[Entry], entry: Entry) -> None:
        if region and _is_stream(entry) and _is_stream(region[-1], entry["name"]):
            region[-1]["text"] += entry["text"]
        else:
            region.append(dict(entry))

    def update_display(
        self, display_id: str, data: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        for entry in (*self._head, *self._tail):
            if entry.get("display_id") == display_id:
                entry["data"] = data
                entry["metadata"] = metadata

    def entries(self) -> list[Entry]:
        cut: list[Entry] = []
        if self.omitted_chars or self.omitted_outputs:
            cut = [
                {
                    "output_type": "truncated",
                    "omitted_chars": self.omitted_chars,
                    "omitted_outputs": self.omitted_outputs,
                }
            ]
        return [*self._head, *cut, *self._tail]


class ExecutionCollector:
    """Gathers the reply and outputs of one request, identified by its msg_id.

    The request is an `execute_request`, or a `kernel_info_request` when probing readiness.
    """

    def __init__(self, msg_id: str, output_limit: int) -> None:
        self.msg_id = msg_id
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self._outputs = _BoundedOutputs(output_limit)
        self._clear_on_next_output = False

    @property
    def done(self) -> bool:
        """True once the execute_reply has arrived and iopub went idle for this request."""
        return self.reply is not None and self.idle

    @property
    def execution_count(self) -> int | None:
        count = (self.reply or {}).get("execution_count")
        return count if isinstance(count, int) else None

    def feed(self, msg: dict[str, Any]) -> None:
        """Take one message from the shell or iopub channel; others' messages are ignored."""
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        msg_type = msg["header"]["msg_type"]
        content: dict[str, Any] = msg.get("content", {})
        if msg_type.endswith("_reply"):
            self.reply = content
        elif msg_type == "status":
            if content.get("execution_state") == "idle":
                self.idle = True
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_on_next_output = True
            else:
                self._outputs.clear()
        elif msg_type == "update_display_data":
            display_id = content.get("transient", {}).get("display_id")
            if display_id:
                self._outputs.update_display(
                    display_id, content.get("data", {}), content.get("metadata", {})
                )
        else:
            entry = _entry_from(msg_type, content)
            if entry is not None:
                if self._clear_on_next_output:
                    self._clear_on_next_output = False
                    self._outputs.clear()
                self._outputs.add(entry)

    def feed_all(self, msgs: Iterable[dict[str, Any]]) -> None:
        for msg in msgs:
            self.feed(msg)

    def outputs(self) -> list[Output]:
        """The outputs so far, in arrival order, with terminal controls applied to streams."""
        result: list[Output] = []
        for entry in self._outputs.entries():
            kind = entry["output_type"]
            if kind == "stream":
                result.append(
                    StreamOutput(name=entry["name"], text=apply_terminal_controls(entry["text"]))
                )
            elif kind == "display_data":
                result.append(DisplayDataOutput.model_validate(entry))
            elif kind == "execute_result":
                result.append(ExecuteResultOutput.model_validate(entry))
            elif kind == "error":
                result.append(ErrorOutput.model_validate(entry))
            else:
                result.append(TruncatedOutput.model_validate(entry))
        return result

    def reply_error(self) -> ErrorOutput | None:
        """The error the execute_reply carries, for when its iopub `error` never arrived."""
        if self.reply is None or self.reply.get("status") != "error":
            return None
        return ErrorOutput(
            ename=str(self.reply.get("ename", "Error")),
            evalue=str(self.reply.get("evalue", "")),
            traceback=[strip_ansi(line) for line in self.reply.get("traceback", [])],
        )


def _entry_from(msg_type: str, content: dict[str, Any]) -> Entry | None:
    if msg_type == "stream":
        name = content.get("name")
        if name not in ("stdout", "stderr"):
            return None
        return {"output_type": "stream", "name": name, "text": str(content.get("text", ""))}
    if msg_type == "display_data":
        return {
            "output_type": "display_data",
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
            "display_id": content.get("transient", {}).get("display_id"),
        }
    if msg_type == "execute_result":
        return {
            "output_type": "execute_result",
            "execution_count": content.get("execution_count"),
            "data": content.get("data", {}),
            "metadata": content.get("metadata", {}),
        }
    if msg_type == "error":
        return {
            "output_type": "error",
            "ename": str(content.get("ename", "Error")),
            "evalue": str(content.get("evalue", "")),
            "traceback": [strip_ansi(line) for line in content.get("traceback", [])],
        }
    return None
