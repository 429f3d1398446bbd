"""The service's three channels to one kernel (shell, iopub, control): Jupyter messages,
signed and checked (`messages.py`), over our own bounded ZMTP sockets (`wire.py` says why
not libzmq's)."""

import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from kernel_service.kernel.messages import BadMessage, MessageCodec
from kernel_service.kernel.wire import KernelSocket, SocketType

log = logging.getLogger(__name__)

Channel = Literal["shell", "iopub", "control"]
_SOCKET_TYPES: dict[Channel, SocketType] = {
    "shell": "DEALER",
    "iopub": "SUB",
    "control": "DEALER",
}
# Told of each message from the kernel, deserialised (header, parent_header, content...).
OnKernelMessage = Callable[[dict[str, Any]], None]
# Told that a message was refused on a channel (too large: it and what followed are lost).
OnRefused = Callable[[Channel, str], None]


class KernelChannels:
    def __init__(
        self,
        connection_info: dict[str, Any],
        max_message_bytes: int,
        on_message: OnKernelMessage,
        on_refused: OnRefused,
    ) -> None:
        key = connection_info["key"]
        self._codec = MessageCodec(
            key if isinstance(key, bytes) else str(key).encode(),
            connection_info.get("signature_scheme", "hmac-sha256"),
        )
        self._on_message = on_message
        self._bad_messages = 0
        base = connection_info["ip"]
        self._sockets: dict[Channel, KernelSocket] = {
            channel: KernelSocket(
                f"{base}-{connection_info[f'{channel}_port']}",
                socket_type,
                max_message_bytes,
                self._receive,
                lambda reason, channel=channel: on_refused(channel, reason),  # type: ignore[misc]
            )
            for channel, socket_type in _SOCKET_TYPES.items()
        }

    def start(self) -> None:
        for socket in self._sockets.values():
            socket.start()

    def close(self) -> None:
        for socket in self._sockets.values():
            socket.close()

    @property
    def refused(self) -> int:
        """Messages refused so far, on every channel."""
        return sum(socket.refused for socket in self._sockets.values())

    def send(
        self,
        channel: Channel,
        msg_type: str,
        content: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> str:
        """Send a request; its msg_id (replies and outputs name it as their parent)."""
        msg_id, frames = self._codec.request(msg_type, content, metadata, buffers)
        self._sockets[channel].send(frames)
        return msg_id

    def _receive(self, frames: list[bytes]) -> None:
        try:
            msg = self._codec.read(frames)
        except BadMessage:  # malformed, unsigned, replayed: dropped, whatever user code sent
            self._bad_messages += 1
            if self._bad_messages & (self._bad_messages - 1) == 0:  # 1, 2, 4, 8, ...
                log.warning("%d unreadable messages from a kernel", self._bad_messages)
            return
        self._on_message(msg)
