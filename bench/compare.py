"""Two checkouts of kernel-service side by side: the 32-client throughput of each, in short
windows taken in turn (ABBA...), so that both see the same machine. The machine's speed
swings by up to 2x while other work runs: one run after the other cannot tell a change of
10% from noise; alternating windows can.

    .venv/bin/python -m bench.compare BEFORE AFTER        # each a checkout's directory
    git worktree add /tmp/before <commit>; .venv/bin/python -m bench.compare /tmp/before .

Both services run as the benchmark runs one (`bench.service`, the defaults: bubblewrap and
the fork-server, no warm pool), each with its sessions made and warmed before the first
window. Printed: per checkout, the medians over its windows of the service process's CPU
per execution, the kernels' CPU per execution and executions/s, and every window's CPU
figure. Every process started is ended, also on error or Ctrl-C.
"""

import argparse
import asyncio
import contextlib
import statistics
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.load import Throughput, back_to_back, delete_sessions, make_sessions, over_http
from bench.service import RawHttp, Service
from bench.stats import cpu_seconds, cpu_used

_UID_BASE = 760_000  # kernel uids of its own: a block per service


@dataclass
class Windows:
    """One checkout's figures, a value per window."""

    code: Path
    service_us: list[float] = field(default_factory=list)  # service CPU per execution
    kernels_us: list[float] = field(default_factory=list)  # kernels' CPU per execution
    rates: list[float] = field(default_factory=list)  # executions/s
    errors: int = 0


@dataclass
class _Running:
    service: Service
    sessions: list[str]
    connections: list[RawHttp]
    windows: Windows


@contextlib.asynccontextmanager
async def _running(code: Path, root: Path, uid_base: int, clients: int) -> AsyncIterator[_Running]:
    settings = {
        "connection_dir": root / "c", "work_dir": root / "w", "state_dir": root / "s",
        "sandbox_uid_base": uid_base, "sandbox_uid_count": 1000, "session_ttl": 0,
        "keep_alive_timeout": 3600, "pool_size": 0, "max_sessions": clients + 8,
    }  # fmt: skip
    service = Service(code.name or str(code), root, settings, code=code)
    connections: list[RawHttp] = []
    sessions: list[str] = []
    try:
        await service.start()
        sessions = await make_sessions(service, clients)
        connections = [await RawHttp.connect(service.port) for _ in sessions]
        yield _Running(service, sessions, connections, Windows(code))
    finally:
        for connection in connections:
            await connection.close()
        if sessions and service.process is not None and service.process.is_running():
            await delete_sessions(service, sessions)
        await service.stop(120)


async def _window(running: _Running, seconds: float, record: bool) -> None:
    """Every connection sends `1+1` on its session back to back for `seconds`."""
    service, windows = running.service, running.windows
    kernels = service.children()
    kernels_before, service_before = cpu_seconds(kernels), service.cpu_seconds()
    result = Throughput(len(running.connections))
    calls = [over_http(c, s) for c, s in zip(running.connections, running.sessions, strict=True)]
    await back_to_back(result, calls, seconds)
    windows.errors += result.errors
    executions = len(result.latencies)
    if record and executions:
        windows.service_us.append((service.cpu_seconds() - service_before) / executions * 1e6)
        kernels_used = cpu_used(kernels_before, cpu_seconds(kernels))
        windows.kernels_us.append(kernels_used / executions * 1e6)
        windows.rates.append(executions / result.seconds)


async def compare(codes: list[Path], rounds: int, seconds: float, clients: int) -> list[Windows]:
    with tempfile.TemporaryDirectory(prefix="ksc-") as scratch:
        async with contextlib.AsyncExitStack() as stack:
            running = [
                await stack.enter_async_context(
                    _running(code, Path(scratch) / str(i), _UID_BASE + 2000 * i, clients)
                )
                for i, code in enumerate(codes)
            ]
            for each in running:  # warm: the kernels' first executions, the service's caches
                await _window(each, min(seconds, 2.0), record=False)
            for turn in range(rounds):
                for each in running if turn % 2 == 0 else running[::-1]:
                    await _window(each, seconds, record=True)
            return [each.windows for each in running]


def report(results: list[Windows]) -> str:
    lines = [
        "| checkout | service CPU per execution, µs (median) | kernels' CPU per execution, "
        "µs | executions/s | service CPU in each window, µs |",
        "|---|---|---|---|---|",
    ]
    for windows in results:
        lines.append(
            f"| `{windows.code}` | {statistics.median(windows.service_us):.0f} "
            f"| {statistics.median(windows.kernels_us):.0f} "
            f"| {statistics.median(windows.rates):.0f} "
            f"| {', '.join(f'{v:.0f}' for v in sorted(windows.service_us))} |"
        )
    if len(results) == 2:
        before, after = (statistics.median(w.service_us) for w in results)
        lines.append(f"\nservice CPU per execution: ×{after / before:.2f}")
    errors = sum(w.errors for w in results)
    if errors:
        lines.append(f"\n{errors} unexpected answers")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkouts", nargs=2, type=Path, help="two checkouts' directories")
    parser.add_argument("--rounds", type=int, default=8, help="windows per checkout (8)")
    parser.add_argument("--seconds", type=float, default=3, help="seconds per window (3)")
    parser.add_argument("--clients", type=int, default=32, help="clients and sessions (32)")
    args = parser.parse_args()
    args.checkouts = [code.resolve() for code in args.checkouts]
    for code in args.checkouts:
        if not (code / "kernel_service" / "__init__.py").is_file():
            parser.error(f"{code} is not a kernel-service checkout")
    try:
        results = asyncio.run(compare(args.checkouts, args.rounds, args.seconds, args.clients))
    except KeyboardInterrupt:
        raise SystemExit("interrupted; every process it started has been ended") from None
    print(report(results))
    raise SystemExit(1 if any(w.errors for w in results) else 0)


if __name__ == "__main__":
    main()
