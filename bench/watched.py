"""`kernel-service serve` on asyncio's own event loop, reporting every callback that holds
the loop for SLOW_CALLBACK_SECONDS or more, for the load section to find the longest stall.

asyncio's debug mode times each callback and logs "Executing <callback> took N seconds" to
the `asyncio` logger (the service's log). Its other checks are left off here: debug mode
also saves a stack for every callback and every coroutine, which would slow the service
down and lengthen the very stalls measured. uvloop, which the service runs on otherwise,
has no such report, so this runs on asyncio's selector loop.

    python -m bench.watched serve --port 8000
"""

import asyncio
import logging
import re

from uvicorn.loops import auto

from kernel_service import cli

SLOW_CALLBACK_SECONDS = 0.005
# What asyncio logs for a slow callback.
STALL = re.compile(r"Executing (?P<callback>.*) took (?P<seconds>[0-9.]+) seconds")


class WatchedLoop(asyncio.SelectorEventLoop):
    """A selector loop whose callbacks are timed as in debug mode, and nothing else is."""

    def __init__(self) -> None:
        super().__init__()
        self.slow_callback_duration = SLOW_CALLBACK_SECONDS
        self._debug = True  # what `_run_once` reads to time each callback

    def set_debug(self, enabled: bool) -> None:
        pass  # uvicorn's asyncio.Runner sets it (off) as it starts: the timing stays on

    def get_debug(self) -> bool:
        return False  # what handles and tasks read to save a stack each

    def _set_coroutine_origin_tracking(self, enabled: bool) -> None:
        pass  # no stack saved per coroutine either


def _watched_factory(use_subprocess: bool = False) -> type[asyncio.AbstractEventLoop]:
    return WatchedLoop


def main() -> None:
    auto.auto_loop_factory = _watched_factory  # uvicorn's "auto" loop, as the service asks
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    cli.main()


if __name__ == "__main__":
    main()
