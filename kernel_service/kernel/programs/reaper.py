"""The orphan reaper: ends the kernels of a service process that is gone for good.

Kernels outlive the service that started them, so that the next start can adopt them (see
`kernel/launcher.py`). Each service process starts one reaper, in a session of its own, as
`python -I reaper.py STATE_DIR SERVICE_PID TIMEOUT DATABASE LOCK` (DATABASE and LOCK: the
names of the state store's database and lock file in STATE_DIR). It waits for the service
to end:

- a clean stop (the service ended its kernels and says so in the state database): it exits;
- a crash, or a stop that kept the kernels: it waits up to TIMEOUT seconds for a service
  to take the state directory's lock again, and exits if one does (that service adopts the
  kernels and has a reaper of its own); if none does, it takes the lock, kills every kernel
  recorded in the database (each checked by its start time, with everything it started),
  removes their connection directories and cgroups and records, and exits.

Sessions and their work directories stay for the next start, which tells each session's
next execution that its kernel was ended. It runs as a file and imports only the standard
library and psutil: it lives as long as the service, so it should cost little memory. The
service imports its cgroup and process helpers from here, so both remove cgroups alike.
"""

import contextlib
import ctypes
import fcntl
import os
import select
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil

PR_SET_NAME = 15
NAME = b"ks-reaper"
CGROUP_ROOT = Path("/sys/fs/cgroup")  # cgroup v1: one hierarchy per controller below it
CONTROLLERS = ("memory", "pids", "cpu")  # the ones a kernel gets a group in


def main() -> None:
    state_dir, service_pid, timeout = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    state = _State(state_dir / sys.argv[4], state_dir / sys.argv[5])
    ctypes.CDLL(None).prctl(PR_SET_NAME, ctypes.c_char_p(NAME), 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C in the service's terminal
    _wait_for_exit(service_pid)
    if _meta(state, "stopped") == "clean":
        return
    # read now: no kernel is started while no service runs, and the directory may be gone
    # (removed by hand) by the deadline, the kernels still running
    kernels = _kernels(state)
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if _service_running(state):
            return
        time.sleep(min(remaining, 0.5))
    with _locked(state) as locked:
        # none came back in time; unless one did at the last moment, or it was a later
        # service (with a reaper of its own) that stopped
        if locked and _meta(state, "service_pid") in (str(service_pid), None):
            _reap(state, kernels, timeout)


class _State(NamedTuple):
    """The state store's database and lock file."""

    database: Path
    lock: Path


def _wait_for_exit(pid: int) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # gone already
    select.select([pidfd], [], [])
    os.close(pidfd)


def _meta(state: _State, name: str) -> str | None:
    with contextlib.suppress(sqlite3.Error), _database(state) as db:
        row = db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None
    return None


Kernel = tuple[str, int, int, str, str | None]  # id, pid, start ticks, directory, cgroup


def _kernels(state: _State) -> list[Kernel]:
    with contextlib.suppress(sqlite3.Error), _database(state) as db:
        query = "SELECT kernel_id, pid, start_ticks, directory, cgroup FROM kernels"
        return [tuple(row) for row in db.execute(query).fetchall()]
    return []


@contextlib.contextmanager
def _database(state: _State):  # type: ignore[no-untyped-def]
    # read-write but never created: a missing database is an error, not a new empty one
    uri = f"{state.database.as_uri()}?mode=rw"
    db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10)
    try:
        yield db
    finally:
        db.close()


def _service_running(state: _State) -> bool:
    """Whether a service holds the state directory's lock."""
    with _locked(state) as locked:
        return not locked


@contextlib.contextmanager
def _locked(state: _State):  # type: ignore[no-untyped-def]
    """The state directory's lock if it is free (True), else False; released at the end.
    A lock file or directory that is gone is free: no service can hold it (and it is not
    made again: the directory may be being removed)."""
    try:
        fd = os.open(state.lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _reap(state: _State, kernels: list[Kernel], timeout: float) -> None:
    """End the kernels, remove their files and cgroups, then their records (if the
    database is still there)."""
    for _, pid, ticks, directory, cgroup in kernels:
        end_kernel(pid, ticks, Path(directory), Path(cgroup) if cgroup else None)
    with contextlib.suppress(sqlite3.Error), _database(state) as db:
        for kernel_id, *_ in kernels:
            db.execute("DELETE FROM kernels WHERE kernel_id = ?", (kernel_id,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('reaped', ?)", (f"{timeout:g}",))
    print(f"kernel-service reaper: the service did not come back in {timeout:g} s; its "
          "kernels were ended", file=sys.stderr)  # fmt: skip


def end_kernel(pid: int, ticks: int, directory: Path, cgroup: Path | None) -> bool:
    """End a recorded kernel: kill it, if it is still the process recorded, with all it
    started and all left in its cgroup; wait until they are gone (their uid is free for
    another kernel only then); remove its connection directory and cgroup. Whether it ran.
    """
    running = start_ticks(pid) == ticks
    victims: list[psutil.Process] = []
    if running:
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            victims = [*process.children(recursive=True), process]
    if cgroup is not None:  # what left its process tree, if it kept to its cgroup
        with contextlib.suppress(OSError, ValueError):
            for member in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(psutil.Error):
                    victims.append(psutil.Process(int(member)))
    for victim in victims:
        with contextlib.suppress(psutil.Error):
            victim.kill()
    psutil.wait_procs(victims, timeout=5)
    shutil.rmtree(directory, ignore_errors=True)
    if cgroup is not None:
        _remove_cgroup(cgroup)
    return running


def _remove_cgroup(group: Path) -> None:
    for _ in range(100):  # the last processes take a moment to leave
        done, removed = remove_cgroups_once(group)
        for member in removed:
            with contextlib.suppress(OSError):  # the dead service's own group, once empty
                member.parent.rmdir()
        if done:
            return
        time.sleep(0.05)


def remove_cgroups_once(group: Path) -> tuple[bool, list[Path]]:
    """One try at removing a kernel's cgroups (see `cgroups_of`): whether none is left, and
    those this try removed."""
    done, removed = True, []
    for member in cgroups_of(group):
        try:
            member.rmdir()
        except FileNotFoundError:
            continue
        except OSError:  # processes are still leaving it
            done = False
            continue
        removed.append(member)
    return done, removed


def cgroups_of(group: Path) -> list[Path]:
    """A kernel's cgroups: the one recorded (its memory cgroup, where there is one) and its
    namesakes in the other controllers. Each is `<controller>/<the service's own group>/
    kernel-service-<pid>-<tag>/<kernel>`, so they are found under this process's own groups
    (a reaper's are its service's; a service started again runs where it ran before)."""
    groups = [group]
    tail = group.relative_to(group.parent.parent)
    for controller, own in own_cgroups().items():
        namesake = CGROUP_ROOT / controller / own.lstrip("/") / tail
        if controller in CONTROLLERS and namesake != group and namesake.is_dir():
            groups.append(namesake)
    return groups


def start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (it tells a reused pid apart);
    None if there is no such process or it has ended (a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def own_cgroups() -> dict[str, str]:
    """This process's group in each cgroup v1 controller (`/proc/self/cgroup`)."""
    groups = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller:
                    groups[controller] = path
    return groups


if __name__ == "__main__":
    main()
