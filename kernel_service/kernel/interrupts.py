"""Interrupting the code a kernel runs, so that the interrupt is not lost.

ipykernel ignores SIGINT until it has begun handling a request, so an interrupt sent
between our execute_request and the kernel taking it up would be lost (and the code run to
its end): it is held until the kernel announces the code (execute_input). And ipykernel
catches a SIGINT that lands between its announcing the code and running it, and runs the
code anyway: an interrupt is sent again while the code neither raised nor ended.
"""

import asyncio
from collections.abc import Callable

from kernel_service.execution.collector import ExecutionCollector

# How often an interrupt is sent again, and how many times at most.
_AGAIN, _TRIES = 1.0, 5


class Interrupts:
    """The interrupts of one kernel's executions; `send` sends one interrupt_request."""

    def __init__(self, send: Callable[[], None]) -> None:
        self._send = send
        self._execution: ExecutionCollector | None = None  # the execute_request in flight
        self._on_start = False

    def begin(self, execution: ExecutionCollector, interrupted: bool) -> None:
        """`execution` is sent; `interrupted`: it is interrupted as soon as it begins."""
        self._execution, self._on_start = execution, interrupted

    def end(self) -> None:
        self._execution, self._on_start = None, False

    def interrupt(self) -> None:
        """Make the running code raise KeyboardInterrupt (held until it begins)."""
        execution = self._execution
        if execution is not None and not execution.started and execution.reply is None:
            self._on_start = True
            return
        if execution is not None:
            self._interrupt(execution)
        else:
            self._send()

    def at_once(self, collector: ExecutionCollector) -> None:
        """At a deadline, or when the caller gives up: interrupt whatever runs now, and
        `collector`'s code as it begins.

        Code that has not begun by then is stuck behind other code (a cell that an earlier
        service process sent to an adopted kernel) or the kernel is slow to take it up; the
        signal now frees the kernel of the former, the held one reaches the latter."""
        if not collector.started:
            self._send()
        self.interrupt()

    def fed(self, collector: ExecutionCollector) -> None:
        """`collector` was given a message: the held interrupt goes once its code began."""
        if self._on_start and collector is self._execution and collector.started:
            self._on_start = False
            self._interrupt(collector)

    def _interrupt(self, execution: ExecutionCollector, tries: int = 1) -> None:
        """Interrupt `execution`'s code, and again while it neither raised nor ended."""
        if self._execution is not execution or execution.reply is not None or execution.raised:
            return
        self._send()
        if tries < _TRIES:
            asyncio.get_running_loop().call_later(_AGAIN, self._interrupt, execution, tries + 1)
