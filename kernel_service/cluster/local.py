"""`kernel-service cluster`: N cells, HAProxy in front of them and the status endpoint, on one
machine, in the foreground. Each cell is `kernel-service serve --cell i` with directories of
its own under the cluster's; one that dies is started again on them, and adopts its kernels.
SIGTERM or SIGINT stops everything, and nothing is left running."""

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from kernel_service.api.cluster_status import StatusServer
from kernel_service.cluster.haproxy import Cell, Front, render
from kernel_service.cluster.processes import Supervised
from kernel_service.cluster.status import PROBE_TIMEOUT, probe, summary
from kernel_service.config import Settings

log = logging.getLogger(__name__)

# In a directory the cluster made: so that a later cluster may take it again.
MARKER = ".kernel-service-cluster"
_START_TIMEOUT = 180.0  # seconds for every cell to answer (each preloads its modules once)


class ClusterRefused(Exception):
    """The cluster cannot start as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ClusterOptions:
    cells: int
    host: str
    port: int
    directory: Path | None  # None: a new temporary one, removed at the end
    serve_flags: tuple[str, ...]  # passed to every cell's `serve`
    settings: Settings  # the cells' settings, as flags and environment give them


def run_cluster(options: ClusterOptions) -> int:
    """Run until SIGTERM or SIGINT; the exit status (0: stopped as asked)."""
    haproxy = find_haproxy()
    if haproxy is None:
        raise ClusterRefused(
            "HAProxy, the cluster's front, is not installed (Debian, Ubuntu: apt-get install "
            "haproxy; docs/scaling.md)"
        )
    _check_port(options.host, options.port)
    if options.directory is not None:
        directory = _claim(options.directory)
    elif options.settings.keep_kernels:
        raise ClusterRefused(
            "--keep-kernels keeps the cells' sessions for a later start on the same "
            "directories: give them one with --dir"
        )
    else:
        directory = Path(tempfile.mkdtemp(prefix="kernel-service-cluster-"))
    try:
        return asyncio.run(_LocalCluster(options, directory, haproxy).run())
    finally:
        if options.directory is None:  # its own: nothing in it outlives the cluster
            shutil.rmtree(directory, ignore_errors=True)


def find_haproxy() -> str | None:
    """HAProxy's program: on the PATH, or where Debian puts it (/usr/sbin, often not on a
    user's PATH)."""
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def _claim(directory: Path) -> Path:
    """`directory`, made if missing; refused when it holds files of anything else."""
    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    others = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    if others and not (directory / MARKER).exists():
        listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ClusterRefused(
            f"{directory} holds files the cluster did not make ({listed}): give it a new or "
            "empty directory (its cells delete what no session owns in theirs)"
        )
    (directory / MARKER).touch()
    return directory


def _check_port(host: str, port: int) -> None:
    refusal = listen_refusal(host, port)
    if refusal is not None:
        raise ClusterRefused(refusal)


def listen_refusal(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on now (None: it can)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):
            return None
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return f"cannot listen on {host}:{port}: {reason}"


def _free_port(host: str) -> int:
    with socket.create_server(
        (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET
    ) as s:
        port: int = s.getsockname()[1]
    return port


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _LocalCluster:
    def __init__(self, options: ClusterOptions, directory: Path, haproxy: str) -> None:
        self.options = options
        self.directory = directory
        # Cells listen on loopback only, on ports of their own: the front is the one way in
        # (a cell's own address would bypass what the front refuses, such as POST /drain)
        self.cell_host = "::1" if options.host == "::1" else "127.0.0.1"
        self.cells = [
            Cell(index, _address(self.cell_host, _free_port(self.cell_host)))
            for index in range(options.cells)
        ]
        self.processes = [self._cell_process(cell) for cell in self.cells]
        self.status = StatusServer(self._report)
        self.front = Front(
            listen=_address(options.host, options.port),
            cells=tuple(self.cells),
            status=self.status.address,
            server_timeout=max(3600.0, 2 * options.settings.max_timeout + 60),
        )
        config = directory / "haproxy.cfg"
        config.write_text(render(self.front))
        self.haproxy = Supervised("haproxy", [haproxy, "-db", "-f", str(config)], dict(os.environ))
        self._client = httpx.AsyncClient(timeout=PROBE_TIMEOUT)
        self._served = False  # the cells all answered and the front started
        self._hurry = asyncio.Event()  # a second stop signal

    def _cell_process(self, cell: Cell) -> Supervised:
        home = self.directory / cell.name
        argv = [
            sys.executable, "-m", "kernel_service", "serve",
            "--cell", str(cell.index),
            "--host", self.cell_host,
            "--port", cell.address.rpartition(":")[2],
            "--state-dir", str(home / "state"),
            "--work-dir", str(home / "work"),
            "--connection-dir", str(home / "connection"),
            *self.options.serve_flags,
        ]  # fmt: skip
        env = dict(os.environ)
        settings = self.options.settings
        if settings.sandbox_uid_base is not None:  # a range each, one after the other
            base = settings.sandbox_uid_base + cell.index * settings.sandbox_uid_count
            env["KERNEL_SERVICE_SANDBOX_UID_BASE"] = str(base)
        return Supervised(cell.name, argv, env)

    async def _report(self) -> tuple[int, dict[str, object]]:
        states = await asyncio.gather(
            *(
                probe(self._client, c, p.pid, p.restarts)
                for c, p in zip(self.cells, self.processes, strict=True)
            )
        )
        return summary(list(states))

    async def run(self) -> int:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per probe otherwise
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:  # a second signal: stop without waiting for cells to revive
            (self._hurry if stop.is_set() else stop).set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping)
        log.info("starting %d cells in %s", len(self.cells), self.directory)
        try:
            await self.status.start()
            for process in self.processes:
                process.start()
            if not await self._until_cells_answer(stop):
                return 0 if stop.is_set() else 1
            self.haproxy.start()
            self._served = True
            url = f"http://{self.front.listen}"
            log.info(
                "the cluster serves at %s (%d cells; GET /healthz: their state)",
                url,
                len(self.cells),
            )
            await stop.wait()
            log.info("stopping the cluster")
            return 0
        finally:
            await self._stop()

    async def _until_cells_answer(self, stop: asyncio.Event) -> bool:
        deadline = loop_time() + _START_TIMEOUT
        waiting = list(zip(self.cells, self.processes, strict=True))
        while waiting and not stop.is_set():
            for cell, process in list(waiting):
                if process.exits:
                    log.error(
                        "%s ended as it started (its log is above): the cluster stops", cell.name
                    )
                    return False
                state = await probe(self._client, cell, process.pid, 0)
                if state.status != "down":
                    waiting.remove((cell, process))
            if loop_time() > deadline:
                names = ", ".join(cell.name for cell, _ in waiting)
                log.error("%s did not answer within %g s: the cluster stops", names, _START_TIMEOUT)
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)
        return not stop.is_set()

    async def _stop(self) -> None:
        """The front stops taking connections, the cells stop (ending their executions and,
        unless they keep them, their kernels), then the front ends."""
        # HAProxy's soft stop: it closes its listeners now, and ends once its connections
        # have (the cells' answers to requests in flight go out first)
        front = asyncio.create_task(self.haproxy.stop(signal.SIGUSR1, grace=90.0))
        await self._revive_dead_cells()
        await asyncio.gather(*(process.stop() for process in self.processes))
        await front
        await self.status.stop()
        await self._client.aclose()

    async def _revive_dead_cells(self) -> None:
        """A cell that died and is not yet started again has left kernels (and their
        reaper) running: started now, it adopts them, so that its stop ends them."""
        if self.options.settings.keep_kernels or not self._served:
            return  # kept for the next start anyway; or a cell that never started has none
        dead = [(c, p) for c, p in zip(self.cells, self.processes, strict=True) if p.pid is None]
        if not dead:
            return
        log.info("starting %s again to end its kernels", ", ".join(c.name for c, _ in dead))
        for _, process in dead:
            process.wake()
        deadline = loop_time() + _START_TIMEOUT
        exits = {id(p): p.exits for _, p in dead}
        while dead and loop_time() < deadline and not self._hurry.is_set():
            states = [await probe(self._client, c, p.pid, 0) for c, p in dead]
            dead = [
                (c, p)
                for (c, p), s in zip(dead, states, strict=True)
                if s.status == "down" and p.exits == exits[id(p)]  # died again: given up
            ]
            await asyncio.sleep(0.1)  # polling the cells' probes until they answer


def loop_time() -> float:
    return asyncio.get_running_loop().time()
