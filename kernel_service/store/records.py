"""What the state store keeps, as the rest of the service sees it: a kernel, a session, an
execution, and the totals a session carried on after a restart starts from."""

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class KernelRecord:
    kernel_id: str
    pid: int
    start_ticks: int
    directory: Path
    connection: dict[str, Any]
    uid: int | None = None
    cgroup: Path | None = None


@dataclass(frozen=True)
class SessionRecord:
    key: str
    session_id: str
    owner: str | None
    work_dir: Path
    kernel_id: str | None
    created_at: datetime
    last_activity: datetime
    execution_count: int
    notice: str | None


@dataclass(frozen=True)
class ExecutionRecord:
    seq: int
    code: str
    status: str
    started_at: datetime
    duration_ms: float | None
    execution_count: int | None
    result: str | None


@dataclass(frozen=True)
class SessionTotals:
    """Where a session's records stand: its last execution's number, the bytes of results
    it keeps, and its images (id, bytes of base64), oldest first."""

    last_seq: int = 0
    result_bytes: int = 0
    images: tuple[tuple[str, int], ...] = ()


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot; None if there is no such
    process or it has ended (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])
