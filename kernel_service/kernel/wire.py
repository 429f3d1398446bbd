"""ZMTP 3.0, ZeroMQ's wire protocol, for the service's end of a kernel's sockets.

Written here rather than taken from libzmq because libzmq cannot bound what a peer sends:
ZMQ_MAXMSGSIZE limits each frame, but every frame of a multipart message is buffered until
the last one arrives, so a kernel could make the service hold any amount of memory (600
frames of 0.9 MiB, sent from one 0.9 MiB buffer, took a receiver to 548 MiB). Here a
message is counted as its frame headers arrive, and one over the limit closes the
connection at once, before its bytes are read: refusing it costs nothing. The connection
is then made anew; what the kernel sent meanwhile is lost, and the owner of the socket is
told (`on_refused`), so an answer never claims output it did not get.

Only what talking to a kernel needs: Unix sockets (the ipc transport), the NULL mechanism,
SUB and DEALER sockets, and reconnection. Messages are handed over as lists of frames,
inside `data_received`: nothing is queued on the way in, and one kernel's read is at most
one chunk per turn of the event loop, so a flooding kernel cannot starve the others.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Literal, cast

log = logging.getLogger(__name__)

SocketType = Literal["SUB", "DEALER"]
# Told of each message a socket receives, as its frames.
OnMessage = Callable[[list[bytes]], None]
# Told why a message was refused (its connection closed and made anew).
OnRefused = Callable[[str], None]

_SIGNATURE_END = 9  # the greeting: 0xFF, 8 bytes of padding, 0x7F, then the version
_GREETING_SIZE = 64
# version 3.0 (subscriptions are messages), NULL mechanism, as the client
GREETING = b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32)
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_MAX_COMMAND = 64 * 1024
# A Jupyter message is identities, a delimiter, a signature, four JSON parts and buffers:
# the service uses none of the buffers (widgets' binary data), so a few suffice.
MAX_FRAMES = 32
# Between tries to connect: a new kernel binds its sockets a few ms to a few hundred ms after
# its launch, so at first often (libzmq's pace); after a second, rarely (a kernel gone).
_RECONNECT_SOON, _RECONNECT_LATER, _SOON_TRIES = 0.01, 0.2, 100
# Messages sent before the kernel accepts a connection, kept for it (ours only: few).
_MAX_PENDING = 64


class _Refused(Exception):
    """The peer broke the protocol or a limit; the connection is closed."""


def _command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes([len(name)]) + name + body
    return _frame_head(len(data), _COMMAND) + data


def _frame_head(size: int, flags: int) -> bytes:
    if size > 255:
        return bytes([flags | _LONG]) + size.to_bytes(8, "big")
    return bytes([flags, size])


def _ready(socket_type: SocketType) -> bytes:
    name, value = b"Socket-Type", socket_type.encode()
    return _command(b"READY", bytes([len(name)]) + name + len(value).to_bytes(4, "big") + value)


def _copy(buffer: bytes | bytearray, start: int, end: int) -> bytes:
    """`buffer[start:end]` as bytes, copied once."""
    if isinstance(buffer, bytes):
        return buffer[start:end]
    with memoryview(buffer) as view:
        return bytes(view[start:end])


class _Connection(asyncio.Protocol):
    """One connection's handshake and frame parsing, within the message limit."""

    def __init__(self, owner: "KernelSocket") -> None:
        self._owner = owner
        self._buffer = bytearray()
        self._greeted = self._ready = False
        self._parts: list[bytes] = []
        self._message_size = 0
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(GREETING)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._lost(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        # Most reads hold whole messages: they are parsed where they are, and only what is
        # left of a message is kept for the next read.
        buffer: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        try:
            used = self._parse(buffer)
        except _Refused as exc:
            self._buffer.clear()
            self._owner._lost(self)  # what is sent from now waits for the next connection
            self._owner._refused(str(exc))
            if self.transport is not None:
                self.transport.abort()
            return
        if buffer is self._buffer:
            del self._buffer[:used]
        elif used < len(data):
            self._buffer += data[used:]

    def send(self, frames: list[bytes]) -> None:
        assert self.transport is not None
        last = len(frames) - 1
        chunks: list[bytes] = []
        for index, frame in enumerate(frames):
            chunks.append(_frame_head(len(frame), _MORE if index < last else 0))
            chunks.append(frame)
        self.transport.writelines(chunks)

    def _parse(self, buffer: bytes | bytearray) -> int:
        """Take every whole frame in `buffer`; how many bytes were used."""
        position = 0
        if not self._greeted:
            if len(buffer) < _GREETING_SIZE:
                return 0
            if buffer[0] != 0xFF or buffer[_SIGNATURE_END] != 0x7F or buffer[10] < 3:
                raise _Refused("the peer does not speak ZMTP 3")
            if bytes(buffer[12:32]).rstrip(b"\0") != b"NULL":
                raise _Refused("the peer asks for a security mechanism other than NULL")
            self._greeted = True
            position = _GREETING_SIZE
            assert self.transport is not None
            self.transport.write(_ready(self._owner.socket_type))
        limit = self._owner.max_message_bytes
        while True:
            if len(buffer) - position < 2:
                return position
            flags = buffer[position]
            if flags & _LONG:
                if len(buffer) - position < 9:
                    return position
                size = int.from_bytes(buffer[position + 1 : position + 9], "big")
                start = position + 9
            else:
                size = buffer[position + 1]
                start = position + 2
            if flags & _COMMAND:
                if size > _MAX_COMMAND:
                    raise _Refused(f"a command of {size:,} bytes")
            elif self._message_size + size > limit:
                raise _Refused(f"a message of more than {limit:,} bytes (a part of {size:,} bytes)")
            elif len(self._parts) >= MAX_FRAMES:
                raise _Refused(f"a message of more than {MAX_FRAMES} parts")
            if len(buffer) - start < size:
                return position  # checked above before its bytes arrive; taken when they have
            body = _copy(buffer, start, start + size)
            position = start + size
            if flags & _COMMAND:
                self._on_command(body)
            elif not self._ready:
                raise _Refused("a message before the handshake ended")
            else:
                self._parts.append(body)
                self._message_size += size
                if not flags & _MORE:
                    parts, self._parts, self._message_size = self._parts, [], 0
                    self._owner.on_message(parts)

    def _on_command(self, body: bytes) -> None:
        name = body[1 : 1 + body[0]] if body else b""
        if name == b"READY" and not self._ready:
            self._ready = True
            self._owner._opened(self)
        elif name == b"PING" and self.transport is not None:
            # PING: its TTL (2 bytes), then a context to echo in the PONG
            self.transport.write(_command(b"PONG", body[1 + len(name) + 2 :][:16]))
        elif not self._ready:
            raise _Refused(f"{name!r} before READY")


class KernelSocket:
    """The service's end of one of a kernel's sockets: connects (and reconnects) to the
    Unix socket at `path` as `socket_type`, hands each message to `on_message`, and refuses
    messages over `max_message_bytes` (see the module docstring)."""

    def __init__(
        self,
        path: str,
        socket_type: SocketType,
        max_message_bytes: int,
        on_message: OnMessage,
        on_refused: OnRefused,
    ) -> None:
        self.path = path
        self.socket_type = socket_type
        self.max_message_bytes = max_message_bytes
        self.on_message = on_message
        self._on_refused = on_refused
        self._open: _Connection | None = None
        self._pending: list[list[bytes]] = []
        self._task: asyncio.Task[None] | None = None
        self.refused = 0  # messages refused so far

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"zmtp-{self.socket_type}")

    def send(self, frames: list[bytes]) -> None:
        """Send one message now, or as soon as the kernel accepts a connection."""
        if self._open is not None:
            self._open.send(frames)
        elif len(self._pending) < _MAX_PENDING:
            self._pending.append(frames)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._open is not None and self._open.transport is not None:
            self._open.transport.abort()
        self._open = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        tries = 0
        while True:
            try:
                _, connection = await loop.create_unix_connection(
                    lambda: _Connection(self), self.path
                )
            except OSError:  # not bound yet, or gone
                tries += 1
                await asyncio.sleep(_RECONNECT_SOON if tries < _SOON_TRIES else _RECONNECT_LATER)
                continue
            try:
                await connection.closed
            except asyncio.CancelledError:
                if connection.transport is not None:
                    connection.transport.abort()
                raise
            tries = 0
            # a pause before the next connection, as libzmq makes: a kernel that sends a
            # message too large on every connection cannot keep the service reconnecting
            await asyncio.sleep(_RECONNECT_SOON)

    def _opened(self, connection: _Connection) -> None:
        self._open = connection
        if self.socket_type == "SUB":
            connection.send([b"\x01"])  # subscribe to everything (ZMTP 3.0: a message)
        pending, self._pending = self._pending, []
        for frames in pending:
            connection.send(frames)

    def _lost(self, connection: _Connection) -> None:
        if self._open is connection:
            self._open = None

    def _refused(self, reason: str) -> None:
        self.refused += 1
        log.debug("%s socket %s: refused %s", self.socket_type, self.path, reason)
        with contextlib.suppress(Exception):
            self._on_refused(reason)
