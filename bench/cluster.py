"""Cells behind the proxy (docs/scaling.md), on this machine, in one run: `kernel-service
cluster` (3 cells and HAProxy), then one of 1 cell for the throughput beside it.

- the proxy's cost: a warm `1+1` through the front and straight to its cell, interleaved
  call by call on one session; the difference of the medians;
- continuity: SESSIONS sessions made through the front, each given CHAIN executions that
  build on the one before (`x = 1`, then `x = x + 1` ...); every answer checked;
- placement: how many of them each cell holds;
- throughput: CLIENTS clients, each with a session of its own, `1+1` for DURATION seconds,
  through the front of 3 cells and of 1;
- a cell killed (SIGKILL): every session asked at once for `x`; those of the other cells
  must answer, those of the dead one must get 503 `cell_unavailable` quickly; once the
  cluster has started the cell again, its sessions must answer with their `x`.

Every process is ended at the end (the cluster's own stop), also on an error.
"""

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SESSIONS = 300
CHAIN = 5
CLIENTS = 32
DURATION = 10.0
ROUNDS = 400
# How long a cluster may take to start, and a killed cell to be back (seconds).
_START = 300.0
_BACK = 180.0
# Concurrent requests while making sessions and running chains.
_CONCURRENCY = 32
_CELL_SETTINGS = {
    "KERNEL_SERVICE_MAX_SESSIONS": str(SESSIONS // 3 + 40),
    "KERNEL_SERVICE_SESSION_TTL": "0",
    "KERNEL_SERVICE_LOG_LEVEL": "warning",
}


@dataclass
class ClusterResult:
    cells: int = 3
    direct_ms: float | None = None
    proxied_ms: float | None = None
    sessions: int = 0
    continuous: int = 0
    placement: dict[str, int] = field(default_factory=dict)
    throughput: dict[int, float] = field(default_factory=dict)  # cells → executions/s
    victims: int = 0
    victims_refused: int = 0  # answered 503 cell_unavailable while down
    slowest_refusal_s: float | None = None
    victims_back: int = 0  # answered with their x after the restart
    others: int = 0
    others_ok: int = 0
    back_after_s: float | None = None
    problems: list[str] = field(default_factory=list)


class LocalCluster:
    """`kernel-service cluster` in a process group of its own."""

    def __init__(self, cells: int, place: Path, port: int) -> None:
        self.cells, self.place, self.port = cells, place, port
        self.url = f"http://127.0.0.1:{port}"
        self._process: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> "LocalCluster":
        self.place.mkdir(parents=True)
        self._process = _start(self.cells, self.port, self.place)
        deadline = time.monotonic() + _START
        async with httpx.AsyncClient(timeout=5) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    cells = await self.status(client)
                    if len(cells) == self.cells and all(c["status"] == "up" for c in cells):
                        return self
                if self._process.poll() is not None:
                    break
                await asyncio.sleep(0.5)  # polling the cluster's status while it starts
        await self.__aexit__(None, None, None)
        raise RuntimeError(f"the {self.cells}-cell cluster did not come up (see its log)")

    async def status(self, client: httpx.AsyncClient) -> list[dict[str, Any]]:
        cells: list[dict[str, Any]] = (await client.get(f"{self.url}/healthz")).json()["cells"]
        return cells

    async def __aexit__(self, *_: object) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, 300)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            await asyncio.to_thread(process.wait)


def _start(cells: int, port: int, place: Path) -> "subprocess.Popen[bytes]":
    log = (place.parent / f"cluster-{cells}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "kernel_service", "cluster", "--cells", str(cells),
         "--port", str(port), "--dir", str(place)],
        env={**os.environ, **_CELL_SETTINGS}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


async def run(root: Path, port: int, rounds: int = ROUNDS) -> ClusterResult:
    result = ClusterResult()
    three = LocalCluster(3, root / "three", port)
    async with three, httpx.AsyncClient(base_url=three.url, timeout=120) as front:
        await _proxy_cost(three, front, result, rounds)
        sessions = await _chains(front, result)
        result.throughput[3] = await _throughput(front)
        await _kill_one(three, front, sessions, result)
    one = LocalCluster(1, root / "one", port)
    async with one, httpx.AsyncClient(base_url=one.url, timeout=120) as front:
        result.throughput[1] = await _throughput(front)
    return result


async def _proxy_cost(
    cluster: LocalCluster, front: httpx.AsyncClient, result: ClusterResult, rounds: int
) -> None:
    made = await front.post("/sessions", json={})
    session_id = made.json()["session_id"]
    async with httpx.AsyncClient(timeout=5) as probe:
        cells = {c["tag"]: c["address"] for c in await cluster.status(probe)}
    direct_url = f"http://{cells[session_id[:4]]}"
    body = {"code": "1+1", "session_id": session_id}
    direct_times: list[float] = []
    proxied_times: list[float] = []
    async with httpx.AsyncClient(base_url=direct_url, timeout=60) as direct:
        for _ in range(20):  # warm both paths
            await direct.post("/execute", json=body)
            await front.post("/execute", json=body)
        for _ in range(rounds):
            for client, times in ((direct, direct_times), (front, proxied_times)):
                started = time.perf_counter()
                answer = await client.post("/execute", json=body)
                times.append(time.perf_counter() - started)
                if answer.json().get("result") != "2":
                    result.problems.append(f"1+1 answered {answer.text[:200]}")
    result.direct_ms = statistics.median(direct_times) * 1000
    result.proxied_ms = statistics.median(proxied_times) * 1000
    await front.delete(f"/sessions/{session_id}")


async def _chains(front: httpx.AsyncClient, result: ClusterResult) -> list[str]:
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def make() -> str | None:
        async with gate:
            answer = await front.post("/sessions", json={})
        return answer.json()["session_id"] if answer.status_code == 201 else None

    made = [s for s in await asyncio.gather(*(make() for _ in range(SESSIONS))) if s]
    result.sessions = len(made)
    result.placement = dict(sorted(Counter(s[:4] for s in made).items()))
    broken: set[str] = set(made) if len(made) < SESSIONS else set()
    for step in range(1, CHAIN + 1):
        code = "x = 1; x" if step == 1 else "x = x + 1; x"

        async def run(session_id: str, code: str = code, step: int = step) -> None:
            async with gate:
                answer = await front.post("/execute", json={"code": code, "session_id": session_id})
            if answer.status_code != 200 or answer.json().get("result") != str(step):
                broken.add(session_id)

        await asyncio.gather(*(run(s) for s in made))
    result.continuous = len([s for s in made if s not in broken])
    if result.continuous < SESSIONS:
        result.problems.append(f"continuity: {SESSIONS - result.continuous} sessions broken")
    return made


async def _throughput(front: httpx.AsyncClient) -> float:
    sessions = [
        (await front.post("/sessions", json={})).json()["session_id"] for _ in range(CLIENTS)
    ]
    done = 0
    stop = time.monotonic() + DURATION

    async def client(session_id: str) -> None:
        nonlocal done
        body = {"code": "1+1", "session_id": session_id}
        while time.monotonic() < stop:
            if (await front.post("/execute", json=body)).status_code == 200:
                done += 1

    started = time.monotonic()
    await asyncio.gather(*(client(s) for s in sessions))
    rate = done / (time.monotonic() - started)
    await asyncio.gather(*(front.delete(f"/sessions/{s}") for s in sessions))
    return rate


async def _kill_one(
    cluster: LocalCluster, front: httpx.AsyncClient, sessions: list[str], result: ClusterResult
) -> None:
    async with httpx.AsyncClient(timeout=5) as probe:
        victim = next(c for c in await cluster.status(probe) if c["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    gate = asyncio.Semaphore(_CONCURRENCY)
    victims = [s for s in sessions if s[:4] == victim["tag"]]
    others = [s for s in sessions if s[:4] != victim["tag"]]
    result.victims, result.others = len(victims), len(others)
    refusals: list[float] = []

    async def ask(session_id: str) -> tuple[int, str | None, float]:
        async with gate:
            started = time.monotonic()
            answer = await front.post("/execute", json={"code": "x", "session_id": session_id})
            took = time.monotonic() - started
        json = answer.headers.get("content-type", "").startswith("application/json")
        body = answer.json() if json else {}
        return answer.status_code, body.get("result") or body.get("code"), took

    for status, value, took in await asyncio.gather(*(ask(s) for s in victims)):
        if status == 503 and value == "cell_unavailable":
            result.victims_refused += 1
            refusals.append(took)
    result.slowest_refusal_s = max(refusals) if refusals else None
    for status, value, _ in await asyncio.gather(*(ask(s) for s in others)):
        if status == 200 and value == str(CHAIN):
            result.others_ok += 1
    # back once the front sends the cell's sessions to it again (HAProxy's own check, a
    # moment after the cell answers the cluster's status probe)
    while victims and time.monotonic() - killed_at < _BACK:
        with contextlib.suppress(httpx.HTTPError):
            if (await front.get(f"/sessions/{victims[0]}")).status_code == 200:
                result.back_after_s = time.monotonic() - killed_at
                break
        await asyncio.sleep(0.2)  # polling the front until the cell's sessions answer
    if result.back_after_s is None:
        result.problems.append(f"the killed cell was not back within {_BACK:.0f} s")
        return
    for status, value, _ in await asyncio.gather(*(ask(s) for s in victims)):
        if status == 200 and value == str(CHAIN):
            result.victims_back += 1


def lines(result: ClusterResult) -> tuple[list[str], list[str]]:
    """The section's table, and its targets' verdicts."""
    overhead = (
        result.proxied_ms - result.direct_ms
        if result.proxied_ms is not None and result.direct_ms is not None
        else None
    )
    three, one = result.throughput.get(3), result.throughput.get(1)
    table = [
        "| cells behind HAProxy (3 cells, one run) | |",
        "|---|---|",
        f"| warm 1+1 p50: straight to the cell / through the proxy | {_ms(result.direct_ms)} / "
        f"{_ms(result.proxied_ms)} (+{_ms(overhead)}) |",
        f"| {SESSIONS} sessions x {CHAIN} chained executions, unbroken | "
        f"{result.continuous}/{SESSIONS} |",
        f"| placement (sessions per cell tag) | "
        f"{', '.join(f'{t}: {n}' for t, n in result.placement.items())} |",
        f"| throughput, {CLIENTS} clients, 1+1: 3 cells / 1 cell | {_rate(three)} / {_rate(one)}"
        f" ({three / one:.2f}x) |"
        if three and one
        else "| throughput | - |",
        f"| one cell killed: its {result.victims} sessions refused 503 cell_unavailable | "
        f"{result.victims_refused}/{result.victims}, slowest {_s(result.slowest_refusal_s)} |",
        f"| meanwhile, the other cells' {result.others} sessions answered | "
        f"{result.others_ok}/{result.others} |",
        f"| the cell back after / its sessions with their variables | "
        f"{_s(result.back_after_s)} / {result.victims_back}/{result.victims} |",
    ]
    verdicts = [
        _verdict(
            "proxy adds <= 0.5 ms p50 to a warm 1+1", overhead is not None and overhead <= 0.5
        ),
        _verdict("100% continuity", result.continuous == SESSIONS),
        _verdict(
            "a killed cell touches only its own sessions, refused within 2 s, then continued",
            result.others_ok == result.others
            and result.victims_refused == result.victims
            and (result.slowest_refusal_s or 0) < 2
            and result.victims_back == result.victims,
        ),
    ]
    return table, verdicts


def _verdict(what: str, met: bool) -> str:
    return f"- {'met' if met else 'MISSED'}: {what}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}/s"
