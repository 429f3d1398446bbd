"""Numbers from samples and from processes: medians and p99, the CPU calibration loop, and
the memory (PSS, USS) and CPU time of process trees."""

import contextlib
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psutil

MIB = 1024 * 1024


@dataclass(frozen=True)
class Summary:
    """Median and p99 (nearest rank) of latencies in ms."""

    n: int
    p50: float
    p99: float
    worst: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Summary":
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)
        p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
        return cls(len(ordered), statistics.median(ordered), p99, ordered[-1])


def block_medians(samples: Sequence[float], blocks: int) -> list[float]:
    """Medians of consecutive blocks: how much the same measurement drifts within a run."""
    size = max(1, len(samples) // blocks)
    return [
        statistics.median(samples[i : i + size])
        for i in range(0, size * blocks, size)
        if samples[i : i + size]
    ]


def calibrate(repeats: int = 7) -> float:
    """Median ms of a fixed pure-Python loop: the machine's speed right now."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@dataclass(frozen=True)
class Memory:
    """Summed over processes, in bytes."""

    pss: int
    uss: int
    rss: int
    processes: int


def tree(root: psutil.Process, include_root: bool = False) -> list[psutil.Process]:
    """`root`'s descendants (and itself if asked), alive ones only."""
    found = [root] if include_root else []
    with contextlib.suppress(psutil.Error):
        found += root.children(recursive=True)
    return [p for p in found if _alive(p)]


def memory(processes: Iterable[psutil.Process]) -> Memory:
    """PSS adds up across processes (shared pages are split among their users), so the sum
    over a group is what the group costs the machine."""
    pss = uss = rss = count = 0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            info = process.memory_full_info()
            pss += info.pss
            uss += info.uss
            rss += info.rss
            count += 1
    return Memory(pss, uss, rss, count)


def cpu_seconds(processes: Iterable[psutil.Process]) -> dict[int, float]:
    """user + system seconds per pid (processes that ended meanwhile are left out)."""
    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


def cpu_used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two `cpu_seconds` readings by processes alive at both."""
    return sum(after[pid] - before[pid] for pid in after if pid in before)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
