"""The only package that talks to kernels (Jupyter messages over our own bounded ZMTP
sockets): launch, execute, interrupt, and relay a client's other requests."""

from kernel_service.kernel.endings import ExitCause
from kernel_service.kernel.kernel import (
    ExecuteOptions,
    Kernel,
    KernelFactory,
    KernelStartError,
    Relay,
)
from kernel_service.kernel.kernelspecs import KernelCatalog, KernelKind
from kernel_service.kernel.launcher import KernelLauncher, SubprocessLauncher
from kernel_service.kernel.options import KernelOptions

__all__ = [
    "ExecuteOptions",
    "ExitCause",
    "Kernel",
    "KernelCatalog",
    "KernelFactory",
    "KernelKind",
    "KernelLauncher",
    "KernelOptions",
    "KernelStartError",
    "Relay",
    "SubprocessLauncher",
]
