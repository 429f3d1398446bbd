"""The session registry: id → Session (one kernel, one queue of executions, its images).

Executions of one session are serialised by its lock; sessions run concurrently. A session
whose kernel died or was killed gets a fresh kernel, started in the background at once.
Everything a later service process needs to carry a session on is written to the state
store as it happens: the session before it is handed out, each execution before it runs
and when it ends, its images, which kernel it has.
"""

import asyncio
import base64
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kernel_service.collector import OutputLimits, OutputListener
from kernel_service.config import MIB, Settings
from kernel_service.errors import (
    ImageNotFound,
    KernelUnavailable,
    SessionExists,
    SessionNotFound,
    StateFull,
    TooManySessions,
)
from kernel_service.files import changed_files, snapshot
from kernel_service.full_output import FullOutputSpill
from kernel_service.images import image_payloads, png_size
from kernel_service.kernel import Kernel, KernelStartError
from kernel_service.metrics import CloseReason, Metrics, output_size
from kernel_service.models import (
    IMAGE_URL_TEMPLATE,
    ExecutionResult,
    Image,
    Output,
    SessionInfo,
    SessionStatus,
)
from kernel_service.pool import KernelFactory, KernelPool
from kernel_service.results import STATE_LOST, build_result
from kernel_service.state import ExecutionRecord, SessionRecord, StateStore
from kernel_service.workspaces import WorkspaceError, Workspaces

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
        self.key = _key(session_id, owner)
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


class SessionRegistry:
    """All live sessions, their creation within limits, and the culling of idle ones."""

    def __init__(
        self,
        settings: Settings,
        start_kernel: KernelFactory,
        workspaces: Workspaces,
        pool: KernelPool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self.metrics = metrics or Metrics()
        self._start_kernel = self.metrics.counting_starts(start_kernel, "session")
        self._replace_kernel = self.metrics.counting_starts(start_kernel, "replacement")
        self.workspaces = workspaces
        self.pool = pool
        self.store: StateStore | None = None  # set while the service runs
        # Keyed by owner and id together: each API key has a namespace of its own.
        self._sessions: dict[str, Session] = {}
        self._reserved: dict[str, str | None] = {}  # being made or ended: key → owner

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        try:
            return self._sessions[_key(session_id, owner)]
        except KeyError:
            raise SessionNotFound(session_id) from None

    def sessions(self, owner: str | None = None) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def work_dirs(self) -> set[Path]:
        return {s.work_dir.resolve() for s in self._sessions.values()}

    def statuses(self) -> list[SessionStatus]:
        """The status of every live session, whoever owns it."""
        return [s.status for s in self._sessions.values()]

    async def create(self, session_id: str | None = None, owner: str | None = None) -> Session:
        """A new session with a ready kernel; on any failure nothing of it remains."""
        session_id = session_id or uuid.uuid4().hex
        key = _key(session_id, owner)
        if key in self._sessions or key in self._reserved:
            raise SessionExists(session_id)
        if len(self._sessions) + len(self._reserved) >= self._settings.max_sessions:
            raise TooManySessions(self._settings.max_sessions)
        if owner is not None:
            owned = sum(s.owner == owner for s in self._sessions.values())
            owned += sum(o == owner for o in self._reserved.values())
            if owned >= self._settings.max_sessions_per_key:
                raise TooManySessions(self._settings.max_sessions_per_key, per_key=True)
        warm = self.pool.take() if self.pool is not None else None
        if warm is not None:  # ready now: no await, so no failure to undo
            kernel, work_dir = warm.kernel, warm.work_dir
        else:
            self._reserved[key] = owner
            work_dir = self.workspaces.path(key)
            try:
                work_dir = await self.workspaces.create(key)
                kernel = await self._start_kernel(work_dir)
            except BaseException as exc:
                await self.workspaces.remove(work_dir)
                if isinstance(exc, KernelStartError | WorkspaceError):
                    raise KernelUnavailable(str(exc)) from exc
                raise
            finally:
                self._reserved.pop(key, None)
        session = self._session(session_id, owner, kernel, work_dir)
        try:
            self._stored().add_session(
                SessionRecord(
                    key=key,
                    session_id=session_id,
                    owner=owner,
                    work_dir=work_dir,
                    kernel_id=kernel.kernel_id,
                    created_at=session.created_at,
                    last_activity=session.last_activity,
                    execution_count=0,
                    notice=None,
                )
            )
        except BaseException:
            self._reserved[key] = owner
            try:
                await session.close()
            finally:
                self._reserved.pop(key, None)
            raise
        self._sessions[key] = session
        self.metrics.session_created(warm=warm is not None)
        log.info("session %s created (kernel %s)", session_id, kernel.kernel_id)
        return session

    async def close(
        self, session_id: str, owner: str | None = None, reason: CloseReason = "deleted"
    ) -> None:
        key = _key(session_id, owner)
        session = self._sessions.pop(key, None)
        if session is None:
            raise SessionNotFound(session_id)
        self.metrics.session_closed(reason)
        self._reserved[key] = owner  # the id stays taken until its work dir is gone
        try:
            await session.close()
        finally:
            self._reserved.pop(key, None)
        log.info("session %s closed", session_id)

    async def close_all(self) -> None:
        sessions = list(self._sessions.values())
        self._sessions.clear()
        for _ in sessions:
            self.metrics.session_closed("service_stopped")
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    async def detach_all(self) -> None:
        """Leave every session's kernel running for the next service process."""
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(s.detach() for s in sessions), return_exceptions=True)

    def restore(self, record: SessionRecord, kernel: Kernel | None, lost: str | None) -> Session:
        """A session an earlier service process left, with its adopted kernel (or None and
        why its kernel is gone)."""
        session = self._session(record.session_id, record.owner, kernel, record.work_dir,
                                record=record, lost=lost)  # fmt: skip
        if lost is not None:
            self._stored().set_kernel(record.key, None, session.notice)
        self._sessions[record.key] = session
        return session

    def _session(
        self,
        session_id: str,
        owner: str | None,
        kernel: Kernel | None,
        work_dir: Path,
        **restored: Any,
    ) -> Session:
        return Session(
            session_id,
            owner=owner,
            kernel=kernel,
            work_dir=work_dir,
            start_kernel=self._replace_kernel,
            settings=self._settings,
            workspaces=self.workspaces,
            metrics=self.metrics,
            store=self._stored(),
            **restored,
        )

    def _stored(self) -> StateStore:
        if self.store is None:
            raise RuntimeError("the session registry is used before the service runs")
        return self.store

    async def cull_idle(self) -> list[str]:
        """Close sessions idle for longer than the TTL; busy sessions are never culled."""
        ttl = self._settings.session_ttl
        if ttl <= 0:
            return []
        culled: list[str] = []
        for key in [k for k, s in self._sessions.items() if s.idle_seconds() > ttl]:
            # checked again at its turn: closing the ones before took time
            session = self._sessions.get(key)
            if session is None or session.idle_seconds() <= ttl:
                continue
            with contextlib.suppress(SessionNotFound):
                await self.close(session.session_id, session.owner, reason="culled")
                culled.append(session.session_id)
                log.info("session %s culled after %.0f s idle", session.session_id, ttl)
        return culled

    async def run_culler(self) -> None:
        """Cull forever, checking a few times per TTL (owned by the app's lifespan)."""
        ttl = self._settings.session_ttl
        if ttl <= 0:
            return
        interval = min(max(ttl / 4, 0.05), 30.0)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.cull_idle()
            except Exception:
                log.exception("culling failed")


def _key(session_id: str, owner: str | None) -> str:
    """Where a session is filed, and the name of its work directory."""
    return session_id if owner is None else f"{owner}.{session_id}"
