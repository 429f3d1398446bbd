"""Jupyter messages on a WebSocket (kernel_service/api/jupyter/frames.py), pure: the legacy
JSON text and binary layouts, the v1 subprotocol's layout (a vector built by hand from the
spec), and hostile frames, each of which must raise BadFrame and nothing else."""

import json
import struct
from typing import Any

import pytest

from kernel_service.api.jupyter.frames import (
    V1_PROTOCOL,
    BadFrame,
    ClientMessage,
    Framing,
    read,
    write,
)

HEADER = {"msg_id": "m-1", "msg_type": "execute_request", "session": "s", "version": "5.3"}


def _text(**message: Any) -> str:
    return json.dumps(message)


def _legacy_binary(json_part: bytes, *buffers: bytes) -> bytes:
    """Jupyter's legacy binary layout, by hand: a big-endian uint32 count of parts, each
    part's offset (uint32, from the frame's start), the message's JSON, then the buffers."""
    parts = [json_part, *buffers]
    start = 4 * (len(parts) + 1)
    offsets = []
    for part in parts:
        offsets.append(start)
        start += len(part)
    return struct.pack(f">{len(parts) + 1}I", len(parts), *offsets) + b"".join(parts)


def _v1(*parts: bytes) -> bytes:
    """v1.kernel.websocket.jupyter.org, by hand: a little-endian uint64 count N of offsets,
    the N offsets (uint64: where each part starts, the last where the frame ends), then the
    channel, header, parent header, metadata and content, and the buffers."""
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<Q{count}Q", count, *offsets) + b"".join(parts)


# ---------------------------------------------------------------- legacy JSON text


def test_a_text_message_is_read_with_every_part() -> None:
    message = read(
        _text(
            channel="control",
            header=HEADER,
            parent_header={"msg_id": "p"},
            metadata={"timeout": 3},
            content={"code": "1 + 1"},
        ),
        "legacy",
    )
    assert message == ClientMessage(
        channel="control",
        header=HEADER,
        metadata={"timeout": 3},
        content={"code": "1 + 1"},
        buffers=[],
    )
    assert (message.msg_type, message.msg_id) == ("execute_request", "m-1")


@pytest.mark.parametrize("framing", ["legacy", "v1"])
def test_a_text_message_without_channel_is_for_shell_and_null_parts_are_empty(
    framing: Framing,
) -> None:
    # (JSON text is read in either framing: lenient with v1 clients)
    message = read(_text(header=HEADER, parent_header=None, metadata=None, content=None), framing)
    assert message.channel == "shell"
    assert (message.metadata, message.content) == ({}, {})
    absent = read(_text(header=HEADER), framing)
    assert (absent.channel, absent.content, absent.buffers) == ("shell", {}, [])


def test_only_the_headers_protocol_fields_are_kept_each_bounded() -> None:
    # the header is the parent of every message of the request's answer: a client's extra
    # fields (a megabyte in one) would be copied into each
    header = {**HEADER, "junk": "x" * 1_000_000, "username": 7, "subshell_id": None}
    kept = read(_text(header=header), "legacy").header
    assert kept == {k: v for k, v in HEADER.items() if k != "username"}
    for field in ("msg_id", "session", "date"):
        with pytest.raises(BadFrame, match=f"header's {field} is longer than 256"):
            read(_text(header={**HEADER, field: "x" * 257}), "legacy")
    assert read(_text(header={**HEADER, "session": "x" * 256}), "legacy").header["session"]


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"header": HEADER, "channel": "bogus"}, "unknown channel 'bogus'"),
        ({"header": HEADER, "channel": ["shell"]}, "unknown channel"),
        ({"header": HEADER, "content": [1, 2]}, "content is not a JSON object"),
        ({"header": HEADER, "metadata": "x"}, "metadata is not a JSON object"),
        ({"header": HEADER, "parent_header": 7}, "parent_header is not a JSON object"),
    ],
)
def test_wrong_parts_beside_a_readable_header_carry_the_header(
    message: dict[str, Any], words: str
) -> None:
    with pytest.raises(BadFrame, match=words) as raised:
        read(json.dumps(message), "legacy")
    assert raised.value.header == HEADER  # so the request can be answered with an error


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ({"content": {}}, "no header object"),
        ({"header": None}, "no header object"),
        ({"header": "execute_request"}, "no header object"),
        ({"header": {"msg_id": "m"}}, "no msg_type"),
        ({"header": {"msg_id": "m", "msg_type": ""}}, "no msg_type"),
        ({"header": {"msg_id": "m", "msg_type": 5}}, "no msg_type"),
        ({"header": {"msg_type": "kernel_info_request"}}, "no msg_id"),
        ({"header": {"msg_type": "kernel_info_request", "msg_id": 12}}, "no msg_id"),
    ],
)
def test_a_header_that_cannot_be_answered_is_not_attached(
    message: dict[str, Any], words: str
) -> None:
    with pytest.raises(BadFrame, match=words) as raised:
        read(json.dumps(message), "legacy")
    assert raised.value.header is None


def test_legacy_write_is_one_json_text_frame_without_buffers() -> None:
    frame = write(
        {
            "channel": "iopub",
            "header": HEADER,
            "parent_header": {"msg_id": "p"},
            "metadata": {},
            "content": {"name": "stdout", "text": "hi\n"},
            "buffers": [b"\x00\x01"],
        },
        "legacy",
    )
    assert isinstance(frame, str)
    assert json.loads(frame) == {
        "channel": "iopub",
        "header": HEADER,
        "parent_header": {"msg_id": "p"},
        "metadata": {},
        "content": {"name": "stdout", "text": "hi\n"},
        "buffers": [],  # Jupyter Server's gateway client cannot read a binary frame
    }


def test_an_integer_past_64_bits_does_not_break_reading_or_writing() -> None:
    big = 2**70
    text = json.dumps({"header": HEADER, "content": {"n": big}})
    message = read(text, "legacy")
    assert message.content["n"] == pytest.approx(float(big))
    out = write(
        {
            "channel": "shell",
            "header": HEADER,
            "parent_header": {},
            "metadata": {},
            "content": {"n": big},
        },
        "legacy",
    )
    assert isinstance(out, str)
    assert json.loads(out)["content"]["n"] == big  # written exactly, not as a float


# ---------------------------------------------------------------- legacy binary


def test_a_legacy_binary_frame_is_read_with_its_buffers() -> None:
    body = json.dumps({"channel": "shell", "header": HEADER, "content": {"comm_id": "c"}}).encode()
    frame = _legacy_binary(body, b"\x00\xffraw", b"", b"second")
    assert frame[:4] == b"\x00\x00\x00\x04"  # big-endian: four parts
    message = read(frame, "legacy")
    assert message.header == HEADER
    assert message.content == {"comm_id": "c"}
    assert message.buffers == [b"\x00\xffraw", b"", b"second"]


def test_a_legacy_binary_frame_without_buffers() -> None:
    body = json.dumps({"header": HEADER}).encode()
    message = read(_legacy_binary(body), "legacy")
    assert (message.channel, message.buffers) == ("shell", [])


# ---------------------------------------------------------------- v1


V1_MESSAGE: dict[str, Any] = {
    "channel": "shell",
    "header": {"h": 1, "msg_id": "a", "msg_type": "comm_msg"},
    "parent_header": {},
    "metadata": {"m": True},
    "content": {"data": {"x": [1, 2]}},
    "buffers": [b"\x00\x01\x02", b"BUF"],
}
# By hand from the spec: 8 parts (channel, 4 JSON, 2 buffers) → N = 8 offsets, each a
# little-endian uint64; the first part starts after the count and the offsets: 8 * 9 = 72.
_V1_PARTS = [
    b"shell",  # 72..77
    b'{"h":1,"msg_id":"a","msg_type":"comm_msg"}',  # 77..119
    b"{}",  # 119..121
    b'{"m":true}',  # 121..131
    b'{"data":{"x":[1,2]}}',  # 131..151
    b"\x00\x01\x02",  # 151..154
    b"BUF",  # 154..157
]
V1_VECTOR = (
    (8).to_bytes(8, "little")
    + b"".join(n.to_bytes(8, "little") for n in (72, 77, 119, 121, 131, 151, 154, 157))
    + b"".join(_V1_PARTS)
)


def test_v1_protocol_name() -> None:
    assert V1_PROTOCOL == "v1.kernel.websocket.jupyter.org"


def test_v1_write_is_the_hand_built_vector() -> None:
    assert len(V1_VECTOR) == 157
    assert write(V1_MESSAGE, "v1") == V1_VECTOR


def test_v1_read_of_the_hand_built_vector() -> None:
    message = read(V1_VECTOR, "v1")
    assert message == ClientMessage(
        channel="shell",
        header={"msg_id": "a", "msg_type": "comm_msg"},  # Jupyter's fields alone are kept
        metadata={"m": True},
        content={"data": {"x": [1, 2]}},
        buffers=[b"\x00\x01\x02", b"BUF"],
    )


@pytest.mark.parametrize("buffers", [[], [b""], [b"a" * 1000, b"\xff" * 3]])
def test_v1_round_trip(buffers: list[bytes]) -> None:
    sent = {
        "channel": "control",
        "header": HEADER,
        "parent_header": {"msg_id": "p", "ü": "ß"},
        "metadata": {},
        "content": {"code": "print('é')"},
        "buffers": buffers,
    }
    frame = write(sent, "v1")
    assert isinstance(frame, bytes)
    message = read(frame, "v1")
    assert message.channel == "control"
    assert message.header == HEADER
    assert message.content == {"code": "print('é')"}
    assert message.buffers == buffers


def test_v1_wrong_channel_carries_the_header() -> None:
    frame = _v1(b"nope", json.dumps(HEADER).encode(), b"{}", b"{}", b"{}")
    with pytest.raises(BadFrame, match="unknown channel 'nope'") as raised:
        read(frame, "v1")
    assert raised.value.header == HEADER


def test_v1_content_that_is_not_an_object_carries_the_header() -> None:
    frame = _v1(b"shell", json.dumps(HEADER).encode(), b"{}", b"{}", b"[1]")
    with pytest.raises(BadFrame, match="content is not a JSON object") as raised:
        read(frame, "v1")
    assert raised.value.header == HEADER


# ---------------------------------------------------------------- hostile frames

_GOOD_HEADER = json.dumps(HEADER).encode()


def _hostile() -> list[tuple[str, Framing, bytes | str]]:
    v1_count = struct.pack("<Q", 6)
    start = 8 * 7
    good_v1 = _v1(b"shell", _GOOD_HEADER, b"{}", b"{}", b"{}")
    legacy_json = json.dumps({"header": HEADER}).encode()
    return [
        # text
        ("text not JSON", "legacy", "this is not json"),
        ("text empty", "legacy", ""),
        ("text JSON list", "legacy", "[1, 2]"),
        ("text JSON string", "legacy", '"execute_request"'),
        ("text JSON null", "legacy", "null"),
        ("text infinity", "legacy", '{"header": {"msg_id": "m", "msg_type": "x"}, "n": 1e400}'),
        ("text deep nesting", "legacy", "[" * 5000 + "]" * 5000),
        ("v1 text not JSON", "v1", "{"),
        # legacy binary
        ("legacy empty", "legacy", b""),
        ("legacy short count", "legacy", b"\x00\x00"),
        ("legacy zero parts", "legacy", struct.pack(">I", 0)),
        ("legacy absurd count", "legacy", struct.pack(">I", 0xFFFFFFFF) + b"\x00" * 64),
        ("legacy count past offsets", "legacy", struct.pack(">II", 3, 16)),
        ("legacy offset past end", "legacy", struct.pack(">II", 1, 1000) + legacy_json),
        ("legacy offset inside offsets", "legacy", struct.pack(">II", 1, 4) + legacy_json),
        (
            "legacy offsets out of order",
            "legacy",
            struct.pack(">III", 2, 20, 12) + legacy_json + b"pad-pad-",
        ),
        ("legacy JSON not JSON", "legacy", _legacy_binary(b"\x00\x01not json")),
        ("legacy JSON not UTF-8", "legacy", _legacy_binary(b'{"header": "\xff\xfe"}')),
        ("legacy JSON a list", "legacy", _legacy_binary(b"[]")),
        ("legacy no header", "legacy", _legacy_binary(b'{"content": {}}')),
        # v1
        ("v1 empty", "v1", b""),
        ("v1 short count", "v1", b"\x06\x00\x00"),
        ("v1 zero offsets", "v1", struct.pack("<Q", 0)),
        ("v1 absurd count", "v1", struct.pack("<Q", 2**64 - 1) + b"\x00" * 64),
        ("v1 count of 2**32", "v1", struct.pack("<Q", 2**32) + b"\x00" * 64),
        ("v1 count beyond the frame", "v1", struct.pack("<Q", 200) + b"\x00" * 64),
        ("v1 too few parts", "v1", _v1(b"shell", _GOOD_HEADER, b"{}")),
        ("v1 truncated", "v1", good_v1[:-1]),
        ("v1 truncated in its offsets", "v1", good_v1[:30]),
        (
            "v1 offset past the end",
            "v1",
            v1_count + struct.pack("<6Q", start, start + 5, 99, 100, 101, 2**63) + b"shell",
        ),
        (
            "v1 huge first offset",
            "v1",
            v1_count + struct.pack("<6Q", 2**64 - 1, 0, 0, 0, 0, 0) + b"shell",
        ),
        (
            "v1 offsets out of order",
            "v1",
            v1_count
            + struct.pack("<6Q", start, start + 5, start + 2, start + 6, start + 7, start + 8)
            + b"shell{}{}{}",
        ),
        (
            "v1 first offset inside the offsets",
            "v1",
            v1_count + struct.pack("<6Q", 8, 9, 10, 11, 12, 13) + b"shell",
        ),
        ("v1 channel not UTF-8", "v1", _v1(b"\xff\xfe", _GOOD_HEADER, b"{}", b"{}", b"{}")),
        ("v1 header not JSON", "v1", _v1(b"shell", b"{", b"{}", b"{}", b"{}")),
        ("v1 header a list", "v1", _v1(b"shell", b"[]", b"{}", b"{}", b"{}")),
        ("v1 header null", "v1", _v1(b"shell", b"null", b"{}", b"{}", b"{}")),
        ("v1 header without msg_type", "v1", _v1(b"shell", b'{"msg_id":"a"}', b"{}", b"{}", b"{}")),
        ("v1 parent not JSON", "v1", _v1(b"shell", _GOOD_HEADER, b"\x00", b"{}", b"{}")),
        ("v1 content infinity", "v1", _v1(b"shell", _GOOD_HEADER, b"{}", b"{}", b'{"n":1e999}')),
        ("v1 empty parts", "v1", _v1(b"", b"", b"", b"", b"")),
        (
            "v1 many offsets",
            "v1",
            _v1(b"shell", _GOOD_HEADER, b"{}", b"{}", b"{}", *([b"x"] * 300)),
        ),
    ]


@pytest.mark.parametrize(
    ("framing", "frame"),
    [pytest.param(framing, frame, id=name) for name, framing, frame in _hostile()],
)
def test_a_hostile_frame_raises_bad_frame_and_nothing_else(
    framing: Framing, frame: bytes | str
) -> None:
    with pytest.raises(BadFrame) as raised:
        read(frame, framing)
    assert str(raised.value)  # says what was wrong


def test_the_hostile_v1_frames_are_hostile_only_where_meant() -> None:
    """The vectors above differ from a readable frame only in what they break."""
    good = _v1(b"shell", _GOOD_HEADER, b"{}", b"{}", b"{}")
    assert read(good, "v1").header == HEADER
    assert read(_legacy_binary(json.dumps({"header": HEADER}).encode()), "legacy").header == HEADER
    # the most parts a frame may have is generous enough for ipywidgets' buffers
    many = _v1(b"shell", _GOOD_HEADER, b"{}", b"{}", b"{}", *([b"x"] * 200))
    assert len(read(many, "v1").buffers) == 200


def test_every_truncation_of_a_v1_frame_is_refused_cleanly() -> None:
    frame = write({**V1_MESSAGE, "buffers": [b"tail"]}, "v1")
    assert isinstance(frame, bytes)
    for end in range(len(frame)):
        with pytest.raises(BadFrame):
            read(frame[:end], "v1")


def test_every_truncation_of_a_legacy_binary_frame_is_refused_cleanly() -> None:
    frame = _legacy_binary(json.dumps({"header": HEADER}).encode(), b"buffer")
    for end in range(len(frame)):
        try:
            message = read(frame[:end], "legacy")
        except BadFrame:
            continue
        # cut inside the last buffer only: the frame is still a message, the buffer shorter
        assert message.buffers[0] == b"buffer"[: len(message.buffers[0])]
        assert end >= len(frame) - len(b"buffer")
