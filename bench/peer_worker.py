"""Runs inside bench/.venv-peers (never the project's environment): times one peer's code
interpreter as it is used, and prints one JSON line per event.

    .venv-peers/bin/python bench/peer_worker.py qwen|lagent WORK_DIR PLAN_JSON

The plan says how many rounds of each call; after the warm calls the worker prints
`idle` (with its kernel's pid, for the memory reading) and waits for a line on stdin; the
timeout call comes last, since a peer may never come back from it.
"""

import json
import os
import sys
import time
from typing import Any

# The cells of bench/latency.py, repeated: this file runs in the peers' venv, which has
# neither kernel_service nor the bench package.
ONE_PLUS_ONE = "1+1"
PLOT = "import matplotlib.pyplot as plt\nplt.plot(range(10))\nplt.show()"
PANDAS = (
    "import pandas as pd\n"
    "df = pd.DataFrame({'x': range(1000), 'y': [i * i for i in range(1000)]})\n"
    "df.describe()"
)
UNINTERRUPTIBLE = "sum(range(10**10))"


def emit(**event: Any) -> None:
    print(json.dumps(event), flush=True)


class Qwen:
    """Qwen-Agent's CodeInterpreter tool: one kernel per tool instance (and pid)."""

    def __init__(self, work_dir: str) -> None:
        from qwen_agent.tools import code_interpreter

        self._module = code_interpreter
        self._work_dir = work_dir
        self._tool: Any = None

    def new_session(self) -> None:
        self.close()
        self._tool = self._module.CodeInterpreter({"work_dir": self._work_dir})

    def call(self, code: str, timeout: int = 30) -> str:
        text: str = self._tool.call(json.dumps({"code": code}), timeout=timeout)
        return text

    def ok(self, text: str, expected: str) -> bool:
        return expected in text

    def kernel_pid(self) -> int:
        key = f"{self._tool.instance_id}_{os.getpid()}"
        pid: int = self._module._MISC_SUBPROCESSES[key].pid
        return pid

    def close(self) -> None:
        if self._tool is None:
            return
        key = f"{self._tool.instance_id}_{os.getpid()}"
        process = self._module._MISC_SUBPROCESSES.get(key)
        self._tool.__del__()  # its own clean-up: shutdown_request, then terminate
        if process is not None:
            process.wait(10)
        self._tool = None


class Lagent:
    """Lagent's IPythonInterpreter: one kernel per process, started on first use."""

    def __init__(self, work_dir: str) -> None:
        from lagent.actions.ipython_interpreter import IPythonInterpreter

        self._cls = IPythonInterpreter
        self._work_dir = work_dir
        self._tool: Any = None

    def new_session(self) -> None:
        self.close()  # else a new instance in this process reuses the kernel
        self._tool = self._cls(work_dir=self._work_dir)

    def call(self, code: str, timeout: int | None = None) -> Any:
        return self._tool.run(code, timeout=timeout)

    def ok(self, answer: Any, expected: str) -> bool:
        return any(expected in str(part.get("content")) for part in answer.result or [])

    def kernel_pid(self) -> int:
        manager, _ = self._cls._KERNEL_CLIENTS[os.getpid()]
        pid: int = manager.provisioner.process.pid
        return pid

    def close(self) -> None:
        kernel = self._cls._KERNEL_CLIENTS.pop(os.getpid(), None)
        if kernel is not None:
            manager, client = kernel
            client.stop_channels()
            manager.shutdown_kernel(now=True)
        self._tool = None


def timed(peer: Any, code: str, expected: str, **kwargs: Any) -> tuple[float, bool]:
    started = time.perf_counter()
    answer = peer.call(code, **kwargs)
    return (time.perf_counter() - started) * 1000, peer.ok(answer, expected)


def main() -> None:
    name, work_dir, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    peer = Qwen(work_dir) if name == "qwen" else Lagent(work_dir)
    try:
        for _ in range(plan["new"]):
            peer.new_session()
            ms, ok = timed(peer, ONE_PLUS_ONE, "2")
            emit(event="new", ms=ms, ok=ok)
        for _ in range(plan["warm_up"]):
            peer.call(ONE_PLUS_ONE)
        for _ in range(plan["warm"]):
            ms, ok = timed(peer, ONE_PLUS_ONE, "2")
            emit(event="warm", ms=ms, ok=ok)
        for _ in range(plan["cells"]):
            ms, ok = timed(peer, PLOT, "png")
            emit(event="plot", ms=ms, ok=ok)
            ms, ok = timed(peer, PANDAS, "mean")
            emit(event="pandas", ms=ms, ok=ok)
        emit(event="idle", kernel_pid=peer.kernel_pid())
        sys.stdin.readline()
        emit(event="timeout_start", kernel_pid=peer.kernel_pid())
        started = time.perf_counter()
        answer = peer.call(UNINTERRUPTIBLE, timeout=plan["timeout"])
        emit(event="timeout", seconds=time.perf_counter() - started, answer=str(answer)[:300])
        sys.stdin.readline()  # the parent looks at the kernel before it goes
    finally:
        peer.close()


if __name__ == "__main__":
    main()
