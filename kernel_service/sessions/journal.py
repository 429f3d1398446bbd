"""A session's execution journal: each execution written to the state store as it starts
and as it ends, within the history's byte budget (the oldest results dropped past it)."""

import asyncio
import logging
from datetime import datetime

from kernel_service.errors import StateFull
from kernel_service.store.records import ExecutionRecord, SessionTotals
from kernel_service.store.state import SMALL_WRITE, StateStore
from kernel_service_client.models import ExecutionResult

log = logging.getLogger(__name__)

# A result's JSON against its outputs' size: they are in it as outputs and as text, escaped.
_JSON_GROWTH = 3


class ExecutionJournal:
    """Numbers a session's executions and records them; every write runs on the store's
    thread, in turn (the result's JSON is made there too: it can be 32 MiB)."""

    def __init__(
        self, session_id: str, key: str, store: StateStore, room: int, totals: SessionTotals
    ) -> None:
        """`room`: bytes of results kept; `totals`: where a restored session stands."""
        self._session_id = session_id
        self._key = key
        self._store = store
        self._room = room
        self._seq = totals.last_seq
        self._result_bytes = totals.result_bytes  # used in the store's jobs only, one at a time

    async def begin(self, code: str) -> int:
        """Record an execution about to run; its number. Raises StateFull: then it must
        not run."""
        seq = self._seq + 1
        try:
            await self._store.execution_started(self._key, seq, code)
        except asyncio.CancelledError:
            # the write was handed over and happens anyway: its number is taken
            self._seq = seq
            self.cut_short(seq, cancelled=True)
            raise
        self._seq = seq
        return seq

    def cut_short(self, seq: int, cancelled: bool) -> None:
        """It ended with no result: cancelled (client gone, service stopping) or failed.
        Handed over without waiting, so that a cancelled caller records it too."""
        self._store.execution_cut_short(self._key, seq, "cancelled" if cancelled else "failed")

    async def end(
        self,
        seq: int,
        result: ExecutionResult,
        last_activity: datetime,
        execution_count: int,
        output_bytes: int,
    ) -> str | None:
        """Its result, and the session's last use; the result's JSON as stored (made once,
        for the answer too), None when the write failed. A failure to write is logged, not
        raised: the code has run and its caller gets the result (a later service process
        reports this execution as lost). Cancelling the wait leaves the write to happen.
        `output_bytes`: what its outputs hold; a result of little output is written on
        the event loop when that need not wait (its JSON is made there too)."""

        def write() -> str:
            stored = result.model_dump_json()
            try:
                self._store.execution_ended_now(
                    self._key,
                    seq,
                    result.status,
                    duration_ms=result.duration_ms,
                    execution_count=result.execution_count,
                    result=stored,
                )
                self._store.session_used_now(self._key, last_activity, execution_count)
                self._result_bytes += len(stored)
                if self._result_bytes > self._room:
                    over = self._result_bytes - self._room
                    self._result_bytes -= self._store.drop_oldest_results_now(self._key, over)
            except StateFull as exc:
                log.error("session %s: execution %d not recorded: %s", self._session_id, seq, exc)
            return stored

        kept = self._result_bytes
        try:
            return await self._store.hand_over(
                write, small=output_bytes * _JSON_GROWTH <= SMALL_WRITE
            )
        except StateFull as exc:  # made in place, it first met the disk at its commit
            self._result_bytes = kept
            log.error("session %s: execution %d not recorded: %s", self._session_id, seq, exc)
            return None

    async def history(self, since: int, limit: int | None) -> list[ExecutionRecord]:
        return await self._store.executions(self._key, since, limit)
