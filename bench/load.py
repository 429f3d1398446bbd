"""Many sessions at once: the memory of idle ones, throughput from concurrent clients (with the
service's CPU share), and how many idle sessions fit (up to a count, a memory floor and a
time limit), each ending with every session deleted."""

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import psutil

from bench.floor import BareKernel, Floor
from bench.service import RawHttp, Service, gather_limited, poll_until
from bench.stats import MIB, Memory, cpu_seconds, cpu_used, memory, tree

# Sessions are made this many at a time: the machine has two cores.
_CREATE_AT_ONCE = 2


async def make_sessions(service: Service, count: int) -> list[str]:
    return await gather_limited(_CREATE_AT_ONCE, (service.new_session() for _ in range(count)))


async def delete_sessions(service: Service, sessions: list[str]) -> int:
    """Deletes them all; how many deletions failed."""
    results = await gather_limited(4, (_quietly(service.delete(s)) for s in sessions))
    return sum(not ok for ok in results)


async def _quietly(deletion: Awaitable[None]) -> bool:
    try:
        await deletion
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class IdleMemory:
    sessions: int
    total: Memory  # every process the service started (a fork-server's zygote included)
    before: Memory  # the same before any session existed (a zygote, say)


async def idle_memory(service: Service, count: int) -> IdleMemory:
    """Sessions that ran one `1+1` each and then sit idle; memory of all the service's
    child processes, summed (PSS shares what processes share, so nothing is counted twice)."""
    before = memory(service.children())
    sessions = await make_sessions(service, count)
    try:
        for session in sessions:
            await service.execute("1+1", session)
        await asyncio.sleep(2)  # let start-up garbage and page faults settle
        total = memory(service.children())
    finally:
        await delete_sessions(service, sessions)
    return IdleMemory(count, total, before)


@dataclass
class Throughput:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    service_cpu: float = 0.0  # seconds of the service process (none for the raw limit)
    kernels_cpu: float = 0.0  # seconds of every process it started
    bench_cpu: float = 0.0  # seconds of this process (the clients)

    def per_execution(self, cpu_seconds: float) -> float:
        """ms of CPU per execution answered."""
        return 1000 * cpu_seconds / max(1, len(self.latencies))


# An answer-checking call: True when the answer is right.
Call = Callable[[], Awaitable[bool]]


async def throughput(service: Service, clients: int, duration: float) -> Throughput:
    """`clients` connections, each on a session of its own, sending `1+1` back to back.
    Measured once the warm pool has refilled after the sessions took its kernels, so that
    no kernel start is counted in the service's CPU."""
    result = Throughput(clients)
    sessions = await make_sessions(service, clients)
    connections = [await RawHttp.connect(service.port) for _ in sessions]
    try:
        calls = [over_http(c, s) for c, s in zip(connections, sessions, strict=True)]
        for call in calls:
            await call()
        if not await service.wait_pool_full():
            raise RuntimeError("throughput: the warm pool did not refill")
        me = psutil.Process()
        kernels_before = cpu_seconds(service.children())
        service_before, bench_before = service.cpu_seconds(), _cpu(me)
        await back_to_back(result, calls, duration)
        result.service_cpu = service.cpu_seconds() - service_before
        result.kernels_cpu = cpu_used(kernels_before, cpu_seconds(service.children()))
        result.bench_cpu = _cpu(me) - bench_before
    finally:
        for connection in connections:
            await connection.close()
        result.errors += await delete_sessions(service, sessions)
    return result


async def raw_throughput(floor: Floor, duration: float) -> Throughput:
    """The raw limit: a bare jupyter_client per kernel of `floor` (kernels started as the
    service starts them, on one Runtime), `1+1` back to back, no service between. Its
    kernels' CPU is that of every process this one started (the floor's kernels, sandboxes
    and zygote: the service, if any, must be gone by now)."""
    result = Throughput(len(floor.kernels))
    calls = [_on_kernel(kernel) for kernel in floor.kernels]
    for call in calls:
        await call()
    me = psutil.Process()
    kernels_before = cpu_seconds(tree(me))
    bench_before = _cpu(me)
    await back_to_back(result, calls, duration)
    result.kernels_cpu = cpu_used(kernels_before, cpu_seconds(tree(me)))
    result.bench_cpu = _cpu(me) - bench_before
    return result


def over_http(connection: RawHttp, session: str) -> Call:
    async def call() -> bool:
        answer = await connection.execute("1+1", session)
        return bool(answer["result"] == "2")

    return call


def _on_kernel(kernel: BareKernel) -> Call:
    async def call() -> bool:
        await kernel.run("1+1")  # the floor reads no result: any answer in time is right
        return True

    return call


async def back_to_back(result: Throughput, calls: list[Call], duration: float) -> None:
    """Each call in a loop of its own, the next as soon as one is answered, until `duration`
    has passed; latencies and wrong answers go to `result` (a call that raises is an error
    and ends its loop)."""
    started = time.perf_counter()
    deadline = started + duration

    async def client(call: Call) -> None:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                result.errors += not await call()
            except Exception:
                result.errors += 1
                return
            result.latencies.append((time.perf_counter() - sent) * 1000)

    await asyncio.gather(*(client(call) for call in calls))
    result.seconds = time.perf_counter() - started


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


@dataclass
class Scale:
    asked: int
    live: int = 0
    create_seconds: float = 0.0
    stopped_because: str = ""
    errors: list[str] = field(default_factory=list)
    min_available: int = 0
    swapped: int = 0  # bytes swapped in and out meanwhile
    at_peak: Memory | None = None
    service_uss: int = 0
    trips: list[float] = field(default_factory=list)  # one 1+1 in every live session
    delete_seconds: float = 0.0
    left: int = -1  # processes left beyond those before the first session


async def scale(service: Service, count: int, floor_bytes: int, time_limit: float) -> Scale:
    """Idle sessions up to `count`, stopping early before available memory would fall under
    `floor_bytes` or when `time_limit` is reached; then `1+1` in each; then all deleted."""
    run = _ScaleRun(service, Scale(count), floor_bytes, time_limit)
    baseline = len(service.children())
    swap_before = _swap()
    try:
        await run.fill()
        await asyncio.sleep(2)
        run.result.at_peak = memory(service.children())
        assert service.process is not None
        with contextlib.suppress(psutil.Error):
            run.result.service_uss = service.process.memory_full_info().uss
        await run.visit()
    finally:
        await run.clear()
        run.result.swapped = _swap() - swap_before
        await poll_until(lambda: len(service.children()) <= baseline, 10)
        run.result.left = max(0, len(service.children()) - baseline)
    return run.result


class _ScaleRun:
    def __init__(self, service: Service, result: Scale, floor_bytes: int, limit: float) -> None:
        self.service = service
        self.result = result
        self._floor = floor_bytes
        self._limit = limit
        self._sessions: list[str] = []
        self._pending = 0  # creations under way
        self._stop = False

    async def fill(self) -> None:
        started = time.perf_counter()
        at_start = psutil.virtual_memory().available
        self.result.min_available = at_start
        await asyncio.gather(
            *(self._maker(at_start, started + self._limit) for _ in range(_CREATE_AT_ONCE))
        )
        self.result.create_seconds = time.perf_counter() - started
        self.result.live = len(self._sessions)

    async def _maker(self, at_start: int, deadline: float) -> None:
        result = self.result
        while not self._stop and len(self._sessions) + self._pending < result.asked:
            available = psutil.virtual_memory().available
            result.min_available = min(result.min_available, available)
            made = len(self._sessions)
            # what one more session costs, judged from those made so far (150 MiB at first)
            each = (at_start - available) / made if made >= 4 else 150 * MIB
            if available - _CREATE_AT_ONCE * max(each, 30 * MIB) < self._floor:
                gib = self._floor / 1024 / MIB
                result.stopped_because = f"available memory would fall under {gib:.0f} GiB"
            elif time.perf_counter() > deadline:
                result.stopped_because = f"the {self._limit:.0f} s time limit"
            elif len(result.errors) >= 3:
                result.stopped_because = "errors"
            if result.stopped_because:
                self._stop = True
                return
            self._pending += 1
            try:
                self._sessions.append(await self.service.new_session())
            except Exception as exc:
                result.errors.append(f"create: {exc}")
            finally:
                self._pending -= 1

    async def visit(self) -> None:
        """`1+1` in every session, one after the other."""
        connection = await RawHttp.connect(self.service.port)
        try:
            for session in self._sessions:
                sent = time.perf_counter()
                try:
                    answer = await connection.execute("1+1", session)
                    if answer["result"] != "2" or answer["state_lost"]:
                        self.result.errors.append(f"1+1 in {session}: {answer['text'][:100]}")
                except Exception as exc:
                    self.result.errors.append(f"1+1 in {session}: {exc}")
                    await connection.close()
                    connection = await RawHttp.connect(self.service.port)
                self.result.trips.append((time.perf_counter() - sent) * 1000)
        finally:
            await connection.close()

    async def clear(self) -> None:
        started = time.perf_counter()
        failed = await delete_sessions(self.service, self._sessions)
        self.result.delete_seconds = time.perf_counter() - started
        if failed:
            self.result.errors.append(f"{failed} deletions failed")


def _swap() -> int:
    swap = psutil.swap_memory()
    return int(swap.sin + swap.sout)
