"""The service's core made from Settings: the kernel launcher, the session registry, the
state store and the work directories, with their start (carrying on what an earlier service
process left) and their stop. Shared by the HTTP app and by `kernel-service mcp` (stdio),
so both run kernels the same way."""

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kernel_service import __version__
from kernel_service.config import MIB, Settings
from kernel_service.errors import ServiceError, StateFull
from kernel_service.kernel import (
    Kernel,
    KernelCatalog,
    KernelKind,
    KernelLauncher,
    KernelOptions,
    KernelStartError,
    SubprocessLauncher,
)
from kernel_service.kernel.forkserver import (
    ForkLauncher,
    ForkServer,
    SandboxedForkLauncher,
    zygote_env,
)
from kernel_service.kernel.kernelspecs import (
    BASH_LAUNCH_FILE,
    BRIDGE_FILE,
    PYTHON,
    KernelChoiceError,
)
from kernel_service.kernel.options import STARTUP_FILE, kernel_env
from kernel_service.kernel.programs import reaper
from kernel_service.kernel.programs.fonts import prepare_font_cache
from kernel_service.kernel.programs.reaper import start_ticks
from kernel_service.kernel.sandbox import BubblewrapLauncher, host_headroom
from kernel_service.kernel.sandbox_spec import SandboxLimits, default_read_only_paths
from kernel_service.kernel.uids import UidRange
from kernel_service.metrics import Metrics
from kernel_service.sessions.pool import KernelPool
from kernel_service.sessions.recovery import recover
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.store.locks import lock_directory
from kernel_service.store.records import KernelRecord
from kernel_service.store.state import DATABASE, LOCK_FILE, StateStore
from kernel_service.workdir.workspaces import Workspaces

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
            max_message_bytes=settings.message_limit(),
            preload_modules=tuple(
                m.strip() for m in settings.preload_modules.split(",") if m.strip()
            ),
        )
        self.launcher = launcher or make_launcher(settings, self.options)
        self.catalog = offered_kernels(settings, self.launcher)
        self.workspaces = Workspaces(
            settings.work_dir,
            settings.sandbox_work_dir_mb * MIB if settings.sandbox != "none" else 0,
        )
        self.metrics = Metrics(language.name for language in self.catalog.languages)
        self.store: StateStore | None = None  # while running
        self._claimed: StateStore | None = None  # claimed, not running yet
        self.uids: UidRange | None = None  # the kernels' (sandboxed), once claimed
        self._locks: list[int] = []  # on the connection and work directories, while claimed
        start_kernel = self._start_kernel
        pooled = self.metrics.counting_starts(start_kernel, "pool")
        self.pools = {
            kind.name: KernelPool(size, pooled, self.workspaces, kind)
            for kind, size in pool_sizes(settings, self.catalog)
        }
        # the registry counts its own starts: new sessions' and replacements'
        self.registry = SessionRegistry(
            settings,
            start_kernel,
            self.workspaces,
            pools=self.pools,
            metrics=self.metrics,
            catalog=self.catalog,
        )
        self.metrics.watch(self.registry.statuses, self.warm_kernels)
        # fixed from here on
        self.isolation: dict[str, Any] = {
            **self.launcher.describe(),
            "work_dir": self.workspaces.describe(),
        }

    def warm_kernels(self) -> int:
        return sum(len(pool) for pool in self.pools.values())

    def claim(self) -> None:
        """Take what this service process holds while it runs: its state, connection and
        work directories (locked), and the uids of its kernels (the range the state's last
        service had, if it is free). `running` does it if it was not done before; the
        command line does it first, so that a refusal is one line. Raises DirectoryInUse
        or UidRangeInUse."""
        if self._claimed is not None:
            return
        settings, options = self.settings, self.options
        store = StateStore(settings.state_dir)
        try:
            # what is in them is this service's to adopt or to remove: no other may use them
            options.connection_dir.mkdir(parents=True, exist_ok=True)
            self._locks.append(lock_directory(options.connection_dir))
            settings.work_dir.mkdir(parents=True, exist_ok=True)
            self._locks.append(lock_directory(settings.work_dir))
            # the work root's stale entries are deleted at the start: it must be ours alone
            self.workspaces.claim_root(record.work_dir for record in store.sessions())
            incarnation = store.meta("incarnation")  # of this state: drawn when it is new
            if incarnation is None:
                incarnation = self.registry.cell.new_incarnation()
                store.set_meta("incarnation", incarnation)
            self.registry.cell.incarnation = incarnation
            own = {kernel.uid for kernel in store.kernels() if kernel.uid is not None}
            uids = self.launcher.claim_uids(UidRange.parse(store.meta("uid_range")), own)
            if uids is not None:
                store.set_meta("uid_range", str(uids))
            self.uids = uids
        except BaseException:
            self._unlock(store)
            raise
        self._claimed = store

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The state directory locked, what an earlier service process left carried on or
        removed, the culler and the orphan reaper running; on exit every session is closed
        and every kernel ended, or with `keep_kernels` all left for the next start."""
        settings, options = self.settings, self.options
        await asyncio.to_thread(self.claim)
        store, self._claimed = self._claimed, None
        assert store is not None
        try:
            await self._carry_on(store)
        except BaseException:
            await self.registry.detach_all()  # as found: the next start may do better
            self._unlock(store)
            raise
        reaper = _start_reaper(settings, store)
        log.info(
            "kernel-service %s ready: isolation=%s %s%s, connection files in %s, state in %s, "
            "max %d sessions",
            __version__,
            self.launcher.isolation,
            self.isolation,
            f", kernel uids {self.uids}" if self.uids else "",
            options.connection_dir,
            store.directory,
            settings.max_sessions,
        )
        if self.launcher.isolation == "none":
            log.warning("kernels run UNSANDBOXED: user code has the service user's rights")
        for line in self.catalog.report():
            log.warning("kernel not available: %s", line)
        culler = asyncio.create_task(self.registry.run_culler(), name="culler")
        for pool in self.pools.values():
            pool.start()
        try:
            yield
        finally:
            culler.cancel()
            await asyncio.wait([culler])
            await asyncio.gather(*(pool.close() for pool in self.pools.values()))
            await self._stop(store, reaper)

    async def _carry_on(self, store: StateStore) -> None:
        """Adopt what the store records (see recovery.py) and clear what nobody owns."""
        options = self.options
        self.store = self.registry.store = store
        before = store.service_started(os.getpid())
        await prepare_font_cache(options.matplotlib_dir)
        recovered = await recover(store, self.registry, self.launcher, options, self.workspaces)
        if recovered.sessions or before != "clean":
            how = {None: "a crash or a first start", "kept": "a stop that kept them"}
            log.info(
                "carried on %d sessions (%d with their kernel) after %s; %d kernels ended",
                recovered.sessions,
                recovered.adopted,
                how.get(before, "a stop"),
                recovered.kernels_ended,
            )
        for path in await self.workspaces.remove_stale(self.registry.work_dirs()):
            log.info("removed stale work directory %s", path.name)
        await self.launcher.prepare()

    async def _stop(self, store: StateStore, reaper: "subprocess.Popen[bytes]") -> None:
        """End every session, or leave them all to the next start (`keep_kernels`)."""
        keep = self.settings.keep_kernels
        try:
            if keep:
                await self.registry.detach_all()
                store.service_stopped("kept")
                log.info("sessions and kernels kept for the next start")
            else:
                await self.registry.close_all()
                log.info("all sessions closed")
                store.service_stopped("clean")
        except StateFull as exc:  # the reaper then waits out the orphan timeout: harmless
            log.error("the state store could not record the stop: %s", exc)
        finally:
            if not keep:
                reaper.terminate()  # nothing left for it to end
            await self.launcher.close(kernels_left=keep)
            self._unlock(store)
            await asyncio.to_thread(_reaped, reaper, keep)

    def _unlock(self, store: StateStore) -> None:
        store.close()
        self.store = self.registry.store = None
        for fd in self._locks:
            os.close(fd)
        self._locks.clear()
        self.launcher.release_uids()

    async def _start_kernel(self, work_dir: Path, kind: KernelKind) -> Kernel:
        """A ready kernel of `kind`, recorded in the state store. One that runs but never
        answers is ended and launched once more. A kind that cannot run here (a session
        carried on from a host that had its runtime, or its memory cgroup) is not started."""
        if kind.problem is not None:
            raise KernelStartError(f"{kind.display_name} cannot run here: {kind.problem}")
        try:
            return await self._start_recorded(work_dir, kind)
        except KernelStartError as exc:
            if not exc.stuck:
                raise
            log.warning("a kernel never answered; launching another: %s", exc)
        return await self._start_recorded(work_dir, kind)

    async def _start_recorded(self, work_dir: Path, kind: KernelKind) -> Kernel:
        """A ready kernel whose record is written. The record is handed to the store as soon
        as the process exists, written while the kernel gets ready, and its outcome awaited
        before the kernel is handed out: StateFull ends the kernel."""
        written: list[asyncio.Future[None]] = []

        def record(kernel: Kernel) -> None:
            store = self.store
            if store is None:
                raise KernelStartError("the service is not running")
            written.append(store.add_kernel(_record_of(kernel)))
            kernel.process.on_exit(lambda _: store.remove_kernel(kernel.kernel_id))

        try:
            kernel = await Kernel.start(self.launcher, self.options, work_dir, record, kind)
        except BaseException:
            for outcome in written:  # moot now: its kernel is ended, and forgotten
                outcome.cancel()
            raise
        try:
            await written[0]
        except BaseException:
            await kernel.shutdown()
            raise
        return kernel


def offered_kernels(settings: Settings, launcher: KernelLauncher) -> KernelCatalog:
    """The kernels installed here that the settings offer; one that needs its memory
    bounded by a cgroup (no RLIMIT_AS) is not offered where the sandbox has no memory
    cgroup. Raises KernelChoiceError for a kernel asked for that is not installed."""
    catalog = KernelCatalog.discover(settings.offered_kernels())
    if settings.sandbox == "none" or launcher.bounds_memory_by_cgroup():
        return catalog
    kinds = {
        name: kind
        if kind.address_space_limit or kind.problem
        else kind.unavailable(
            "its runtime reserves more address space than any RLIMIT_AS allows, and this "
            "host gives the sandbox no memory cgroup to bound it instead"
        )
        for name, kind in catalog.kinds.items()
    }
    return KernelCatalog(kinds, catalog.languages)


def pool_sizes(settings: Settings, catalog: KernelCatalog) -> list[tuple[KernelKind, int]]:
    """The warm pools: Python's (`pool_size`), and each other language's (`pool_sizes`)
    that can run here. Raises KernelChoiceError naming a language that cannot."""
    sizes: dict[str, tuple[KernelKind, int]] = {}
    if settings.pool_size > 0:
        sizes[PYTHON] = (catalog.kinds[PYTHON], settings.pool_size)
    for name, size in settings.language_pool_sizes().items():
        try:
            kind, _ = catalog.resolve(name)
        except ServiceError as exc:
            raise KernelChoiceError(f"KERNEL_SERVICE_POOL_SIZES: {exc}") from exc
        if kind.is_python:
            raise KernelChoiceError(
                "KERNEL_SERVICE_POOL_SIZES: Python's pool is KERNEL_SERVICE_POOL_SIZE"
            )
        if size > 0:
            sizes[kind.name] = (kind, size)
    return list(sizes.values())


def _record_of(kernel: Kernel) -> KernelRecord:
    """What a later service process needs to adopt this kernel (see RecordedKernel)."""
    process, files = kernel.process, kernel.files
    ticks = start_ticks(process.pid)
    return KernelRecord(
        kernel_id=kernel.kernel_id,
        pid=process.pid,
        start_ticks=ticks if ticks is not None else -1,
        directory=files.directory,
        connection=files.connection_info,
        uid=process.sandbox_uid,
        cgroup=process.cgroup,
    )


def _start_reaper(settings: Settings, store: StateStore) -> "subprocess.Popen[bytes]":
    """The orphan reaper for this service process (see reaper.py)."""
    return subprocess.Popen(
        [sys.executable, "-I", reaper.__file__, str(store.directory), str(os.getpid()),
         str(settings.orphan_timeout), DATABASE, LOCK_FILE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip


def _reaped(reaper: "subprocess.Popen[bytes]", kept: bool) -> None:
    """Wait for a reaper told to end; one left to watch over kept kernels is let go."""
    if not kept:
        reaper.wait()
    else:
        reaper.returncode = 0  # not ours to wait for any more: no ResourceWarning


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
        cpus=settings.sandbox_cpus,
    )
    pooled = settings.pool_size + sum(settings.language_pool_sizes().values())
    for warning in host_headroom(settings.max_sessions + pooled, limits):
        log.warning("%s", warning)
    uids = (settings.sandbox_uid_base, settings.sandbox_uid_count)
    read_only = default_read_only_paths(STARTUP_FILE, BRIDGE_FILE, BASH_LAUNCH_FILE)
    launcher = (
        SandboxedForkLauncher(server, limits, *uids, read_only)
        if server
        else BubblewrapLauncher(limits, *uids, read_only)
    )
    launcher.verify()
    return launcher
