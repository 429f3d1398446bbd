"""bash_kernel, started as `python -m bash_kernel` starts it, but for two things.

pexpect's pause of 50 ms before each line it sends to bash is not taken.
bash_kernel sends bash its start-up script line by line (about 45 lines: 2.3 s of pauses
before the kernel answers) and two lines per execution (0.1 s each). The pause is pexpect's
guard for programs that echo what is typed before they turn echo off; bash_kernel starts
bash with echo off, and waits for bash's prompt after each line anyway.

A shell that ends (`exit`, `kill -9 $$`, a fork bomb taking it down) ends the kernel: left
to itself, bash_kernel starts a new shell, prints "Restarting Bash" and answers as if
nothing were lost, while every variable and function of the session is gone. Ended, the
kernel is replaced by the service, whose answer says that the state was lost.

It runs as a file (in a sandbox only it is mounted): bash_kernel, pexpect and ipykernel come
from the Python environment, nothing from this package.
"""

import os
import sys

import pexpect
from ipykernel.kernelapp import IPKernelApp


class _Spawn(pexpect.spawn):  # type: ignore[misc]
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.delaybeforesend = None


pexpect.spawn = _Spawn  # bash_kernel spawns bash through the module's name, at start

from bash_kernel.kernel import BashKernel  # noqa: E402 (after the change it relies on)

# The exit status of a kernel whose shell ended (what its log says too).
SHELL_ENDED = 3


class _OneShellKernel(BashKernel):  # type: ignore[misc]
    _shell_started = False

    def _start_bash(self) -> None:
        if self._shell_started:  # the shell ended: its state with it
            print("bash_kernel: the shell ended; its variables are gone", file=sys.stderr)
            sys.stderr.flush()
            os._exit(SHELL_ENDED)
        self._shell_started = True
        super()._start_bash()


IPKernelApp.launch_instance(kernel_class=_OneShellKernel)
