"""The session registry: id → Session (one kernel, one queue of executions, its images).

Executions of one session are serialised by its lock; sessions run concurrently. A session
whose kernel died or was killed gets a fresh kernel, started in the background at once.
Everything a later service process needs to carry a session on is written to the state
store as it happens: the session before it is handed out, each execution before it runs
and when it ends, its images, which kernel it has.
"""

import asyncio
import contextlib
import logging
from pathlib import Path

from kernel_service.config import Settings
from kernel_service.errors import (
    Draining,
    KernelUnavailable,
    LanguageMismatch,
    SessionExists,
    SessionNotFound,
    TooManySessions,
)
from kernel_service.kernel import (
    Kernel,
    KernelCatalog,
    KernelFactory,
    KernelKind,
    KernelStartError,
)
from kernel_service.metrics import CloseReason, Metrics
from kernel_service.sessions.cell import Cell
from kernel_service.sessions.pool import KernelPool
from kernel_service.sessions.services import SessionServices
from kernel_service.sessions.session import Restored, Session, session_key
from kernel_service.store.records import SessionRecord
from kernel_service.store.state import StateStore
from kernel_service.workdir.workspaces import WorkspaceError, Workspaces
from kernel_service_client.models import (
    SessionStatus,
)

log = logging.getLogger(__name__)


class SessionRegistry:
    """All live sessions, their creation within limits, and the culling of idle ones."""

    def __init__(
        self,
        settings: Settings,
        start_kernel: KernelFactory,
        workspaces: Workspaces,
        *,
        pools: dict[str, KernelPool] | None = None,
        metrics: Metrics | None = None,
        catalog: KernelCatalog | None = None,
    ) -> None:
        """`pools`: warm kernels by kernelspec name (Python's, and any other's configured);
        `catalog`: the kernels offered (None: Python's alone)."""
        self._settings = settings
        self.catalog = catalog or KernelCatalog.python_only()
        self.metrics = metrics or Metrics()
        self._start_kernel = self.metrics.counting_starts(start_kernel, "session")
        self._replace_kernel = self.metrics.counting_starts(start_kernel, "replacement")
        self.workspaces = workspaces
        self.pools = pools or {}
        self.cell = Cell(settings.cell)  # the cell this service is, if it is one
        self.store: StateStore | None = None  # set while the service runs
        # Keyed by owner and id together: each API key has a namespace of its own.
        self._sessions: dict[str, Session] = {}
        self._reserved: dict[str, str | None] = {}  # being made or ended: key → owner

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, owner: str | None = None) -> Session:
        try:
            return self._sessions[session_key(session_id, owner)]
        except KeyError:
            raise self.cell.not_found(session_id) from None

    def holds(self, key: str) -> bool:
        """Whether a live session is filed under `key` (`Session.key`)."""
        return key in self._sessions

    def sessions(self, owner: str | None = None) -> list[Session]:
        return [s for s in self._sessions.values() if s.owner == owner]

    def full(self) -> bool:
        """Whether a new session would be refused for want of room."""
        return len(self._sessions) + len(self._reserved) >= self._settings.max_sessions

    def executing(self) -> int:
        """Sessions running (or queueing) an execution now."""
        return sum(1 for s in self._sessions.values() if s.busy)

    def work_dirs(self) -> set[Path]:
        return {s.work_dir.resolve() for s in self._sessions.values()}

    def statuses(self) -> list[SessionStatus]:
        """The status of every live session, whoever owns it."""
        return [s.status for s in self._sessions.values()]

    async def create(
        self, session_id: str | None = None, owner: str | None = None, language: str | None = None
    ) -> Session:
        """A new session with a ready kernel for `language` (None: Python); on any failure
        nothing of it remains. Raises Draining while the service makes no new sessions,
        WrongCell for a chosen id another cell's tag starts, UnknownLanguage or
        LanguageUnavailable for a language it cannot run."""
        if self.cell.draining:
            raise Draining()
        kind, language = self.catalog.resolve(language)
        if session_id is None:
            session_id = self.cell.new_id()
        else:
            self.cell.check(session_id)
        key = session_key(session_id, owner)
        self._check_room(session_id, key, owner)
        self._reserved[key] = owner  # until it is recorded and listed
        try:
            return await self._create(session_id, key, owner, kind, language)
        finally:
            self._reserved.pop(key, None)

    def check_language(self, session: Session, asked: str | None) -> None:
        """Raise unless `asked` (None: whatever it is) is what `session` runs."""
        if asked is None:
            return
        kind, language = self.catalog.resolve(asked)
        if kind.name != session.kind.name:
            raise LanguageMismatch(session.session_id, session.language, language)

    async def _create(
        self, session_id: str, key: str, owner: str | None, kind: KernelKind, language: str
    ) -> Session:
        pool = self.pools.get(kind.name)
        warm = pool.take() if pool is not None else None
        if warm is not None:  # ready now: no await, so no failure to undo
            kernel, work_dir = warm.kernel, warm.work_dir
        else:
            kernel, work_dir = await self._new_kernel(key, kind)
        session = self._session(session_id, owner, kernel, work_dir, kind=kind, language=language)
        try:
            await self._stored().add_session(
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
                    kernel_name=kind.name,
                    language=language,
                )
            )
        except BaseException:
            await session.close()
            raise
        self._sessions[key] = session
        self.metrics.session_created(warm=warm is not None, language=language)
        log.info("session %s created (%s, kernel %s)", session_id, language, kernel.kernel_id)
        return session

    def _check_room(self, session_id: str, key: str, owner: str | None) -> None:
        """Raise SessionExists or TooManySessions, as the limits say."""
        if key in self._sessions or key in self._reserved:
            raise SessionExists(session_id)
        if len(self._sessions) + len(self._reserved) >= self._settings.max_sessions:
            raise TooManySessions(self._settings.max_sessions)
        if owner is not None:
            owned = sum(s.owner == owner for s in self._sessions.values())
            owned += sum(o == owner for o in self._reserved.values())
            if owned >= self._settings.max_sessions_per_key:
                raise TooManySessions(self._settings.max_sessions_per_key, per_key=True)

    async def _new_kernel(self, key: str, kind: KernelKind) -> tuple[Kernel, Path]:
        """A work directory and a kernel of `kind` started in it (the caller reserved the
        key)."""
        work_dir = self.workspaces.path(key)
        try:
            work_dir = await self.workspaces.create(key)
            return await self._start_kernel(work_dir, kind), work_dir
        except BaseException as exc:
            await self.workspaces.remove(work_dir)
            if isinstance(exc, KernelStartError | WorkspaceError):
                raise KernelUnavailable(str(exc)) from exc
            raise

    async def close(
        self, session_id: str, owner: str | None = None, reason: CloseReason = "deleted"
    ) -> None:
        key = session_key(session_id, owner)
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

    async def restore(
        self, record: SessionRecord, kernel: Kernel | None, lost: str | None
    ) -> Session:
        """A session an earlier service process left, with its adopted kernel (or None and
        why its kernel is gone)."""
        totals = await self._stored().session_totals(record.key)
        kind = self.catalog.kind(record.kernel_name)
        session = self._session(record.session_id, record.owner, kernel, record.work_dir,
                                kind=kind, language=record.language,
                                restored=Restored(record, totals, lost))  # fmt: skip
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
        *,
        kind: KernelKind,
        language: str,
        restored: Restored | None = None,
    ) -> Session:
        services = SessionServices(
            settings=self._settings,
            store=self._stored(),
            metrics=self.metrics,
            workspaces=self.workspaces,
            start_kernel=self._replace_kernel,
        )
        return Session(
            session_id,
            owner=owner,
            kernel=kernel,
            work_dir=work_dir,
            services=services,
            kind=kind,
            language=language,
            restored=restored,
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
