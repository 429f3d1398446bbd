"""A kernel's files on the host: its directory, with its connection file and ZMQ ipc sockets.

The connection file says `"transport": "ipc"`: the kernel and the service meet on Unix
sockets in the kernel's own directory, which a sandbox can bind-mount as the only way
out. Nothing listens on a TCP port.
"""

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.connect import write_connection_file

# What must match between a kernel's record and its connection file to adopt it.
_CONNECTION_KEYS = (
    "transport", "ip", "key", "signature_scheme",
    "shell_port", "iopub_port", "stdin_port", "control_port", "hb_port",
)  # fmt: skip
# A Unix socket path must fit in sun_path (108 bytes with its NUL).
_MAX_SOCKET_PATH = 100


@dataclass(frozen=True)
class KernelFiles:
    directory: Path  # 0700: connection.json and the ipc sockets s-1 … s-5
    # What the connection file says, kept here: the service never reads back a file the
    # kernel could have rewritten.
    connection_info: dict[str, Any]

    @property
    def connection_file(self) -> Path:
        return self.directory / "connection.json"

    @classmethod
    def create(cls, connection_dir: Path, kernel_id: str) -> "KernelFiles":
        """A fresh directory with a connection file (0600) for one kernel."""
        directory = connection_dir / f"k-{kernel_id}"
        socket_base = directory / "s"
        if len(str(socket_base)) + 3 > _MAX_SOCKET_PATH:
            raise ValueError(
                f"the connection directory {connection_dir} is too long a path for Unix "
                f"sockets (at most {_MAX_SOCKET_PATH - 20} characters): choose a shorter one"
            )
        directory.mkdir(mode=0o700, parents=True)
        _, info = write_connection_file(
            str(directory / "connection.json"),
            transport="ipc",
            ip=str(socket_base),
            key=uuid.uuid4().hex.encode(),
        )
        return cls(directory, dict(info))

    @classmethod
    def recorded(cls, directory: Path, connection: dict[str, Any]) -> "KernelFiles":
        """The files of a kernel started with `connection` (an earlier service process's),
        checked against its connection file. Raises ValueError saying what is wrong."""
        try:
            on_disk = json.loads((directory / "connection.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"its connection file is missing or unreadable ({exc})") from exc
        if not isinstance(on_disk, dict) or any(
            on_disk.get(k) != connection.get(k) for k in _CONNECTION_KEYS
        ):
            raise ValueError("its connection file is not the one it was started with")
        return cls(directory, connection)

    def lock(self) -> None:
        """Take the directory back from the kernel once its sockets are bound.

        A kernel that owns it could swap a socket for a symlink elsewhere, and the service
        (root, outside every namespace) would follow it when ZMQ reconnects.
        """
        os.chown(self.directory, 0, 0)
        os.chmod(self.directory, 0o711)
        connection_file = self.connection_file
        os.chown(connection_file, 0, 0, follow_symlinks=False)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
