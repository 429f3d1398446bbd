"""Jupyter messages on a WebSocket, in the framings Jupyter clients speak (pure).

- **Legacy** (no subprotocol; what Kernel Gateway and Jupyter Server's gateway client
  speak): a message is a JSON text frame with a `channel` field. A message with binary
  buffers may come as a binary frame: a big-endian uint32 count of parts, their offsets
  (uint32), the JSON, then the buffers. The service always answers in text frames, without
  buffers: Jupyter Server's gateway client cannot read a binary frame.
- **v1** (`v1.kernel.websocket.jupyter.org`, chosen when the client offers it): every
  message is a binary frame: a little-endian uint64 count of offsets, the offsets (uint64),
  then the channel name, the header, parent header, metadata and content (JSON each) and
  the buffers. Buffers go both ways.

Reading never trusts the client: a frame that is not a message raises BadFrame, which
says what was wrong, and carries the request's header when it could be read (so the
bridge can answer that request with an error).
"""

import itertools
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

V1_PROTOCOL = "v1.kernel.websocket.jupyter.org"
CHANNELS = ("shell", "control", "stdin", "iopub")

Channel = Literal["shell", "control", "stdin", "iopub"]
Frame = str | bytes
Framing = Literal["legacy", "v1"]

# Parts a binary frame may have: the message's and its buffers (ipywidgets sends a few).
_MAX_PARTS = 256
# What is kept of a client's header: Jupyter's fields, strings of at most MAX_FIELD each.
HEADER_FIELDS = ("msg_id", "msg_type", "username", "session", "date", "version")
MAX_FIELD = 256


class BadFrame(ValueError):
    """A frame that is not a Jupyter message; `header` is the request's, when it was read."""

    def __init__(self, reason: str, header: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.header = header


@dataclass
class ClientMessage:
    """A message from a client: its channel, its parts, and its binary buffers."""

    channel: Channel
    header: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    content: dict[str, Any] = field(default_factory=dict)
    buffers: list[bytes] = field(default_factory=list)

    @property
    def msg_type(self) -> str:
        msg_type: str = self.header["msg_type"]
        return msg_type

    @property
    def msg_id(self) -> str:
        msg_id: str = self.header["msg_id"]
        return msg_id


def _loads(data: bytes | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadFrame(f"the frame is not JSON ({exc})") from None


def dumps(value: Any) -> bytes:
    """JSON as orjson writes it, or the standard library where orjson cannot (an integer
    past 64 bits that a client sent)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, default=str).encode()


def read(data: Frame, framing: Framing) -> ClientMessage:
    """The message in one frame from a client. Raises BadFrame."""
    if isinstance(data, str):  # JSON text, whatever the framing (lenient with v1 clients)
        return _message(_loads(data), buffers=[])
    if framing == "v1":
        return _read_v1(data)
    return _read_legacy_binary(data)


def write(message: dict[str, Any], framing: Framing) -> Frame:
    """One frame for a message to a client: `message` has `channel`, `header`,
    `parent_header`, `metadata`, `content` and `buffers`."""
    if framing == "v1":
        return _write_v1(message)
    text = {**message, "buffers": []}
    return dumps(text).decode()


# ---------------------------------------------------------------- reading


def _message(value: Any, buffers: list[bytes]) -> ClientMessage:
    """A message from its parsed JSON (with `channel`)."""
    if not isinstance(value, dict):
        raise BadFrame("a message is a JSON object with header, content and channel")
    header = value.get("header")
    if not isinstance(header, dict):
        raise BadFrame("the message has no header object")
    return _checked(value.get("channel", "shell"), header, value, buffers)


def _checked(
    channel: Any, header: dict[str, Any], parts: dict[str, Any], buffers: list[bytes]
) -> ClientMessage:
    header = _bounded(header)
    if channel not in CHANNELS:
        raise BadFrame(f"unknown channel {channel!r}: one of {', '.join(CHANNELS)}", header)
    for name in ("metadata", "content"):
        value = parts.get(name, {})
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise BadFrame(f"the message's {name} is not a JSON object", header)
        parts[name] = value
    parent = parts.get("parent_header")
    if parent is not None and not isinstance(parent, dict):
        raise BadFrame("the message's parent_header is not a JSON object", header)
    return ClientMessage(
        channel=channel,
        header=header,
        # the kernel never sees a client's headers (the service writes its own), and a
        # request's parent is not used: not kept
        metadata=parts["metadata"],
        content=parts["content"],
        buffers=buffers,
    )


def _bounded(header: dict[str, Any]) -> dict[str, Any]:
    """The header's protocol fields, each a string of at most MAX_FIELD characters: it is
    the parent header of every message the request's answer relays, so nothing else of it
    is kept (a client's extra fields, a megabyte in one, would be copied into them all)."""
    kept: dict[str, Any] = {}
    for name in HEADER_FIELDS:
        value = header.get(name)
        if not isinstance(value, str):
            continue  # absent or not text: left out (without msg_id or msg_type, refused below)
        if len(value) > MAX_FIELD:
            raise BadFrame(f"the header's {name} is longer than {MAX_FIELD} characters")
        kept[name] = value
    if not kept.get("msg_type"):
        raise BadFrame("the header has no msg_type (a string, such as execute_request)")
    if not isinstance(kept.get("msg_id"), str):
        raise BadFrame("the header has no msg_id (a string)")
    return kept


def _offsets(data: bytes, fmt: str, size: int) -> list[int]:
    """The offsets a binary frame starts with (its first word counts them), checked to lie
    in order within the frame."""
    if len(data) < size:
        raise BadFrame("a binary frame shorter than its header")
    (count,) = struct.unpack(fmt + ("Q" if size == 8 else "I"), data[:size])
    if not 1 <= count <= _MAX_PARTS or len(data) < size * (count + 1):
        raise BadFrame("a binary frame whose offsets do not fit it")
    word = "Q" if size == 8 else "I"
    offsets = list(struct.unpack(f"{fmt}{count}{word}", data[size : size * (count + 1)]))
    if offsets[0] < size * (count + 1) or any(a > b for a, b in itertools.pairwise(offsets)):
        raise BadFrame("a binary frame whose offsets are out of order")
    if offsets[-1] > len(data):
        raise BadFrame("a binary frame whose offsets pass its end")
    return offsets


def _read_legacy_binary(data: bytes) -> ClientMessage:
    """Jupyter's legacy binary layout: the parts' count, their starts, the JSON, buffers."""
    starts = _offsets(data, ">", 4)
    ends = [*starts[1:], len(data)]
    parts = [data[a:b] for a, b in zip(starts, ends, strict=True)]
    return _message(_loads(parts[0]), buffers=parts[1:])


def _read_v1(data: bytes) -> ClientMessage:
    """`v1.kernel.websocket.jupyter.org`: the offsets, channel, four JSON parts, buffers."""
    offsets = _offsets(data, "<", 8)
    if len(offsets) < 6:
        raise BadFrame("a v1 frame has a channel and four JSON parts")
    parts = [data[a:b] for a, b in itertools.pairwise(offsets)]
    try:
        channel = parts[0].decode()
    except UnicodeDecodeError:
        raise BadFrame("a v1 frame whose channel is not text") from None
    header = _loads(parts[1])
    if not isinstance(header, dict):
        raise BadFrame("the message has no header object")
    names = ("parent_header", "metadata", "content")  # parsed (and checked) all three
    named = dict(zip(names, map(_loads, parts[2:5]), strict=True))
    return _checked(channel, header, named, buffers=parts[5:])


# ---------------------------------------------------------------- writing


def _write_v1(message: dict[str, Any]) -> bytes:
    parts = [
        message["channel"].encode(),
        dumps(message["header"]),
        dumps(message["parent_header"]),
        dumps(message["metadata"]),
        dumps(message["content"]),
        *message.get("buffers", ()),
    ]
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(parts)
