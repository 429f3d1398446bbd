"""The app factory: wires Settings, the kernel launcher and the session registry to the routes,
and owns the background work (culling) and the clean shutdown of every kernel."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

from fastapi import FastAPI

from kernel_service import __version__
from kernel_service.api.auth import ApiKeyAuth
from kernel_service.api.errors import BodySizeLimit, install_error_handlers
from kernel_service.api.routes import router
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
from kernel_service.kernel.kernel import STARTUP_FILE
from kernel_service.kernel.sandbox import (
    BubblewrapLauncher,
    SandboxLimits,
    default_read_only_paths,
)
from kernel_service.sessions import SessionRegistry
from kernel_service.workspaces import Workspaces

log = logging.getLogger(__name__)

# Room for JSON escaping around the code (a "\u0000" is six bytes for one).
_BODY_OVERHEAD = 64 * 1024


def create_app(settings: Settings | None = None, launcher: KernelLauncher | None = None) -> FastAPI:
    """A ready-to-serve app; kernels start on demand and all end when the app shuts down.

    Raises SandboxUnavailable when the configured sandbox cannot work on this host.
    """
    settings = settings or Settings()
    launcher = launcher or make_launcher(settings)
    options = KernelOptions(
        connection_dir=settings.connection_dir.resolve(),
        matplotlib_dir=settings.matplotlib_dir.resolve(),
        # two tries fit in the configured time: a stuck kernel is replaced once
        start_timeout=settings.kernel_start_timeout / 2,
        zmq_context=zmq_context(settings.max_message_bytes),
        preload_modules=tuple(m.strip() for m in settings.preload_modules.split(",") if m.strip()),
    )
    workspaces = Workspaces(
        settings.work_dir, settings.sandbox_work_dir_mb * MIB if settings.sandbox != "none" else 0
    )
    registry = SessionRegistry(settings, partial(_start_kernel, launcher, options), workspaces)
    isolation = {**launcher.describe(), "work_dir": workspaces.describe()}  # fixed from here on

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        options.connection_dir.mkdir(parents=True, exist_ok=True)
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        for path in await workspaces.remove_stale():
            log.info("removed stale work directory %s", path.name)
        for path in await asyncio.to_thread(remove_stale_files, options.connection_dir):
            log.info("removed stale connection file %s", path.name)
        await prepare_font_cache(options.matplotlib_dir)
        log.info(
            "kernel-service %s ready: isolation=%s %s, connection files in %s, max %d sessions",
            __version__,
            launcher.isolation,
            isolation,
            options.connection_dir,
            settings.max_sessions,
        )
        if launcher.isolation == "none":
            log.warning("kernels run UNSANDBOXED: user code has the service user's rights")
        culler = asyncio.create_task(registry.run_culler(), name="culler")
        try:
            yield
        finally:
            culler.cancel()
            await asyncio.wait([culler])
            await registry.close_all()
            await launcher.close()
            options.zmq_context.destroy(linger=0)
            log.info("all sessions closed")

    app = FastAPI(
        title="kernel-service",
        version=__version__,
        summary="Persistent IPython kernels behind HTTP: a code interpreter for LLM agents.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.sandbox = launcher.isolation
    app.state.isolation = isolation
    install_error_handlers(app)
    app.include_router(router)
    app.add_middleware(BodySizeLimit, limit=settings.max_code_bytes * 6 + _BODY_OVERHEAD)
    if settings.api_keys():
        app.add_middleware(ApiKeyAuth, keys=settings.api_keys())  # outermost: checked first
    return app


def make_launcher(settings: Settings) -> KernelLauncher:
    """The launcher the settings ask for, checked to work here."""
    if settings.sandbox == "none":
        return SubprocessLauncher()
    launcher = BubblewrapLauncher(
        SandboxLimits(
            memory_bytes=settings.sandbox_memory_mb * MIB,
            processes=settings.sandbox_processes,
            file_bytes=settings.sandbox_file_mb * MIB,
            open_files=settings.sandbox_open_files,
            tmp_bytes=settings.sandbox_tmp_mb * MIB,
        ),
        first_uid=settings.sandbox_uid_base,
        uid_count=settings.sandbox_uid_count,
        read_only_paths=default_read_only_paths(STARTUP_FILE),
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
