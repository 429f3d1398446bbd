"""A session's kernel slot: the kernel it runs on, and the fresh one being started in the
background when that one died, was killed or is being replaced."""

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from kernel_service.errors import KernelUnavailable, SessionNotFound
from kernel_service.execution.results import STATE_LOST
from kernel_service.kernel import Kernel, KernelFactory, KernelKind, KernelStartError

log = logging.getLogger(__name__)


class KernelSlot:
    """Holds one kernel at a time; a replacement is started once, however many callers
    notice the old one is gone."""

    def __init__(
        self,
        session_id: str,
        kernel: Kernel | None,
        work_dir: Path,
        *,
        kind: KernelKind,
        start_kernel: KernelFactory,
        on_new_kernel: Callable[[Kernel], None],
    ) -> None:
        self._session_id = session_id
        self._kind = kind
        self._kernel = kernel
        self._work_dir = work_dir
        self._start_kernel = start_kernel
        self._on_new_kernel = on_new_kernel
        self._replacing: asyncio.Task[Kernel] | None = None
        self._closed = False

    @property
    def kernel(self) -> Kernel | None:
        """The kernel now, if there is one (none while a new one starts)."""
        return self._kernel

    @property
    def starting(self) -> bool:
        return self._replacing is not None

    async def ready(self) -> tuple[Kernel, str | None]:
        """The kernel to run on, and why earlier state was lost if it was lost unseen."""
        if self._closed:  # deleted or culled while this caller waited its turn
            raise SessionNotFound(self._session_id)
        lost_before: str | None = None
        kernel = self._kernel
        if kernel is not None and not kernel.alive:
            lost_before = (
                f"KernelDied: The kernel had died since the last call ({kernel.exit_words()}). "
                f"{STATE_LOST}"
            )
            self.replace(kernel)
        elif kernel is None and self._replacing is None:
            self._begin_start(None)
        if self._replacing is not None:
            try:
                kernel = await asyncio.shield(self._replacing)
            except KernelStartError as exc:
                raise KernelUnavailable(str(exc)) from exc
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._closed and current is not None and not current.cancelling():
                    # the start was called off because the session was deleted meanwhile
                    raise SessionNotFound(self._session_id) from None
                raise
        assert kernel is not None
        return kernel, lost_before

    def replace(self, old: Kernel) -> None:
        """Start a fresh kernel in place of `old`, unless that was done already."""
        if self._kernel is not old or self._closed:
            return
        self._begin_start(old)

    async def close(self) -> None:
        """End the kernel, and any kernel starting."""
        await self._call_off_start()
        if self._kernel is not None:
            await self._kernel.shutdown()
            self._kernel = None

    async def detach(self) -> None:
        """Leave the kernel running (any kernel starting is called off)."""
        await self._call_off_start()
        if self._kernel is not None:
            self._kernel.detach()

    async def _call_off_start(self) -> None:
        self._closed = True
        replacing = self._replacing
        if replacing is not None:
            replacing.cancel()
            await asyncio.wait([replacing])  # its outcome is moot; our own cancellation is not

    def _begin_start(self, old: Kernel | None) -> None:
        self._kernel = None
        self._replacing = asyncio.create_task(
            self._start_replacement(old), name=f"kernel-start-{self._session_id}"
        )
        self._replacing.add_done_callback(self._report_start_failure)

    def _report_start_failure(self, task: "asyncio.Task[Kernel]") -> None:
        # Retrieved here so a start nobody waits for is still reported, once.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("session %s: kernel did not start: %s", self._session_id, exc)

    async def _start_replacement(self, old: Kernel | None) -> Kernel:
        try:
            if old is not None:
                await old.shutdown()
            kernel = await self._start_kernel(self._work_dir, self._kind)
        except BaseException:
            self._replacing = None
            raise
        self._kernel = kernel
        self._replacing = None
        self._on_new_kernel(kernel)
        log.info("session %s: new kernel %s", self._session_id, kernel.kernel_id)
        return kernel
