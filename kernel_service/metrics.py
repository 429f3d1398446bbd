"""What the service counts for `GET /metrics` (Prometheus): executions, kernel starts and
deaths, sessions made and ended; live figures (sessions, warm kernels) are read at scrape.

One `Metrics` per runtime, with a registry of its own (never prometheus_client's global
one: several services may run in one process), handed to where things happen.
"""

import asyncio
import json
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from kernel_service.execution.collector import is_rich_mime
from kernel_service.kernel import ExitCause, Kernel, KernelFactory, KernelKind
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    ExecutionResult,
    Output,
    SessionStatus,
    Status,
    StreamOutput,
)

# Who asked for a kernel: the warm pool, a new session the pool could not serve, or a
# session replacing its kernel (after a death, a kill at the deadline, or a restart).
Launch = Literal["pool", "session", "replacement"]
StartOutcome = Literal["ok", "failed", "cancelled"]
CloseReason = Literal["deleted", "culled", "service_stopped"]

# From a 1 ms `1+1` to the 600 s most a caller may ask.
_DURATION_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0),
)


@dataclass(frozen=True)
class OutputSize:
    """Bytes of output one execution gave back: text, and base64 display data (images)."""

    text: int
    rich: int

    @property
    def total(self) -> int:
        return self.text + self.rich


def output_size(outputs: Iterable[Output]) -> OutputSize:
    """What the outputs hold, as kept after the output limits (UTF-8 bytes)."""
    text = rich = 0
    for output in outputs:
        if isinstance(output, StreamOutput):
            text += _utf8_len(output.text)
        elif isinstance(output, ErrorOutput):
            text += _utf8_len(output.ename) + _utf8_len(output.evalue)
            text += sum(_utf8_len(line) for line in output.traceback)
        elif isinstance(output, DisplayDataOutput | ExecuteResultOutput):
            for mime, value in output.data.items():
                size = _utf8_len(
                    value if isinstance(value, str) else json.dumps(value, default=str)
                )
                if is_rich_mime(mime):
                    rich += size
                else:
                    text += size
    return OutputSize(text, rich)


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode(errors="replace"))


class Metrics:
    """Counters fed by the runtime's parts, and their exposition."""

    def __init__(self, languages: Iterable[str] = ("python",)) -> None:
        """`languages`: the languages sessions may use, whose series start at zero."""
        languages = tuple(languages)  # read once per series
        self.registry = CollectorRegistry()
        registry = self.registry
        self._executions = Counter(
            "kernel_service_executions",
            "Executions answered, by status (ok, error, timeout) and language.",
            ["status", "language"],
            registry=registry,
        )
        self._duration = Histogram(
            "kernel_service_execution_duration_seconds",
            "Time each execution took in the service, queueing excluded.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self._output_bytes = Counter(
            "kernel_service_output_bytes",
            "Bytes of output executions gave back: text, or rich (base64 images and the like).",
            ["kind"],
            registry=registry,
        )
        self._state_lost = Counter(
            "kernel_service_state_lost",
            "Executions whose answer said earlier state was lost (a kernel restarted).",
            registry=registry,
        )
        self._starts = Counter(
            "kernel_service_kernel_starts",
            "Kernel starts, by who asked (pool, session, replacement) and outcome.",
            ["launch", "outcome"],
            registry=registry,
        )
        self._deaths = Counter(
            "kernel_service_kernel_deaths",
            "Kernels ended, by cause (shutdown and timeout: by the service; exited, signal, "
            "out_of_memory, unknown: on their own).",
            ["cause"],
            registry=registry,
        )
        self._created = Counter(
            "kernel_service_sessions_created",
            "Sessions made, by kernel (warm: from a pool; or started for it) and language.",
            ["kernel", "language"],
            registry=registry,
        )
        self._closed = Counter(
            "kernel_service_sessions_closed",
            "Sessions ended, by reason (deleted, culled, service_stopped).",
            ["reason"],
            registry=registry,
        )
        # Every series from the start, at 0: a rate needs the zero before the first event.
        # Each execution's series, looked up once (labels() checks its values at each call).
        self._by_status = {
            (status, language): self._executions.labels(status, language)
            for status in get_args(Status)
            for language in languages
        }
        self._text_bytes = self._output_bytes.labels("text")
        self._rich_bytes = self._output_bytes.labels("rich")
        for launch in get_args(Launch):
            for outcome in get_args(StartOutcome):
                self._starts.labels(launch, outcome)
        for cause in get_args(ExitCause):
            self._deaths.labels(cause)
        for kernel in ("warm", "started"):
            for language in languages:
                self._created.labels(kernel, language)
        for reason in get_args(CloseReason):
            self._closed.labels(reason)

    def watch(
        self, sessions: Callable[[], Iterable[SessionStatus]], warm_kernels: Callable[[], int]
    ) -> None:
        """Report the live sessions' statuses and the pool's ready kernels at each scrape."""
        self.registry.register(_LiveFigures(sessions, warm_kernels))

    def gauge(self, name: str, description: str, read: Callable[[], float]) -> None:
        """A gauge read at each scrape (a front door's own live figure)."""
        self.registry.register(_LiveGauge(name, description, read))

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The metrics in the format the scraper's Accept header asks for, and its type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    # ------------------------------------------------------------ events

    def execution(self, result: ExecutionResult, size: OutputSize, language: str) -> None:
        series = self._by_status.get((result.status, language))
        if series is None:  # a language named by its kernelspec alone: made at first use
            series = self._by_status[result.status, language] = self._executions.labels(
                result.status, language
            )
        series.inc()
        self._duration.observe(result.duration_ms / 1000)
        self._text_bytes.inc(size.text)
        self._rich_bytes.inc(size.rich)
        if result.state_lost:
            self._state_lost.inc()

    def session_created(self, warm: bool, language: str) -> None:
        self._created.labels("warm" if warm else "started", language).inc()

    def session_closed(self, reason: CloseReason) -> None:
        self._closed.labels(reason).inc()

    def counting_starts(self, start_kernel: KernelFactory, launch: Launch) -> KernelFactory:
        """`start_kernel`, with its starts counted and the end of each kernel it made."""

        async def start(work_dir: Path, kind: KernelKind) -> Kernel:
            try:
                kernel = await start_kernel(work_dir, kind)
            except asyncio.CancelledError:
                self._starts.labels(launch, "cancelled").inc()
                raise
            except Exception:
                self._starts.labels(launch, "failed").inc()
                raise
            self._starts.labels(launch, "ok").inc()
            kernel.process.on_exit(lambda _: self._kernel_ended(kernel))
            return kernel

        return start

    def _kernel_ended(self, kernel: Kernel) -> None:
        cause = kernel.exit_cause()
        if cause is not None:
            self._deaths.labels(cause).inc()


class _LiveGauge:
    """One gauge read when scraped."""

    def __init__(self, name: str, description: str, read: Callable[[], float]) -> None:
        self._name, self._description, self._read = name, description, read

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._description, value=0)

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._description, value=self._read())


class _LiveFigures:
    """Gauges read from the runtime when scraped, so they are never stale."""

    def __init__(
        self, sessions: Callable[[], Iterable[SessionStatus]], warm_kernels: Callable[[], int]
    ) -> None:
        self._sessions = sessions
        self._warm_kernels = warm_kernels

    def describe(self) -> Iterator[Metric]:
        # Names only, for the registry's clash check: nothing is read before the first scrape.
        yield from self._families(Tally(), 0)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(Tally(self._sessions()), self._warm_kernels())

    @staticmethod
    def _families(statuses: Tally[str], warm: int) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "kernel_service_sessions",
            "Live sessions, by status (starting, idle, busy, dead).",
            labels=["status"],
        )
        for status in get_args(SessionStatus):
            sessions.add_metric([status], statuses[status])
        yield sessions
        yield GaugeMetricFamily(
            "kernel_service_warm_kernels", "Ready kernels waiting in the warm pool.", value=warm
        )
