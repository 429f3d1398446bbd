"""The benchmark: one command, one table, everything side by side in one run on this machine.

    scripts/bench                         # or: .venv/bin/python -m bench.run [options]
    scripts/bench --only floor,http --launchers bubblewrap --rounds 100     # a quick look

For each launcher configuration (a column; a configuration is only Settings overrides, see
LAUNCHERS): the floor (a bare jupyter_client round trip to a kernel started as the service
starts one) interleaved call by call with the service over HTTP and with our own Python
client; a plot and a pandas cell; new sessions with and without the warm pool; a timeout on
code deaf to interrupts; idle memory per session; 32-client throughput with the service's
CPU per execution, then the raw limit (32 such kernels driven by bare jupyter_client
clients, no service). Then, in one configuration, as many idle sessions as asked (bounded
by memory and time); in one (the defaults), a load of 10 000 mixed cells (plots and errors
among them) from 32 clients over 100 live sessions, every answer checked, the service's RSS
and open files before and after, and nothing left once they are deleted (bounded by a
deadline); then the peers (Qwen-Agent, Lagent, from PyPI into bench/.venv-peers). The
service always runs as `kernel-service serve` in a process of its own on a free loopback
port. Every process the benchmark starts is ended, also on Ctrl-C. The table goes to stdout
and bench/results.md.

The machine is noisy (its CPU swings between a fast and a slow phase): compare ratios
within a run, and read the noise rows before comparing runs.
"""

import argparse
import asyncio
import contextlib
import datetime
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import cluster, languages, latency, load, mixed_load
from bench.floor import Floor
from bench.peers import run_peers
from bench.report import METHOD, STALL_LIMIT, TIMEOUT, Column, table
from bench.service import Service
from bench.stats import MIB, calibrate
from kernel_service.config import Settings

SECTIONS = (
    "floor", "http", "sessions", "timeout", "memory", "throughput", "scale", "load", "peers",
    "cluster", "languages",
)  # fmt: skip
RESULTS = Path(__file__).with_name("results.md")


# The launcher configurations compared, a column each: name → Settings overrides. A launcher
# mode is only settings, so a new one is one more line here.
LAUNCHERS: dict[str, dict[str, Any]] = {
    "plain": {"sandbox": "none", "fork_server": False},
    "bubblewrap": {"sandbox": "bubblewrap", "fork_server": False},
    "fork-server": {"sandbox": "bubblewrap", "fork_server": True},  # the service's defaults
    "fork-plain": {"sandbox": "none", "fork_server": True},
}
DEFAULT_LAUNCHERS = ["plain", "bubblewrap", "fork-server"]
# The longest stalls of the load's event loop named in the problems, when over the target.
_STALLS_SHOWN = 5
# Seconds the raw limit may take beyond its duration (its kernels' start and warm-up): it
# stops by itself after that.
_RAW_LIMIT_START = 120
# Kernel uids for the sandboxes the benchmark starts: a block per service, far from the
# service's default (210000) and from another service on this machine.
_UID_BASE = 700_000


class Bench:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.sections = set(args.only)
        self._uid_next = _UID_BASE
        self._made = 0

    def _place(self, uids: int = 1000) -> tuple[Path, dict[str, Any]]:
        """A directory and kernel uids of its own for one service or floor, and the settings
        that say so."""
        self._made += 1
        place = self.root / f"{self._made}"
        base = self._uid_next
        self._uid_next += uids
        return place, {
            "connection_dir": place / "c",
            "work_dir": place / "w",
            "state_dir": place / "s",
            "sandbox_uid_base": base,
            "sandbox_uid_count": uids,
            "session_ttl": 0,
        }

    async def column(self, name: str) -> Column:
        column = Column(name)
        overrides = LAUNCHERS[name]
        column.calibration.append(calibrate())
        try:
            await self._pooled_service(column, overrides)
            await self._raw_limit(column, overrides)
            await self._unpooled_service(column, overrides)
        except Exception as exc:
            column.problems.append(_briefly(exc))
            _say(f"[{name}] failed: {exc}")
        column.calibration.append(calibrate())
        return column

    async def _pooled_service(self, column: Column, overrides: dict[str, Any]) -> None:
        wanted = self.sections & {"floor", "http", "sessions", "timeout", "throughput"}
        if not wanted:
            return
        floor = None
        if "floor" in wanted:
            place, values = self._place()
            floor_settings = Settings(**values, **overrides, pool_size=0)
            floor = await Floor(floor_settings, place / "floor").__aenter__()
        try:
            if wanted == {"floor"}:
                _say(f"[{column.name}] floor: {self.args.rounds} x 1+1")
                assert floor is not None
                column.floor = await latency.floor_alone(floor, self.args.rounds)
                return
            place, values = self._place()
            settings = {**values, **overrides, "pool_size": 2,
                        "max_sessions": self.args.clients + 8}  # fmt: skip
            async with _running(Service(column.name, place, settings), column) as service:
                await service.wait_pool_full()
                if "http" in wanted:
                    _say(f"[{column.name}] warm 1+1: {self.args.rounds} rounds, interleaved")
                    column.warm = await latency.warm_round_trips(floor, service, self.args.rounds)
                    column.floor = column.warm.floor
                    _say(f"[{column.name}] plot and pandas cells")
                    column.cells = await latency.cells(floor, service, self.args.cell_rounds)
                elif floor is not None:
                    column.floor = await latency.floor_alone(floor, self.args.rounds)
                if floor is not None:
                    await floor.__aexit__(None, None, None)
                    floor = None
                if "sessions" in wanted:
                    _say(f"[{column.name}] new sessions, warm pool")
                    column.pooled = await latency.new_sessions(
                        service, self.args.new_rounds, pooled=True
                    )
                    _problem(column, column.pooled.errors, "new sessions (pool)")
                if "timeout" in wanted:
                    _say(f"[{column.name}] timeouts")
                    column.timeouts = await latency.timeouts(service, 2, TIMEOUT)
                    _problem(column, column.timeouts.errors, "timeouts")
                if "throughput" in wanted:
                    _say(f"[{column.name}] throughput: {self.args.clients} clients")
                    column.throughput = await load.throughput(
                        service, self.args.clients, self.args.duration
                    )
                for name, errors in (("warm", column.warm), ("cells", column.cells)):
                    if errors is not None:
                        _problem(column, errors.errors, name)
        finally:
            if floor is not None:
                await floor.__aexit__(None, None, None)

    async def _raw_limit(self, column: Column, overrides: dict[str, Any]) -> None:
        """What the service's throughput is held against: as many kernels as it had
        clients, on one Runtime of the column's settings, each driven by a bare
        jupyter_client, for as long. Right after the service's throughput, its service
        stopped by then, so no kernel but these runs."""
        if "throughput" not in self.sections:
            return
        clients, duration = self.args.clients, self.args.duration
        place, values = self._place()
        settings = Settings(**values, **overrides, pool_size=0, max_sessions=clients + 8)
        bound = _RAW_LIMIT_START + duration
        _say(f"[{column.name}] raw limit: {clients} bare clients on {clients} kernels")
        kernels = Floor(settings, place / "raw", count=clients)
        try:
            async with asyncio.timeout(bound):
                await kernels.start()
                column.raw_limit = await load.raw_throughput(kernels, duration)
        except TimeoutError:
            raise RuntimeError(f"raw limit: not done within {bound:.0f} s") from None
        finally:
            await kernels.close()

    async def _unpooled_service(self, column: Column, overrides: dict[str, Any]) -> None:
        if not self.sections & {"sessions", "memory"}:
            return
        place, values = self._place()
        settings = {**values, **overrides, "pool_size": 0,
                    "max_sessions": self.args.memory_sessions + 8}  # fmt: skip
        async with _running(Service(column.name, place, settings), column) as service:
            if "sessions" in self.sections:
                _say(f"[{column.name}] new sessions, no pool")
                column.unpooled = await latency.new_sessions(
                    service, self.args.new_rounds, pooled=False
                )
                _problem(column, column.unpooled.errors, "new sessions (no pool)")
            if "memory" in self.sections:
                _say(f"[{column.name}] memory of {self.args.memory_sessions} idle sessions")
                column.memory = await load.idle_memory(service, self.args.memory_sessions)

    async def scale(self, column: Column) -> None:
        count = self.args.sessions
        place, values = self._place(uids=count + 100)
        settings = {**values, **LAUNCHERS[column.name], "pool_size": 0, "max_sessions": count + 10}
        _say(f"[{column.name}] scale: up to {count} idle sessions")
        service = Service(column.name, place, settings)
        async with _running(service, column, stop_timeout=300):
            column.scale = await load.scale(
                service, count, self.args.memory_floor * 1024 * MIB, self.args.scale_seconds
            )

    async def load(self, column: Column) -> None:
        """The mixed load, on a service without a warm pool: once every session is deleted,
        no kernel may be left at all."""
        args = self.args
        place, values = self._place(uids=args.load_sessions + 100)
        settings = {**values, **LAUNCHERS[column.name], "pool_size": 0,
                    "max_sessions": args.load_sessions + 8}  # fmt: skip
        _say(
            f"[{column.name}] load: {args.load_executions} executions, {args.load_clients} "
            f"clients, {args.load_sessions} sessions; deadline {args.load_deadline:.0f} s"
        )
        service = Service(column.name, place, settings, watch_stalls=args.watch_stalls)
        async with _running(service, column, stop_timeout=60):
            column.load = result = await mixed_load.mixed(
                service,
                sessions=args.load_sessions,
                executions=args.load_executions,
                clients=args.load_clients,
                deadline=args.load_deadline,
                memory_floor=int(args.memory_floor * 1024 * MIB),
            )
            if args.watch_stalls:
                result.stalls = service.stalls()
        _say(f"[{column.name}] load: done in {result.total_seconds:.0f} s")
        _load_problems(column, result)


@contextlib.asynccontextmanager
async def _running(
    service: Service, column: Column, stop_timeout: float = 120
) -> AsyncIterator[Service]:
    try:
        await service.start()
        yield service
    finally:
        leftovers = await service.stop(stop_timeout)
        if leftovers:
            column.problems.append(f"had to kill: {'; '.join(leftovers)}")


def _problem(column: Column, errors: int, what: str) -> None:
    if errors:
        column.problems.append(f"{what}: {errors} unexpected answers")


def _load_problems(column: Column, result: mixed_load.MixedLoad) -> None:
    """What went wrong under load, counted by kind, and the first few in full."""
    if result.stopped_because:
        column.problems.append(f"load: stopped: {result.stopped_because}")
    if result.kinds:
        kinds = ", ".join(f"{kind} ×{n}" for kind, n in result.kinds.most_common())
        column.problems.append(f"load: {kinds}")
        column.problems += [f"load: {example}" for example in result.examples]
    held = sorted(((s - w, w, c) for s, w, c in result.stalls or []), reverse=True)
    for seconds, waiting, callback in held[:_STALLS_SHOWN]:
        if seconds >= STALL_LIMIT:
            column.problems.append(f"load: a callback held the event loop {seconds * 1000:.0f} ms "
                                   f"(and waited {waiting * 1000:.0f} ms for a CPU) in "
                                   f"{callback[:300]}")  # fmt: skip
    if result.kernels_left or result.files_left:
        column.problems.append(
            f"load: after deleting every session, {result.kernels_left} kernel processes and "
            f"{result.files_left} connection entries left"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _briefly(exc: Exception) -> str:
    """An exception in a line: its message's first and last lines (a log's tail can follow)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return f"{type(exc).__name__}: {text}"


def _say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def _machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent,
    ).stdout.strip()  # fmt: skip
    return (
        f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, Linux {platform.release()}; "
        f"Python {platform.python_version()}, ipykernel {version('ipykernel')}, "
        f"jupyter_client {version('jupyter_client')}; kernel-service {commit}"
    )


async def main_async(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    root = Path(tempfile.mkdtemp(prefix="ksb-"))
    bench = Bench(args, root)
    started = time.monotonic()
    columns: list[Column] = []
    peers = []
    cells: cluster.ClusterResult | None = None
    spoken: list[languages.LanguageFigures] = []
    problems_at_start: list[str] = []  # of sections that failed before giving figures
    try:
        for name in args.launchers:
            columns.append(await bench.column(name))
        # the sections run in one configuration (a column) only
        for section, launcher, run in (
            ("scale", args.scale_launcher, bench.scale),
            ("load", args.load_launcher, bench.load),
        ):
            if section not in bench.sections or not columns:
                continue
            at = next((c for c in columns if c.name == launcher), columns[-1])
            try:
                await run(at)
            except Exception as exc:
                at.problems.append(f"{section}: {_briefly(exc)}")
                _say(f"{section} failed: {exc}")
        if "peers" in bench.sections:
            peers = await run_peers(root / "peers", int(TIMEOUT), root / "peers-install.log")
        if "cluster" in bench.sections:
            _say("cluster: 3 cells behind HAProxy, then 1")
            try:
                cells = await cluster.run(root / "cluster", _free_port(), args.rounds)
            except Exception as exc:
                cells = cluster.ClusterResult(problems=[_briefly(exc)])
                _say(f"cluster failed: {exc}")
        if "languages" in bench.sections:
            spoken, problems_at_start = await _languages(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return _report(args, started, columns, peers, cells, spoken, problems_at_start)


def _report(  # noqa: PLR0917 (each section's outcome)
    args: argparse.Namespace,
    started: float,
    columns: list[Column],
    peers: list[Any],
    cells: cluster.ClusterResult | None,
    spoken: list[languages.LanguageFigures],
    problems_at_start: list[str],
) -> int:
    """The table and its targets to stdout and bench/results.md; 1 if there were problems."""
    lines, verdicts = table(columns, peers, vars(args))
    if cells is not None:
        cell_lines, cell_verdicts = cluster.lines(cells)
        lines += ["", *cell_lines]
        verdicts += cell_verdicts
    if spoken:
        language_lines, language_verdicts = languages.lines(spoken)
        lines += ["", *language_lines]
        verdicts += language_verdicts
    command = "scripts/bench" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])
    problems = [f"- {c.name}: {p}" for c in columns for p in c.problems] + problems_at_start
    for figure in spoken:
        problems += [f"- languages: {figure.language}: {e}" for e in figure.errors]
    if cells is not None:
        problems += [f"- cluster: {p}" for p in cells.problems]
    for peer in peers:
        problems += [f"- {peer.name}: {e}" for e in peer.errors]
    report = [
        f"`{command}` — {datetime.date.today()}, {time.monotonic() - started:.0f} s",
        "",
        f"Machine: {_machine()}",
        "",
        *lines,
        "",
        "Targets:",
        *verdicts,
    ]
    if problems:
        report += ["", "Problems:", *problems]
    text = "\n".join(report) + "\n"
    print(text)
    RESULTS.write_text(f"# Benchmark results\n\n{text}\n{METHOD}")
    return 1 if problems else 0


async def _languages(root: Path) -> tuple[list[languages.LanguageFigures], list[str]]:
    """The languages section: its figures, or the problem that stopped it."""
    _say("languages: a new session and idle memory in each")
    try:
        return await languages.run(root / "languages"), []
    except Exception as exc:
        _say(f"languages failed: {exc}")
        return [], [f"- languages: {_briefly(exc)}"]


def main() -> None:
    # the floor's Runtime logs in this process (an unsandboxed launcher warns); the services
    # log at their default level to files of their own
    logging.getLogger("kernel_service").setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only",
        type=_names(SECTIONS),
        default=list(SECTIONS),
        help=f"sections, comma-separated (default all): {','.join(SECTIONS)}",
    )
    parser.add_argument(
        "--launchers",
        type=_names(tuple(LAUNCHERS)),
        default=DEFAULT_LAUNCHERS,
        help=f"columns, comma-separated: {','.join(LAUNCHERS)} "
        f"(default {','.join(DEFAULT_LAUNCHERS)})",
    )
    parser.add_argument("--rounds", type=int, default=400, help="warm 1+1 round trips (400)")
    parser.add_argument("--cell-rounds", type=int, default=20, help="plot and pandas cells (20)")
    parser.add_argument("--new-rounds", type=int, default=10, help="new sessions timed (10)")
    parser.add_argument("--memory-sessions", type=int, default=10, help="idle sessions (10)")
    parser.add_argument("--clients", type=int, default=32, help="throughput clients (32)")
    parser.add_argument("--duration", type=float, default=10, help="throughput seconds (10)")
    parser.add_argument("--sessions", type=int, default=300, help="scale: sessions (300)")
    parser.add_argument(
        "--scale-launcher",
        default=DEFAULT_LAUNCHERS[-1],
        help=f"the column that runs the scale section ({DEFAULT_LAUNCHERS[-1]})",
    )
    parser.add_argument(
        "--scale-seconds",
        type=float,
        default=300,
        help="scale: stop making sessions after this long (300)",
    )
    parser.add_argument(
        "--memory-floor",
        type=float,
        default=3,
        help="scale: stop before available memory falls under this, GiB (3)",
    )
    parser.add_argument(
        "--load-executions", type=int, default=10_000, help="load: executions (10000)"
    )
    parser.add_argument("--load-sessions", type=int, default=100, help="load: sessions (100)")
    parser.add_argument("--load-clients", type=int, default=32, help="load: clients (32)")
    parser.add_argument(
        "--load-deadline",
        type=float,
        default=480,
        help="load: the section stops by itself after this long, clean-up included (480 s)",
    )
    parser.add_argument(
        "--load-launcher",
        default=DEFAULT_LAUNCHERS[-1],
        help=f"the column that runs the load section ({DEFAULT_LAUNCHERS[-1]})",
    )
    parser.add_argument(
        "--watch-stalls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load: run the service on asyncio's loop, timing every callback, for the longest "
        "stall of its event loop (default; --no-watch-stalls: on uvloop, as it serves)",
    )
    args = parser.parse_args()  # fmt: skip
    sandbox = os.geteuid() == 0 and shutil.which("bwrap") is not None
    if not sandbox:
        skipped = [n for n in args.launchers if LAUNCHERS[n].get("sandbox") == "bubblewrap"]
        if skipped:
            _say(f"skipping {', '.join(skipped)}: the sandbox needs root and bubblewrap")
        args.launchers = [n for n in args.launchers if n not in skipped]
    try:
        code = asyncio.run(main_async(args))
    except (KeyboardInterrupt, asyncio.CancelledError):
        _say("interrupted; every process the benchmark started has been ended")
        code = 130
    sys.exit(code)


def _names(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)}")
        return names

    return parse


if __name__ == "__main__":
    main()
