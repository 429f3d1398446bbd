"""What the cluster's cells are doing, asked of each cell: its liveness (`GET /healthz`) and
whether it takes new sessions (`GET /readyz`). The local cluster's status endpoint answers
with it."""

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from kernel_service.cluster.haproxy import Cell

# A cell that does not answer its probes within this long is reported down.
PROBE_TIMEOUT = 2.0

CellStatus = Literal["up", "down", "full", "draining"]


@dataclass(frozen=True)
class CellState:
    cell: Cell
    status: CellStatus
    sessions: int | None
    max_sessions: int | None
    executing: int | None
    pid: int | None
    restarts: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.cell.name,
            "index": self.cell.index,
            "tag": self.cell.tag,
            "address": self.cell.address,
            "status": self.status,
            "sessions": self.sessions,
            "max_sessions": self.max_sessions,
            "executing": self.executing,
            "pid": self.pid,
            "restarts": self.restarts,
        }


async def probe(client: httpx.AsyncClient, cell: Cell, pid: int | None, restarts: int) -> CellState:
    """The state of `cell` now (down when it does not answer, or answers as another cell)."""
    base = f"http://{cell.address}"
    try:
        health, ready = await asyncio.gather(
            client.get(f"{base}/healthz"), client.get(f"{base}/readyz")
        )
        body = health.json()
        readiness = ready.json()
    except (httpx.HTTPError, ValueError):
        return CellState(cell, "down", None, None, None, pid, restarts)
    if health.status_code != 200 or (body.get("cell") or {}).get("index") != cell.index:
        return CellState(cell, "down", None, None, None, pid, restarts)
    status: CellStatus = "up"
    if ready.status_code != 200:
        status = "draining" if readiness.get("status") == "draining" else "full"
    return CellState(
        cell, status, body.get("sessions"), body.get("max_sessions"), body.get("executing"),
        pid, restarts,
    )  # fmt: skip


def summary(states: list[CellState]) -> tuple[int, dict[str, Any]]:
    """The front's /healthz: 200 while a cell is up (`ok` when all are, else `degraded`),
    503 when none is."""
    alive = [s for s in states if s.status != "down"]
    status = "ok" if len(alive) == len(states) else "degraded" if alive else "down"
    body = {
        "status": status,
        "cells_up": len(alive),
        "cells_ready": sum(s.status == "up" for s in states),
        "sessions": sum(s.sessions or 0 for s in states),
        "cells": [s.describe() for s in states],
    }
    return (200 if alive else 503), body
