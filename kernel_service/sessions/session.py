"""One session: one kernel, one queue of executions, its images, its state records."""

import asyncio
import base64
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from kernel_service.config import MIB, Settings
from kernel_service.errors import (
    ImageNotFound,
    KernelUnavailable,
    SessionNotFound,
    StateFull,
)
from kernel_service.execution.collector import OutputLimits, OutputListener
from kernel_service.execution.full_output import FullOutputSpill
from kernel_service.execution.images import image_payloads, png_size
from kernel_service.execution.results import STATE_LOST, build_result
from kernel_service.kernel import Kernel, KernelStartError
from kernel_service.metrics import Metrics, output_size
from kernel_service.sessions.pool import KernelFactory
from kernel_service.store.state import ExecutionRecord, SessionRecord, StateStore
from kernel_service.workdir.snapshots import changed_files, snapshot
from kernel_service.workdir.workspaces import Workspaces
from kernel_service_client.models import (
    IMAGE_URL_TEMPLATE,
    ExecutionResult,
    Image,
    Output,
    SessionInfo,
    SessionStatus,
)

log = logging.getLogger(__name__)

_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "image/webp": "webp",
    "image/svg+xml": "svg",
}


@dataclass(frozen=True)
class StoredImage:
    mime: str
    data: str  # base64

    def content(self) -> bytes:
        return base64.b64decode(self.data)


class Session:
    """One conversation's kernel, run one execution at a time."""

    def __init__(
        self,
        session_id: str,
        *,
        owner: str | None,
        kernel: Kernel | None,
        work_dir: Path,
        start_kernel: KernelFactory,
        settings: Settings,
        workspaces: Workspaces,
        metrics: Metrics,
        store: StateStore,
        record: SessionRecord | None = None,
        lost: str | None = None,
    ) -> None:
        """`record`: the session as an earlier service process left it (`kernel` is its
        adopted kernel, or None); `lost` says why its kernel could not be adopted."""
        self.session_id = session_id
        self.owner = owner  # who may see it: a digest of the API key that made it
        self.key = session_key(session_id, owner)
        self.work_dir = work_dir
        self.created_at = record.created_at if record else datetime.now(UTC)
        self.last_activity = record.last_activity if record else self.created_at
        self.execution_count = record.execution_count if kernel and record else 0
        idle = (datetime.now(UTC) - self.last_activity).total_seconds()
        self._idle_since = time.monotonic() - max(idle, 0.0)
        # What the next execution has to say first, and whether it means state was lost.
        self.notice = "\n".join(filter(None, (record.notice if record else None, lost))) or None
        self._notice_lost_state = lost is not None
        self._kernel: Kernel | None = kernel
        self._replacing: asyncio.Task[Kernel] | None = None
        self._start_kernel = start_kernel
        self._settings = settings
        self._workspaces = workspaces
        self._metrics = metrics
        self._limits = OutputLimits(text=settings.output_limit, rich=settings.rich_output_limit)
        self._lock = asyncio.Lock()
        self._executing = False  # an execution holds the lock (a restart may hold it too)
        self._interrupt_asked = False  # by interrupt(), for that execution
        self._store = store
        self._seq = store.last_seq(self.key) if record else 0
        self._result_bytes = store.result_bytes(self.key) if record else 0
        self._images = store.image_sizes(self.key) if record else []  # (id, size), oldest first
        self._image_seq = max((int(i.split(".")[0]) for i, _ in self._images), default=0)
        self._image_bytes = sum(size for _, size in self._images)
        self._closed = False

    # ------------------------------------------------------------ views

    @property
    def status(self) -> SessionStatus:
        if self._closed:
            return "dead"
        if self._replacing is not None:
            return "starting"
        if self._kernel is None or not self._kernel.alive:
            return "dead"  # the next execution starts a fresh kernel
        return "busy" if self._lock.locked() else "idle"

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def idle_seconds(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self._idle_since

    def info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.session_id,
            status=self.status,
            execution_count=self.execution_count,
            created_at=self.created_at,
            last_activity=self.last_activity,
            notice=self.notice,
        )

    def image(self, image_id: str) -> StoredImage:
        found = self._store.image(self.key, image_id)
        if found is None:
            raise ImageNotFound(self.session_id, image_id)
        return StoredImage(*found)

    def history(self, since: int = 0, limit: int | None = None) -> list[ExecutionRecord]:
        """Its executions numbered after `since`, oldest first (at most `limit`), as the
        state store keeps them: code, status, timing, and the result as JSON (None while
        running, when cut short, or once dropped for room)."""
        return self._store.executions(self.key, since, limit)

    # ------------------------------------------------------------ actions

    async def execute(
        self, code: str, timeout: float | None, on_output: OutputListener | None = None
    ) -> ExecutionResult:
        """Run `code` after any executions queued before it; never raises for user errors.
        `on_output` is told of each output as it arrives (for streaming)."""
        effective = self._settings.effective_timeout(timeout)
        async with self._lock:
            self._touch()
            started = time.perf_counter()
            if self._closed:
                raise SessionNotFound(self.session_id)
            seq = self._seq + 1
            self._store.execution_started(self.key, seq, code)  # StateFull: nothing ran
            self._seq = seq
            full_mb = self._settings.full_output_mb
            spill = FullOutputSpill(self.work_dir, self.session_id, seq, full_mb * MIB)
            self._executing, self._interrupt_asked = True, False
            try:
                kernel, lost_before = await self._ready_kernel()
                before = await snapshot(self.work_dir)
                outcome = await kernel.execute(
                    code,
                    timeout=effective,
                    interrupt_grace=self._settings.interrupt_grace,
                    limits=self._limits,
                    listener=spill.listener(on_output),
                    interrupted=self._interrupt_asked,  # asked for while we got ready
                )
                files = changed_files(before, await snapshot(self.work_dir), self.session_id)
                if outcome.kernel_lost:
                    self._replace(kernel)
                if outcome.collector.execution_count is not None:
                    self.execution_count = outcome.collector.execution_count
                outputs = outcome.collector.outputs()
                notice, notice_lost = self.notice, self._notice_lost_state
                self.notice, self._notice_lost_state = None, False
                result = build_result(
                    session_id=self.session_id,
                    outcome=outcome,
                    outputs=outputs,
                    timeout=effective,
                    timeout_capped=timeout is not None and timeout > effective,
                    images=self._store_images(outputs),
                    duration_ms=(time.perf_counter() - started) * 1000,
                    lost_before=lost_before or (notice if notice_lost else None),
                    notice=None if notice_lost else notice,
                    text_limit=self._settings.text_limit,
                    files=files,
                    keep_full_output=spill.keep,
                )
                self._record_end(seq, result)
            except BaseException as exc:  # cancelled (client gone, service stopping) or failed
                ending = "cancelled" if isinstance(exc, asyncio.CancelledError) else "failed"
                with contextlib.suppress(StateFull):
                    self._store.execution_ended(self.key, seq, ending)
                raise
            finally:
                self._executing = False
                spill.close()
                self._touch()
        size = output_size(result.outputs)
        self._metrics.execution(result, size)
        # One line per execution, key=value in the message and the same fields as record
        # attributes (for a JSON formatter); never the code or its output.
        fields = {
            "session_id": self.session_id,
            "execution_count": result.execution_count,
            "status": result.status,
            "duration_ms": round(result.duration_ms, 1),
            "bytes_out": size.total,
            "images": len(result.images),
            "state_lost": result.state_lost,
        }
        log.info(
            " ".join(["execution", *(f"{k}=%s" for k in fields)]), *fields.values(), extra=fields
        )
        return result

    def interrupt(self) -> bool:
        """Interrupt the running execution, if any. True when one was running (or about to:
        one still waiting for its kernel is interrupted as soon as its code begins)."""
        if not self._executing:
            return False
        self._interrupt_asked = True
        if self._kernel is not None:
            self._kernel.interrupt()
        return True

    async def restart(self) -> None:
        """Replace the kernel by a fresh one now; a running execution ends as a kernel loss."""
        kernel = self._kernel
        if kernel is not None:
            self._replace(kernel)
        async with self._lock:
            await self._ready_kernel()
            self._touch()

    def _record_end(self, seq: int, result: ExecutionResult) -> None:
        """The execution's result, and the session's last use; within the history's room.

        A failure to write is logged, not raised: the code has run and its caller gets the
        result (a later service process reports this execution as lost)."""
        stored = result.model_dump_json()
        try:
            self._store.execution_ended(
                self.key,
                seq,
                result.status,
                duration_ms=result.duration_ms,
                execution_count=result.execution_count,
                result=stored,
            )
            self._store.session_used(self.key, self.last_activity, self.execution_count)
            self._result_bytes += len(stored)
            room = self._settings.history_mb * MIB
            if self._result_bytes > room:
                freed = self._store.drop_oldest_results(self.key, self._result_bytes - room)
                self._result_bytes -= freed
        except StateFull as exc:
            log.error("session %s: execution %d not recorded: %s", self.session_id, seq, exc)

    async def close(self) -> None:
        """End the kernel (and any kernel starting), then remove the work directory."""
        self._closed = True
        replacing = self._replacing
        if replacing is not None:
            replacing.cancel()
            await asyncio.wait([replacing])  # its outcome is moot; our own cancellation is not
        if self._kernel is not None:
            await self._kernel.shutdown()
            self._kernel = None
        self._store.remove_session(self.key)
        await self._workspaces.remove(self.work_dir)

    async def detach(self) -> None:
        """Leave the kernel running and the session recorded, for the next service process
        (any kernel starting is called off: the session gets one at its next execution)."""
        self._closed = True
        replacing = self._replacing
        if replacing is not None:
            replacing.cancel()
            await asyncio.wait([replacing])
        if self._kernel is not None:
            self._kernel.detach()

    # ------------------------------------------------------------ kernel replacement

    async def _ready_kernel(self) -> tuple[Kernel, str | None]:
        """The kernel to run on, and why earlier state was lost if it was lost unseen."""
        if self._closed:  # deleted or culled while this caller waited its turn
            raise SessionNotFound(self.session_id)
        lost_before: str | None = None
        kernel = self._kernel
        if kernel is not None and not kernel.alive:
            lost_before = (
                f"KernelDied: The kernel had died since the last call ({kernel.exit_words()}). "
                f"{STATE_LOST}"
            )
            self._replace(kernel)
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
                    raise SessionNotFound(self.session_id) from None
                raise
        assert kernel is not None
        return kernel, lost_before

    def _replace(self, old: Kernel) -> None:
        """Start a fresh kernel in place of `old`, once, however many callers notice."""
        if self._kernel is not old or self._closed:
            return
        self._begin_start(old)

    def _begin_start(self, old: Kernel | None) -> None:
        self._kernel = None
        self._replacing = asyncio.create_task(
            self._start_replacement(old), name=f"kernel-start-{self.session_id}"
        )
        self._replacing.add_done_callback(self._report_start_failure)

    def _report_start_failure(self, task: "asyncio.Task[Kernel]") -> None:
        # Retrieved here so a start nobody waits for is still reported, once.
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("session %s: kernel did not start: %s", self.session_id, exc)

    async def _start_replacement(self, old: Kernel | None) -> Kernel:
        try:
            if old is not None:
                await old.shutdown()
            kernel = await self._start_kernel(self.work_dir)
        except BaseException:
            self._replacing = None
            raise
        self._kernel = kernel
        self._replacing = None
        self.execution_count = 0
        self._store.set_kernel(self.key, kernel.kernel_id)
        log.info("session %s: new kernel %s", self.session_id, kernel.kernel_id)
        return kernel

    # ------------------------------------------------------------ helpers

    def _touch(self) -> None:
        self.last_activity = datetime.now(UTC)
        self._idle_since = time.monotonic()

    def _store_images(self, outputs: list[Output]) -> list[Image]:
        images: list[Image] = []
        for payload in image_payloads(outputs):
            self._image_seq += 1
            image_id = f"{self._image_seq}.{_EXTENSIONS.get(payload.mime, 'bin')}"
            try:
                self._store.add_image(self.key, image_id, payload.mime, payload.data)
            except StateFull as exc:  # in the result still, but not at its URL
                log.error("session %s: image not stored: %s", self.session_id, exc)
            else:
                self._images.append((image_id, len(payload.data)))
                self._image_bytes += len(payload.data)
            dropped: list[str] = []
            while len(self._images) > self._settings.images_per_session or (
                self._image_bytes > self._settings.image_store_mb * MIB and len(self._images) > 1
            ):
                dropped_id, dropped_size = self._images.pop(0)
                dropped.append(dropped_id)
                self._image_bytes -= dropped_size
            if dropped:
                self._store.remove_images(self.key, dropped)
            size = png_size(payload.data) if payload.mime == "image/png" else None
            images.append(
                Image(
                    mime=payload.mime,
                    data=payload.data,
                    url=IMAGE_URL_TEMPLATE.format(session_id=self.session_id, image_id=image_id),
                    width=size[0] if size else None,
                    height=size[1] if size else None,
                )
            )
        return images


def session_key(session_id: str, owner: str | None) -> str:
    """Where a session is filed, and the name of its work directory."""
    return session_id if owner is None else f"{owner}.{session_id}"
