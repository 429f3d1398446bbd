"""The load section: many live sessions, many clients, thousands of small mixed cells (values,
prints, pandas, every 50th a plot, every 25th a ZeroDivisionError), every answer checked
against what its cell must give; the service's RSS and open files before and after; then
every session deleted and the service checked for kernels and connection files left over.

Bounded in count (sessions, clients, executions) and in time: at its deadline the section
stops what it is doing, keeps what it measured and still deletes and checks."""

import asyncio
import contextlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.load import delete_sessions
from bench.service import RawHttp, Service, poll_until
from bench.stats import MIB
from kernel_service.kernel.programs.zygote import KERNEL_NAME

# The bounds the service must stay within over the whole load.
RSS_GROWTH_LIMIT = 64 * MIB
FD_GROWTH_LIMIT = 16
PLOT_EVERY, ERROR_EVERY = 50, 25
# Sessions are made this many at a time: the machine has two cores.
_CREATE_AT_ONCE = 2
# Kept from the deadline for deleting the sessions and looking for leftovers.
_CLEAN_UP_SECONDS = 60.0
_SETTLE_SECONDS = 2.0
_EXAMPLES = 5


@dataclass(frozen=True)
class Snippet:
    """One cell of the load and what its answer must hold."""

    kind: str  # value, print, pandas, plot, error
    code: str
    result: str | None = None  # the `result` (text/plain of the value) it must give
    stdout: str = ""

    def wrong(self, answer: dict[str, Any]) -> str | None:
        """What is wrong with `answer` for this cell, in a few words; None if nothing."""
        if answer.get("state_lost"):
            return f"{self.kind}: state lost"
        if self.kind == "error":
            ename = (answer.get("error") or {}).get("ename")
            if answer.get("status") != "error" or ename != "ZeroDivisionError":
                return f"error cell: status {answer.get('status')}, {ename}"
            return None
        if answer.get("status") != "ok":
            return f"{self.kind}: status {answer.get('status')}"
        if self.kind == "plot":
            images = answer.get("images") or []
            if len(images) != 1 or images[0].get("mime") != "image/png" or not images[0]["data"]:
                return "plot: no PNG"
            return None
        if answer.get("result") != self.result or answer.get("stdout") != self.stdout:
            return f"{self.kind}: wrong value or output"
        return None


def snippet(index: int) -> Snippet:
    """The cell of execution `index`: every 50th a plot, every 25th (never the same ones) a
    ZeroDivisionError, the rest in turn a value, a print and a pandas sum."""
    if index % PLOT_EVERY == 0:
        code = (
            "import matplotlib.pyplot as plt\n"
            f"plt.figure(figsize=(2, 1.5))\nplt.plot([0, {index % 7}, 1])\nplt.show()"
        )
        return Snippet("plot", code)
    if index % ERROR_EVERY == ERROR_EVERY // 2:
        return Snippet("error", f"{index} / 0")
    turn = index % 3
    if turn == 0:
        return Snippet("value", f"{index} * 7 + {index % 13}", str(index * 7 + index % 13))
    if turn == 1:
        return Snippet("print", f"print('row', {index})", stdout=f"row {index}\n")
    n = 10 + index % 90
    code = f"import pandas as pd\nint(pd.DataFrame({{'x': range({n})}}).x.sum())"
    return Snippet("pandas", code, str(n * (n - 1) // 2))


@dataclass(frozen=True)
class Footprint:
    """The service process's own resident memory and open file descriptors."""

    rss: int
    fds: int


def footprint(process: psutil.Process) -> Footprint:
    return Footprint(process.memory_info().rss, process.num_fds())


@dataclass
class MixedLoad:
    sessions_asked: int
    executions_asked: int
    clients: int
    deadline: float  # seconds the whole section may take
    sessions: int = 0  # made
    create_seconds: float = 0.0
    warm_errors: int = 0  # sessions whose first `1+1` went wrong
    done: int = 0  # executions answered (whatever the HTTP status)
    errors: int = 0  # answers not as their cell must give, and requests without an answer
    kinds: Counter[str] = field(default_factory=Counter)  # what went wrong, how often
    examples: list[str] = field(default_factory=list)  # the first few, in full
    latencies: list[float] = field(default_factory=list)  # ms, send to answer
    seconds: float = 0.0  # the load itself
    stopped_because: str = ""
    before: Footprint | None = None  # sessions made and warmed, just before the load
    after: Footprint | None = None  # just after it, before any deletion
    delete_seconds: float = 0.0
    delete_failures: int = 0
    kernels_left: int = -1  # kernel processes after deleting every session
    files_left: int = -1  # k-* entries in the connection directory, the same
    children_before: int = 0  # the service's child processes before the first session
    children_after: int = -1  # and after deleting the last
    total_seconds: float = 0.0
    # callbacks that held the service's event loop (seconds, which), longest first; None:
    # not watched
    stalls: list[tuple[float, float, str]] | None = None  # seconds, waiting for a CPU, which

    def within_bounds(self) -> tuple[bool | None, bool | None]:
        """RSS and fd growth within their limits (None: not measured)."""
        if self.before is None or self.after is None:
            return None, None
        rss = self.after.rss - self.before.rss < RSS_GROWTH_LIMIT
        fds = self.after.fds - self.before.fds < FD_GROWTH_LIMIT
        return rss, fds


async def mixed(
    service: Service,
    *,
    sessions: int,
    executions: int,
    clients: int,
    deadline: float,
    memory_floor: int,
) -> MixedLoad:
    """Make `sessions` sessions and warm each with `1+1`; measure the service; run
    `executions` cells from `clients` clients, each on a connection of its own, spread over
    the sessions; measure again; delete every session; look for what is left. Work stops
    `_CLEAN_UP_SECONDS` before `deadline` (seconds from now); the clean-up ends by it."""
    result = MixedLoad(sessions, executions, clients, deadline)
    run = _MixedRun(service, result, memory_floor)
    loop = asyncio.get_running_loop()
    started = loop.time()
    end = started + deadline
    result.children_before = len(service.children())
    try:
        async with asyncio.timeout_at(end - min(_CLEAN_UP_SECONDS, deadline / 4)):
            await run.fill()
            await run.connect()
            await run.warm()
            await asyncio.sleep(_SETTLE_SECONDS)
            result.before = run.footprint()
            await run.execute()
            await asyncio.sleep(_SETTLE_SECONDS)
    except TimeoutError:
        result.stopped_because = f"the {deadline:.0f} s deadline"
    except Exception as exc:
        result.stopped_because = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if result.before is not None:
            result.after = run.footprint()
        await run.close()
        await run.clear(end)
        await run.look_for_leftovers(end)
        result.total_seconds = loop.time() - started
    return result


class _MixedRun:
    def __init__(self, service: Service, result: MixedLoad, memory_floor: int) -> None:
        self.service = service
        self.result = result
        self._memory_floor = memory_floor
        self._sessions: list[str] = []
        self._connections: list[RawHttp] = []
        self._next = 0  # the index of the next execution to send
        self._pending = 0  # session creations under way
        self._create_failures = 0

    def footprint(self) -> Footprint | None:
        assert self.service.process is not None
        try:
            return footprint(self.service.process)
        except psutil.Error:
            return None

    async def fill(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self._maker() for _ in range(_CREATE_AT_ONCE)))
        finally:
            self.result.create_seconds = time.perf_counter() - started
            self.result.sessions = len(self._sessions)
        if not self._sessions:
            raise RuntimeError("no session could be made")

    async def _maker(self) -> None:
        result = self.result
        while len(self._sessions) + self._pending < result.sessions_asked:
            if self._create_failures >= 3:
                return
            if psutil.virtual_memory().available < self._memory_floor:
                result.stopped_because = "available memory at its floor"
                return
            self._pending += 1
            try:
                self._sessions.append(await self.service.new_session())
            except Exception as exc:
                self._create_failures += 1
                self._note(f"create: {type(exc).__name__}", str(exc))
            finally:
                self._pending -= 1

    async def connect(self) -> None:
        count = min(self.result.clients, self.result.executions_asked)
        for _ in range(count):
            self._connections.append(await RawHttp.connect(self.service.port))

    async def warm(self) -> None:
        """`1+1` in every session, the connections sharing the sessions out."""
        count = len(self._connections)

        async def warm_some(slot: int) -> None:
            for session in self._sessions[slot::count]:
                try:
                    answer = await self._connections[slot].execute("1+1", session)
                    self.result.warm_errors += answer["result"] != "2"
                except Exception as exc:
                    self.result.warm_errors += 1
                    self._note(f"warm-up: {type(exc).__name__}", str(exc))
                    await self._reconnect(slot)

        await asyncio.gather(*(warm_some(slot) for slot in range(count)))

    async def execute(self) -> None:
        started = time.perf_counter()
        try:
            await asyncio.gather(*(self._client(slot) for slot in range(len(self._connections))))
        finally:
            self.result.seconds = time.perf_counter() - started

    async def _client(self, slot: int) -> None:
        """Takes the next execution until all are sent; never raises."""
        result = self.result
        while self._next < result.executions_asked:
            index = self._next
            self._next += 1
            cell = snippet(index)
            session = self._sessions[index % len(self._sessions)]
            body = json.dumps({"code": cell.code, "session_id": session}).encode()
            sent = time.perf_counter()
            try:
                status, answer = await self._connections[slot].post("/execute", body)
            except Exception as exc:
                self._note(f"no answer: {type(exc).__name__}", f"#{index} in {session}: {exc}")
                if not await self._reconnect(slot):
                    return
                continue
            result.latencies.append((time.perf_counter() - sent) * 1000)
            result.done += 1
            if status != 200:
                self._note(f"HTTP {status}", f"#{index} in {session}: {answer[:200]!r}")
                continue
            wrong = cell.wrong(json.loads(answer))
            if wrong:
                self._note(wrong, f"#{index} in {session}: {answer[:300]!r}")

    async def _reconnect(self, slot: int) -> bool:
        with contextlib.suppress(Exception):
            await self._connections[slot].close()
        try:
            self._connections[slot] = await RawHttp.connect(self.service.port)
        except OSError as exc:
            self._note(f"reconnect: {type(exc).__name__}", str(exc))
            return False
        return True

    def _note(self, kind: str, detail: str) -> None:
        self.result.errors += not kind.startswith(("create", "warm-up", "reconnect", "delete"))
        self.result.kinds[kind] += 1
        if len(self.result.examples) < _EXAMPLES:
            self.result.examples.append(f"{kind}: {detail}"[:400])

    async def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(Exception):
                await connection.close()
        self._connections.clear()

    async def clear(self, end: float) -> None:
        """Delete every session, ours and any the service lists (one whose creation the
        deadline cut short), by `end` at the latest."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(end):
                listed = (await self.service.http.get("/sessions")).json()["sessions"]
                others = [s["session_id"] for s in listed if s["session_id"] not in self._sessions]
                failed = await delete_sessions(self.service, self._sessions + others)
                self.result.delete_failures = failed
        except TimeoutError:
            self.result.delete_failures = -1  # unknown: cut short by the deadline
        except Exception as exc:  # the service no longer answers, say
            self.result.delete_failures = -1
            self._note(f"delete: {type(exc).__name__}", str(exc))
        finally:
            self.result.delete_seconds = time.perf_counter() - started

    async def look_for_leftovers(self, end: float) -> None:
        connection_dir = Path(self.service.settings["connection_dir"])

        def clean() -> bool:
            return not kernel_processes(connection_dir) and not connection_entries(connection_dir)

        await poll_until(clean, max(1.0, min(10.0, end - asyncio.get_running_loop().time())))
        self.result.kernels_left = len(kernel_processes(connection_dir))
        self.result.files_left = len(connection_entries(connection_dir))
        self.result.children_after = len(self.service.children())


def kernel_processes(connection_dir: Path) -> list[psutil.Process]:
    """Live kernels of the service that uses `connection_dir`, wherever they are in the
    process tree: a Python process named as a forked kernel, or started as ipykernel (not a
    wrapper such as bwrap around one), whose command line names the directory. The
    fork-server's zygote and sandbox helpers have other names."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        info = process.info
        argv: list[str] = info["cmdline"] or []
        if info["status"] == psutil.STATUS_ZOMBIE or not argv:
            continue
        python = Path(argv[0]).name.startswith("python")
        kernel = info["name"] == KERNEL_NAME or "ipykernel_launcher" in argv
        if python and kernel and any(str(connection_dir) in arg for arg in argv):
            found.append(process)
    return found


def connection_entries(connection_dir: Path) -> list[Path]:
    """A kernel's connection files live in a `k-<id>` directory of their own."""
    with contextlib.suppress(OSError):
        return sorted(connection_dir.glob("k-*"))
    return []
