"""How one execution ended (`RunOutcome`), as the kernel reports it to the result
builder: its ending in a word, and everything the collector gathered for it."""

from dataclasses import dataclass
from typing import Literal

from kernel_service.execution.collector import ExecutionCollector

# "interrupt_ended": at its deadline the kernel was interrupted, and the interrupt ended it
# (Deno's kernel, for one, dies of SIGINT)
Ending = Literal["done", "interrupted", "killed", "interrupt_ended", "died", "output_lost"]


@dataclass(frozen=True)
class RunOutcome:
    """How one execution ended, with everything gathered for it."""

    collector: ExecutionCollector
    ending: Ending
    exit_reason: str | None = None
    lost: str | None = None  # why output was lost (with ending "output_lost")

    @property
    def kernel_lost(self) -> bool:
        return self.ending in ("killed", "interrupt_ended", "died")
