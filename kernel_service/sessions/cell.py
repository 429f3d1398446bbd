"""Which cell of a cluster this service is, told by the ids it makes.

A cell (`KERNEL_SERVICE_CELL`, 0..65535) starts every id it makes with its tag, the index
as 4 lowercase hex digits: session ids, Jupyter kernel ids (still UUIDs) and MCP session
ids. A proxy in front of the cells routes any request for a session by the first 4
characters of the id it names (docs/scaling.md), with no lookup and no sticky cookies,
and adding a cell never moves a session. A session id chosen by a client must carry the
tag of the cell it is made in. Without a cell (one service alone) ids are plain UUIDs.

While draining (before a cell is stopped or moved), it makes no new sessions; its own go on.
"""

import uuid

from kernel_service.errors import WrongCell

TAG_LENGTH = 4


class Cell:
    def __init__(self, index: int | None) -> None:
        self.index = index
        self.tag = None if index is None else f"{index:04x}"
        self.draining = False

    def new_id(self) -> str:
        """A new session id: 32 hex digits, the first 4 the tag."""
        return self._tagged(uuid.uuid4().hex)

    def new_uuid(self) -> str:
        """A new id in UUID form (Jupyter's kernel ids), the first 4 hex digits the tag."""
        return self._tagged(str(uuid.uuid4()))

    def tagged(self, foreign_id: str) -> str:
        """An id made elsewhere (the MCP SDK's session ids) as clients see it: tagged."""
        return foreign_id if self.tag is None else self.tag + foreign_id

    def untagged(self, seen_id: str) -> str | None:
        """The id `tagged` made of `seen_id`, or None when it names another cell."""
        if self.tag is None:
            return seen_id
        return seen_id[TAG_LENGTH:] if seen_id.startswith(self.tag) else None

    def check(self, session_id: str) -> None:
        """Raises WrongCell for a chosen id that does not start with this cell's tag."""
        if self.tag is not None and not session_id.lower().startswith(self.tag):
            raise WrongCell(session_id, self.tag)

    def describe(self) -> dict[str, object] | None:
        return None if self.index is None else {"index": self.index, "tag": self.tag}

    def _tagged(self, fresh: str) -> str:
        return fresh if self.tag is None else self.tag + fresh[TAG_LENGTH:]
