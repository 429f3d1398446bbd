"""bash_kernel, started as `python -m bash_kernel` starts it, but for one thing: pexpect's
pause of 50 ms before each line it sends to bash is not taken.

bash_kernel sends bash its start-up script line by line (about 45 lines: 2.3 s of pauses
before the kernel answers) and two lines per execution (0.1 s each). The pause is pexpect's
guard for programs that echo what is typed before they turn echo off; bash_kernel starts
bash with echo off, and waits for bash's prompt after each line anyway.

It runs as a file (in a sandbox only it is mounted): bash_kernel, pexpect and ipykernel come
from the Python environment, nothing from this package.
"""

import pexpect
from ipykernel.kernelapp import IPKernelApp


class _Spawn(pexpect.spawn):  # type: ignore[misc]
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.delaybeforesend = None


pexpect.spawn = _Spawn  # bash_kernel spawns bash through the module's name, at start

from bash_kernel.kernel import BashKernel  # noqa: E402 (after the change it relies on)

IPKernelApp.launch_instance(kernel_class=BashKernel)
