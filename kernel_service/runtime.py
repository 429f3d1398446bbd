"""The service's core made from Settings: the kernel launcher, the session registry and the
work directories, with their start and their clean stop. Shared by the HTTP app and by
`kernel-service mcp` (stdio), so both run kernels the same way."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

from kernel_service import __version__
from kernel_service.config import MIB, Settings
from kernel_service.kernel import (
    Kernel,
    KernelLauncher,
    KernelOptions,
    KernelStartError,
    SubprocessLauncher,
    remove_stale_files,
    zmq_context,
)
from kernel_service.kernel.fonts import prepare_font_cache
from kernel_service.kernel.forkserver import (
    ForkLauncher,
    ForkServer,
    SandboxedForkLauncher,
    zygote_env,
)
from kernel_service.kernel.kernel import STARTUP_FILE, kernel_env
from kernel_service.kernel.sandbox import (
    BubblewrapLauncher,
    SandboxLimits,
    default_read_only_paths,
)
from kernel_service.metrics import Metrics
from kernel_service.pool import KernelPool
from kernel_service.sessions import SessionRegistry
from kernel_service.workspaces import Workspaces

log = logging.getLogger(__name__)


class Runtime:
    """Kernels start on demand once `running()`; all of them end when it exits."""

    def __init__(self, settings: Settings, launcher: KernelLauncher | None = None) -> None:
        """Raises SandboxUnavailable when the configured sandbox cannot work on this host."""
        self.settings = settings
        self.options = KernelOptions(
            connection_dir=settings.connection_dir.resolve(),
            matplotlib_dir=settings.matplotlib_dir.resolve(),
            # two tries fit in the configured time: a stuck kernel is replaced once
            start_timeout=settings.kernel_start_timeout / 2,
            zmq_context=zmq_context(settings.max_message_bytes),
            preload_modules=tuple(
                m.strip() for m in settings.preload_modules.split(",") if m.strip()
            ),
        )
        self.launcher = launcher or make_launcher(settings, self.options)
        self.workspaces = Workspaces(
            settings.work_dir,
            settings.sandbox_work_dir_mb * MIB if settings.sandbox != "none" else 0,
        )
        self.metrics = Metrics()
        start_kernel = partial(_start_kernel, self.launcher, self.options)
        self.pool = KernelPool(
            settings.pool_size,
            self.metrics.counting_starts(start_kernel, "pool"),
            self.workspaces,
        )
        # the registry counts its own starts: new sessions' and replacements'
        self.registry = SessionRegistry(
            settings, start_kernel, self.workspaces, self.pool, self.metrics
        )
        self.metrics.watch(self.registry.statuses, lambda: len(self.pool))
        # fixed from here on
        self.isolation: dict[str, Any] = {
            **self.launcher.describe(),
            "work_dir": self.workspaces.describe(),
        }

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Directories made, leftovers of a killed service swept, the culler running; on exit
        every session is closed and every kernel ended."""
        settings, options = self.settings, self.options
        options.connection_dir.mkdir(parents=True, exist_ok=True)
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        for path in await self.workspaces.remove_stale():
            log.info("removed stale work directory %s", path.name)
        for path in await asyncio.to_thread(remove_stale_files, options.connection_dir):
            log.info("removed stale connection file %s", path.name)
        await prepare_font_cache(options.matplotlib_dir)
        await self.launcher.prepare()
        log.info(
            "kernel-service %s ready: isolation=%s %s, connection files in %s, max %d sessions",
            __version__,
            self.launcher.isolation,
            self.isolation,
            options.connection_dir,
            settings.max_sessions,
        )
        if self.launcher.isolation == "none":
            log.warning("kernels run UNSANDBOXED: user code has the service user's rights")
        culler = asyncio.create_task(self.registry.run_culler(), name="culler")
        self.pool.start()
        try:
            yield
        finally:
            culler.cancel()
            await asyncio.wait([culler])
            await self.pool.close()
            await self.registry.close_all()
            await self.launcher.close()
            options.zmq_context.destroy(linger=0)
            log.info("all sessions closed")


def make_launcher(settings: Settings, options: KernelOptions) -> KernelLauncher:
    """The launcher the settings ask for, checked to work here."""
    server = None
    if settings.fork_server:
        env = zygote_env(kernel_env(options))
        server = ForkServer(options.preload_modules, env, options.connection_dir)
    if settings.sandbox == "none":
        return ForkLauncher(server) if server else SubprocessLauncher()
    limits = SandboxLimits(
        memory_bytes=settings.sandbox_memory_mb * MIB,
        processes=settings.sandbox_processes,
        file_bytes=settings.sandbox_file_mb * MIB,
        open_files=settings.sandbox_open_files,
        tmp_bytes=settings.sandbox_tmp_mb * MIB,
    )
    uids = (settings.sandbox_uid_base, settings.sandbox_uid_count)
    read_only = default_read_only_paths(STARTUP_FILE)
    launcher = (
        SandboxedForkLauncher(server, limits, *uids, read_only)
        if server
        else BubblewrapLauncher(limits, *uids, read_only)
    )
    launcher.verify()
    return launcher


async def _start_kernel(launcher: KernelLauncher, options: KernelOptions, work_dir: Path) -> Kernel:
    """A ready kernel. One that runs but never answers is ended and launched once more."""
    try:
        return await Kernel.start(launcher, options, work_dir)
    except KernelStartError as exc:
        if not exc.stuck:
            raise
        log.warning("a kernel never answered; launching another: %s", exc)
    return await Kernel.start(launcher, options, work_dir)
