"""Benchmarks, side by side in one run (the machines are noisy: compare ratios, not runs).

    scripts/bench            # or: .venv/bin/python -m bench.run [--rounds N]

Sandbox cost: a kernel's start-to-ready and a `1+1` round trip (execute_request to
iopub idle), plain launch vs bubblewrap, interleaved so both see the same machine.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kernel_service.collector import OutputLimits
from kernel_service.config import MIB, Settings
from kernel_service.kernel import Kernel, KernelLauncher, KernelOptions, zmq_context
from kernel_service.kernel.fonts import prepare_font_cache
from kernel_service.kernel.kernel import STARTUP_FILE
from kernel_service.kernel.launcher import SubprocessLauncher
from kernel_service.kernel.sandbox import (
    BubblewrapLauncher,
    SandboxLimits,
    default_read_only_paths,
)

LIMITS = OutputLimits(text=100_000, rich=1_000_000)


async def _measure(
    launcher: KernelLauncher, options: KernelOptions, work: Path, executions: int
) -> tuple[float, list[float]]:
    work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (a mkdir)
    started = time.perf_counter()
    kernel = await Kernel.start(launcher, options, work)
    ready = (time.perf_counter() - started) * 1000
    try:
        for _ in range(20):  # warm-up
            await kernel.execute("1+1", 10, 0.5, LIMITS)
        trips = []
        for _ in range(executions):
            started = time.perf_counter()
            await kernel.execute("1+1", 10, 0.5, LIMITS)
            trips.append((time.perf_counter() - started) * 1000)
    finally:
        await kernel.shutdown()
    return ready, trips


def _row(name: str, ready: list[float], trips: list[float]) -> str:
    trips = sorted(trips)
    p99 = trips[int(len(trips) * 0.99) - 1]
    return (
        f"| {name:<10} | {statistics.median(ready):>8.0f} | {max(ready):>8.0f} "
        f"| {statistics.median(trips):>8.2f} | {p99:>8.2f} |"
    )


async def sandbox_cost(rounds: int, executions: int) -> None:
    settings = Settings()
    options = KernelOptions(
        connection_dir=Path(tempfile.mkdtemp(prefix="ks-bench-")),
        matplotlib_dir=settings.matplotlib_dir,
        start_timeout=60,
        preload_modules=tuple(settings.preload_modules.split(",")),
        zmq_context=zmq_context(settings.max_message_bytes),
    )
    await prepare_font_cache(settings.matplotlib_dir)
    launchers: dict[str, KernelLauncher] = {"plain": SubprocessLauncher()}
    if os.geteuid() == 0 and shutil.which("bwrap"):
        launchers["bubblewrap"] = BubblewrapLauncher(
            SandboxLimits(2048 * MIB, 256, 1024 * MIB, 1024, 256 * MIB),
            first_uid=settings.sandbox_uid_base,
            uid_count=100,
            read_only_paths=default_read_only_paths(STARTUP_FILE),
        )
    else:
        print("(no sandbox here: needs root and bubblewrap)")
    ready: dict[str, list[float]] = {name: [] for name in launchers}
    trips: dict[str, list[float]] = {name: [] for name in launchers}
    try:
        for round_ in range(rounds):
            for name, launcher in launchers.items():  # interleaved
                work = options.connection_dir / f"work-{name}-{round_}"
                start, round_trips = await _measure(launcher, options, work, executions)
                ready[name].append(start)
                trips[name].extend(round_trips)
    finally:
        for launcher in launchers.values():
            await launcher.close()
        shutil.rmtree(options.connection_dir, ignore_errors=True)
        options.zmq_context.destroy(linger=0)
    print(f"\nSandbox cost: {rounds} kernels each (numpy, pandas, matplotlib preloaded), "
          f"{executions} x `1+1` per kernel")  # fmt: skip
    print("| launch     | ready ms | max ms   | 1+1 p50  | 1+1 p99  |")
    print("|------------|----------|----------|----------|----------|")
    for name in launchers:
        print(_row(name, ready[name], trips[name]))
    if "bubblewrap" in launchers:
        slower = statistics.median(ready["bubblewrap"]) / statistics.median(ready["plain"])
        trip = statistics.median(trips["bubblewrap"]) / statistics.median(trips["plain"])
        print(f"bubblewrap / plain: start x{slower:.2f}, 1+1 x{trip:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="kernels started per launcher")
    parser.add_argument("--executions", type=int, default=200, help="1+1 per kernel")
    args = parser.parse_args()
    asyncio.run(sandbox_cost(args.rounds, args.executions))


if __name__ == "__main__":
    main()
