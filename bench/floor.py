"""The floor: kernels started exactly as the service starts its kernels (its Runtime, hence
the same launcher, sandbox, preloads and kernel options), each driven by a bare
jupyter_client AsyncKernelClient in the benchmark's own process. An execution is over when
its execute_reply has arrived and iopub has gone idle for it, as in the service.

One kernel is the floor of a round trip; many on one Runtime (one launcher, one
fork-server, as the service has) are the raw limit of throughput."""

import asyncio
import contextlib
import queue
import time
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import zmq.asyncio
from jupyter_client.asynchronous.client import AsyncKernelClient
from jupyter_client.connect import KernelConnectionInfo

from kernel_service.config import Settings
from kernel_service.kernel import Kernel
from kernel_service.runtime import Runtime

# Kernels started at once: as the service's sessions are made in the benchmark, on 2 cores.
_STARTS_AT_ONCE = 2


class BareKernel:
    """One kernel the service's way, and our bare client on it: the only reader of its
    messages (the service-side client that Kernel.start used to check readiness is shut)."""

    def __init__(self, kernel: Kernel, context: zmq.asyncio.Context) -> None:
        self.kernel = kernel
        kernel._stop_channels()
        self._client = AsyncKernelClient(context=context)
        # the service keeps it as plain JSON; jupyter_client names its value types
        self._client.load_connection_info(cast(KernelConnectionInfo, kernel.files.connection_info))
        self._client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)

    @classmethod
    async def start(
        cls, runtime: Runtime, work_dir: Path, context: zmq.asyncio.Context
    ) -> "BareKernel":
        """A kernel whose iopub our client is subscribed to; ended again if that fails."""
        kernel = await Kernel.start(runtime.launcher, runtime.options, work_dir)
        try:
            bare = cls(kernel, context)
        except BaseException:
            await kernel.shutdown()
            raise
        try:
            await bare._subscribed()
        except BaseException:
            await bare.close()
            raise
        return bare

    async def close(self) -> None:
        self._client.stop_channels()
        await self.kernel.shutdown()

    async def run(self, code: str) -> float:
        """ms from execute_request to the reply and iopub idle."""
        started = time.perf_counter()
        msg_id = self._client.execute(
            code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True
        )
        await self._until_done(msg_id, 60.0)
        return (time.perf_counter() - started) * 1000

    async def _until_done(self, msg_id: str, timeout: float) -> None:
        while True:
            reply: dict[str, Any] = await self._client.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        while True:
            msg: dict[str, Any] = await self._client.get_iopub_msg(timeout=timeout)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return

    async def _subscribed(self) -> None:
        """Until a kernel_info's idle arrives on our iopub: our SUB socket is connected."""
        deadline = time.monotonic() + 30
        while True:
            try:
                await self._until_done(self._client.kernel_info(), 0.5)
                return
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError("a floor kernel's iopub never answered") from None


class Floor:
    """`count` bare kernels on one Runtime, each in a work directory of its own; every one
    is ended on exit, also when starting them fails or is cancelled."""

    def __init__(self, settings: Settings, work_dir: Path, count: int = 1) -> None:
        self._runtime = Runtime(settings)
        self._work_dir = work_dir
        self._count = count
        self._running: contextlib.AbstractAsyncContextManager[None] | None = None
        self._context = zmq.asyncio.Context()
        self.kernels: list[BareKernel] = []

    async def __aenter__(self) -> "Floor":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """The Runtime running and every kernel started; `close()` ends whatever this got
        to, also when it failed or was cancelled."""
        running = self._runtime.running()
        await running.__aenter__()
        self._running = running
        gate = asyncio.Semaphore(_STARTS_AT_ONCE)
        # a failed start cancels the others; each ends its own kernel when cancelled
        async with asyncio.TaskGroup() as group:
            for i in range(self._count):
                group.create_task(self._start_one(self._work_dir / f"k{i}", gate))

    async def _start_one(self, work_dir: Path, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.kernels.append(await BareKernel.start(self._runtime, work_dir, self._context))

    async def close(self) -> None:
        """Every kernel ended, even when another fails to end (the first failure is raised
        after), then the Runtime stopped; once is enough, more is harmless."""
        kernels, self.kernels = self.kernels, []
        ended = await asyncio.gather(*(k.close() for k in kernels), return_exceptions=True)
        if self._running is not None:
            running, self._running = self._running, None
            await running.__aexit__(None, None, None)
        if not self._context.closed:
            self._context.destroy(linger=0)
        for outcome in ended:
            if isinstance(outcome, BaseException):
                raise outcome

    async def run(self, code: str) -> float:
        """ms of `code` on the first kernel (the floor of a round trip)."""
        return await self.kernels[0].run(code)
