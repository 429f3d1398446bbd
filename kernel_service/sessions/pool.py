"""A warm pool: kernels started ahead of demand, each handed to exactly one new session.

A pooled kernel has run no user code and has a work directory of its own, which goes with
it to the session that takes it. Kernels are never given back: a session's kernel ends
with the session, so nothing one session did can reach another. The pool refills itself
in the background, one kernel at a time, after each take.
"""

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from kernel_service.kernel import Kernel, KernelFactory, KernelKind
from kernel_service.workdir.workspaces import Workspaces

log = logging.getLogger(__name__)

# after a failed start, wait this long before trying again (a broken host must not spin)
_RETRY_DELAY = 5.0
# after a take, wait this long before starting a replacement: a start takes both cores for
# a moment, and the session that took the kernel is about to run its first code
_REFILL_DELAY = 0.5


@dataclass(frozen=True)
class WarmKernel:
    kernel: Kernel
    work_dir: Path


class KernelPool:
    """Up to `size` ready kernels of one kind; `take()` gives one at once or None when it is
    empty."""

    def __init__(
        self, size: int, start_kernel: KernelFactory, workspaces: Workspaces, kind: KernelKind
    ) -> None:
        self.size = size
        self.kind = kind
        self._start_kernel = start_kernel
        self._workspaces = workspaces
        self._ready: deque[WarmKernel] = deque()
        self._wanted = asyncio.Event()
        self._filler: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._ready)

    def start(self) -> None:
        """Begin filling (on the running loop)."""
        if self.size > 0 and self._filler is None:
            self._filler = asyncio.create_task(self._fill(), name="kernel-pool")
            self._wanted.set()

    def take(self) -> WarmKernel | None:
        """A ready kernel, now, or None; a kernel that died while waiting is skipped."""
        while self._ready:
            warm = self._ready.popleft()
            self._wanted.set()
            if warm.kernel.alive:
                return warm
            self._discard(warm)
        self._wanted.set()
        return None

    async def close(self) -> None:
        """Stop filling and end every pooled kernel and its work directory."""
        if self._filler is not None:
            self._filler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._filler
            self._filler = None
        ready, self._ready = list(self._ready), deque()
        await asyncio.gather(*(self._end(warm) for warm in ready), return_exceptions=True)
        if self._ending:
            await asyncio.wait(set(self._ending))

    async def _fill(self) -> None:
        while True:
            await self._wanted.wait()
            await asyncio.sleep(_REFILL_DELAY)
            self._wanted.clear()
            while len(self._ready) < self.size:
                warm = await self._start_one()
                if warm is None:
                    await asyncio.sleep(_RETRY_DELAY)
                    continue
                self._ready.append(warm)
                warm.kernel.process.on_exit(partial(self._died, warm))

    async def _start_one(self) -> WarmKernel | None:
        work_dir = self._workspaces.path(f"pool-{uuid.uuid4().hex}")
        try:
            work_dir = await self._workspaces.create(work_dir.name)
            kernel = await self._start_kernel(work_dir, self.kind)
        except asyncio.CancelledError:
            await asyncio.shield(self._workspaces.remove(work_dir))
            raise
        except Exception as exc:
            log.warning("warm pool (%s): a kernel did not start: %s", self.kind.name, exc)
            await self._workspaces.remove(work_dir)
            return None
        return WarmKernel(kernel, work_dir)

    def _died(self, warm: WarmKernel, _returncode: int) -> None:
        if warm in self._ready:  # still waiting: replace it
            log.warning("pooled kernel %s died while waiting; replaced", warm.kernel.kernel_id)
            self._ready.remove(warm)
            self._discard(warm)
            self._wanted.set()

    def _discard(self, warm: WarmKernel) -> None:
        task = asyncio.create_task(self._end(warm))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end(self, warm: WarmKernel) -> None:
        await warm.kernel.shutdown()
        await self._workspaces.remove(warm.work_dir)
