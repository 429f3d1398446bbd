"""The HTTP edge: uvicorn configured for the service, and guarded before any key is checked.

uvicorn's httptools protocol reads a request head of any size for as long as the client
likes, and keeps every connection the kernel hands it. `GuardedHttpProtocol` adds three
limits, shared by `kernel-service serve` and the tests' servers through `uvicorn_config`:

- a head (request line and headers) over `max_head_bytes` gets 431 and the connection is
  closed; the parser is never fed past the limit;
- a head not complete within `head_timeout` seconds of the connection's start (or of its
  first byte on a kept-alive connection) is dropped; so is a connection whose request was
  answered early (401, 413) and whose body still comes after that time;
- at most `max_connections` are open. At the cap a new connection takes the place of the
  one that has waited longest on an unfinished head; when none is waiting, the new one
  gets 503 and is closed at once.

Idle kept-alive connections are closed after `keep_alive_timeout` (uvicorn's own timer).
"""

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections import OrderedDict
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kernel_service.config import Settings

logger = logging.getLogger(__name__)

# File descriptors the service keeps for itself apart from HTTP connections: its state
# store, logs, the fork-server's pipes, libraries...
_BASE_FILES = 128
# ... and per kernel (a session's or the pool's): its three channel sockets, its pidfd and
# what its launch holds (7 measured with libzmq's sockets, fewer now), with room for uploads
# and downloads under way.
_FILES_PER_KERNEL = 16


def connection_cap(settings: Settings, open_file_limit: int | None = None) -> int:
    """Open HTTP connections at most: the setting, or what the process's open-file limit
    leaves once every kernel the service may hold has its files; never less than a quarter
    of the limit, so HTTP keeps a share when max_sessions is large for the limit."""
    if settings.max_connections:
        return settings.max_connections
    if open_file_limit is None:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_file_limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    kernels = (
        settings.max_sessions + settings.pool_size + sum(settings.language_pool_sizes().values())
    )
    reserved = _BASE_FILES + _FILES_PER_KERNEL * kernels
    return max(open_file_limit - reserved, open_file_limit // 4)


def _error(status: int, reason: str, code: str, detail: str) -> bytes:
    """A whole response as the routes give errors (JSON), after which the connection ends."""
    body = json.dumps({"detail": detail, "code": code}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


_HEAD_TOO_LARGE = _error(
    431,
    "Request Header Fields Too Large",
    "head_too_large",
    "The request line and headers are too large (KERNEL_SERVICE_MAX_HEAD_BYTES).",
)
_TOO_MANY_CONNECTIONS = _error(
    503,
    "Service Unavailable",
    "too_many_connections",
    "Too many open connections (KERNEL_SERVICE_MAX_CONNECTIONS); try again shortly.",
)


class Edge:
    """The limits of one server, and its connections that wait on an unfinished head: one
    timer for them all, set for the one that has waited longest."""

    def __init__(self, max_head_bytes: int, head_timeout: float, max_connections: int) -> None:
        self.max_head_bytes = max_head_bytes
        self.head_timeout = head_timeout
        self.max_connections = max_connections
        # each waiting connection → the loop time it began to wait; the longest first
        self.waiting: OrderedDict[GuardedHttpProtocol, float] = OrderedDict()
        self._sweep: asyncio.TimerHandle | None = None
        self.refused = 0
        self._warned_at = -float("inf")

    def wait(self, protocol: "GuardedHttpProtocol") -> None:
        """`protocol` waits on a head from now on (unless it already does)."""
        if protocol not in self.waiting:
            self.waiting[protocol] = protocol.loop.time()
            if self._sweep is None:
                self._sweep = protocol.loop.call_later(self.head_timeout, self._drop_late)

    def done(self, protocol: "GuardedHttpProtocol") -> None:
        self.waiting.pop(protocol, None)

    def _drop_late(self) -> None:
        self._sweep = None
        while self.waiting:
            oldest, since = next(iter(self.waiting.items()))
            if oldest.loop.time() < since + self.head_timeout:
                self._sweep = oldest.loop.call_at(since + self.head_timeout, self._drop_late)
                return
            oldest.drop()

    def make_room(self) -> bool:
        """Drop the connection that has waited longest on its head; false if none waits."""
        if not self.waiting:
            return False
        next(iter(self.waiting)).drop()
        return True

    def note_refused(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= 60:  # one line a minute at most, however many
            self._warned_at = now
            logger.warning(
                "refusing HTTP connections over the cap of %d (KERNEL_SERVICE_MAX_CONNECTIONS), "
                "%d so far",
                self.max_connections,
                self.refused,
            )


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the edge's limits on heads and connections."""

    edge: ClassVar[Edge]  # set on the subclass `guarded_protocol` makes for a server

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._refused = False
        self._in_head = True  # the bytes that come now are a request head
        self._head_bytes = 0
        if len(self.connections) >= self.edge.max_connections and not self.edge.make_room():
            self._refused = True
            self.edge.note_refused()
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        super().connection_made(transport)
        self._wait_for_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self.edge.done(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # The parser keeps a head in memory (and copies it, header by header): feed it no
        # more of one than the limit allows. (A head that starts in the same read as the
        # previous request ends may pass the limit by up to that read's size.)
        while self._in_head and len(data) > self.edge.max_head_bytes - self._head_bytes:
            room = self.edge.max_head_bytes - self._head_bytes
            if room == 0:
                self._close_with(_HEAD_TOO_LARGE)
                return
            self._head_bytes += room
            super().data_received(data[:room])
            data = data[room:]
            if self.transport.is_closing():
                return
        if self._in_head:
            self._head_bytes += len(data)
        if data:
            super().data_received(data)

    # parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._wait_for_head()  # a later request on a kept-alive connection: from its start

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.edge.done(self)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        closing = self.transport.is_closing()
        if self.cycle.response_complete and self.cycle.more_body and not closing:
            # Answered before its body was all sent (a 401, a 413): uvicorn reads the rest
            # for nothing. It gets the time of a head to come, with the next head.
            self._wait_for_head()

    # the limits

    def _wait_for_head(self) -> None:
        """The connection serves no request now: it has head_timeout to bring one, and
        a newer connection may take its place at the cap."""
        self.edge.wait(self)

    def drop(self) -> None:
        """Close a connection whose head is late (or whose place a newer one takes)."""
        self.edge.done(self)
        self.transport.close()

    def _close_with(self, response: bytes) -> None:
        self.edge.done(self)
        if self.cycle is None or self.cycle.response_complete:  # not inside another answer
            self.transport.write(response)
        self.transport.close()


def guarded_protocol(edge: Edge) -> type[GuardedHttpProtocol]:
    """The protocol class for one server: its connections share `edge`."""
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"edge": edge})


def uvicorn_config(app: Any, settings: Settings, **extra: Any) -> uvicorn.Config:
    """How the service runs under uvicorn, for `kernel-service serve` and the tests alike;
    `extra` adds uvicorn options of the caller's own."""
    edge = Edge(settings.max_head_bytes, settings.head_timeout, connection_cap(settings))
    logger.info(
        "HTTP edge: heads up to %d bytes within %g s, %d connections at most, idle keep-alive %g s",
        edge.max_head_bytes,
        edge.head_timeout,
        edge.max_connections,
        settings.keep_alive_timeout,
    )
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(edge),
        timeout_keep_alive=settings.keep_alive_timeout,
        lifespan="on",
        log_level=settings.log_level.lower(),
        # a line per HTTP request costs the hot path ~0.2 ms; executions log their own line
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=5,
        # a Jupyter client's message carries code as a request body does: the same room
        # (larger messages close the socket with 1009, "message too big")
        ws_max_size=settings.max_code_bytes * 6 + 64 * 1024,
        **extra,
    )


def serve(app: Any, settings: Settings) -> bool:
    """Run `app` under uvicorn until it is stopped (SIGTERM, SIGINT); whether it started."""
    server = uvicorn.Server(uvicorn_config(app, settings))
    # Once the app has started, what exists then (the imported modules, classes and
    # functions, what the start made: most of the heap) is kept out of the cyclic garbage
    # collector's passes, which would otherwise walk it all each time, holding the event
    # loop 60-150 ms under load (app.py's lifespan does it). Only here, where the process
    # is the service's alone: not in tests' in-process servers.
    app.state.freeze_heap = True
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return server.started
