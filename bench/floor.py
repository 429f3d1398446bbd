"""The floor: a kernel started exactly as the service starts its kernels (its Runtime, hence
the same launcher, sandbox, preloads and kernel options), driven by a bare jupyter_client
AsyncKernelClient in the benchmark's own process. An execution is over when its
execute_reply has arrived and iopub has gone idle for it, as in the service."""

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


class Floor:
    def __init__(self, settings: Settings, work_dir: Path) -> None:
        self._runtime = Runtime(settings)
        self._work_dir = work_dir
        self._running: contextlib.AbstractAsyncContextManager[None] | None = None
        self._kernel: Kernel | None = None
        self._context = zmq.asyncio.Context()
        self._client: AsyncKernelClient | None = None

    async def __aenter__(self) -> "Floor":
        try:
            self._running = self._runtime.running()
            await self._running.__aenter__()
            self._work_dir.mkdir(parents=True, exist_ok=True)
            self._kernel = await Kernel.start(
                self._runtime.launcher, self._runtime.options, self._work_dir
            )
            # Nothing but our bare client may read the kernel's messages: the service-side
            # client that Kernel.start used to check readiness is shut.
            self._kernel._stop_channels()
            self._client = AsyncKernelClient(context=self._context)
            # the service keeps it as plain JSON; jupyter_client names its value types
            info = cast(KernelConnectionInfo, self._kernel.files.connection_info)
            self._client.load_connection_info(info)
            self._client.start_channels(
                shell=True, iopub=True, stdin=False, hb=False, control=False
            )
            await self._subscribed()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            self._client.stop_channels()
        if self._kernel is not None:
            await self._kernel.shutdown()
        if self._running is not None:
            await self._running.__aexit__(kind, exc, tb)
        self._context.destroy(linger=0)

    async def run(self, code: str) -> float:
        """ms from execute_request to the reply and iopub idle."""
        assert self._client is not None
        started = time.perf_counter()
        msg_id = self._client.execute(
            code, silent=False, store_history=True, allow_stdin=False, stop_on_error=True
        )
        await self._until_done(msg_id, 60.0)
        return (time.perf_counter() - started) * 1000

    async def _until_done(self, msg_id: str, timeout: float) -> None:
        assert self._client is not None
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
        assert self._client is not None
        deadline = time.monotonic() + 30
        while True:
            try:
                await self._until_done(self._client.kernel_info(), 0.5)
                return
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RuntimeError("the floor kernel's iopub never answered") from None
