"""One session: its executions run one at a time through a pipeline of its kernel slot
(`kernel_slot`), the kernel, the result, its image store (`image_store`) and its journal in
the state store (`journal`)."""

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from kernel_service.config import MIB
from kernel_service.errors import SessionNotFound
from kernel_service.execution.collector import OutputLimits, OutputListener
from kernel_service.execution.full_output import FullOutputSpill
from kernel_service.execution.results import build_result
from kernel_service.kernel import ExecuteOptions, Kernel, KernelKind, Relay
from kernel_service.metrics import OutputSize, output_size
from kernel_service.sessions.image_store import ImageStore, StoredImage
from kernel_service.sessions.journal import ExecutionJournal
from kernel_service.sessions.kernel_slot import KernelSlot
from kernel_service.sessions.services import SessionServices
from kernel_service.store.records import ExecutionRecord, SessionRecord, SessionTotals
from kernel_service.workdir.snapshots import FileChanges
from kernel_service_client.models import (
    ExecutionError,
    ExecutionResult,
    SessionInfo,
    SessionStatus,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """A session as an earlier service process left it: its record, where its records
    stand, and why its kernel could not be adopted (None: it was)."""

    record: SessionRecord
    totals: SessionTotals
    lost: str | None


class Answer(NamedTuple):
    """An execution's result, the same as JSON, the ending the service saw itself (a
    timeout, the kernel's death, lost output: not the code's own error), if it saw one, and
    what the service had to say before it (state lost since the last execution, an earlier
    execution cut short), if anything."""

    result: ExecutionResult
    json: str
    service_error: ExecutionError | None = None
    notice: str | None = None


class _Ran(NamedTuple):
    result: ExecutionResult
    service_error: ExecutionError | None
    notice: str | None


class Session:
    """One conversation's kernel, run one execution at a time."""

    def __init__(
        self,
        session_id: str,
        *,
        owner: str | None,
        kernel: Kernel | None,
        work_dir: Path,
        services: SessionServices,
        kind: KernelKind,
        language: str,
        restored: Restored | None = None,
    ) -> None:
        """`kernel`: a ready kernel of `kind`, or for a restored session its adopted one (or
        None); `language`: the language asked for (Deno's kernel runs two)."""
        self.session_id = session_id
        self.kind = kind
        self.language = language
        self.owner = owner  # who may see it: a digest of the API key that made it
        self.key = session_key(session_id, owner)
        self.work_dir = work_dir
        self.files = FileChanges(work_dir, session_id)  # what each execution changed there
        record = restored.record if restored else None
        self.created_at = record.created_at if record else datetime.now(UTC)
        self.last_activity = record.last_activity if record else self.created_at
        self.execution_count = record.execution_count if kernel and record else 0
        idle = (datetime.now(UTC) - self.last_activity).total_seconds()
        self._idle_since = time.monotonic() - max(idle, 0.0)
        # What the next execution has to say first, and whether it means state was lost.
        lost = restored.lost if restored else None
        self.notice = "\n".join(filter(None, (record.notice if record else None, lost))) or None
        self._notice_lost_state = lost is not None
        settings, store = services.settings, services.store
        self._settings, self._metrics, self._store = settings, services.metrics, store
        self._workspaces = services.workspaces
        self._limits = OutputLimits(text=settings.output_limit, rich=settings.rich_output_limit)
        totals = restored.totals if restored else SessionTotals()
        self._slot = KernelSlot(
            session_id,
            kernel,
            work_dir,
            kind=kind,
            start_kernel=services.start_kernel,
            on_new_kernel=self._on_new_kernel,
        )
        self._journal = ExecutionJournal(
            session_id, self.key, store, settings.history_mb * MIB, totals
        )
        self._images = ImageStore(session_id, self.key, store, settings, totals)
        self._lock = asyncio.Lock()
        self._executing = False  # an execution holds the lock (a restart may hold it too)
        self._interrupt_asked = False  # by interrupt(), for that execution
        self._closed = False
        # Set once the session is closed or left for the next service process: whoever
        # holds a connection to it (a Jupyter client's WebSocket) lets go.
        self.gone = asyncio.Event()

    # ------------------------------------------------------------ views

    @property
    def status(self) -> SessionStatus:
        kernel = self._slot.kernel
        if self._closed:
            return "dead"
        if self._slot.starting:
            return "starting"
        if kernel is None or not kernel.alive:
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
            language=self.language,
            kernel=self.kind.name,
        )

    def notebook_metadata(self) -> dict[str, Any]:
        """The kernelspec and language_info of a notebook of this session (its kernel's own
        words for its language, once it has answered)."""
        kernel = self._slot.kernel
        info = dict(kernel.language_info) if kernel is not None else {}
        return {
            "kernelspec": {
                "name": self.kind.name,
                "display_name": self.kind.display_name,
                "language": self.kind.language,
            },
            "language_info": info if info.get("name") else {"name": self.kind.language},
        }

    async def image(self, image_id: str) -> StoredImage:
        return await self._images.get(image_id)

    async def history(self, since: int = 0, limit: int | None = None) -> list[ExecutionRecord]:
        """Its executions numbered after `since`, oldest first (at most `limit`), as the
        state store keeps them: code, status, timing, and the result as JSON (None while
        running, when cut short, or once dropped for room)."""
        return await self._journal.history(since, limit)

    # ------------------------------------------------------------ actions

    async def execute(
        self, code: str, timeout: float | None, on_output: OutputListener | None = None
    ) -> ExecutionResult:
        """Run `code` after any executions queued before it; never raises for user errors.
        `on_output` is told of each output as it arrives (for streaming)."""
        return (await self.execute_answer(code, timeout, on_output)).result

    async def execute_answer(
        self,
        code: str,
        timeout: float | None,
        on_output: OutputListener | None = None,
        *,
        options: ExecuteOptions | None = None,
        relay: Relay | None = None,
    ) -> Answer:
        """`execute`, with the result as JSON too (made once: as the state store keeps it).
        `options`: the execute_request's fields a Jupyter client chose; `relay` is told of
        each message the kernel sends for it (see `Kernel.execute`)."""
        async with self._lock:
            self._touch()
            began, started = self.last_activity, time.perf_counter()
            if self._closed:
                raise SessionNotFound(self.session_id)
            # From here an interrupt is for this execution (kept until its code begins).
            self._executing, self._interrupt_asked = True, False
            try:
                seq = await self._journal.begin(code)  # StateFull: nothing ran
                ran = await self._run_recorded(
                    seq, code, timeout, started, on_output=on_output, options=options, relay=relay
                )
            finally:
                self._executing = False
                self._touch()
            result = ran.result
            size = output_size(result.outputs)
            # Past the try: a wait cancelled here leaves the write to happen, and alone.
            stored = await self._journal.end(seq, result, began, self.execution_count, size.total)
        self._report(result, size)
        json = stored if stored is not None else result.model_dump_json()
        return Answer(result, json, ran.service_error, ran.notice)

    async def _run_recorded(
        self,
        seq: int,
        code: str,
        timeout: float | None,
        started: float,
        *,
        on_output: OutputListener | None,
        options: ExecuteOptions | None,
        relay: Relay | None,
    ) -> _Ran:
        """Run execution `seq`, its full output spilled; an ending other than a result
        (cancelled: client gone, service stopping; or failed) is recorded as cut short."""
        full_bytes = self._settings.full_output_mb * MIB
        spill = FullOutputSpill(self.work_dir, self.session_id, seq, full_bytes)
        try:
            return await self._run(
                code, timeout, started, spill, on_output=on_output, options=options, relay=relay
            )
        except BaseException as exc:
            self._journal.cut_short(seq, cancelled=isinstance(exc, asyncio.CancelledError))
            raise
        finally:
            spill.close()

    async def _run(
        self,
        code: str,
        timeout: float | None,
        started: float,
        spill: FullOutputSpill,
        *,
        on_output: OutputListener | None,
        options: ExecuteOptions | None,
        relay: Relay | None,
    ) -> _Ran:
        """Run the code on a ready kernel and make its result (with the ending the service
        saw itself, and what it had to say first)."""
        effective = self._settings.effective_timeout(timeout)
        kernel, lost_before = await self._slot.ready()
        before = await self.files.before()
        outcome = await kernel.execute(
            code,
            timeout=effective,
            interrupt_grace=self._settings.interrupt_grace,
            limits=self._limits,
            listener=spill.listener(on_output),
            interrupted=self._interrupt_asked,  # asked for while we got ready
            options=options,
            relay=relay,
        )
        files = await self.files.after(before)
        if outcome.kernel_lost:
            self._slot.replace(kernel)
        if outcome.collector.execution_count is not None:
            self.execution_count = outcome.collector.execution_count
        outputs = outcome.collector.outputs()
        images = await self._images.keep(outputs)
        notice, notice_lost = self.notice, self._notice_lost_state
        lost_before = lost_before or (notice if notice_lost else None)
        draft = build_result(
            session_id=self.session_id,
            outcome=outcome,
            outputs=outputs,
            timeout=effective,
            timeout_capped=timeout is not None and timeout > effective,
            images=images,
            duration_ms=(time.perf_counter() - started) * 1000,
            lost_before=lost_before,
            notice=None if notice_lost else notice,
            text_limit=self._settings.text_limit,
            files=files,
        )
        result = draft.finish(await spill.keep() if draft.needs_full_output else None)
        # said once, in this result: cleared only now that no await can cut it off
        self.notice, self._notice_lost_state = None, False
        said = "\n".join(filter(None, (lost_before, None if notice_lost else notice)))
        return _Ran(result, draft.service_error, said or None)

    async def relay(
        self,
        channel: Literal["shell", "control"],
        msg_type: str,
        content: dict[str, Any],
        to: Relay,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> None:
        """Send a client's request other than an execution (kernel_info, complete, a comm
        message...) to the kernel as soon as it is ready, not waiting for the running
        execution (the kernel answers in its own order); `to` hears the kernel's answer."""
        kernel, lost_before = await self._slot.ready()
        if lost_before is not None:  # the next execution says so, as if it had found out
            self.notice = "\n".join(filter(None, (lost_before, self.notice)))
            self._notice_lost_state = True
        self._touch()
        kernel.relay(channel, msg_type, content, to, metadata=metadata, buffers=buffers)

    def interrupt(self) -> bool:
        """Interrupt the running execution, if any. True when one was running (or about to:
        one still waiting for its kernel is interrupted as soon as its code begins)."""
        if not self._executing:
            return False
        self._interrupt_asked = True
        if (kernel := self._slot.kernel) is not None:
            kernel.interrupt()
        return True

    async def restart(self) -> None:
        """Replace the kernel by a fresh one now; a running execution ends as a kernel loss."""
        if (kernel := self._slot.kernel) is not None:
            self._slot.replace(kernel)
        async with self._lock:
            await self._slot.ready()
            self._touch()

    async def close(self) -> None:
        """End the kernel (and any kernel starting), then remove the work directory."""
        self._closed = True
        self.gone.set()
        await self._slot.close()
        await self._store.remove_session(self.key)
        await self._workspaces.remove(self.work_dir)

    async def detach(self) -> None:
        """Leave the kernel running and the session recorded, for the next service process
        (any kernel starting is called off: the session gets one at its next execution)."""
        self._closed = True
        self.gone.set()
        await self._slot.detach()

    # ------------------------------------------------------------ helpers

    def _on_new_kernel(self, kernel: Kernel) -> None:
        self.execution_count = 0
        self._store.set_kernel(self.key, kernel.kernel_id)

    def _touch(self) -> None:
        self.last_activity = datetime.now(UTC)
        self._idle_since = time.monotonic()

    def _report(self, result: ExecutionResult, size: OutputSize) -> None:
        """Count it, and log one line for it: key=value in the message and the same fields
        as record attributes (for a JSON formatter); never the code or its output."""
        self._metrics.execution(result, size, self.language)
        fields = {
            "session_id": self.session_id,
            "language": self.language,
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


def session_key(session_id: str, owner: str | None) -> str:
    """Where a session is filed, and the name of its work directory."""
    return session_id if owner is None else f"{owner}.{session_id}"
