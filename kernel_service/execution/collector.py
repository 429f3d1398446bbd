"""Pure: turns the messages of one `execute_request` into ordered, size-bounded outputs.

Feed it every shell and iopub message as jupyter_client delivers them (dicts with
`header`, `parent_header`, `msg_type`, `content`); it keeps only those whose parent is
its request. The execution is complete when the `execute_reply` has arrived *and*
iopub has gone `idle` for the request (as nbclient does).

Memory is bounded: the first half of `output_limit` characters is kept from the start,
the other half from the end, and what lies between is counted, not kept. Every field an
output carries counts (an error's name, a display's metadata and id too), whatever the
kernel puts there.
"""

import json
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kernel_service.execution.text import apply_terminal_controls, strip_ansi
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    Output,
    StreamOutput,
    TruncatedOutput,
)
from kernel_service_client.outputs import cut_middle

Entry = dict[str, Any]
# Characters of an error's name or a display's id kept; longer ones are cut.
NAME_LIMIT = 200
# Characters (as JSON) of an output's metadata kept; larger metadata is dropped.
METADATA_LIMIT = 16 * 1024
# Told of each output as it arrives (streaming).
OutputListener = Callable[[Output], None]


@dataclass(frozen=True)
class OutputLimits:
    """What one execution may keep: half of each budget from the start, half from the end."""

    text: int  # characters of text: streams, tracebacks, text-like MIME values
    rich: int  # characters of binary display data (base64 images, PDFs, ...)


def is_rich_mime(mime: str) -> bool:
    """Binary (base64) display data, budgeted apart from text so plots survive long prints."""
    return mime.startswith(("image/", "video/", "audio/")) or mime == "application/pdf"


def _value_size(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(json.dumps(value, default=str))


def _sizes(entry: Entry) -> tuple[int, int]:
    """(text, rich) characters an entry holds."""
    kind = entry["output_type"]
    if kind == "stream":
        return len(entry["text"]), 0
    if kind == "error":
        traceback = sum(len(line) for line in entry["traceback"])
        return traceback + len(entry["evalue"]) + len(entry["ename"]), 0
    metadata = entry.get("metadata")
    text = len(entry.get("display_id") or "") + (_value_size(metadata) if metadata else 0)
    rich = 0
    for mime, value in entry["data"].items():
        if is_rich_mime(mime):
            rich += _value_size(value)
        else:
            text += _value_size(value)
    return text, rich


def _is_stream(entry: Entry, name: str | None = None) -> bool:
    return entry["output_type"] == "stream" and (name is None or entry["name"] == name)


class _BoundedOutputs:
    """An ordered list of outputs that keeps a head and a tail within two budgets.

    One output larger than half a budget is cut (text) or left out (rich data) on arrival,
    so every entry fits in a half and memory stays bounded whatever the kernel sends.
    """

    def __init__(self, limits: OutputLimits) -> None:
        self._half_text = max(limits.text // 2, 1)
        self._half_rich = max(limits.rich // 2, 1)
        self.clear()

    def clear(self) -> None:
        self._head: list[Entry] = []
        self._tail: deque[Entry] = deque()
        self._head_text = self._head_rich = 0
        self._tail_text = self._tail_rich = 0
        self._cutting = False
        self.omitted_chars = 0
        self.omitted_outputs = 0

    def add(self, entry: Entry) -> None:
        """Keep a fitted entry (see `fit`) within the budgets."""
        text, rich = _sizes(entry)
        if not self._cutting:
            text_room = self._half_text - self._head_text
            if text <= text_room and self._head_rich + rich <= self._half_rich:
                self._append(self._head, entry)
                self._head_text += text
                self._head_rich += rich
                return
            self._cutting = True
            if _is_stream(entry) and text_room > 0:
                self._append(self._head, {**entry, "text": entry["text"][:text_room]})
                self._head_text += text_room
                entry = {**entry, "text": entry["text"][text_room:]}
                text -= text_room
        self._append(self._tail, entry)
        self._tail_text += text
        self._tail_rich += rich
        self._trim_tail()

    def _trim_tail(self) -> None:
        """Drop the oldest tail content until both budgets hold.

        Text is trimmed from the oldest text outputs, passing over images (whose only text
        is a short label), so long prints around a plot do not push the plot out.
        """
        while self._tail_rich > self._half_rich:
            index = next(i for i, e in enumerate(self._tail) if _sizes(e)[1] > 0)
            self._drop(index)
        while self._tail_text > self._half_text:
            index = next(
                (i for i, e in enumerate(self._tail) if _sizes(e)[0] > 0 and _sizes(e)[1] == 0),
                0,
            )
            entry = self._tail[index]
            excess = self._tail_text - self._half_text
            if _is_stream(entry) and excess < len(entry["text"]):
                entry["text"] = entry["text"][excess:]
                self.omitted_chars += excess
                self._tail_text -= excess
                return
            self._drop(index)

    def _drop(self, index: int) -> None:
        entry = self._tail[index]
        del self._tail[index]
        text, rich = _sizes(entry)
        self._tail_text -= text
        self._tail_rich -= rich
        self.omitted_chars += text + rich
        if not _is_stream(entry):
            self.omitted_outputs += 1

    def fit(self, entry: Entry) -> Entry:
        """The entry with any part too large for a half budget cut or left out."""
        kind = entry["output_type"]
        if kind == "error":
            evalue, omitted = cut_middle(entry["evalue"], self._half_text // 4)
            traceback = entry["traceback"]
            joined = "\n".join(traceback)
            if len(joined) > self._half_text // 2:
                joined, omitted_lines = cut_middle(joined, self._half_text // 2)
                traceback = joined.split("\n")
                omitted += omitted_lines
            ename, omitted_name = _cut_name(entry["ename"])
            self.omitted_chars += omitted + omitted_name
            return {**entry, "ename": ename, "evalue": evalue, "traceback": traceback}
        if kind in ("display_data", "execute_result"):
            fitted = {
                **entry,
                "data": self._fit_data(entry["data"]),
                "metadata": self._fit_metadata(entry["metadata"]),
            }
            if entry.get("display_id") is not None:
                fitted["display_id"], omitted = _cut_name(entry["display_id"])
                self.omitted_chars += omitted
            return fitted
        return entry

    def _fit_metadata(self, metadata: dict[str, Any]) -> dict[str, Any]:
        if not metadata:
            return metadata
        size = _value_size(metadata)
        if size <= METADATA_LIMIT:
            return metadata
        self.omitted_chars += size
        return {}

    def _fit_data(self, data: dict[str, Any]) -> dict[str, Any]:
        fitted: dict[str, Any] = {}
        for mime, value in data.items():
            size = _value_size(value)
            if is_rich_mime(mime):
                if size <= self._half_rich:
                    fitted[mime] = value
                    continue
                note = f"[{mime} of {size:,} characters omitted: over the output limit]"
                fitted.setdefault("text/plain", note)
            elif isinstance(value, str):
                fitted[mime], omitted = cut_middle(value, self._half_text // 2)
                size = omitted
            elif size <= self._half_text // 2:
                fitted[mime] = value
                continue
            self.omitted_chars += size
        return fitted

    @staticmethod
    def _append(region: list[Entry] | deque[Entry], entry: Entry) -> None:
        if region and _is_stream(entry) and _is_stream(region[-1], entry["name"]):
            region[-1]["text"] += entry["text"]
        else:
            region.append(dict(entry))

    def update_display(
        self, display_id: str, data: dict[str, Any], metadata: dict[str, Any]
    ) -> None:
        """Replace the data of every output with `display_id`, within the budgets."""
        fitted = self._fit_data(data)
        metadata = self._fit_metadata(metadata)
        new_text, new_rich = _sizes(
            {"output_type": "display_data", "data": fitted, "metadata": metadata}
        )
        for in_head, region in ((True, self._head), (False, self._tail)):
            for entry in region:
                if entry.get("display_id") != display_id:
                    continue
                old_text, old_rich = _sizes({**entry, "display_id": None})
                text_used = (self._head_text if in_head else self._tail_text) - old_text
                rich_used = (self._head_rich if in_head else self._tail_rich) - old_rich
                if text_used + new_text > self._half_text or rich_used + new_rich > self._half_rich:
                    self.omitted_chars += new_text + new_rich
                    self.omitted_outputs += 1
                    continue  # the update would not fit: the output keeps what it showed
                entry["data"], entry["metadata"] = fitted, metadata
                if in_head:
                    self._head_text, self._head_rich = text_used + new_text, rich_used + new_rich
                else:
                    self._tail_text, self._tail_rich = text_used + new_text, rich_used + new_rich

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

    def __init__(
        self, msg_id: str, limits: OutputLimits, listener: OutputListener | None = None
    ) -> None:
        """`listener` is told of each output as it arrives (a stream output carries only the
        new text; neither limits nor clear_output nor display updates apply to what it is
        told: the final `outputs()` are the truth)."""
        self.msg_id = msg_id
        self.reply: dict[str, Any] | None = None
        self.idle = False
        self.started = False  # the kernel announced the code (execute_input): it runs now
        self.raised = False  # an error output came (an exception, KeyboardInterrupt included)
        self._outputs = _BoundedOutputs(limits)
        self._clear_on_next_output = False
        self._listener = listener

    @property
    def done(self) -> bool:
        """True once the execute_reply has arrived and iopub went idle for this request."""
        return self.reply is not None and self.idle

    def end_unanswered(self) -> None:
        """The kernel went idle for this request and will send no reply (ipykernel drops
        it when an interrupt lands as it takes the request up): it ends as interrupted."""
        self.reply = {
            "status": "error",
            "ename": "KeyboardInterrupt",
            "evalue": "interrupted as it began; the kernel sent no reply",
            "traceback": [],
        }

    @property
    def execution_count(self) -> int | None:
        count = (self.reply or {}).get("execution_count")
        return count if isinstance(count, int) else None

    def feed(self, msg: dict[str, Any]) -> None:
        """Take one message from the shell or iopub channel; others' messages are ignored."""
        if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
            return
        msg_type = msg["header"]["msg_type"]
        content = _dict(msg.get("content"))
        if msg_type.endswith("_reply"):
            self.reply = content
        elif msg_type == "status":
            if content.get("execution_state") == "idle":
                self.idle = True
        elif msg_type == "execute_input":
            self.started = True
        elif msg_type == "error":
            self.raised = True
            self._add(msg_type, content)
        elif msg_type == "clear_output":
            if content.get("wait"):
                self._clear_on_next_output = True
            else:
                self._outputs.clear()
        elif msg_type == "update_display_data":
            display_id = _dict(content.get("transient")).get("display_id")
            if display_id is not None:
                self._outputs.update_display(
                    _cut_name(str(display_id))[0],
                    _dict(content.get("data")),
                    _dict(content.get("metadata")),
                )
        else:
            self._add(msg_type, content)

    def _add(self, msg_type: str, content: dict[str, Any]) -> None:
        entry = _entry_from(msg_type, content)
        if entry is None:
            return
        entry = self._outputs.fit(entry)
        if self._listener is not None:
            self._listener(_output_of(entry))
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
            if entry["output_type"] == "stream":
                text = apply_terminal_controls(entry["text"])
                result.append(StreamOutput(name=entry["name"], text=text))
            else:
                result.append(_output_of(entry))
        return result

    def reply_error(self) -> ErrorOutput | None:
        """The error the execute_reply carries, for when its iopub `error` never arrived."""
        if self.reply is None or self.reply.get("status") != "error":
            return None
        ename, evalue = _error_words(self.reply)
        return ErrorOutput(
            ename=ename,
            evalue=evalue,
            traceback=[strip_ansi(line) for line in self.reply.get("traceback", [])],
        )


def _error_words(content: dict[str, Any]) -> tuple[str, str]:
    """An error's name and value. A shell's kernel (bash_kernel) names none and gives the
    failed command's exit status as the value: said in words a reader understands."""
    ename, evalue = str(content.get("ename") or ""), str(content.get("evalue", ""))
    if ename:
        return ename, evalue
    if evalue.isdigit():
        return "ExitStatus", f"the last command exited with status {evalue}"
    return "Error", evalue


def _cut_name(name: str) -> tuple[str, int]:
    """A name (an error's, a display's id) cut to NAME_LIMIT, and how much was left out."""
    if len(name) <= NAME_LIMIT:
        return name, 0
    return name[: NAME_LIMIT - 1] + "…", len(name) - NAME_LIMIT + 1


def _dict(value: Any) -> dict[str, Any]:
    """A mapping from the kernel as a str-keyed dict; anything else as empty (untrusted input)."""
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _output_of(entry: Entry) -> Output:
    kind = entry["output_type"]
    if kind == "stream":
        return StreamOutput(name=entry["name"], text=entry["text"])
    if kind == "display_data":
        return DisplayDataOutput.model_validate(entry)
    if kind == "execute_result":
        return ExecuteResultOutput.model_validate(entry)
    if kind == "error":
        return ErrorOutput.model_validate(entry)
    return TruncatedOutput.model_validate(entry)


def _entry_from(msg_type: str, content: dict[str, Any]) -> Entry | None:
    """The output a message carries, its fields coerced to the types the models expect."""
    if msg_type == "stream":
        name = content.get("name")
        if name not in ("stdout", "stderr"):
            return None
        return {"output_type": "stream", "name": name, "text": str(content.get("text", ""))}
    if msg_type in ("display_data", "execute_result"):
        entry: Entry = {
            "output_type": msg_type,
            "data": _dict(content.get("data")),
            "metadata": _dict(content.get("metadata")),
        }
        if msg_type == "execute_result":
            count = content.get("execution_count")
            entry["execution_count"] = count if isinstance(count, int) else None
        else:
            display_id = _dict(content.get("transient")).get("display_id")
            entry["display_id"] = None if display_id is None else str(display_id)
        return entry
    if msg_type == "error":
        traceback = content.get("traceback")
        ename, evalue = _error_words(content)
        return {
            "output_type": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": [strip_ansi(str(line)) for line in traceback]
            if isinstance(traceback, list)
            else [],
        }
    return None
