"""Latency scenarios against one running service: warm round trips interleaved with the floor,
a plot and a pandas cell, new sessions (with and without the warm pool), and a timeout on
code that ignores interrupts."""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bench.floor import Floor
from bench.service import JupyterSocket, RawHttp, Service
from kernel_service_client import Client

ONE_PLUS_ONE = "1+1"
PLOT = "import matplotlib.pyplot as plt\nplt.plot(range(10))\nplt.show()"
PANDAS = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'x': range(1000), 'y': [i * i for i in range(1000)]})\n"
    "df.describe()"
)
UNINTERRUPTIBLE = "sum(range(10**10))"
_WARM_UP = 30


@dataclass
class WarmTrips:
    """ms per `1+1`, each list in the order measured."""

    floor: list[float] = field(default_factory=list)
    httpx: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    ours: list[float] = field(default_factory=list)  # kernel_service_client's sync Client
    jupyter: list[float] = field(default_factory=list)  # the kernel's Jupyter WebSocket
    inside: list[float] = field(default_factory=list)  # the service's own duration_ms
    # ms of the event loop thread's CPU time per call, by the names above
    cpu: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0


async def warm_round_trips(floor: Floor | None, service: Service, rounds: int) -> WarmTrips:
    """`1+1` on the floor, over httpx, over a bare connection, with our own client and over
    the session's Jupyter WebSocket, interleaved call by call (the order rotating), so all
    of them see the same machine.
    Each call's CPU time on this thread is taken too: what the caller's side costs."""
    trips = WarmTrips()
    session = await service.new_session()
    raw = await RawHttp.connect(service.port)
    socket = await JupyterSocket.connect(service.port, session)
    client = Client(service.base_url)
    ours = client.session()  # a session of its own, made by its first call

    async def over_httpx() -> float:
        started = time.perf_counter()
        result = await service.execute(ONE_PLUS_ONE, session)
        elapsed = (time.perf_counter() - started) * 1000
        trips.errors += result["result"] != "2"
        trips.inside.append(result["duration_ms"])
        return elapsed

    async def over_raw() -> float:
        started = time.perf_counter()
        result = await raw.execute(ONE_PLUS_ONE, session)
        elapsed = (time.perf_counter() - started) * 1000
        trips.errors += result["result"] != "2"
        return elapsed

    async def over_jupyter() -> float:
        started = time.perf_counter()
        value = await socket.execute(ONE_PLUS_ONE)
        elapsed = (time.perf_counter() - started) * 1000
        trips.errors += value.get("data", {}).get("text/plain") != "2"
        return elapsed

    async def with_ours() -> float:
        # sync, so it blocks the event loop while it waits: nothing else is meant to run
        # then (the round trips go one at a time), and a thread would add its hand-offs
        started = time.perf_counter()
        result = ours.execute(ONE_PLUS_ONE)
        elapsed = (time.perf_counter() - started) * 1000
        trips.errors += result.result != "2"
        return elapsed

    async def on_floor() -> float:
        assert floor is not None
        return await floor.run(ONE_PLUS_ONE)

    targets: dict[str, tuple[list[float], Callable[[], Awaitable[float]]]] = {
        "httpx": (trips.httpx, over_httpx),
        "raw": (trips.raw, over_raw),
        "ours": (trips.ours, with_ours),
        "jupyter": (trips.jupyter, over_jupyter),
    }
    if floor is not None:
        targets["floor"] = (trips.floor, on_floor)
    names = list(targets)
    try:
        for _ in range(_WARM_UP):
            for _, measure in targets.values():
                await measure()
        # the two sessions took kernels from the warm pool: no kernel start while measuring
        await service.wait_pool_full()
        trips.inside.clear()
        for i in range(rounds):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                samples, measure = targets[name]
                cpu = time.thread_time()
                samples.append(await measure())
                trips.cpu.setdefault(name, []).append((time.thread_time() - cpu) * 1000)
    finally:
        await raw.close()
        await socket.close()
        await service.delete(session)
        with client:  # closed whatever ending the session does
            ours.close()
    return trips


async def floor_alone(floor: Floor, rounds: int) -> list[float]:
    for _ in range(_WARM_UP):
        await floor.run(ONE_PLUS_ONE)
    return [await floor.run(ONE_PLUS_ONE) for _ in range(rounds)]


@dataclass
class CellTrips:
    floor: dict[str, list[float]] = field(default_factory=dict)
    http: dict[str, list[float]] = field(default_factory=dict)
    errors: int = 0


async def cells(floor: Floor | None, service: Service, rounds: int) -> CellTrips:
    """A plot and a pandas cell, floor and HTTP (httpx) alternating."""
    trips = CellTrips()
    session = await service.new_session()
    try:
        for name, code in (("plot", PLOT), ("pandas", PANDAS)):
            trips.floor[name], trips.http[name] = [], []
            for i in range(rounds + 2):  # the first two warm up
                if floor is not None:
                    elapsed = await floor.run(code)
                    if i >= 2:
                        trips.floor[name].append(elapsed)
                started = time.perf_counter()
                result = await service.execute(code, session)
                elapsed = (time.perf_counter() - started) * 1000
                if i >= 2:
                    trips.http[name].append(elapsed)
                wanted = result["images"] if name == "plot" else result["result"]
                trips.errors += result["status"] != "ok" or not wanted
    finally:
        await service.delete(session)
    return trips


@dataclass
class NewSessions:
    ms: list[float] = field(default_factory=list)
    inside: list[float] = field(default_factory=list)  # the first execution's duration_ms
    errors: int = 0


async def new_sessions(service: Service, rounds: int, pooled: bool) -> NewSessions:
    """ms of POST /execute without a session (a new session and its first result); with the
    pool, each after the pool is full again. The session is deleted untimed."""
    trips = NewSessions()
    for _ in range(rounds):
        if pooled and not await service.wait_pool_full():
            trips.errors += 1
        started = time.perf_counter()
        result = await service.execute(ONE_PLUS_ONE)
        trips.ms.append((time.perf_counter() - started) * 1000)
        trips.inside.append(result["duration_ms"])
        trips.errors += result["result"] != "2"
        await service.delete(result["session_id"])
    return trips


@dataclass
class TimeoutTrips:
    seconds: list[float] = field(default_factory=list)  # until the timeout's answer
    next_call_ms: list[float] = field(default_factory=list)  # the following 1+1 (new kernel)
    errors: int = 0


async def timeouts(service: Service, rounds: int, timeout: float) -> TimeoutTrips:
    trips = TimeoutTrips()
    session = await service.new_session()
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            result = await service.execute(UNINTERRUPTIBLE, session, timeout=timeout)
            trips.seconds.append(time.perf_counter() - started)
            trips.errors += result["status"] != "timeout" or not result["state_lost"]
            started = time.perf_counter()
            result = await service.execute(ONE_PLUS_ONE, session)
            trips.next_call_ms.append((time.perf_counter() - started) * 1000)
            trips.errors += result["result"] != "2"
    finally:
        await service.delete(session)
    return trips
