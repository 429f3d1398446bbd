"""The peers, measured the same way: Qwen-Agent's code interpreter and Lagent's
IPythonInterpreter, installed from PyPI into the benchmark's own venv (bench/.venv-peers,
never a project dependency) and driven by bench/peer_worker.py in a process of its own."""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.service import die_with_parent, kill_remaining
from bench.stats import Memory, memory, tree

VENV = Path(__file__).parent / ".venv-peers"
WORKER = Path(__file__).with_name("peer_worker.py")
# qwen-agent 0.0.31 is the last that runs kernels on the host (0.0.32+ need Docker); each
# imports a module it does not declare (tqdm, cachetools).
REQUIREMENTS = ["qwen-agent[code-interpreter]==0.0.31", "lagent==0.2.4", "tqdm", "cachetools"]
PEERS = {"qwen": "Qwen-Agent 0.0.31", "lagent": "Lagent 0.2.4"}
# Rounds per call: Qwen-Agent takes ~0.4 s a call, Lagent ~5 s (it drains iopub 5 s first).
PLANS = {
    "qwen": {"new": 3, "warm_up": 2, "warm": 20, "cells": 5},
    "lagent": {"new": 1, "warm_up": 0, "warm": 3, "cells": 1},
}
_STEP_LIMIT = 120.0  # seconds any one call may take before the peer is given up


def ensure_venv(log: Path) -> Path | None:
    """The peers' python, installing them on first use; None (and why, on stderr) if not."""
    python = VENV / "bin" / "python"
    marker = VENV / ".installed"
    wanted = "\n".join(REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted and python.exists():
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    print(f"peers: installing {', '.join(REQUIREMENTS)} into {VENV} ...", file=sys.stderr)
    steps = [
        [sys.executable, "-m", "venv", str(VENV)],
        [str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS],
        [str(python), "-c", "import qwen_agent.tools.code_interpreter, "
         "lagent.actions.ipython_interpreter"],
    ]  # fmt: skip
    with log.open("ab") as out:
        for step in steps:
            try:
                done = subprocess.run(
                    step, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"peers: skipped, installing failed: {exc} (see {log})", file=sys.stderr)
                return None
            if done.returncode != 0:
                print(f"peers: skipped, installing failed (see {log})", file=sys.stderr)
                return None
    marker.write_text(wanted)
    return python


@dataclass
class PeerResult:
    name: str
    new: list[float] = field(default_factory=list)
    warm: list[float] = field(default_factory=list)
    plot: list[float] = field(default_factory=list)
    pandas: list[float] = field(default_factory=list)
    idle: Memory | None = None
    timeout_seconds: float | None = None  # None: no answer within the limit
    timeout_limit: float = 0.0
    still_running: bool | None = None  # the kernel busy after the answer (or the limit)
    errors: list[str] = field(default_factory=list)


async def measure(python: Path, peer: str, root: Path, timeout: int) -> PeerResult:
    """Runs the worker for one peer; whatever happens, its process tree is gone after."""
    work = root / peer
    work.mkdir(parents=True, exist_ok=True)
    plan = {**PLANS[peer], "timeout": timeout}
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(work / "runtime")}
    process = await asyncio.create_subprocess_exec(
        str(python), str(WORKER), peer, str(work), json.dumps(plan),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        cwd=work, env=env, start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    driver = _Driver(PeerResult(peer), process, timeout)
    try:
        await driver.follow()
    finally:
        await driver.end()
    return driver.result


class _Driver:
    """Reads the worker's events into a PeerResult, answering its pauses."""

    def __init__(self, result: PeerResult, process: asyncio.subprocess.Process, timeout: int):
        self.result = result
        self._process = process
        self._timeout = timeout
        self._root = psutil.Process(process.pid)
        self._seen: set[tuple[int, float]] = set()  # every process of its tree, to end them
        self._kernel = 0

    async def follow(self) -> None:
        assert self._process.stdout is not None
        result = self.result
        while True:
            waiting_timeout = result.timeout_limit and result.timeout_seconds is None
            limit = result.timeout_limit if waiting_timeout else _STEP_LIMIT
            try:
                line = await asyncio.wait_for(self._process.stdout.readline(), limit)
            except TimeoutError:
                if waiting_timeout:  # stuck in the uninterruptible call
                    result.still_running = _busy(self._kernel)
                else:
                    result.errors.append(f"no answer within {limit:.0f} s")
                return
            self._seen |= _snapshot(self._root)
            if not line:
                if self._process.returncode not in (None, 0):
                    result.errors.append(f"worker exited with {self._process.returncode}")
                return
            await self._on(json.loads(line))

    async def _on(self, event: dict[str, Any]) -> None:
        result, kind = self.result, event["event"]
        if kind in ("new", "warm", "plot", "pandas"):
            getattr(result, kind).append(event["ms"])
            if not event["ok"]:
                result.errors.append(f"{kind}: unexpected answer")
        elif kind == "idle":
            await asyncio.sleep(1)
            result.idle = memory(tree(psutil.Process(event["kernel_pid"]), include_root=True))
            await self._go_on()
        elif kind == "timeout_start":
            self._kernel = event["kernel_pid"]
            result.timeout_limit = self._timeout + 10.0
        elif kind == "timeout":
            result.timeout_seconds = event["seconds"]
            result.still_running = _busy(self._kernel)
            await self._go_on()

    async def _go_on(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(b"\n")
        await self._process.stdin.drain()

    async def end(self) -> None:
        """SIGTERM (the peers' own clean-up), then SIGKILL for all that ever ran below it."""
        process = self._process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 10)
        self._seen |= _snapshot(self._root)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        kill_remaining(self._seen)
        await process.wait()


def _busy(pid: int) -> bool | None:
    """The process is burning CPU (the code it was told to stop still runs)."""
    try:
        return psutil.Process(pid).cpu_percent(interval=0.5) > 50
    except psutil.Error:
        return None


def _snapshot(root: psutil.Process) -> set[tuple[int, float]]:
    """(pid, create time) of `root` and all below it: enough to kill exactly them later."""
    found = set()
    for process in tree(root, include_root=True):
        with contextlib.suppress(psutil.Error):
            found.add((process.pid, process.create_time()))
    return found


async def run_peers(root: Path, timeout: int, log: Path) -> list[PeerResult]:
    python = await asyncio.to_thread(ensure_venv, log)
    if python is None:
        return []
    results = []
    for peer, title in PEERS.items():
        started = time.perf_counter()
        print(f"peers: {title} ...", file=sys.stderr, flush=True)
        results.append(await measure(python, peer, root, timeout))
        print(f"peers: {title} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return results
