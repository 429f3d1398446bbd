"""Directories one service process holds alone: an exclusive lock, and the refusal when
another process has it."""

import fcntl
import os
import time
from pathlib import Path


class DirectoryInUse(Exception):
    """Another service process holds one of the directories; the message says which."""


def lock_directory(directory: Path, name: str | None = None, wait: float = 0.0) -> int:
    """An exclusive lock on `directory` (on the directory itself, or on a file `name` in
    it), held until the returned fd is closed; raises DirectoryInUse if another process
    holds it for `wait` seconds."""
    if name is None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        fd = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DirectoryInUse(
                    f"another kernel-service process uses {directory}: each service needs a "
                    "state, connection and work directory of its own"
                ) from None
            time.sleep(0.1)
            continue
        return fd
