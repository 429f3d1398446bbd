"""The service's own codec for Jupyter messages speaks the wire format of jupyter_client's
`Session` (what ipykernel uses) both ways, and refuses what `Session` refuses."""

import pytest
from jupyter_client.session import Session

from kernel_service.kernel.messages import _REMEMBERED, BadMessage, MessageCodec

KEY = b"a-kernel-key-0123456789abcdef"


def kernel_message(session: Session, msg_type: str, content: dict[str, object]) -> list[bytes]:
    """Frames as a kernel sends them (identities first on iopub: the topic)."""
    msg = session.msg(msg_type, content, parent=session.msg_header("execute_request"))
    return [b"kernel.abc.status", *session.serialize(msg)]


def test_reads_what_a_kernel_sends() -> None:
    kernel = Session(key=KEY)
    frames = kernel_message(kernel, "status", {"execution_state": "idle"})
    msg = MessageCodec(KEY).read(frames)
    assert msg["msg_type"] == msg["header"]["msg_type"] == "status"
    assert msg["content"] == {"execution_state": "idle"}
    assert msg["parent_header"]["msg_type"] == "execute_request"
    assert isinstance(msg["header"]["date"], str)  # left as it came: nothing reads it


def test_a_kernel_reads_its_requests() -> None:
    codec, kernel = MessageCodec(KEY), Session(key=KEY)
    msg_id, frames = codec.request("execute_request", {"code": "1+1", "silent": False})
    _, parts = kernel.feed_identities(frames)
    msg = kernel.deserialize(parts)  # checks the signature, parses the date
    assert msg["header"]["msg_id"] == msg_id
    assert msg["header"]["version"].startswith("5.")
    assert msg["content"] == {"code": "1+1", "silent": False}
    assert codec.request("kernel_info_request", {})[0] != msg_id


@pytest.mark.parametrize("scheme", ["hmac-sha256", "hmac-sha512"])
def test_signature_schemes(scheme: str) -> None:
    kernel = Session(key=KEY, signature_scheme=scheme)
    frames = kernel_message(kernel, "stream", {"name": "stdout", "text": "hi"})
    assert MessageCodec(KEY, scheme).read(frames)["content"]["text"] == "hi"
    with pytest.raises(BadMessage):
        MessageCodec(KEY, "hmac-sha384").read(frames)


def test_refuses_what_the_kernel_did_not_sign() -> None:
    codec = MessageCodec(KEY)
    signed = kernel_message(Session(key=KEY), "status", {"execution_state": "busy"})
    forged = kernel_message(Session(key=b"another key"), "status", {"execution_state": "busy"})
    unsigned = [*signed[:2], b"", *signed[3:]]
    tampered = [*signed[:-1], b'{"execution_state": "idle"}']
    for frames, why in (
        (forged, "another key"),
        (unsigned, "signed"),
        (tampered, "signed"),
        (signed[:5], "four parts"),
        ([b"no", b"delimiter"], "delimiter"),
    ):
        with pytest.raises(BadMessage, match=why):
            codec.read(frames)
    codec.read(signed)
    with pytest.raises(BadMessage, match="replayed"):
        codec.read(signed)


def test_refuses_signed_parts_that_are_not_a_message() -> None:
    codec = MessageCodec(KEY)
    for header, content, why in ((b"[1]", b"{}", "object"), (b"{}", b"not json", "JSON")):
        parts = [header, b"{}", b"{}", content]
        with pytest.raises(BadMessage, match=why):
            codec.read([b"<IDS|MSG>", codec._sign(parts), *parts])


def test_a_key_and_a_known_scheme_are_required() -> None:
    with pytest.raises(ValueError, match="empty"):
        MessageCodec(b"")
    for scheme in ("sha256", "hmac-nonesuch"):
        with pytest.raises(ValueError, match="scheme"):
            MessageCodec(KEY, scheme)


def test_reads_a_message_with_bytes_a_kernel_escaped() -> None:
    """ipykernel packs with `.encode("utf8", errors="surrogateescape")`: a string holding an
    undecodable file name (os.listdir gives '\\udcff' for a byte 0xff) goes out as a raw,
    invalid-UTF-8 byte. Session decoded it with errors="replace"; orjson refuses it."""
    kernel = Session(key=KEY)
    msg = kernel.msg(
        "stream",
        {"name": "stdout", "text": "caf\udce9.txt\n"},
        parent=kernel.msg_header("execute_request"),
    )
    frames = kernel.serialize(msg)
    assert b"\xe9" in frames[-1]  # not valid UTF-8
    read = MessageCodec(KEY).read(frames)
    assert read["content"]["text"] == "caf\ufffd.txt\n"


def test_numbers_are_read_as_jupyter_client_reads_them() -> None:
    kernel = Session(key=KEY)
    content = {"data": {"application/json": {"big": 2**70, "small": 7, "x": 0.5}}}
    msg = kernel.msg("display_data", content, parent=kernel.msg_header("execute_request"))
    frames = kernel.serialize(msg)
    theirs = Session(key=KEY).deserialize(frames[1:])["content"]
    assert MessageCodec(KEY).read(frames)["content"] == theirs


def test_deep_nesting_is_a_bad_message_not_a_crash() -> None:
    codec = MessageCodec(KEY)
    content = b"[" * 100_000 + b'"\xff"' + b"]" * 100_000  # not UTF-8: json reads it, deep
    parts = [b'{"msg_type": "stream"}', b"{}", b"{}", content]
    with pytest.raises(BadMessage, match="JSON"):
        codec.read([b"<IDS|MSG>", codec._sign(parts), *parts])


def test_the_replay_window_is_bounded() -> None:
    """Signatures are remembered to refuse replays, the newest _REMEMBERED only: a kernel
    that sends for days does not grow the service's memory."""
    codec, kernel = MessageCodec(KEY), Session(key=KEY)
    first = kernel_message(kernel, "status", {"execution_state": "busy"})
    codec.read(first)
    for _ in range(_REMEMBERED - 1):
        codec.read(kernel_message(kernel, "status", {"execution_state": "busy"}))
    with pytest.raises(BadMessage, match="replayed"):
        codec.read(first)  # still within the window
    codec.read(kernel_message(kernel, "status", {"execution_state": "idle"}))
    codec.read(first)  # out of it now
    assert len(codec._seen) == len(codec._seen_order) == _REMEMBERED
