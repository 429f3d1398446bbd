"""How a kernel process ends (`KernelEnd`): why, in words for people and models and in a
word for counting. How one execution ended is `execution.outcome.RunOutcome`."""

import signal
from typing import Literal

from kernel_service.kernel.cgroups import oom_kills
from kernel_service.kernel.launcher import KernelProcess

# Why a kernel process ended, in a word (for counting; `exit_words` says it for people).
ExitCause = Literal["shutdown", "timeout", "exited", "signal", "out_of_memory", "unknown"]


class KernelEnd:
    """What is known of how a kernel process ended: whether the service ended it, and what
    its memory cgroup saw."""

    def __init__(self, process: KernelProcess) -> None:
        self._process = process
        self.by_service = False
        self._at_timeout = False
        self._oom_kills: int | None = None  # its cgroup's, read as it ends by a SIGKILL

    def killed(self, at_timeout: bool = False) -> None:
        """The service is ending it (at an execution's deadline, or a shutdown)."""
        self.by_service = True
        self._at_timeout = self._at_timeout or at_timeout

    def exited(self, returncode: int) -> None:
        """Called as the process ends: a SIGKILL's cgroup is read before the launcher
        removes it (a task it starts on the same exit)."""
        if returncode == -signal.SIGKILL and self._process.cgroup is not None:
            self._oom_kills = oom_kills(self._process.cgroup)

    def words(self) -> str:
        """Why the kernel ended, for people and models alike."""
        if self.by_service:
            return "it was shut down by the service (a restart or the session's deletion)"
        if (reason := self._process.exit_reason()) is not None:
            return reason
        returncode = self._process.returncode
        if returncode is None:
            return "it stopped answering"
        return describe_exit(returncode, self._oom_kills)

    def cause(self) -> ExitCause | None:
        """Why the kernel ended, in a word; None while it runs."""
        returncode = self._process.returncode
        if returncode is None:
            return None
        if self.by_service:
            return "timeout" if self._at_timeout else "shutdown"
        if self._process.exit_reason() is not None:
            return "unknown"  # it was not our child when it ended: no exit status
        if returncode == -signal.SIGKILL and self._oom_kills != 0:
            # a SIGKILL we did not send: the OOM killer (its cgroup says so), most likely
            return "out_of_memory"
        return "signal" if returncode < 0 else "exited"


def describe_exit(returncode: int, oom_kills: int | None = None) -> str:
    """Words for why a kernel process ended, for people and models alike. `oom_kills`, read
    from the kernel's memory cgroup as it ended (None without one), tells a SIGKILL of the
    out-of-memory killer from another."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if number == signal.SIGKILL:
            if oom_kills == 0:
                return (
                    "it was killed by SIGKILL, not by the out-of-memory killer (a kill sent "
                    "by the code itself or from outside)"
                )
            if oom_kills:
                return (
                    "it was killed by the out-of-memory killer (out of memory: the code used "
                    "more memory than its limit allows)"
                )
            return (
                "it was killed by SIGKILL, most likely by the out-of-memory killer "
                "(out of memory: the code used more memory than the machine allows)"
            )
        if number == signal.SIGSEGV:
            return "it crashed with a segmentation fault (SIGSEGV)"
        return f"it was ended by {name}"
    if returncode == 0:
        return "it exited with code 0 (the code called exit() or quit(), which ends the kernel)"
    return f"it exited with code {returncode}"
