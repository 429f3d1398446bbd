"""What every session is given by the registry: the settings and the shared services."""

from dataclasses import dataclass

from kernel_service.config import Settings
from kernel_service.kernel import KernelFactory
from kernel_service.metrics import Metrics
from kernel_service.store.state import StateStore
from kernel_service.workdir.workspaces import Workspaces


@dataclass(frozen=True)
class SessionServices:
    settings: Settings
    store: StateStore
    metrics: Metrics
    workspaces: Workspaces
    start_kernel: KernelFactory  # for a kernel in place of one that died or was replaced
