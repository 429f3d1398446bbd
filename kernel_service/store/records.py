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
    kernel_name: str = "python3"  # its kernelspec (kernel/kernelspecs.py)
    language: str = "python"  # the language it was asked for


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
