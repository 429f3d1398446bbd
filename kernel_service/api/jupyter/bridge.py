"""A Jupyter client's WebSocket on a session's kernel: its requests in, the kernel's
messages out, as a Jupyter kernel's own channels would carry them.

- An `execute_request` runs through the session's execution path (`Session.execute_answer`):
  one at a time with every other execution, the service's timeout, output limits, history
  and metrics. The kernel's messages for it are relayed as they arrive, their parent header
  the client's request; its `execute_reply` and closing `idle` are held back until the
  session has made the result, so that what the service saw itself (a timeout, the
  kernel's death, lost output) comes first, as an iopub `error`.
- `interrupt_request` interrupts the session's running execution; `shutdown_request`
  restarts the session's kernel, or deletes the session.
- The other requests of the protocol on shell or control (kernel_info, complete, inspect,
  is_complete, history, comm messages...: RELAYED) go to the kernel as they are
  (`Session.relay`); any other type is answered with an error.
- Input is never asked for: code runs with `allow_stdin` false (`input()` says why).

iopub messages go to every client of the session, as Jupyter does; replies go to the client
that asked. Everything is bounded, whatever the client or the kernel's code sends: what a
kernel's clients may have waiting (MAX_QUEUED executions, MAX_RELAYED requests), what
waits for a slow client (`Outbox`), what one request may relay (`Budget`: past it outputs
are dropped, and a note says so), and one reply per request.
"""

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from kernel_service.api.errors import detail_of
from kernel_service.api.jupyter.frames import BadFrame, ClientMessage, Frame, Framing, dumps, write
from kernel_service.config import Settings
from kernel_service.errors import CodeTooLarge, ServiceError
from kernel_service.execution.collector import is_rich_mime
from kernel_service.kernel import ExecuteOptions
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.sessions.session import Answer, Session
from kernel_service_client.models import ExecutionError, truncation_note

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "5.3"
# Bytes of messages held for a client that reads slowly; past it outputs are dropped.
OUTBOX_LIMIT = 8 * 1024 * 1024
# ... and of every message (replies too): past it the client is taken as not reading, and
# its socket is closed. Room for a few of the largest messages a kernel may send.
OUTBOX_HARD_LIMIT = 64 * 1024 * 1024
# Executions waiting on one kernel, from all its clients (JupyterLab's "Run All" sends every
# cell at once), and characters of their code; more are answered with an error.
MAX_QUEUED = 1024
QUEUED_CODE = 64  # ... and at most this many times KERNEL_SERVICE_MAX_CODE_BYTES of code
# Requests relayed to one kernel and not yet answered, from all its clients, at most.
MAX_RELAYED = 256
# Messages the answer to one request may relay (past it, outputs and statuses are dropped).
MAX_MESSAGES = 20_000
# After its idle, how long a relayed request's reply may take before it is taken as lost.
REPLY_GRACE = 5.0
# The requests relayed to the kernel as they are (execute, interrupt and shutdown requests
# are the service's own); any other type gets an error reply.
RELAYED = frozenset(
    {
        "kernel_info_request",
        "complete_request",
        "inspect_request",
        "is_complete_request",
        "history_request",
        "comm_info_request",
        "comm_open",
        "comm_msg",
        "comm_close",
        "debug_request",
        "usage_request",
    }
)
_NO_REPLY = frozenset({"comm_open", "comm_msg", "comm_close"})
# The kernel's messages that are outputs (counted against a request's budget).
_OUTPUTS = frozenset({"stream", "display_data", "execute_result", "error", "update_display_data"})

Send = Callable[[Frame], Awaitable[None]]


def _header(msg_type: str, session: str) -> dict[str, Any]:
    """A header for a message the service writes itself."""
    return {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "kernel-service",
        "session": session,
        "date": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "version": PROTOCOL_VERSION,
    }


def _size(msg_type: str, content: dict[str, Any]) -> tuple[int, int]:
    """(text, rich) characters an output message carries; at least one (an empty output
    costs something too)."""
    if msg_type == "stream":
        text = content.get("text")
        return max(len(text) if isinstance(text, str) else 0, 1), 0
    if msg_type == "error":
        traceback = content.get("traceback")
        lines = traceback if isinstance(traceback, list) else []
        size = sum(len(str(line)) for line in lines) + len(str(content.get("evalue", "")))
        return max(size, 1), 0
    data = content.get("data")
    text = rich = 0
    for mime, value in data.items() if isinstance(data, dict) else ():
        size = len(value) if isinstance(value, str) else len(dumps(value))
        if is_rich_mime(str(mime)):
            rich += size
        else:
            text += size
    return max(text, 1), rich


class Budget:
    """What one request may relay: the service's output limits, whole (the result keeps a
    head and a tail; a client sees the head, then a note), and MAX_MESSAGES messages."""

    def __init__(self, text: int, rich: int) -> None:
        self._text, self._rich = text, rich
        self._messages = MAX_MESSAGES
        self.dropped_chars = self.dropped_outputs = 0

    def fit(self, msg_type: str, content: dict[str, Any]) -> dict[str, Any] | None:
        """The content to relay: all of it, a stream's text cut to the room left, or None
        (past the budget). Once cut, all later output is dropped: none out of order."""
        text, rich = _size(msg_type, content)
        if text <= self._text and rich <= self._rich:
            self._text -= text
            self._rich -= rich
            return content
        room, self._text, self._rich = self._text, 0, 0
        if msg_type == "stream" and room > 0 and isinstance(content.get("text"), str):
            self.dropped_chars += text - room
            return {**content, "text": content["text"][:room]}
        self.dropped_chars += text + rich
        self.dropped_outputs += msg_type != "stream"
        return None

    def relayed(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """`msg` as it may be relayed (an output within the budget), or None."""
        if self._messages <= 0:
            self.dropped_outputs += msg.get("msg_type") in _OUTPUTS
            return None
        self._messages -= 1
        msg_type, content = msg.get("msg_type"), msg.get("content")
        if msg_type not in _OUTPUTS or not isinstance(content, dict):
            return msg
        fitted = self.fit(str(msg_type), content)
        if fitted is None:
            return None
        return msg if fitted is content else {**msg, "content": fitted}

    def note(self) -> str | None:
        """What was not relayed, in words (None: everything was)."""
        if not (self.dropped_chars or self.dropped_outputs):
            return None
        return truncation_note(self.dropped_chars, self.dropped_outputs)


class Outbox:
    """The frames waiting for one client, and the task that sends them. Outputs past
    OUTBOX_LIMIT bytes are dropped (the next output that fits says how many); the service's
    own messages and the kernel's replies are kept, up to OUTBOX_HARD_LIMIT: past it the
    client is not reading at all: what waits is dropped and `broken` is set (the socket is
    then closed)."""

    def __init__(self, send: Send, limit: int = OUTBOX_LIMIT) -> None:
        self._send = send
        self._limit = limit
        self._queue: deque[Frame] = deque()
        self._pending = 0
        self._ready = asyncio.Event()
        self.broken = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def full(self, droppable: bool) -> bool:
        """Whether a frame would be refused now, whatever its size (decided before the
        frame is made: a client that reads nothing costs no serialising)."""
        return self.closed or (droppable and self._pending >= self._limit)

    def put(self, frame: Frame, droppable: bool) -> bool:
        if self.closed:
            return False
        if self._pending + len(frame) > (self._limit if droppable else OUTBOX_HARD_LIMIT):
            if droppable:
                self.dropped += 1
            else:
                self.broken.set()
                self.discard()
            return False
        self._queue.append(frame)
        self._pending += len(frame)
        self._ready.set()
        return True

    async def run(self) -> None:
        """Send until closed (the client's socket failing ends it too)."""
        while True:
            while self._queue:
                frame = self._queue.popleft()
                self._pending -= len(frame)
                await self._send(frame)
            if self.closed:
                return
            self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        """Send what waits, then stop."""
        self.closed = True
        self._ready.set()

    def discard(self) -> None:
        """Stop, and let go of what waits (the client has gone)."""
        self.close()
        self._queue.clear()
        self._pending = 0


class Connections:
    """Every open WebSocket, by session (for iopub to reach all of a session's clients, and
    the kernel model's `connections`), what a session's clients have waiting (bounded per
    kernel, however many sockets), and the work that outlives its socket (executions a
    client sent before it went, shutdowns): ended when the service stops."""

    def __init__(self) -> None:
        self._by_session: dict[str, set[KernelConnection]] = {}
        self._queued: dict[str, int] = {}
        self._queued_code: dict[str, int] = {}
        self._relaying: dict[str, int] = {}
        self._work: set[asyncio.Task[Any]] = set()

    def count(self, session: Session) -> int:
        return len(self._by_session.get(session.key, ()))

    def total(self) -> int:
        """Open WebSockets, on every kernel."""
        return sum(map(len, self._by_session.values()))

    def of(self, session: Session) -> set["KernelConnection"]:
        return self._by_session.get(session.key, set())

    @contextlib.contextmanager
    def attached(self, connection: "KernelConnection") -> Iterator[None]:
        """`connection` is open for as long as this lasts."""
        key = connection.session.key
        self._by_session.setdefault(key, set()).add(connection)
        try:
            yield
        finally:
            connections = self._by_session.get(key)
            if connections is not None:
                connections.discard(connection)
                if not connections:
                    del self._by_session[key]

    def queue(self, session: Session, code: int, most_code: int) -> bool:
        """Count one more execution waiting on `session`, of `code` characters, unless
        MAX_QUEUED wait or their code would pass `most_code` characters."""
        key = session.key
        if self._queued.get(key, 0) >= MAX_QUEUED:
            return False
        if self._queued_code.get(key, 0) + code > most_code:
            return False
        _add(self._queued, key, 1)
        _add(self._queued_code, key, code)
        return True

    def dequeue(self, session: Session, code: int) -> None:
        _add(self._queued, session.key, -1)
        _add(self._queued_code, session.key, -code)

    def take_relay(self, session: Session) -> bool:
        """Count one more relayed request awaiting its answer, unless MAX_RELAYED do."""
        if self._relaying.get(session.key, 0) >= MAX_RELAYED:
            return False
        _add(self._relaying, session.key, 1)
        return True

    def release_relay(self, session: Session) -> None:
        _add(self._relaying, session.key, -1)

    def keep(self, work: Awaitable[None], name: str) -> "asyncio.Task[None]":
        """Run `work` to its end whatever becomes of the socket (until the service stops)."""
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    async def stop(self) -> None:
        """The service is stopping: end the work still under way."""
        work = list(self._work)
        for task in work:
            task.cancel()
        if work:
            await asyncio.wait(work)


def _add(counts: dict[str, int], key: str, amount: int) -> None:
    """Add to a count (none left: no entry, so nothing grows with sessions gone)."""
    left = counts.get(key, 0) + amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass(frozen=True)
class _Execution:
    """What is kept of an execute_request while it waits: its code, its options, its
    bounded header (the parent of its answer), and its time limit."""

    header: dict[str, Any]
    code: str
    options: ExecuteOptions
    timeout: float | None

    @property
    def request(self) -> ClientMessage:
        return ClientMessage(channel="shell", header=self.header)


# user_expressions an execute_request may carry: entries, and characters of each
_EXPRESSIONS = 64
_EXPRESSION_CHARS = 4096


class KernelConnection:
    """One client's WebSocket on one session."""

    def __init__(
        self,
        session: Session,
        registry: SessionRegistry,
        settings: Settings,
        connections: Connections,
        *,
        framing: Framing,
        send: Send,
    ) -> None:
        self.session = session
        self._registry = registry
        self.settings = settings
        self.connections = connections
        self.framing = framing
        self.outbox = Outbox(send)
        self._bridge_session = uuid.uuid4().hex  # the `session` of headers written here
        self._executions: deque[_Execution] = deque()
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # relays waiting for a kernel
        self._dropped_note_parent: dict[str, Any] | None = None

    # ------------------------------------------------------------ the client's frames

    def receive(self, message: ClientMessage) -> None:
        """Act on one message from the client (never blocks: work runs in tasks)."""
        msg_type = message.msg_type
        if message.channel in ("stdin", "iopub"):
            return  # no input is ever asked for; iopub is the kernel's to send
        if msg_type == "execute_request":
            self._queue_execution(message)
        elif msg_type == "interrupt_request":
            interrupted = self.session.interrupt()
            log.info("session %s: interrupt asked (running: %s)", self.session.session_id,
                     interrupted)  # fmt: skip
            self._reply(message, {"status": "ok"})
        elif msg_type == "shutdown_request":
            self.connections.keep(self._shut_down(message), "jupyter-shutdown")
        elif msg_type in RELAYED:
            self._relay(message)
        else:
            self._fail(
                message,
                "UnknownMessageType",
                f"{msg_type!r} is not a request this kernel takes: execute, interrupt, "
                f"shutdown, and {', '.join(sorted(RELAYED))}.",
            )

    def refuse(self, error: BadFrame) -> bool:
        """Answer a frame that is not a valid request with an error reply, when its header
        could be read; False when it could not (the caller then closes the socket)."""
        header = error.header
        if header is None:
            return False
        message = ClientMessage(channel="shell", header=header)
        self._fail(message, "InvalidMessage", f"{error}. Send Jupyter messages (protocol 5).")
        return True

    # ------------------------------------------------------------ executions

    def _queue_execution(self, message: ClientMessage) -> None:
        execution = self._execution(message)
        if execution is None:
            return
        most_code = QUEUED_CODE * self.settings.max_code_bytes
        if not self.connections.queue(self.session, len(execution.code), most_code):
            self._fail(
                message,
                "TooManyRequests",
                f"Too many executions already wait on this kernel (at most {MAX_QUEUED}, "
                f"with {most_code:,} characters of code); wait for their replies before "
                "sending more.",
            )
            return
        self._executions.append(execution)
        if self._worker is None:
            self._worker = self.connections.keep(
                self._run_executions(), f"jupyter-executions-{self.session.session_id}"
            )

    def _execution(self, message: ClientMessage) -> _Execution | None:
        """The request as it waits, or None when it was refused (and answered)."""
        content = message.content
        code = content.get("code")
        if not isinstance(code, str):
            self._fail(message, "InvalidMessage", "execute_request needs `code`, a string.")
            return None
        size = len(code.encode(errors="surrogatepass"))
        if size > self.settings.max_code_bytes:
            error = CodeTooLarge(size, self.settings.max_code_bytes)
            self._fail(message, "CodeTooLarge", str(error))
            return None
        expressions = content.get("user_expressions") or {}
        if not (
            isinstance(expressions, dict)
            and len(expressions) <= _EXPRESSIONS
            and all(
                isinstance(v, str) and len(k) + len(v) <= _EXPRESSION_CHARS
                for k, v in expressions.items()
            )
        ):
            self._fail(
                message,
                "InvalidMessage",
                f"user_expressions must be an object of at most {_EXPRESSIONS} expressions "
                f"(strings, each under {_EXPRESSION_CHARS} characters).",
            )
            return None
        options = ExecuteOptions(
            silent=content.get("silent") is True,
            store_history=content.get("store_history", True) is not False,
            user_expressions=expressions,
            stop_on_error=content.get("stop_on_error", True) is not False,
        )
        asked = message.metadata.get("timeout")
        timeout = float(asked) if isinstance(asked, int | float) and asked > 0 else None
        return _Execution(message.header, code, options, timeout)

    async def _run_executions(self) -> None:
        """The connection's executions, in the order they came (the kernel outlives the
        socket: those sent before it closed still run, as in Jupyter)."""
        try:
            while self._executions:
                execution = self._executions.popleft()
                self.connections.dequeue(self.session, len(execution.code))
                ok = await self._execute(execution)
                if not ok and execution.options.stop_on_error:
                    # as a kernel does: what was queued behind a failed execution is aborted
                    while self._executions:
                        aborted = self._executions.popleft()
                        self.connections.dequeue(self.session, len(aborted.code))
                        self._abort(aborted.request)
        finally:
            for left in self._executions:  # cancelled (the service stopping)
                self.connections.dequeue(self.session, len(left.code))
            self._executions.clear()
            self._worker = None

    async def _execute(self, execution: _Execution) -> bool:
        """Run one execute_request through the session; whether its reply says `ok` (the
        kernel's reply, or the service's when it saw the ending)."""
        relay = ExecutionRelay(self, execution.header)
        try:
            answer = await self.session.execute_answer(
                execution.code, execution.timeout, options=execution.options, relay=relay
            )
        except ServiceError as exc:
            relay.stop()
            self._fail(execution.request, type(exc).__name__, detail_of(exc, jupyter=True))
            return False
        return relay.finish(answer)

    def _abort(self, message: ClientMessage) -> None:
        self._reply(message, {"status": "aborted", "execution_count": None})
        self._status(message, "idle")

    # ------------------------------------------------------------ other requests

    def _relay(self, message: ClientMessage) -> None:
        if not self.connections.take_relay(self.session):
            self._fail(
                message,
                "TooManyRequests",
                f"{MAX_RELAYED} requests to this kernel await its answer; wait for their "
                "replies before sending more.",
            )
            return
        relay = RequestRelay(self, message)
        channel: Literal["shell", "control"] = (
            "control" if message.channel == "control" else "shell"
        )

        async def send() -> None:
            try:
                await self.session.relay(
                    channel,
                    message.msg_type,
                    message.content,
                    relay,
                    metadata=message.metadata,
                    buffers=message.buffers,
                )
            except ServiceError as exc:
                relay.fail(type(exc).__name__, detail_of(exc, jupyter=True))
            except asyncio.CancelledError:
                relay.stop()  # the socket closed while the kernel started: never sent
                raise
            except Exception as exc:  # what the kernel's codec cannot write (JSON too deep)
                relay.fail("InvalidMessage", f"The request cannot be sent to a kernel: {exc}.")

        self._spawn(send())

    async def _shut_down(self, message: ClientMessage) -> None:
        """shutdown_request: restart the kernel (its state is lost), or delete the session."""
        restart = message.content.get("restart") is True
        try:
            if restart:
                await self.session.restart()
            else:  # said first: the session's end closes this socket
                self._reply(message, {"status": "ok", "restart": False})
                await self._registry.close(self.session.session_id, self.session.owner)
                return
        except ServiceError as exc:
            self._fail(message, type(exc).__name__, detail_of(exc, jupyter=True))
            return
        self._reply(message, {"status": "ok", "restart": True})

    def _spawn(self, work: Awaitable[None]) -> None:
        """Run `work` while the socket is open (cancelled when it closes)."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------ to the client

    def deliver(
        self,
        msg: dict[str, Any],
        parent: dict[str, Any],
        channel: str,
        droppable: bool,
        frames: dict[Framing, Frame] | None = None,
    ) -> bool:
        """Queue one message for this client, its parent header `parent`; `frames` caches
        the message's frames by framing (a broadcast makes each once)."""
        if self.outbox.full(droppable):
            if droppable and not self.outbox.closed:
                self.outbox.dropped += 1
                self._dropped_note_parent = parent
            return False
        if droppable and self.outbox.dropped and self._dropped_note_parent is not None:
            self._note_dropped()
        frame = frames.get(self.framing) if frames is not None else None
        if frame is None:
            frame = write(_outgoing(msg, parent, channel), self.framing)
            if frames is not None:
                frames[self.framing] = frame
        sent = self.outbox.put(frame, droppable)
        if not sent and droppable:
            self._dropped_note_parent = parent
        return sent

    def _note_dropped(self) -> None:
        """Say, before the next output that gets through, how many did not."""
        count, self.outbox.dropped = self.outbox.dropped, 0
        parent, self._dropped_note_parent = self._dropped_note_parent, None
        text = (
            f"[{count} message(s) of output not sent: this client read too slowly. The "
            "session's history has the whole result.]\n"
        )
        self.publish(parent or {}, "stream", {"name": "stderr", "text": text})

    def publish(
        self,
        parent: dict[str, Any],
        msg_type: str,
        content: dict[str, Any],
        channel: str = "iopub",
    ) -> None:
        """A message of the service's own, to this client alone (never dropped)."""
        self.deliver({"header": self.header(msg_type), "content": content}, parent, channel,
                     droppable=False)  # fmt: skip

    def header(self, msg_type: str) -> dict[str, Any]:
        """A header for a message the service writes itself."""
        return _header(msg_type, self._bridge_session)

    def _reply(self, message: ClientMessage, content: dict[str, Any]) -> None:
        reply_type = message.msg_type.removesuffix("_request") + "_reply"
        channel = "control" if message.channel == "control" else "shell"
        self.publish(message.header, reply_type, content, channel)

    def _status(self, message: ClientMessage, state: str) -> None:
        self.publish(message.header, "status", {"execution_state": state})

    def _fail(self, message: ClientMessage, ename: str, evalue: str) -> None:
        """Answer a request the service could not carry out: an error reply, and for an
        execution an iopub error and idle (what clients wait for)."""
        error = {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]}
        if message.msg_type == "execute_request":
            self.publish(message.header, "error", error)
        self._reply(message, {"status": "error", **error})
        if message.msg_type == "execute_request":
            self._status(message, "idle")

    # ------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """The client has gone: stop sending, and let go of what waited for it. Its
        executions still run (the kernel outlives the socket); requests relayed for it are
        answered to nobody."""
        self.outbox.discard()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)


def _outgoing(msg: dict[str, Any], parent: dict[str, Any], channel: str) -> dict[str, Any]:
    """A kernel's (or the service's) message as a client gets it."""
    header = msg.get("header")
    header = header if isinstance(header, dict) else {}
    metadata, content = msg.get("metadata"), msg.get("content")
    return {
        "header": header,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": parent,
        "metadata": metadata if isinstance(metadata, dict) else {},
        "content": content if isinstance(content, dict) else {},
        "buffers": msg.get("buffers", []),
        "channel": channel,
    }


def broadcast(
    origin: KernelConnection, msg: dict[str, Any], parent: dict[str, Any], droppable: bool
) -> None:
    """An iopub message to every client of the origin's session (the origin first; each
    framing's frame made once)."""
    frames: dict[Framing, Frame] = {}
    origin.deliver(msg, parent, "iopub", droppable, frames)
    for connection in origin.connections.of(origin.session):
        if connection is not origin:
            connection.deliver(msg, parent, "iopub", droppable, frames)


class RequestRelay:
    """The kernel's answer to one relayed request: its reply (one) to the client that
    asked, its iopub messages to every client within the budget; done at reply and idle
    (at idle alone for comm messages, which have no reply), or when the kernel ends."""

    def __init__(self, connection: KernelConnection, request: ClientMessage) -> None:
        self._connection = connection
        self._request = request
        settings = connection.settings
        self._budget = Budget(settings.output_limit, settings.rich_output_limit)
        self._replied = request.msg_type in _NO_REPLY
        self._idle = False
        self._ended = False
        self._waiting: asyncio.TimerHandle | None = None

    def __call__(self, msg: dict[str, Any] | None) -> bool:
        if self._ended:
            return False
        if msg is None:  # the kernel ended, or forgot the request, before answering it
            self.fail("KernelDied", "The kernel ended before it answered this request.")
            return False
        msg_type = msg.get("msg_type")
        content = msg.get("content")
        content = content if isinstance(content, dict) else {}
        parent = self._request.header
        if isinstance(msg_type, str) and msg_type.endswith("_reply"):
            if self._replied:
                return True  # one reply per request: more can only be forged by the code
            self._replied = True
            channel = "control" if self._request.channel == "control" else "shell"
            self._connection.deliver(msg, parent, channel, droppable=False)
        elif (relayed := self._budget.relayed(msg)) is not None:
            if msg_type == "status" and content.get("execution_state") == "idle":
                self._idle = True
            broadcast(self._connection, relayed, parent, droppable=True)
        if self._replied and self._idle:
            self.stop()
            return False
        if self._idle and self._waiting is None:  # the reply may come just after, or never
            loop = asyncio.get_running_loop()
            self._waiting = loop.call_later(REPLY_GRACE, self._unanswered)
        return True

    def _unanswered(self) -> None:
        self._waiting = None
        if not self._replied:
            self.fail("NoReply", "The kernel went idle without answering this request.")

    def fail(self, ename: str, evalue: str) -> None:
        """Answer the request with an error, unless it was answered; relay no more."""
        if not self._ended and not self._replied:
            self._replied = True
            self._connection._fail(self._request, ename, evalue)
        self.stop()

    def stop(self) -> None:
        if not self._ended:
            self._ended = True
            if self._waiting is not None:
                self._waiting.cancel()
            self._connection.connections.release_relay(self._connection.session)


class ExecutionRelay:
    """The kernel's messages for one client's execute_request. Relayed as they come but
    the reply, the closing idle and a KeyboardInterrupt, held until `finish` says how the
    execution ended (a timeout's TimeoutError comes before the KeyboardInterrupt it caused);
    the thread output that may come after is relayed too, within the same budget."""

    def __init__(self, connection: KernelConnection, header: dict[str, Any]) -> None:
        self._connection = connection
        self._header = header
        settings = connection.settings
        self._budget = Budget(settings.output_limit, settings.rich_output_limit)
        self._reply: dict[str, Any] | None = None
        self._idle: dict[str, Any] | None = None
        # the kernel's KeyboardInterrupt, held: when the service interrupted at the time
        # limit, its own error must come first (clients stop reading at the first error)
        self._interrupted: dict[str, Any] | None = None
        self._finished = False
        self._stopped = False

    def __call__(self, msg: dict[str, Any] | None) -> bool:
        if msg is None:  # the kernel ended: its last words may still come, until the finish
            return not (self._finished or self._stopped)
        if self._stopped:
            return False
        if self._finished and self._connection.outbox.closed:
            return False  # after its end, late output goes on only while its client is there
        msg_type = msg.get("msg_type")
        content = msg.get("content")
        content = content if isinstance(content, dict) else {}
        if not self._finished:
            if msg_type == "execute_reply":
                self._reply = msg
                return True
            if msg_type == "status" and content.get("execution_state") == "idle":
                self._idle = msg
                return True
            if (
                msg_type == "error"
                and content.get("ename") == "KeyboardInterrupt"
                and self._interrupted is None
            ):
                self._interrupted = msg
                return True
        relayed = self._budget.relayed(msg)
        if relayed is not None:
            broadcast(self._connection, relayed, self._header, droppable=True)
        return True

    def finish(self, answer: Answer) -> bool:
        """Say how the execution ended: what the service had to say (on stderr: the state
        lost since the last execution), what it saw (an iopub error), what was cut (a note),
        then the reply and idle (the kernel's, or written here when the kernel sent none: it
        was killed or died). Whether the reply says `ok`."""
        self._finished = True
        connection, parent = self._connection, self._header
        result, seen = answer.result, answer.service_error
        if seen is None and self._reply is None and result.error is not None:
            seen = result.error  # the kernel sent no reply (interrupted as it began)
        if answer.notice:  # the state lost since the last execution, say
            text = f"[{answer.notice}]\n"
            connection.publish(parent, "stream", {"name": "stderr", "text": text})
        if seen is not None:
            traceback = [f"{seen.ename}: {seen.evalue}"]
            error = {"ename": seen.ename, "evalue": seen.evalue, "traceback": traceback}
            connection.publish(parent, "error", error)
        if self._interrupted is not None and (relayed := self._budget.relayed(self._interrupted)):
            broadcast(connection, relayed, parent, droppable=True)
        if (note := self._budget.note()) is not None:
            where = (
                f" The whole output: {result.full_output.url}"
                if result.full_output is not None
                else ""
            )
            text = f"\n{note} (over the service's output limit.{where})\n"
            connection.publish(parent, "stream", {"name": "stderr", "text": text})
        service = {
            "status": result.status,
            "duration_ms": result.duration_ms,
            "state_lost": result.state_lost,
            "files": [file.model_dump(mode="json") for file in result.files],
        }
        kernel_reply = self._reply or {}
        content = _reply_content(self._reply, answer, seen)
        reply = {
            "header": kernel_reply.get("header") or connection.header("execute_reply"),
            "metadata": {**_dict(kernel_reply.get("metadata")), "kernel_service": service},
            "content": content,
        }
        connection.deliver(reply, parent, "shell", droppable=False)
        idle = self._idle or {
            "header": connection.header("status"),
            "content": {"execution_state": "idle"},
        }
        broadcast(connection, idle, parent, droppable=False)
        if connection.outbox.closed:
            self._stopped = True  # nobody to tell of late output: the kernel may forget it
        return bool(content.get("status") == "ok")

    def stop(self) -> None:
        """Relay nothing more (the execution never ran)."""
        self._stopped = True


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _reply_content(
    reply: dict[str, Any] | None, answer: Answer, seen: ExecutionError | None
) -> dict[str, Any]:
    """The execute_reply's content: the kernel's, with the service's ending in place of its
    error when the service saw one."""
    content = dict(_dict((reply or {}).get("content")))
    content.setdefault("status", "ok")
    content.setdefault("execution_count", answer.result.execution_count)
    content.setdefault("user_expressions", {})
    content.setdefault("payload", [])
    if seen is not None:
        content.update(
            status="error",
            ename=seen.ename,
            evalue=seen.evalue,
            traceback=[f"{seen.ename}: {seen.evalue}"],
        )
    return content
