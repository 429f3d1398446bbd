"""Carrying on where an earlier service process stopped: its sessions and kernels adopted
from the state store, and whatever else it left behind removed.

A session's kernel is adopted when its process is still the one recorded, its connection
file is the one it was started with, and it answers kernel_info; its variables are then
all there. Otherwise the kernel is ended and the session kept, with its work directory:
its next execution starts a new kernel and says that earlier state is gone. Kernels that
belong to no session (a warm pool's) are ended. An execution that was running when the
service stopped is marked `lost` in the history, and its session's next execution says so.
"""

import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass, replace
from datetime import datetime
from functools import partial
from pathlib import Path

import psutil

from kernel_service.execution.results import STATE_LOST
from kernel_service.kernel import Kernel, KernelKind, KernelLauncher, KernelOptions
from kernel_service.kernel.launcher import AdoptionError
from kernel_service.kernel.programs.reaper import end_kernel
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.store.records import KernelRecord, SessionRecord
from kernel_service.store.state import StateStore
from kernel_service.workdir.workspaces import Workspaces

log = logging.getLogger(__name__)

# What forked kernels' processes are called (see kernel/programs/zygote.py); the zygote is not one.
_KERNEL_NAMES = ("ks-sandbox", "ks-init", "ks-kernel")


@dataclass(frozen=True)
class Recovered:
    sessions: int  # sessions carried on
    adopted: int  # of which with their kernel (and its state)
    kernels_ended: int  # recorded kernels that could not be adopted or had no session


async def recover(
    store: StateStore,
    registry: SessionRegistry,
    launcher: KernelLauncher,
    options: KernelOptions,
    workspaces: Workspaces,
) -> Recovered:
    """Adopt what the store records; end and remove what cannot be carried on."""
    kernels = {record.kernel_id: record for record in store.kernels()}
    sessions = store.sessions()
    cut_short = {key: (seq, started) for key, seq, started in store.executions_cut_short()}
    reaped = store.meta("reaped")
    wanted = {s.kernel_id: s for s in sessions if s.kernel_id in kernels}
    outcomes = await asyncio.gather(
        *(
            _adopt(kernels[kernel_id], launcher, options, registry.catalog.kind(s.kernel_name))
            for kernel_id, s in wanted.items()
        )
    )
    adopted: dict[str, Kernel] = {}
    reasons: dict[str, str] = {}
    for kernel_id, outcome in zip(wanted, outcomes, strict=True):
        if isinstance(outcome, Kernel):
            adopted[kernel_id] = outcome
            outcome.process.on_exit(partial(_forget, store, kernel_id))
        else:
            reasons[kernel_id] = outcome
    unadopted = [record for kernel_id, record in kernels.items() if kernel_id not in adopted]
    ended = sum(await asyncio.to_thread(lambda: [_end(record) for record in unadopted]))
    for record in unadopted:
        store.remove_kernel(record.kernel_id)
    for recorded in sessions:
        kernel = adopted.get(recorded.kernel_id or "")
        lost = None if kernel else _lost_words(recorded, reasons, reaped)
        session = recorded
        if recorded.key in cut_short:
            notice = _cut_short_words(*cut_short[recorded.key], kept=kernel is not None)
            session = replace(recorded, notice="\n".join(filter(None, (recorded.notice, notice))))
        await workspaces.restore(session.work_dir)
        await registry.restore(session, kernel, lost)
        log.info(
            "session %s carried on %s",
            session.session_id,
            f"with its kernel {kernel.kernel_id}" if kernel else f"without its kernel: {lost}",
        )
    await asyncio.to_thread(_sweep, options.connection_dir, list(adopted.values()))
    return Recovered(len(sessions), len(adopted), ended)


async def _adopt(
    record: KernelRecord, launcher: KernelLauncher, options: KernelOptions, kind: KernelKind
) -> Kernel | str:
    """The adopted kernel (of `kind`), or why it could not be adopted."""
    try:
        return await Kernel.adopt(record, launcher, options, kind)
    except AdoptionError as exc:
        log.warning("kernel %s not adopted: %s", record.kernel_id, exc)
        return str(exc)


def _forget(store: StateStore, kernel_id: str, _returncode: int) -> None:
    store.remove_kernel(kernel_id)


def _end(record: KernelRecord) -> bool:
    """End a recorded kernel that is not adopted (as the reaper does); whether it ran."""
    return end_kernel(record.pid, record.start_ticks, record.directory, record.cgroup)


def _lost_words(record: SessionRecord, reasons: dict[str, str], reaped: str | None) -> str:
    if record.kernel_id is None:
        why = "it had no kernel when the service stopped"
    elif record.kernel_id in reasons:
        why = (
            "its kernel could not be taken over after the service restarted: "
            f"{reasons[record.kernel_id]}"
        )
    elif reaped is not None:
        why = (
            f"its kernel was ended when the service had been gone for {reaped} s "
            "(the orphan timeout), or it had ended before"
        )
    else:
        why = "its kernel had ended while the service was stopped"
    why = why.rstrip(".")  # a reason may end a sentence of its own ("... within 5 s.")
    return f"KernelDied: {why[0].upper()}{why[1:]}. {STATE_LOST}"


def _cut_short_words(seq: int, started: datetime, kept: bool) -> str:
    when = started.strftime("%Y-%m-%d %H:%M:%S UTC")
    after = (
        "The kernel went on running it: what it printed or returned after that was not "
        "collected, but what it assigned is in the kernel."
        if kept
        else "It is not known how far it got."
    )
    return (
        f"ServiceRestarted: The service was restarted while execution #{seq} (started "
        f"{when}) ran. {after}"
    )


def _sweep(connection_dir: Path, adopted: list[Kernel]) -> None:
    """End kernel processes of this connection directory that are no adopted kernel (nor
    anything one started), then remove its directories that no adopted kernel uses.

    They are what a service killed between starting a kernel and recording it leaves.
    """
    keep: set[int] = set()
    for kernel in adopted:
        keep.add(kernel.process.pid)
        with contextlib.suppress(psutil.Error):
            keep.update(p.pid for p in psutil.Process(kernel.process.pid).children(recursive=True))
    where = str(connection_dir)
    for process in psutil.process_iter(["name", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.pid in keep or not any(where in part for part in cmdline):
            continue
        kernel_like = process.info["name"] in _KERNEL_NAMES or any(
            part == "ipykernel_launcher" or Path(part).name == "bwrap" for part in cmdline[:8]
        )
        if kernel_like:
            with contextlib.suppress(psutil.Error):
                process.kill()
                log.info("ended a stray kernel process %d", process.pid)
    in_use = {kernel.files.directory for kernel in adopted}
    for directory in connection_dir.glob("k-*"):
        if directory.is_dir() and directory not in in_use:
            shutil.rmtree(directory, ignore_errors=True)
