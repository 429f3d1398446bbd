"""A child process of the local cluster (a cell, HAProxy): its output line by line under its
name, started again when it dies (as a StatefulSet would: same command, same directories),
ended with the cluster, or by the kernel if the cluster itself is killed."""

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import BinaryIO

log = logging.getLogger(__name__)

# A process that ran this long before it died is started again at once; one that dies
# younger waits 1 s, then 2, 4... up to _MAX_PAUSE (a cell that cannot start, say because
# its port was taken, is not started in a tight loop).
_HEALTHY_RUN = 10.0
_MAX_PAUSE = 30.0
_CHUNK = 64 * 1024
_PR_SET_PDEATHSIG = 1
# HAProxy in the foreground says each warning twice: on stderr as `[WARNING]  (pid) : what`,
# and in its log (stdout) as `what`. The second is not shown.
_HAPROXY_MESSAGE = re.compile(rb"^\[[A-Z]+\] +\(\d+\) : (.*)$")
_libc = ctypes.CDLL(None, use_errno=True)


def _end_with_parent() -> None:
    """In the child before it runs: SIGTERM when the cluster process dies, even by SIGKILL
    (the cell then stops as on any SIGTERM; not inherited by the kernels it starts)."""
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the cluster died before the call: nobody would signal it
        os.kill(os.getpid(), signal.SIGTERM)


class Supervised:
    """`argv` run under `name`, started again whenever it exits until `stop`."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], output: BinaryIO | None = None
    ) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self._output = output or sys.stderr.buffer
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()  # ends a pause before a start
        self.exits = 0  # how many times it ended on its own
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        # Output of each process started: it lasts as long as anything holds the pipe (a
        # killed cell's kernels do, and live on), not only as long as the process.
        self._relays: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        """The running process's id (None between a death and the next start)."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=self.name)

    async def stop(self, signum: int = signal.SIGTERM, grace: float = 60.0) -> None:
        """Send `signum`; after `grace` seconds SIGKILL. Returns once it has exited."""
        self._stopping.set()
        process = self._process
        if process is not None and process.returncode is None:
            process.send_signal(signum)
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                log.warning("%s did not stop within %g s: killed", self.name, grace)
                process.kill()
        if self._task is not None:
            await self._task
        if self._relays:  # what the process's children still say, for a moment
            _, late = await asyncio.wait(self._relays, timeout=5.0)
            for relay in late:
                relay.cancel()
            if late:
                await asyncio.wait(late)

    async def _supervise(self) -> None:
        pause = 0.0
        while not self._stopping.is_set():
            started = time.monotonic()
            # A pipe of our own, not asyncio's: its wait() would last until every holder of
            # the pipe had closed it (a killed cell's kernels hold it and live on).
            output, into = os.pipe()
            try:
                process = await asyncio.create_subprocess_exec(
                    *self._argv,
                    stdin=subprocess.DEVNULL,
                    stdout=into,
                    stderr=into,
                    env=self._env,
                    # terminal signals reach the cluster only, which passes them on once
                    start_new_session=True,
                    preexec_fn=_end_with_parent,
                )
            except BaseException:
                os.close(output)
                raise
            finally:
                os.close(into)
            self._process = process
            if self._stopping.is_set():  # `stop` came while it started
                process.terminate()
            relay = asyncio.create_task(self._relay(output), name=f"{self.name} output")
            self._relays.add(relay)
            relay.add_done_callback(self._relays.discard)
            code = await process.wait()
            if self._stopping.is_set():
                break
            self.exits += 1
            pause = 0.0 if time.monotonic() - started >= _HEALTHY_RUN else max(1.0, pause * 2)
            pause = min(pause, _MAX_PAUSE)
            how = f"signal {-code}" if code < 0 else f"status {code}"
            log.warning("%s exited (%s); starting it again in %g s", self.name, how, pause)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._woken(), pause)
            if not self._stopping.is_set():
                self.restarts += 1

    def wake(self) -> None:
        """Start it now if it is waiting to be started again."""
        self._wake.set()

    async def _woken(self) -> None:
        stopping = asyncio.create_task(self._stopping.wait())
        woken = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait((stopping, woken), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            woken.cancel()

    async def _relay(self, fd: int) -> None:
        """Each line written to the pipe `fd`, under the process's name, until it closes."""
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=_CHUNK)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(fd, "rb", buffering=0)
        )
        prefix = f"{self.name} | ".encode()
        pending = b""
        said = b""  # the last message HAProxy printed on stderr

        def shown(line: bytes) -> bool:
            nonlocal said
            if line == said:
                said = b""
                return False
            message = _HAPROXY_MESSAGE.match(line)
            said = message.group(1) if message else b""
            return True

        try:
            while chunk := await stream.read(_CHUNK):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > _CHUNK:  # a line without end: what came of it so far
                    lines.append(pending)
                    pending = b""
                shown_lines = [prefix + line + b"\n" for line in lines if shown(line)]
                self._output.write(b"".join(shown_lines))
                self._output.flush()
            if pending:
                self._output.write(prefix + pending + b"\n")
                self._output.flush()
        finally:
            transport.close()
