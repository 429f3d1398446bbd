"""Jupyter messages as the service writes and reads them: signed requests out, checked and
parsed messages in (the wire format of the Jupyter messaging protocol, version 5).

jupyter_client's `Session` does the same, and more than the service needs: for each message
it parses the dates of the header and the parent header (with dateutil), adapts older
protocol versions and copies an HMAC object per part. In the 32-client throughput benchmark
that was a tenth of the service's CPU; here a message costs an HMAC over its four JSON parts
(a copy of one keyed HMAC) and four JSON parses (orjson, as jupyter_client; the standard
library's for bytes that are not UTF-8, as jupyter_client too). Dates stay the strings
they arrived as: nothing in the service reads them. What is checked is what `Session`
checks: the signature (a message unsigned or signed with another key is refused), at
least the four parts, and that a signature is not a replay of a recent one.
"""

import hashlib
import hmac
import json
import os
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
# Signatures remembered to refuse a replayed message (jupyter_client keeps 65 536, culled at
# random; a replay can only come from whoever holds the key, the kernel itself).
_REMEMBERED = 4096


def _loads(part: bytes) -> Any:
    """One JSON part, read as jupyter_client reads it (orjson, or the standard library's
    json where orjson fails): ipykernel writes strings with the bytes of undecodable names
    as they were (`surrogateescape`), which is not UTF-8; those are read with U+FFFD in
    their place."""
    try:
        return orjson.loads(part)
    except orjson.JSONDecodeError:
        return json.loads(part.decode("utf-8", "replace"))


class BadMessage(ValueError):
    """Not a message this kernel signed: malformed, unsigned, badly signed or replayed."""


class MessageCodec:
    """Signs the service's requests to one kernel and checks and parses what it sends."""

    def __init__(self, key: bytes, signature_scheme: str = "hmac-sha256") -> None:
        if not key:
            raise ValueError("a kernel's messages are always signed: its key is empty")
        algorithm = signature_scheme.removeprefix("hmac-")
        if algorithm == signature_scheme or algorithm not in hashlib.algorithms_available:
            raise ValueError(f"unknown signature scheme {signature_scheme!r}")
        self._hmac = hmac.new(key, digestmod=algorithm)  # keyed once, copied per message
        self._session = uuid.uuid4().hex
        self._prefix = f"{self._session}_{os.getpid()}_"
        self._sent = 0
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()

    def request(
        self,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> tuple[str, list[bytes]]:
        """A request's msg_id (replies and outputs name it as their parent) and its frames."""
        self._sent += 1
        msg_id = f"{self._prefix}{self._sent}"
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "username": "kernel-service",
            "session": self._session,
            "date": datetime.now(UTC).isoformat(),
            "version": PROTOCOL_VERSION,
        }
        meta = orjson.dumps(metadata) if metadata else b"{}"
        parts = [orjson.dumps(header), b"{}", meta, orjson.dumps(content)]
        return msg_id, [DELIMITER, self._sign(parts), *parts, *buffers]

    def read(self, frames: list[bytes]) -> dict[str, Any]:
        """The message in `frames` (routing identities, the delimiter, the signature, the
        header, parent header, metadata and content, then any buffers). Raises BadMessage."""
        try:
            start = frames.index(DELIMITER) + 1
        except ValueError:
            raise BadMessage("no delimiter") from None
        if len(frames) - start < 5:
            raise BadMessage("fewer than the four parts of a message")
        signature, parts = frames[start], frames[start + 1 : start + 5]
        if not hmac.compare_digest(signature, self._sign(parts)):
            raise BadMessage("unsigned, or signed with another key")
        if signature in self._seen:
            raise BadMessage("a replayed signature")
        self._remember(signature)
        try:
            header, parent, metadata, content = map(_loads, parts)
        except (ValueError, RecursionError) as exc:  # orjson's, json's (deep nesting too)
            raise BadMessage(f"not JSON: {exc}") from None
        if not isinstance(header, dict) or not isinstance(parent, dict):
            raise BadMessage("a header that is not an object")
        return {
            "header": header,
            "msg_id": header.get("msg_id"),
            "msg_type": header.get("msg_type"),
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "buffers": frames[start + 5 :],
        }

    def _sign(self, parts: list[bytes]) -> bytes:
        signer = self._hmac.copy()
        for part in parts:
            signer.update(part)
        return signer.hexdigest().encode()

    def _remember(self, signature: bytes) -> None:
        self._seen.add(signature)
        self._seen_order.append(signature)
        if len(self._seen_order) > _REMEMBERED:
            self._seen.discard(self._seen_order.popleft())
