"""The only package that speaks the kernel protocol (jupyter_client's Session over our own
bounded ZMTP sockets): launch, execute, interrupt."""

from kernel_service.kernel.kernel import (
    ExitCause,
    Kernel,
    KernelOptions,
    KernelStartError,
    RunOutcome,
)
from kernel_service.kernel.launcher import KernelLauncher, SubprocessLauncher

__all__ = [
    "ExitCause",
    "Kernel",
    "KernelLauncher",
    "KernelOptions",
    "KernelStartError",
    "RunOutcome",
    "SubprocessLauncher",
]
