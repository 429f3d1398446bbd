"""Which cell of a cluster this service is, told by the ids it makes.

A cell (`KERNEL_SERVICE_CELL`, 0..65535) starts every id it makes with its tag, the index
as 4 lowercase hex digits: session ids, Jupyter kernel ids (still UUIDs) and MCP session
ids. A proxy in front of the cells routes any request for a session by the first 4
characters of the id it names (docs/scaling.md), with no lookup and no sticky cookies,
and adding a cell never moves a session. A session id chosen by a client must carry the
tag of the cell it is made in. Without a cell (one service alone) ids are plain UUIDs.

The next 4 hex digits of a session id the cell makes are its state's incarnation, drawn
when its state store is first made: a cell whose state was lost (a new volume) tells an id
of its earlier incarnation apart from one that never existed, and says the session was
lost with its cell.

While draining (before a cell is stopped or moved), it makes no new sessions; its own go on.
"""

import re
import secrets
import uuid

from kernel_service.errors import (
    SessionLostWithCell,
    SessionNotFound,
    SessionOfAnotherCell,
    WrongCell,
)

TAG_LENGTH = 4
_TAG = re.compile(r"[0-9a-fA-F]{4}")
_MADE_ID = re.compile(r"[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Cell:
    def __init__(self, index: int | None) -> None:
        self.index = index
        self.tag = None if index is None else f"{index:04x}"
        self.draining = False
        self.incarnation: str | None = None  # set from the state store at start

    @staticmethod
    def new_incarnation() -> str:
        return secrets.token_hex(2)

    def new_id(self) -> str:
        """A new session id: 32 hex digits, the first 4 the tag, the next 4 the incarnation."""
        return self._tagged(uuid.uuid4().hex)

    def new_uuid(self) -> str:
        """A new id in UUID form (Jupyter's kernel ids), its first 8 hex digits as new_id's."""
        return self._tagged(str(uuid.uuid4()))

    def tagged(self, foreign_id: str) -> str:
        """An id made elsewhere (the MCP SDK's session ids) as clients see it: tagged."""
        return foreign_id if self.tag is None else self.tag + foreign_id

    def untagged(self, seen_id: str) -> str | None:
        """The id `tagged` made of `seen_id`, or None when it names another cell."""
        if self.tag is None:
            return seen_id
        return seen_id[TAG_LENGTH:] if seen_id[:TAG_LENGTH].lower() == self.tag else None

    def check(self, session_id: str) -> None:
        """Raises WrongCell for a chosen id that does not start with this cell's tag."""
        if self.tag is not None and not session_id.lower().startswith(self.tag):
            raise WrongCell(session_id, self.tag)

    def not_found(self, session_id: str) -> SessionNotFound:
        """The error for a session id not here: another cell's when its tag is another's
        (the request came the wrong way); lost with this cell's earlier state when it is an
        id this cell made in an earlier incarnation."""
        its_tag = session_id[:TAG_LENGTH].lower()
        if self.tag is not None and _TAG.match(session_id) and its_tag != self.tag:
            return SessionOfAnotherCell(session_id, its_tag, self.tag)
        if (
            self.tag is not None
            and self.incarnation is not None
            and _MADE_ID.fullmatch(session_id)
            and session_id.replace("-", "")[TAG_LENGTH : 2 * TAG_LENGTH] != self.incarnation
        ):
            return SessionLostWithCell(session_id, self.tag)
        return SessionNotFound(session_id)

    def describe(self) -> dict[str, object] | None:
        return None if self.index is None else {"index": self.index, "tag": self.tag}

    def _tagged(self, fresh: str) -> str:
        if self.tag is None:
            return fresh
        prefix = self.tag + (self.incarnation or fresh[TAG_LENGTH : 2 * TAG_LENGTH])
        if fresh[8] == "-":  # a UUID: 8 hex digits before its first hyphen
            return prefix + fresh[8:]
        return prefix + fresh[2 * TAG_LENGTH :]
