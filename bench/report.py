"""The one table: a column per launcher configuration and per peer, a row per figure, the
targets with a pass (✓) or fail (✗) mark in each cell they apply to."""

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.latency import CellTrips, NewSessions, TimeoutTrips, WarmTrips
from bench.load import IdleMemory, Scale, Throughput
from bench.mixed_load import FD_GROWTH_LIMIT, RSS_GROWTH_LIMIT, MixedLoad
from bench.peers import PEERS, PeerResult
from bench.stats import MIB, Summary, block_medians
from bench.watched import SLOW_CALLBACK_SECONDS

PASS, FAIL = "✓", "✗"
_GIB = 1024 * MIB


@dataclass
class Column:
    """Everything measured with one launcher configuration."""

    name: str
    calibration: list[float] = field(default_factory=list)  # ms, at its start and its end
    floor: list[float] = field(default_factory=list)  # 1+1 on the floor, in order
    warm: WarmTrips | None = None
    cells: CellTrips | None = None
    pooled: NewSessions | None = None
    unpooled: NewSessions | None = None
    timeouts: TimeoutTrips | None = None
    memory: IdleMemory | None = None
    throughput: Throughput | None = None
    raw_limit: Throughput | None = None  # bare jupyter_client clients, no service
    scale: Scale | None = None
    load: MixedLoad | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Cell:
    text: str
    verdict: bool | None = None  # None: no target applies here

    def render(self) -> str:
        if self.verdict is None:
            return self.text
        return f"{self.text} {PASS if self.verdict else FAIL}"


@dataclass(frozen=True)
class Row:
    label: str
    ours: Callable[[Column], Cell | None]
    peer: Callable[[PeerResult, Column | None], Cell | None] = lambda _, __: None
    target: str = ""  # short, in the table
    goal: str = ""  # the target in words, for the list of passes and fails


def ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _p(samples: list[float]) -> str:
    summary = Summary.of(samples)
    return f"{ms(summary.p50)} / {ms(summary.p99)}"


def _floor(column: Column) -> Cell | None:
    return Cell(_p(column.floor)) if column.floor else None


def _ratio_to_floor(samples: list[float], column: Column) -> str:
    return (
        f" (×{Summary.of(samples).p50 / Summary.of(column.floor).p50:.2f})" if column.floor else ""
    )


def _raw(column: Column) -> Cell | None:
    return Cell(_p(column.warm.raw)) if column.warm and column.warm.raw else None


def _ratio(column: Column) -> Cell | None:
    if not (column.warm and column.floor and column.warm.raw):
        return None
    http, floor = Summary.of(column.warm.raw), Summary.of(column.floor)
    p50, p99 = http.p50 / floor.p50, http.p99 / floor.p99
    return Cell(f"{p50:.2f} / {p99:.2f}", p50 <= 1.25 and p99 <= 2.0)


def _httpx(column: Column) -> Cell | None:
    if not (column.warm and column.warm.httpx):
        return None
    return Cell(_p(column.warm.httpx) + _ratio_to_floor(column.warm.httpx, column))


def _within(samples: list[float], column: Column, limit: float) -> Cell | None:
    """p50 / p99 of a way of calling, its ratio to the floor, and whether the p50's is
    within `limit`."""
    if not samples:
        return None
    text = _p(samples) + _ratio_to_floor(samples, column)
    if not column.floor:
        return Cell(text)
    ratio = Summary.of(samples).p50 / Summary.of(column.floor).p50
    return Cell(text, ratio <= limit)


def _ours(column: Column) -> Cell | None:
    return _within(column.warm.ours, column, OURS_LIMIT) if column.warm else None


def _jupyter(column: Column) -> Cell | None:
    return _within(column.warm.jupyter, column, JUPYTER_LIMIT) if column.warm else None


def _client_cpu(column: Column) -> Cell | None:
    """Median CPU of the benchmark's thread per call, for each way of calling."""
    if not (column.warm and column.warm.cpu):
        return None
    cpu = column.warm.cpu
    return Cell(
        " / ".join(
            ms(statistics.median(cpu[name])) if cpu.get(name) else "–"
            for name in ("floor", "raw", "httpx", "ours", "jupyter")
        )
    )


def _inside(column: Column) -> Cell | None:
    if not (column.warm and column.warm.inside):
        return None
    return Cell(_p(column.warm.inside) + _ratio_to_floor(column.warm.inside, column))


def _cell(name: str) -> Callable[[Column], Cell | None]:
    def cell(column: Column) -> Cell | None:
        if not (column.cells and column.cells.http.get(name)):
            return None
        http = statistics.median(column.cells.http[name])
        if not column.cells.floor.get(name):
            return Cell(ms(http))
        floor = statistics.median(column.cells.floor[name])
        return Cell(f"{ms(floor)} → {ms(http)} (×{http / floor:.2f})")

    return cell


def _new(trips: NewSessions) -> str:
    return f"{_p(trips.ms)} (inside {ms(statistics.median(trips.inside))})"


def _pooled(column: Column) -> Cell | None:
    if not (column.pooled and column.pooled.ms):
        return None
    return Cell(_new(column.pooled), Summary.of(column.pooled.ms).p50 <= 30)


def _unpooled(column: Column) -> Cell | None:
    if not (column.unpooled and column.unpooled.ms):
        return None
    applies = column.name.startswith("fork-server")
    verdict = Summary.of(column.unpooled.ms).p50 <= 200 if applies else None
    return Cell(_new(column.unpooled), verdict)


def _timeout(column: Column) -> Cell | None:
    trips = column.timeouts
    if not trips or not trips.seconds:
        return None
    worst = max(trips.seconds)
    text = f"{worst:.2f} s; next call {ms(statistics.median(trips.next_call_ms))} ms"
    return Cell(text, worst <= TIMEOUT + 1 and not trips.errors)


def _pss(column: Column) -> Cell | None:
    if not column.memory:
        return None
    each = column.memory.total.pss / column.memory.sessions / MIB
    return Cell(f"{each:.1f}", each <= 45)


def _uss(column: Column) -> Cell | None:
    if not column.memory:
        return None
    return Cell(f"{column.memory.total.uss / column.memory.sessions / MIB:.1f}")


def _execs(column: Column) -> Cell | None:
    load = column.throughput
    if not load or not load.seconds:
        return None
    errors = f", {load.errors} errors" if load.errors else ""
    return Cell(f"{len(load.latencies) / load.seconds:.0f}{errors}")


def _load_latency(column: Column) -> Cell | None:
    load = column.throughput
    return Cell(_p(load.latencies)) if load and load.latencies else None


def _load_cpu(column: Column) -> Cell | None:
    load = column.throughput
    if not load or not load.seconds:
        return None
    shares = (load.service_cpu, load.kernels_cpu, load.bench_cpu)
    return Cell(" / ".join(f"{100 * s / load.seconds:.0f}%" for s in shares))


def _service_cpu(column: Column) -> Cell | None:
    load = column.throughput
    if not load or not load.latencies:
        return None
    each = load.per_execution(load.service_cpu)
    return Cell(f"{each:.2f}", each <= SERVICE_CPU_LIMIT)


def _others_cpu(column: Column) -> Cell | None:
    load = column.throughput
    if not load or not load.latencies:
        return None
    return Cell(
        f"{load.per_execution(load.kernels_cpu):.2f} / {load.per_execution(load.bench_cpu):.2f}"
    )


def _raw_execs(column: Column) -> Cell | None:
    raw = column.raw_limit
    if not raw or not raw.seconds or not raw.latencies:
        return None
    errors = f", {raw.errors} errors" if raw.errors else ""
    return Cell(f"{len(raw.latencies) / raw.seconds:.0f}; {_p(raw.latencies)}{errors}")


def _raw_ratio(column: Column) -> Cell | None:
    load, raw = column.throughput, column.raw_limit
    if not (load and raw and load.seconds and raw.seconds and raw.latencies):
        return None
    ratio = (len(load.latencies) / load.seconds) / (len(raw.latencies) / raw.seconds)
    return Cell(f"×{ratio:.2f}", ratio >= RAW_RATIO_LIMIT)


def _raw_cpu(column: Column) -> Cell | None:
    raw = column.raw_limit
    if not raw or not raw.latencies:
        return None
    return Cell(
        f"{raw.per_execution(raw.bench_cpu):.2f} / {raw.per_execution(raw.kernels_cpu):.2f}"
    )


def _scale_live(column: Column) -> Cell | None:
    scale = column.scale
    if not scale:
        return None
    why = f" (stopped: {scale.stopped_because})" if scale.stopped_because else ""
    text = f"{scale.live}/{scale.asked} in {scale.create_seconds:.0f} s{why}; "
    text += f"{len(scale.errors)} errors"
    return Cell(text, scale.live == scale.asked and not scale.errors)


def _scale_trips(column: Column) -> Cell | None:
    scale = column.scale
    if not scale or not scale.trips or not scale.at_peak:
        return None
    pss = scale.at_peak.pss / max(1, scale.live) / MIB
    return Cell(f"{_p(scale.trips)}; {pss:.0f} MiB PSS each; service {scale.service_uss / MIB:.0f}")


def _scale_end(column: Column) -> Cell | None:
    scale = column.scale
    if not scale:
        return None
    text = (
        f"{scale.left} left, deleted in {scale.delete_seconds:.0f} s; swap "
        f"{scale.swapped // MIB} MiB; available ≥ {scale.min_available / _GIB:.1f} GiB"
    )
    return Cell(text, scale.left == 0 and scale.swapped == 0)


def _load_sessions(column: Column) -> Cell | None:
    load = column.load
    if not load:
        return None
    warm = f"; {load.warm_errors} first `1+1` wrong" if load.warm_errors else ""
    text = f"{load.sessions}/{load.sessions_asked} in {load.create_seconds:.0f} s{warm}"
    return Cell(text, load.sessions == load.sessions_asked and not load.warm_errors)


def _load_done(column: Column) -> Cell | None:
    load = column.load
    if not load or not load.before:
        return None
    why = f" (stopped: {load.stopped_because})" if load.stopped_because else ""
    text = f"{load.done}/{load.executions_asked} in {load.seconds:.0f} s{why}; "
    text += f"{load.errors} errors"
    return Cell(text, load.done == load.executions_asked and not load.errors)


def _load_speed(column: Column) -> Cell | None:
    load = column.load
    if not load or not load.latencies or not load.seconds:
        return None
    return Cell(f"{load.done / load.seconds:.0f}; {_p(load.latencies)}")


def _load_rss(column: Column) -> Cell | None:
    load = column.load
    if not load or not load.before or not load.after:
        return None
    before, after = load.before.rss / MIB, load.after.rss / MIB
    return Cell(f"{before:.0f} → {after:.0f} ({after - before:+.1f})", load.within_bounds()[0])


def _load_fds(column: Column) -> Cell | None:
    load = column.load
    if not load or not load.before or not load.after:
        return None
    before, after = load.before.fds, load.after.fds
    return Cell(f"{before} → {after} ({after - before:+d})", load.within_bounds()[1])


def _load_stall(column: Column) -> Cell | None:
    """The longest time a callback held the loop (its wall time less its wait for a CPU),
    and the longest wall time, waits included."""
    load = column.load
    if not load or load.stalls is None:
        return None
    if not load.stalls:
        return Cell(f"< {SLOW_CALLBACK_SECONDS * 1000:.0f}", True)
    held = max(seconds - waiting for seconds, waiting, _ in load.stalls)
    wall, waited, _ = load.stalls[0]
    over = sum(seconds - waiting >= STALL_LIMIT for seconds, waiting, _ in load.stalls)
    text = f"{held * 1000:.0f}" + (
        f" ({over} callbacks ≥ {STALL_LIMIT * 1000:.0f})" if over else ""
    )
    text += f"; wall time {wall * 1000:.0f}, of it {waited * 1000:.0f} waiting for a CPU"
    return Cell(text, held < STALL_LIMIT)


def _load_end(column: Column) -> Cell | None:
    load = column.load
    if not load or load.kernels_left < 0:
        return None
    failures = load.delete_failures
    failed = {0: "", -1: ", cut short"}.get(failures, f", {failures} failed")
    text = (
        f"{load.kernels_left}; {load.files_left} (deleted in {load.delete_seconds:.0f} s{failed}; "
        f"child processes {load.children_before} → {load.children_after})"
    )
    return Cell(text, load.kernels_left == 0 and load.files_left == 0 and not failed)


def _calibration(column: Column) -> Cell | None:
    if not column.calibration:
        return None
    first, last = column.calibration[0], column.calibration[-1]
    return Cell(f"{ms(first)} → {ms(last)} ({100 * (last / first - 1):+.0f}%)")


def _floor_blocks(column: Column) -> Cell | None:
    if len(column.floor) < 50:
        return None
    medians = block_medians(column.floor, 5)
    spread = 100 * (max(medians) / min(medians) - 1)
    return Cell(f"{ms(min(medians))}–{ms(max(medians))} ({spread:.0f}%)")


# --- the peers' cells


def _peer_warm(peer: PeerResult, _: Column | None) -> Cell | None:
    return Cell(_p(peer.warm)) if peer.warm else None


def _peer_ratio(peer: PeerResult, floor: Column | None) -> Cell | None:
    if not (peer.warm and floor and floor.floor):
        return None
    return Cell(f"{Summary.of(peer.warm).p50 / Summary.of(floor.floor).p50:.0f} (p50)")


def _peer_cell(name: str) -> Callable[[PeerResult, Column | None], Cell | None]:
    def cell(peer: PeerResult, _: Column | None) -> Cell | None:
        samples = getattr(peer, name)
        return Cell(ms(statistics.median(samples))) if samples else None

    return cell


def _peer_new(peer: PeerResult, _: Column | None) -> Cell | None:
    return Cell(_p(peer.new)) if peer.new else None


def _peer_timeout(peer: PeerResult, _: Column | None) -> Cell | None:
    if not peer.timeout_limit:
        return None
    runs_on = {True: ", the code runs on", False: ", stopped", None: ""}[peer.still_running]
    if peer.timeout_seconds is None:
        return Cell(f"no answer in {peer.timeout_limit:.0f} s{runs_on}", False)
    seconds = peer.timeout_seconds
    return Cell(f"{seconds:.2f} s{runs_on}", seconds <= TIMEOUT + 1 and not peer.still_running)


def _peer_memory(kind: str) -> Callable[[PeerResult, Column | None], Cell | None]:
    def cell(peer: PeerResult, _: Column | None) -> Cell | None:
        return Cell(f"{getattr(peer.idle, kind) / MIB:.1f}") if peer.idle else None

    return cell


TIMEOUT = 2.0  # seconds, the limit asked with the uninterruptible cell
STALL_LIMIT = 0.020  # seconds: the longest a callback may hold the service's event loop
OURS_LIMIT = 1.3  # our Python client's warm `1+1`, p50 ÷ the floor's
JUPYTER_LIMIT = 1.25  # the Jupyter WebSocket's warm `1+1`, p50 ÷ the floor's (as bare HTTP's)
SERVICE_CPU_LIMIT = 1.0  # ms of the service process's CPU per execution under throughput
RAW_RATIO_LIMIT = 0.8  # the service's executions/s ÷ the raw limit's

# Headings are formatted with the run's sizes; a row shows only when something filled it.
ROWS: list[Row | str] = [
    "**Warm round trips** (ms, p50 / p99)",
    Row("`1+1`, bare jupyter_client: the floor", _floor),
    Row("`1+1`, POST /execute, bare HTTP client (peers: their call)", _raw, _peer_warm),
    Row("… ÷ floor (peers: p50 ÷ the plain floor)", _ratio, _peer_ratio, "≤ 1.25 / ≤ 2",
        "warm `1+1` over HTTP ÷ floor: p50 ≤ 1.25, p99 ≤ 2"),
    Row("`1+1`, POST /execute, httpx client (p50 ÷ floor)", _httpx),
    Row("`1+1`, our Python client: `kernel_service_client.Client`, sync (p50 ÷ floor)", _ours,
        target=f"p50 ≤ {OURS_LIMIT:g}× floor",
        goal=f"warm `1+1` with our Python client ÷ floor: p50 ≤ {OURS_LIMIT:g}"),
    Row("`1+1`, the kernel's Jupyter WebSocket: execute_request → idle (p50 ÷ floor)", _jupyter,
        target=f"p50 ≤ {JUPYTER_LIMIT:g}× floor",
        goal=f"warm `1+1` over the Jupyter WebSocket ÷ floor: p50 ≤ {JUPYTER_LIMIT:g}"),
    Row("client CPU per call, ms (median, thread CPU time): floor / bare HTTP / httpx / ours / "
        "WebSocket", _client_cpu),
    Row("`1+1`, inside the service: `duration_ms` (p50 ÷ floor)", _inside),
    Row("plot, p50: floor → HTTP (×)", _cell("plot"), _peer_cell("plot")),
    Row("pandas `df.describe()`, p50: floor → HTTP (×)", _cell("pandas"), _peer_cell("pandas")),
    "**New session + first `1+1`**: POST /execute without session_id (ms, p50 / p99)",
    Row("warm pool has kernels", _pooled, target="p50 ≤ 30",
        goal="new session with the pool: p50 ≤ 30 ms"),
    Row("no warm kernel: pool size 0 (peers: a new tool)", _unpooled, _peer_new,
        "p50 ≤ 200 (fork-server)", "new session, pool empty, fork-server: p50 ≤ 200 ms"),
    "**Timeout**",
    Row(f"`sum(range(10**10))`, timeout {TIMEOUT:g} s: answer after (worst)", _timeout,
        _peer_timeout, f"≤ {TIMEOUT + 1:g} s",
        f"uninterruptible code, timeout {TIMEOUT:g} s: answer within {TIMEOUT + 1:g} s"),
    "**Memory per idle session** ({memory_sessions} sessions; numpy, pandas, matplotlib "
    "loaded; MiB)",
    Row("PSS: all the service's child processes ÷ sessions", _pss, _peer_memory("pss"),
        "≤ 45", "idle session PSS ≤ 45 MiB"),
    Row("USS: the same", _uss, _peer_memory("uss")),
    "**Throughput** ({clients} clients on {clients} sessions, `1+1` back to back, "
    "{duration:g} s)",
    Row("executions/s", _execs),
    Row("latency, ms p50 / p99", _load_latency),
    Row("CPU: service process / kernels / clients (% of one core)", _load_cpu),
    Row("service process CPU per execution, ms", _service_cpu,
        target=f"≤ {SERVICE_CPU_LIMIT:g} ms",
        goal=f"throughput: service CPU per execution ≤ {SERVICE_CPU_LIMIT:g} ms"),
    Row("kernels / clients CPU per execution, ms", _others_cpu),
    Row("raw limit: as many kernels, each driven by a bare jupyter_client, no service: "
        "executions/s; latency, ms p50 / p99", _raw_execs),
    Row("service ÷ raw limit, executions/s", _raw_ratio, target=f"≥ {RAW_RATIO_LIMIT:g}×",
        goal=f"throughput: service ≥ {RAW_RATIO_LIMIT:g}× the raw limit's executions/s"),
    Row("raw limit CPU per execution, ms: its process (clients) / kernels", _raw_cpu),
    "**Scale** (up to {sessions} idle sessions at once)",
    Row("sessions live / asked", _scale_live, target="all, no errors",
        goal="{sessions} idle sessions, no errors"),
    Row("`1+1` in each, ms p50 / p99; PSS per session; service USS (MiB)", _scale_trips),
    Row("after deleting all: processes left; swap; available memory", _scale_end,
        target="0 left, no swap", goal="after deleting all: no process left, no swap"),
    "**Load** ({load_executions} executions from {load_clients} clients over {load_sessions} "
    "live sessions: values, prints, pandas; every 50th a plot, every 25th a ZeroDivisionError)",
    Row("sessions made and warmed (one `1+1` each)", _load_sessions, target="all",
        goal="load: {load_sessions} sessions made"),
    Row("executions answered / asked; errors (not 200, or not what the cell gives)", _load_done,
        target="all, 0 errors", goal="load: {load_executions} executions, 0 errors"),
    Row("executions/s; latency, ms p50 / p99", _load_speed),
    Row("service RSS, MiB: before → after the load (growth)", _load_rss,
        target=f"growth < {RSS_GROWTH_LIMIT // MIB} MiB",
        goal=f"load: service RSS grows < {RSS_GROWTH_LIMIT // MIB} MiB"),
    Row("service open fds: before → after the load (growth)", _load_fds,
        target=f"growth < {FD_GROWTH_LIMIT}", goal=f"load: service fds grow < {FD_GROWTH_LIMIT}"),
    Row("longest event-loop stall, ms: held by a callback (its wall time less its wait for "
        "a CPU; slow callbacks timed as asyncio's debug mode does; sessions made, used and "
        "deleted); the longest wall time", _load_stall, target=f"< {STALL_LIMIT * 1000:.0f}",
        goal=f"load: the service's event loop never stalls {STALL_LIMIT * 1000:.0f} ms"),
    Row("after deleting all: kernel processes left; `k-*` in the connection dir", _load_end,
        target="0; 0", goal="load, after deleting all: no kernel, no connection files"),
    "**Noise**",
    Row("CPU calibration loop, ms: start → end of the column", _calibration),
    Row("floor `1+1` p50 over 5 consecutive blocks, ms", _floor_blocks),
]  # fmt: skip


def table(
    columns: list[Column], peers: list[PeerResult], sizes: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """The markdown lines, and one line per target saying where it passed and failed."""
    heads = [c.name for c in columns] + [PEERS[p.name] for p in peers]
    lines = [
        "| figure | " + " | ".join(heads) + " | target |",
        "|---|" + "---|" * len(heads) + "---|",
    ]
    plain = next((c for c in columns if c.name == "plain"), columns[0] if columns else None)
    verdicts: dict[str, list[tuple[str, bool]]] = {}
    heading = ""
    for row in ROWS:
        if isinstance(row, str):
            heading = f"| {row.format(**sizes)} |" + " |" * (len(heads) + 1)
            continue
        cells = [row.ours(c) for c in columns] + [row.peer(p, plain) for p in peers]
        if all(cell is None for cell in cells):
            continue
        if heading:  # a section's heading only above figures of it
            lines.append(heading)
            heading = ""
        for head, cell in zip(heads, cells, strict=True):
            if cell is not None and cell.verdict is not None:
                goal = (row.goal or f"{row.label}: {row.target}").format(**sizes)
                verdicts.setdefault(goal, []).append((head, cell.verdict))
        rendered = [cell.render() if cell else "–" for cell in cells]
        lines.append(f"| {row.label} | " + " | ".join(rendered) + f" | {row.target} |")
    summary = []
    for target, marks in verdicts.items():
        passed = [head for head, ok in marks if ok]
        failed = [head for head, ok in marks if not ok]
        summary.append(
            f"- {target} — {PASS} {', '.join(passed) or 'none'}"
            + (f"; {FAIL} {', '.join(failed)}" if failed else "")
        )
    return lines, summary


METHOD = """\
How each figure is measured (bench/):
- Columns are launcher configurations, each only Settings overrides (`LAUNCHERS` in run.py):
  plain (`sandbox=none, fork_server=false`), bubblewrap (`fork_server=false`), fork-server
  (the service's defaults: bubblewrap and the fork-server). The service runs as
  `kernel-service serve` in a process of its own, on a free loopback port, settings from
  KERNEL_SERVICE_* (its default log level, info, included).
- Floor: a kernel started by the service's own Runtime and launcher (same sandbox, preloads
  and kernel options), driven by a bare jupyter_client AsyncKernelClient in the benchmark's
  process: `execute_request` until the execute_reply and iopub idle. Warm round trips
  interleave floor, bare HTTP client, httpx and our own Python client call by call (order
  rotating), after 30 of each to warm up and once the warm pool has refilled after the
  sessions took its kernels. The bare HTTP client is a keep-alive HTTP/1.1 connection
  written and parsed by hand, the counterpart of the bare jupyter_client: the target is
  judged on it. httpx shows what a Python httpx caller sees (the difference is the client's
  own CPU). Our client is `kernel_service_client.Client` (sync) on a session of its own,
  `session.execute("1+1")` checked for `result == "2"`; it is called straight from the
  benchmark's event loop (it blocks it while it waits; nothing else runs then, and a thread
  would add its hand-offs to the figure). Client CPU per call is the median of the event
  loop thread's CPU time (`time.thread_time()`) around each call: the caller's side of it
  (the floor's zmq I/O thread is not in it). `duration_ms` is the service's own time for the
  execution, HTTP excluded.
- New session: POST /execute without session_id, until its answer (the session is deleted
  afterwards, untimed); with the pool, each one after /healthz shows the pool full again.
  "inside" is the first execution's `duration_ms`.
- Timeout: `sum(range(10**10))` with `timeout: 2`, worst of 2; then the next `1+1` in the
  same session (a new kernel).
- Memory: N sessions made, one `1+1` each, 2 s idle; PSS and USS (psutil
  memory_full_info) summed over every process the service started (bwrap, init, kernel; a
  fork-server's zygote and helpers included, so the zygote is counted once and shared
  across the sessions), divided by N. PSS splits shared pages among their users, so the
  sum counts nothing twice. Peers: their one kernel process after the warm calls.
- Throughput: a client per session, each on its own bare HTTP connection, `1+1` back to back
  for the duration, measured once the warm pool has refilled after the sessions took its
  kernels (no kernel start in the figures); CPU is user+system time of the service process,
  of all its child processes (kernels, sandboxes, the fork-server's zygote), and of the
  benchmark (the clients), over wall time, and divided by the executions answered (CPU per
  execution). The raw limit follows, once that service has stopped: as many kernels as
  clients, started as the service starts them (one Runtime of the column's settings: same
  launcher, sandbox and fork-server), each driven by a bare jupyter_client AsyncKernelClient
  in the benchmark's process, `1+1` back to back for as long, no service between; its
  executions/s, the service's executions/s ÷ it, and its CPU per execution (the benchmark's
  process, then every process it started: the kernels, their sandboxes, the zygote). Both
  run on this noisy machine one after the other, not interleaved.
- Scale: sessions made two at a time until the count, the time limit, or until available
  memory would fall under the floor (3 GiB); then `1+1` in each; then all deleted, and the
  service's child processes counted against those before the first session.
- Load: one service with the defaults (bubblewrap, fork-server) but no warm pool (so that
  no kernel may remain once the sessions are deleted) and `max_sessions` above the sessions
  asked. Sessions made two at a time, each warmed by one `1+1`; one bare keep-alive
  connection per client; the clients take executions in turn from one counter, execution i
  going to session i mod the sessions. Cell i: a small matplotlib plot when i is a multiple of
  50 (must come back with one PNG), `i / 0` when i mod 25 is 12 (status `error`,
  `ZeroDivisionError`), else in turn a product, a print, a pandas sum (status `ok` and
  exactly the value or output it gives). An error is a request without an answer, an
  answer other than 200 or one unlike its cell's, or any with `state_lost`. Latency is
  send to answer; executions/s is answers over the load's wall time. RSS
  (`memory_info().rss`) and open fds (`num_fds()`) of the service process, 2 s after the
  warm-up and 2 s after the load, with the clients' connections open both times. Then every
  session is deleted and, for up to 10 s, kernel processes (named `ks-kernel`, or started
  as `ipykernel_launcher`, on this service's connection directory) and `k-*` entries in
  the connection directory are looked for. At its deadline (`--load-deadline`) the section
  stops, keeping a minute of it for the deletion and the look.
- Peers: qwen-agent 0.0.31 (CodeInterpreter) and lagent 0.2.4 (IPythonInterpreter) from
  PyPI in bench/.venv-peers, driven by bench/peer_worker.py in a process of their own; a new
  session is a new tool instance (Lagent: its per-process kernel shut first). Their kernels
  are unsandboxed, so their ratio is to the plain floor.
- Noise: a fixed pure-Python loop timed at each column's start and end, and the floor's
  medians over 5 consecutive blocks of its samples.
"""
