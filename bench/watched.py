"""`kernel-service serve` on asyncio's own event loop, reporting every callback that holds
the loop for SLOW_CALLBACK_SECONDS or more, for the load section to find the longest stall.

Each callback is timed as asyncio's debug mode times it, and a slow one is logged in
asyncio's words ("Executing <callback> took N seconds") to the `asyncio` logger (the
service's log), with how much of that time the loop's thread spent waiting for a CPU
(/proc/thread-self/schedstat: on a loaded 2-core machine a callback of microseconds can
wait tens of milliseconds for its turn; that is the scheduler's, not a callback holding
the loop). Debug mode itself stays off: it also saves a stack for every callback and every
coroutine, which would slow the service down and lengthen the very stalls measured.
uvloop, which the service runs on otherwise, has no such report, so this runs on asyncio's
selector loop.

    python -m bench.watched serve --port 8000
"""

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable

from uvicorn.loops import auto

from kernel_service import cli

SLOW_CALLBACK_SECONDS = 0.005
# What is logged for a slow callback.
STALL = re.compile(
    r"Executing (?P<callback>.*) took (?P<seconds>[0-9.]+) seconds"
    r"(?: \((?P<waiting>[0-9.]+) waiting for a CPU\))?"
)
_log = logging.getLogger("asyncio")


class _Schedstat:
    """The loop thread's time waiting on the run queue, in seconds (Linux schedstat)."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def waited(self) -> float:
        return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9


def _timed(run: Callable[[asyncio.Handle], None]) -> Callable[[asyncio.Handle], None]:
    """Handle._run, timed; a slow callback logged with its wait for a CPU."""
    schedstat: _Schedstat | None = None

    def timed_run(handle: asyncio.Handle) -> None:
        nonlocal schedstat
        if schedstat is None:
            schedstat = _Schedstat()  # opened by the loop's thread: its own numbers
        started, waited = time.perf_counter(), schedstat.waited()
        try:
            run(handle)
        finally:
            took = time.perf_counter() - started
            if took >= SLOW_CALLBACK_SECONDS:
                waiting = schedstat.waited() - waited
                _log.warning(
                    "Executing %s took %.3f seconds (%.3f waiting for a CPU)", handle, took, waiting
                )

    return timed_run


class WatchedLoop(asyncio.SelectorEventLoop):
    """A selector loop whose callbacks are timed (`_timed`); debug mode stays off."""

    def set_debug(self, enabled: bool) -> None:
        self._debug = False  # always off (uvicorn's asyncio.Runner sets it as it starts)

    def get_debug(self) -> bool:
        return False  # what handles and tasks read to save a stack each


def _watched_factory(use_subprocess: bool = False) -> type[asyncio.AbstractEventLoop]:
    return WatchedLoop


def main() -> None:
    asyncio.Handle._run = _timed(asyncio.Handle._run)  # type: ignore[method-assign,assignment]
    auto.auto_loop_factory = _watched_factory  # uvicorn's "auto" loop, as the service asks
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    cli.main()


if __name__ == "__main__":
    main()
