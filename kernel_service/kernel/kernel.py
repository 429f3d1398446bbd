"""One running ipykernel: its connection file, its channels, and the execution in flight.

A `Kernel` lives as long as its process. It runs one execution at a time (the session
serialises callers), enforces the deadline itself (interrupt over the control channel,
then kill), and notices the process's death the moment it happens. Replacing a dead or
killed kernel is the session's job.
"""

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kernel_service.execution.collector import ExecutionCollector, OutputLimits, OutputListener
from kernel_service.execution.outcome import RunOutcome
from kernel_service.kernel.channels import Channel, KernelChannels
from kernel_service.kernel.endings import ExitCause, KernelEnd
from kernel_service.kernel.files import KernelFiles
from kernel_service.kernel.interrupts import Interrupts
from kernel_service.kernel.kernelspecs import PYTHON_KIND, KernelKind
from kernel_service.kernel.launcher import (
    AdoptionError,
    KernelLauncher,
    KernelProcess,
    LaunchSpec,
    RecordedKernel,
)
from kernel_service.kernel.options import KernelOptions, kernel_args, kernel_env

log = logging.getLogger(__name__)

# After the execute_reply, how long iopub may lag before the kernel is asked whether its
# output was lost (a probe whose iopub status, coming after ours, proves ours was dropped),
# and how long the answer to that probe may take before the output is taken as lost.
_IOPUB_GRACE = 5.0
# iopub idle for a request and no reply yet: after this long the kernel is asked whether a
# reply is still to come (a SIGINT landing as ipykernel takes a request up can make it go
# idle without ever replying)
_REPLY_GRACE = 0.2
_PROBE_WAIT = 30.0
# How long a dying kernel's last messages may take to arrive.
_DEATH_DRAIN = 0.05
# Between kernel_info requests while waiting for a new kernel to be ready.
_READY_RETRY = 0.25
_LOG_TAIL = 2000
# How long the channels have to be made again after a refused message.
_RECONNECTED_WITHIN = 5.0
# How long a kernel being adopted has to answer kernel_info.
_ADOPT_TIMEOUT = 5.0
_PROBE_LIMITS = OutputLimits(text=1000, rich=1000)
# Requests whose answers are relayed to a client at most (`Kernel.relay`): past it the
# oldest is forgotten (a request the kernel never answered, a client that never stopped).
_RELAYED = 1024

# Told of each message the kernel sends in answer to a relayed request (its reply, and its
# iopub messages: status, outputs, comms), as it arrives; it returns False to hear no more.
# Told None when the kernel ended, or forgot the request (past _RELAYED): it returns True
# only to hear the last messages of a dying kernel.
Relay = Callable[[dict[str, Any] | None], bool]


@dataclass(frozen=True)
class ExecuteOptions:
    """The fields of an `execute_request` a client may choose (the Jupyter protocol's); the
    code never waits for input (`allow_stdin` is always false: nobody could answer)."""

    silent: bool = False
    store_history: bool = True
    user_expressions: dict[str, Any] = field(default_factory=dict)
    stop_on_error: bool = True


# Told to every start: record this kernel, now that its process exists.
OnLaunch = Callable[["Kernel"], None]


class KernelStartError(Exception):
    """A kernel did not become ready; the message says why (its own log included).

    `stuck`: its process ran but never answered (as opposed to dying or not launching).
    """

    def __init__(self, message: str, stuck: bool = False) -> None:
        super().__init__(message)
        self.stuck = stuck


class Kernel:
    """A kernel process and the client that talks to it."""

    def __init__(
        self,
        kernel_id: str,
        process: KernelProcess,
        files: KernelFiles,
        max_message_bytes: int,
        kind: KernelKind = PYTHON_KIND,
    ) -> None:
        self.kernel_id = kernel_id
        self.kind = kind
        # what its kernel_info_reply says of its language (name, version, file extension...)
        self.language_info: dict[str, Any] = {}
        self.process = process
        self.files = files
        self._channels = KernelChannels(
            files.connection_info, max_message_bytes, self._dispatch, self._on_refused
        )
        self._active: ExecutionCollector | None = None
        self._interrupts = Interrupts(self._send_interrupt)
        # An execution given up by its caller, still ending; the next one waits for it.
        self._settling: asyncio.Task[None] | None = None
        self._lost: str | None = None  # why output of the active request was lost
        self._probe: str | None = None  # msg_id of a request sent to check for lost output
        self._probe_answered = False
        self._reply_probe: str | None = None  # msg_id of a request sent after a missing reply
        self._reply_dropped = False  # its answer came, and still no reply: none will
        self._refusals_seen = 0  # messages refused when the last execution began
        self._relays: OrderedDict[str, Relay] = OrderedDict()  # msg_id → whom to tell
        self._changed = asyncio.Event()
        self._end = KernelEnd(process)
        self._closed = False
        process.on_exit(self._on_exit)

    # ------------------------------------------------------------ lifecycle

    @classmethod
    async def start(
        cls,
        launcher: KernelLauncher,
        options: KernelOptions,
        work_dir: Path,
        on_launch: OnLaunch | None = None,
        kind: KernelKind = PYTHON_KIND,
    ) -> "Kernel":
        """Write a connection file, launch a kernel of `kind` on it and wait until it answers.

        `on_launch` is called once the process exists, before the wait; if it raises, the
        kernel is ended and the error goes to the caller."""
        kernel_id = uuid.uuid4().hex[:16]
        try:
            # on the loop: a thread cancelled meanwhile would leave the directory behind
            files = KernelFiles.create(options.connection_dir, kernel_id)
        except ValueError as exc:
            raise KernelStartError(str(exc)) from exc
        spec = LaunchSpec(
            files=files,
            work_dir=work_dir,
            env=kernel_env(options),
            kernel_args=kernel_args(options) if kind.is_python else [],
            kind=kind,
        )
        try:
            # user code may have removed it; a mkdir is too small to hand to a thread
            work_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
            process = await launcher.launch(spec)
        except BaseException as exc:
            await asyncio.shield(asyncio.to_thread(files.remove))
            if isinstance(exc, OSError):
                raise KernelStartError(f"the kernel process could not be started: {exc}") from exc
            raise
        kernel = cls(kernel_id, process, files, options.max_message_bytes, kind)
        try:
            if on_launch is not None:
                on_launch(kernel)
            kernel._start_channels()
            await kernel._wait_ready(options.start_timeout)
            await launcher.on_ready(spec)
        except BaseException:
            await kernel.shutdown()
            raise
        return kernel

    @classmethod
    async def adopt(
        cls,
        record: RecordedKernel,
        launcher: KernelLauncher,
        options: KernelOptions,
        kind: KernelKind = PYTHON_KIND,
    ) -> "Kernel":
        """Take over a kernel that an earlier service process started: its process found
        alive, its connection file as recorded, and kernel_info answered (over the control
        channel: the shell may still be busy with code that ran when that service ended).
        Raises AdoptionError, after ending the kernel, when any of that fails."""
        try:
            files = await asyncio.to_thread(
                KernelFiles.recorded, record.directory, record.connection
            )
        except ValueError as exc:
            raise AdoptionError(str(exc)) from exc
        process = launcher.adopt(record)
        kernel = cls(record.kernel_id, process, files, options.max_message_bytes, kind)
        try:
            kernel._start_channels()
            await kernel._wait_ready(_ADOPT_TIMEOUT, control=True)
        except BaseException as exc:
            await kernel.shutdown()
            if isinstance(exc, KernelStartError):
                raise AdoptionError(str(exc)) from exc
            raise
        return kernel

    def detach(self) -> None:
        """Let go of a kernel that stays running (for the next service process): close our
        channels, leave the process and its files."""
        self._closed = True
        self._stop_channels()
        self._end_relays()

    async def _wait_ready(self, timeout: float, control: bool = False) -> None:
        """Ready means: kernel_info answered on shell (or `control`) *and* its idle seen on
        iopub.

        The second half proves our iopub subscription is live, so no output of the first
        execution can be missed.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg_id = self._channels.send(
                "control" if control else "shell", "kernel_info_request", {}
            )
            collector = ExecutionCollector(msg_id, _PROBE_LIMITS)
            ending = await self._follow(
                collector, min(deadline, loop.time() + _READY_RETRY), probe=False
            )
            if ending == "done":
                info = (collector.reply or {}).get("language_info")
                self.language_info = info if isinstance(info, dict) else {}
                return
            if ending == "died":
                raise KernelStartError(
                    f"the kernel died while starting: {self.exit_words()}.{self._log_excerpt()}"
                )
            if loop.time() >= deadline:
                raise KernelStartError(
                    f"the kernel did not answer within {timeout:g} s.{self._log_excerpt()}",
                    stuck=True,
                )

    async def shutdown(self) -> None:
        """Kill the process and all it started, close the channels, remove the files."""
        if self._closed:
            return
        self._closed = True
        self._end.killed()
        try:
            await self.process.kill()
            await self.process.wait()
        finally:  # cleaned up even if the caller is cancelled while the process is reaped
            self._stop_channels()
            await asyncio.shield(asyncio.to_thread(self.files.remove))

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    # ------------------------------------------------------------ execution

    async def execute(
        self,
        code: str,
        *,
        timeout: float,
        interrupt_grace: float,
        limits: OutputLimits,
        listener: OutputListener | None = None,
        interrupted: bool = False,
        options: ExecuteOptions | None = None,
        relay: Relay | None = None,
    ) -> RunOutcome:
        """Run `code`, gather its outputs (telling `listener` of each as it arrives), and
        enforce `timeout` from outside the kernel. `interrupted`: an interrupt was asked for
        before the code was sent; it ends the code as soon as it begins. `relay` is told of
        every message the kernel sends for it, as it arrives (and after: a thread's late
        output), until it says no more."""
        loop = asyncio.get_running_loop()
        if self._settling is not None:
            # the kernel would abort this code (stop_on_error) were it sent before the
            # interrupted code has ended
            await asyncio.shield(self._settling)
        if self._channels.refused != self._refusals_seen:
            # a refused message closed a connection: this code's output must not be sent
            # before it is made again (iopub's subscription proven live, as at the start)
            self._refusals_seen = self._channels.refused
            with contextlib.suppress(KernelStartError):
                await self._wait_ready(_RECONNECTED_WITHIN)
        options = options or ExecuteOptions()
        msg_id = self._channels.send(
            "shell",
            "execute_request",
            {
                "code": code,
                "silent": options.silent,
                "store_history": options.store_history,
                "user_expressions": options.user_expressions,
                "allow_stdin": False,
                "stop_on_error": options.stop_on_error,
            },
        )
        if relay is not None:
            self._watch(msg_id, relay)
        collector = ExecutionCollector(msg_id, limits, listener)
        self._interrupts.begin(collector, interrupted)
        self._lost = None
        try:
            ending = await self._follow(collector, loop.time() + timeout)
            timed_out = ending == "timeout"
            if timed_out:
                self._interrupts.at_once(collector)
                ending = await self._follow(collector, loop.time() + interrupt_grace)
                if ending == "timeout":  # deaf to interrupts (a long C call): end it
                    self._end.killed(at_timeout=True)
                    await self.process.kill()
                    await self.process.wait()
                    return RunOutcome(collector, "killed")
            if ending == "died":
                await asyncio.sleep(_DEATH_DRAIN)  # let its last words arrive
                if timed_out:
                    return RunOutcome(collector, "interrupt_ended", self.exit_words())
                return RunOutcome(collector, "died", self.exit_words())
            if timed_out:
                return RunOutcome(collector, "interrupted")
            if self._lost is not None:
                return RunOutcome(collector, "output_lost", lost=self._lost)
            return RunOutcome(collector, "done")
        except asyncio.CancelledError:
            # The caller gave up (client gone, service stopping): don't leave code running,
            # and don't let the next request reach the kernel before the interrupted one
            # has ended (with stop_on_error, the kernel would abort it). The caller may be
            # cancelled again and again (anyio's cancel scopes do that): the ending goes on
            # in a task of its own, which the next execution waits for.
            if self.alive and self._settling is None:
                self._interrupts.at_once(collector)
                self._settling = asyncio.create_task(self._settle(collector, interrupt_grace))
            raise
        finally:
            self._active = None
            if self._settling is None:
                self._interrupts.end()
            # else the interrupt stays armed for the settling code: held until it begins,
            # sent again while it neither raised nor ended

    async def _settle(self, collector: ExecutionCollector, grace: float) -> None:
        """Let an interrupted execution end within `grace`; kill the kernel if it does not."""
        loop = asyncio.get_running_loop()
        try:
            if await self._follow(collector, loop.time() + grace) == "timeout":
                self._end.killed()
                await self.process.kill()
                await self.process.wait()
        finally:
            self._active = None
            self._interrupts.end()
            self._settling = None

    def relay(
        self,
        channel: Literal["shell", "control"],
        msg_type: str,
        content: dict[str, Any],
        to: Relay,
        *,
        metadata: dict[str, Any] | None = None,
        buffers: Sequence[bytes] = (),
    ) -> str:
        """Send a client's request (kernel_info, complete, a comm message...) as it is, and
        tell `to` of each message the kernel sends in answer; its msg_id. Executions go
        through `execute`: its deadline and bookkeeping hold for them."""
        msg_id = self._channels.send(channel, msg_type, content, metadata, buffers)
        self._watch(msg_id, to)
        return msg_id

    def _watch(self, msg_id: str, to: Relay) -> None:
        self._relays[msg_id] = to
        if len(self._relays) > _RELAYED:
            _, forgotten = self._relays.popitem(last=False)
            self._tell(forgotten, None)

    def _end_relays(self) -> None:
        """The kernel ended: tell the relays. One that still listens (its execution is
        ending: a dying kernel's last words may still arrive) is kept."""
        for msg_id, relay in list(self._relays.items()):
            if not self._tell(relay, None):
                self._relays.pop(msg_id, None)

    def _tell(self, relay: Relay, msg: dict[str, Any] | None) -> bool:
        try:
            return relay(msg)
        except Exception:
            log.exception("kernel %s: a relay failed", self.kernel_id)
            return False

    def interrupt(self) -> None:
        """Make the running code raise KeyboardInterrupt (see interrupts.py)."""
        self._interrupts.interrupt()

    def _send_interrupt(self) -> None:
        """interrupt_request on the control channel: the kernel signals itself, so this
        works in any sandbox."""
        if self.alive:
            self._channels.send("control", "interrupt_request", {})

    async def _follow(
        self, collector: ExecutionCollector, deadline: float, probe: bool = True
    ) -> Literal["done", "died", "timeout", "output_lost"]:
        """Feed `collector` until its request is complete, the kernel dies, or time is up.

        Once the reply is in, iopub has `_IOPUB_GRACE` seconds to go idle, whatever the
        deadline (with `probe`: then the kernel is probed, and the output is taken as lost
        only when the probe's status arrives first or it too goes unanswered); without
        `probe`, the deadline alone counts.
        """
        loop = asyncio.get_running_loop()
        self._active = collector
        self._probe, self._probe_answered = None, False
        self._reply_probe, self._reply_dropped = None, False
        reply_seen = False
        ask_for_reply_at: float | None = None
        while True:
            if collector.done:
                return "done"
            if not self.alive:
                return "died"
            if self._reply_dropped:
                # shell answers in order: the probe's reply came, so no reply will
                collector.end_unanswered()
                return "done"
            if collector.idle and collector.reply is None and self._reply_probe is None:
                if ask_for_reply_at is None:
                    ask_for_reply_at = loop.time() + _REPLY_GRACE
                elif loop.time() >= ask_for_reply_at:
                    self._reply_probe = self._channels.send("shell", "kernel_info_request", {})
                    ask_for_reply_at = None
            if self._lost is not None and collector.reply is not None:
                return "output_lost"  # a refused message: its idle may be lost too
            if self._probe_answered:
                self._lost = "the kernel's output for this call did not arrive"
                return "output_lost"
            if collector.reply is not None and not reply_seen and probe:
                # The code has finished; iopub only has to catch up.
                reply_seen = True
                deadline = loop.time() + _IOPUB_GRACE
            remaining = deadline - loop.time()
            if ask_for_reply_at is not None:
                remaining = min(remaining, max(ask_for_reply_at - loop.time(), 0.0))
            if deadline - loop.time() <= 0:
                if not reply_seen:
                    return "timeout"
                if self._probe is None:
                    self._probe = self._channels.send("shell", "kernel_info_request", {})
                    deadline = loop.time() + _PROBE_WAIT
                    continue
                self._lost = "the kernel's output for this call did not arrive"
                return "output_lost"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._changed.wait()

    # ------------------------------------------------------------ channels

    def _start_channels(self) -> None:
        self._channels.start()

    def _stop_channels(self) -> None:
        self._channels.close()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        """Hand a message from the kernel to the request in flight, and to whoever a request
        it answers is relayed for; drop the rest."""
        self._feed(msg)
        parent = msg.get("parent_header")
        parent_id = parent.get("msg_id") if isinstance(parent, dict) else None
        relay = self._relays.get(parent_id) if isinstance(parent_id, str) else None
        if relay is not None and not self._tell(relay, msg):
            self._relays.pop(str(parent_id), None)

    def _feed(self, msg: dict[str, Any]) -> None:
        """Hand a message from the kernel to the request in flight (or to a probe's wait)."""
        header = msg.get("header")
        msg_type = header.get("msg_type") if isinstance(header, dict) else None
        if self._probe is not None and msg_type == "status":
            parent = msg.get("parent_header")
            if isinstance(parent, dict) and parent.get("msg_id") == self._probe:
                self._probe_answered = True
                self._changed.set()
        if self._reply_probe is not None and msg_type == "kernel_info_reply":
            parent = msg.get("parent_header")
            if isinstance(parent, dict) and parent.get("msg_id") == self._reply_probe:
                self._reply_dropped = self._active is not None and self._active.reply is None
                self._changed.set()
        active = self._active
        if active is None:
            return
        try:
            active.feed(msg)
        except Exception:  # the collector is pure but its input comes from user code
            log.exception("kernel %s: message not understood", self.kernel_id)
            return
        self._interrupts.fed(active)
        if msg_type in ("execute_reply", "kernel_info_reply") or active.idle:
            self._changed.set()  # what `_follow` waits for (a busy status changes nothing)

    def _on_refused(self, channel: Channel, reason: str) -> None:
        refused = self._channels.refused
        if refused & (refused - 1) == 0:  # 1, 2, 4, 8, ...: a flood does not flood the log
            log.warning(
                "kernel %s: %s message refused (%d so far): %s",
                self.kernel_id, channel, refused, reason,
            )  # fmt: skip
        if self._active is not None:
            self._lost = f"the kernel sent {reason}, more than the service accepts"
            self._changed.set()

    def _on_exit(self, returncode: int) -> None:
        self._end_relays()
        self._end.exited(returncode)
        if not self._end.by_service:
            log.warning("kernel %s ended unexpectedly: %s", self.kernel_id, self.exit_words())
        self._changed.set()

    def exit_words(self) -> str:
        """Why the kernel ended, for people and models alike."""
        return self._end.words()

    def exit_cause(self) -> ExitCause | None:
        """Why the kernel ended, in a word; None while it runs."""
        return self._end.cause()

    def _log_excerpt(self) -> str:
        tail = self.process.output_tail()[-_LOG_TAIL:].strip()
        return f" Kernel log:\n{tail}" if tail else ""


# Starts a ready kernel of a kind with the given work directory as its cwd and home (the
# runtime's `_start_kernel`, wrapped by the metrics to count starts).
KernelFactory = Callable[[Path, KernelKind], Awaitable[Kernel]]
