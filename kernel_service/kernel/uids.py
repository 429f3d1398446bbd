"""The uids a sandboxing service gives its kernels: a range claimed for the life of the
service process, so that any number of services can run on one host without setting.

Every range is claimed by a lock on bytes of one host-wide file, LOCK_FILE: the bytes
numbered as the range's uids, locked for writing (an open file description lock, taken
or refused by Linux in one step, so two services starting at once cannot both get
overlapping ranges). The lock goes with the service process, however it ends.

- Automatic (no KERNEL_SERVICE_SANDBOX_UID_BASE): the first free block of `count` uids
  from AUTO_BASE; a block some process already runs as is passed over (the kernels of a
  service that was killed, left for its next start). A service that restarts on the same
  state directory asks first for the range it had (the state store records it), so that
  it adopts its kernels inside its own range.
- Explicit: exactly that range; refused if another service holds any of its uids.
"""

import collections
import contextlib
import fcntl
import itertools
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

LOCK_DIR = Path("/run/kernel-service")
LOCK_FILE = LOCK_DIR / "uids.lock"
AUTO_BASE = 210000
MAX_UID = 2**31 - 2  # where the search for a free block ends
_ADVICE = (
    "give each service a range of its own, or leave KERNEL_SERVICE_SANDBOX_UID_BASE unset "
    "to have a free one claimed"
)


class UidRangeInUse(Exception):
    """No range could be claimed; the message says why and what to do."""


@dataclass(frozen=True)
class UidRange:
    first: int
    count: int

    @property
    def uids(self) -> range:
        return range(self.first, self.first + self.count)

    def __str__(self) -> str:
        return f"{self.first}-{self.first + self.count - 1}"

    @classmethod
    def parse(cls, text: str | None) -> "UidRange | None":
        """The range `str` wrote, or None (no text, or not one)."""
        if text:
            with contextlib.suppress(ValueError):
                first, last = (int(part) for part in text.split("-"))
                if first <= last:
                    return cls(first, last - first + 1)
        return None


class UidClaim:
    """A range held for this process until `release`."""

    def __init__(self, uids: UidRange, fd: int) -> None:
        self.range = uids
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the last reference to the description: the lock goes
            self._fd = None


def claim(
    count: int,
    first: int | None = None,
    earlier: UidRange | None = None,
    own: Iterable[int] = (),
) -> UidClaim:
    """Claim `count` uids from `first`, or (None) the first free block of them, preferring
    `earlier`. Uids in `own` (the recorded kernels of this service's state) do not make a
    range busy. Raises UidRangeInUse."""
    fd = _open_lock_file()
    try:
        foreign = uids_in_use() - set(own)  # uids that some other process runs as
        if first is not None:
            return _claim_exactly(fd, UidRange(first, count), foreign)
        blocks = (UidRange(base, count) for base in range(AUTO_BASE, MAX_UID - count, count))
        for candidate in itertools.chain([earlier] if earlier else [], blocks):
            if not any(uid in candidate.uids for uid in foreign) and _lock(fd, candidate):
                return UidClaim(candidate, fd)
        raise UidRangeInUse(f"no free block of {count} sandbox uids is left on this host")
    except BaseException:
        os.close(fd)
        raise


def _claim_exactly(fd: int, wanted: UidRange, foreign: set[int]) -> UidClaim:
    setting = "(KERNEL_SERVICE_SANDBOX_UID_BASE and _COUNT)"
    if not _lock(fd, wanted):
        raise UidRangeInUse(
            f"the sandbox uids {wanted} {setting} are claimed by another kernel-service on "
            f"this host; {_ADVICE}"
        )
    if busy := sorted(uid for uid in foreign if uid in wanted.uids):
        raise UidRangeInUse(
            f"processes already run as uid {busy[0]}, one of the sandbox uids {wanted} "
            f"{setting}; {_ADVICE}"
        )
    return UidClaim(wanted, fd)


def _open_lock_file() -> int:
    try:
        LOCK_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(LOCK_FILE, flags, 0o600)
    except OSError as exc:
        raise UidRangeInUse(
            f"{LOCK_FILE}, where uids are claimed, cannot be opened: {exc}"
        ) from None


def _lock(fd: int, uids: UidRange) -> bool:
    """Write-lock the bytes numbered as `uids` for this open file description, if none of
    them is locked by another; whether it was."""
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for an OFD lock), padding
    request = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, uids.first, uids.count, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another
        return False
    return True


def uids_in_use() -> set[int]:
    """The real uids of the host's processes (zombies hold nothing)."""
    uids = set()
    for process in psutil.process_iter(["uids", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        with contextlib.suppress(TypeError):
            uids.add(process.info["uids"].real)
    return uids


class UidPool:
    """Uids for kernels, one per live kernel, so per-uid limits and files are theirs alone.

    A uid given back is taken again last: the processes of a killed kernel take a moment to
    be reaped, and until then they still count against RLIMIT_NPROC for their uid.
    """

    def __init__(self, first: int, count: int) -> None:
        self._range = range(first, first + count)
        self._free = collections.deque(self._range)
        self._taken: set[int] = set()

    def in_use_on_host(self) -> list[int]:
        """Uids of the range that some process on the host runs as."""
        return sorted(uid for uid in uids_in_use() if uid in self._range)

    def take(self) -> int:
        if not self._free:
            raise OSError("no free sandbox uid left: raise KERNEL_SERVICE_SANDBOX_UID_COUNT")
        uid = self._free.popleft()
        self._taken.add(uid)
        return uid

    def reserve(self, uid: int) -> None:
        """Take this uid (an adopted kernel's), if it is of the range."""
        if uid in self._range and uid not in self._taken:
            self._free.remove(uid)
            self._taken.add(uid)

    def in_use_by_others(self) -> list[int]:
        """Uids of the range that processes run as, other than the ones taken here."""
        return [uid for uid in self.in_use_on_host() if uid not in self._taken]

    def give_back(self, uid: int) -> None:
        if uid in self._taken:
            self._taken.discard(uid)
            self._free.append(uid)
