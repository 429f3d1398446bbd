"""The only package that speaks the kernel protocol (jupyter_client's Session over our own
bounded ZMTP sockets): launch, execute, interrupt."""

from kernel_service.kernel.endings import ExitCause
from kernel_service.kernel.kernel import Kernel, KernelFactory, KernelStartError
from kernel_service.kernel.launcher import KernelLauncher, SubprocessLauncher
from kernel_service.kernel.options import KernelOptions

__all__ = [
    "ExitCause",
    "Kernel",
    "KernelFactory",
    "KernelLauncher",
    "KernelOptions",
    "KernelStartError",
    "SubprocessLauncher",
]
