"""The kernel bridge (kernel/programs/kernel_bridge.py) with the real Deno and R kernels,
unsandboxed, driven over its ipc sockets by jupyter_client's own client.

What each kernel does with an interrupt is shown here too: Deno answers interrupt_request
itself and dies of SIGINT (its kind is "message"); IRkernel ignores interrupt_request and
takes SIGINT as an interrupt (its kind is "signal": the bridge answers for it).
"""

import ast
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from tests.conftest import wait_for

BRIDGE = (
    Path(__file__).parent.parent / "kernel_service" / "kernel" / "programs" / "kernel_bridge.py"
)
DENO = Path(sys.executable).parent / "deno"
START_TIMEOUT = 60.0


@dataclass(frozen=True)
class Runtime:
    name: str
    argv: tuple[str, ...]
    interrupt_mode: str
    # code setting a variable, code reading it (its output shows "42"), a busy loop
    set_x: str
    read_x: str
    busy: str


RUNTIMES = {
    "deno": Runtime(
        "deno",
        (str(DENO), "jupyter", "--kernel", "--conn", "{connection_file}"),
        "message",
        "let x = 41;",
        "x + 1",
        "while (true) {}",
    ),
    "ir": Runtime(
        "ir",
        ("R", "--slave", "-e", "IRkernel::main()", "--args", "{connection_file}"),
        "signal",
        "x <- 41",
        "x + 1",
        "repeat {}",
    ),
}


def _installed(runtime: Runtime) -> bool:
    if runtime.name == "deno":
        return DENO.exists()
    return shutil.which("R") is not None and Path("/usr/share/jupyter/kernels/ir").exists()


@dataclass
class Bridged:
    """A bridge running a kernel, and a client connected to the bridge's ipc sockets."""

    process: subprocess.Popen[bytes]
    client: BlockingKernelClient
    connection_info: dict[str, Any]

    def kernel(self) -> psutil.Process:
        children = psutil.Process(self.process.pid).children()
        assert len(children) == 1
        return children[0]

    def execute(self, code: str, timeout: float = 30.0) -> tuple[dict[str, Any], list[Any]]:
        """Run `code`; its execute_reply and its iopub messages (status and input left out)."""
        outputs: list[Any] = []

        def keep(msg: dict[str, Any]) -> None:
            if msg["msg_type"] not in ("status", "execute_input"):
                outputs.append(msg)

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=keep)
        # Deno 2.9 may publish the value after its idle and reply: a kernel_info round trip
        # lets it arrive, as the service does (KernelKind.late_iopub)
        execution = reply["parent_header"]["msg_id"]
        probe = self.client.kernel_info()
        while True:
            msg = self.client.get_iopub_msg(timeout=timeout)
            parent = msg["parent_header"].get("msg_id")
            if parent == execution:
                keep(msg)
            elif parent == probe and msg["content"].get("execution_state") == "idle":
                break
        while self.client.get_shell_msg(timeout=timeout)["parent_header"]["msg_id"] != probe:
            pass  # its reply read too: the shell channel holds nothing for later reads
        return reply, outputs

    def control(self, msg_type: str) -> dict[str, Any]:
        msg = self.client.session.msg(msg_type, {})
        self.client.control_channel.send(msg)
        while True:
            reply: dict[str, Any] = self.client.control_channel.get_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                return reply


@pytest.fixture(params=sorted(RUNTIMES))
def runtime(request: pytest.FixtureRequest) -> Runtime:
    runtime = RUNTIMES[request.param]
    if not _installed(runtime):
        pytest.skip(f"{runtime.name} is not installed")
    return runtime


@pytest.fixture
def bridged(runtime: Runtime) -> Iterator[Bridged]:
    # a short path: the ipc sockets' names must fit a Unix socket address
    directory = Path(tempfile.mkdtemp(prefix="kb-"))
    bridged: Bridged | None = None
    started: list[psutil.Process] = []
    try:
        bridged = start(directory, runtime)
        started = [psutil.Process(bridged.process.pid), bridged.kernel()]
        yield bridged
    finally:
        if bridged is not None:
            bridged.client.stop_channels()
            if bridged.process.poll() is None:
                bridged.process.terminate()
            bridged.process.wait(timeout=30)
        _, alive = psutil.wait_procs(started, timeout=10)
        shutil.rmtree(directory)
    assert alive == []  # no process left behind
    assert not any(Path(tempfile.gettempdir()).glob(f"kernel-bridge-*/{directory.name}"))


def start(directory: Path, runtime: Runtime) -> Bridged:
    connection_file, info = write_connection_file(
        str(directory / "connection.json"),
        transport="ipc",
        ip=str(directory / "s"),
        key=uuid.uuid4().hex.encode(),
    )
    process = subprocess.Popen(
        [sys.executable, "-I", str(BRIDGE), connection_file, runtime.interrupt_mode, "--",
         *runtime.argv],
        env={**os.environ, "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"},
    )  # fmt: skip
    client = BlockingKernelClient(connection_file=connection_file)
    client.load_connection_file()
    client.start_channels()
    try:
        _wait_ready(client, process)
    except BaseException:
        client.stop_channels()
        process.kill()
        process.wait()
        raise
    return Bridged(process, client, dict(info))


def _wait_ready(client: BlockingKernelClient, process: subprocess.Popen[bytes]) -> None:
    """kernel_info answered on shell, and its idle seen on iopub (the subscription is live).

    Not `wait_for_ready`: without a kernel manager it takes a heartbeat not yet beating for
    a dead kernel, and R takes a second or two to start."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, "the bridge ended"
        msg_id = client.kernel_info()
        try:
            while client.get_shell_msg(timeout=1)["parent_header"]["msg_id"] != msg_id:
                pass
            while True:
                msg = client.get_iopub_msg(timeout=1)
                ours = msg["parent_header"].get("msg_id") == msg_id
                if ours and msg["content"].get("execution_state") == "idle":
                    return
        except queue.Empty:
            continue
    raise TimeoutError(f"no kernel_info_reply within {START_TIMEOUT} s")


def _text(outputs: list[Any]) -> str:
    return "".join(
        str(m["content"].get("data", {}).get("text/plain", m["content"].get("text", "")))
        for m in outputs
    )


def test_kernel_info(bridged: Bridged, runtime: Runtime) -> None:
    reply = bridged.client.kernel_info(reply=True, timeout=10)
    language = reply["content"]["language_info"]["name"]
    assert language == {"deno": "typescript", "ir": "R"}[runtime.name]


def test_execute_keeps_state(bridged: Bridged, runtime: Runtime) -> None:
    reply, _ = bridged.execute(runtime.set_x)
    assert reply["content"]["status"] == "ok"
    reply, outputs = bridged.execute(runtime.read_x)
    assert reply["content"]["status"] == "ok"
    assert "42" in _text(outputs)
    # Deno's value is an execute_result; IRkernel shows every value as display_data
    kinds = {m["msg_type"] for m in outputs}
    assert kinds == {"deno": {"execute_result"}, "ir": {"display_data"}}[runtime.name]


def _wait_for_input(bridged: Bridged, msg_id: str) -> None:
    while True:
        msg = bridged.client.get_iopub_msg(timeout=30)
        if msg["msg_type"] == "execute_input" and msg["parent_header"]["msg_id"] == msg_id:
            return


def _wait_for_cpu(process: psutil.Process, seconds: float) -> None:
    """The loop is running: the kernel has used `seconds` of CPU more than now."""
    used = sum(process.cpu_times()[:2])
    assert wait_for(lambda: sum(process.cpu_times()[:2]) - used >= seconds, timeout=60)


def test_interrupt_of_a_busy_loop(bridged: Bridged, runtime: Runtime) -> None:
    msg_id = bridged.client.execute(runtime.busy)
    _wait_for_input(bridged, msg_id)
    # IRkernel dies of a SIGINT that lands between its execute_input and the evaluation
    # (R halts on an interrupt outside a handler): only a loop seen running is interrupted
    _wait_for_cpu(bridged.kernel(), 0.2)
    assert bridged.control("interrupt_request")["content"]["status"] == "ok"
    reply = bridged.client.get_shell_msg(timeout=30)
    assert reply["parent_header"]["msg_id"] == msg_id
    # Deno: an error ("Execution failed"); IRkernel: "abort", with no error output
    assert reply["content"]["status"] == {"deno": "error", "ir": "abort"}[runtime.name]
    _, outputs = bridged.execute(runtime.read_x.replace("x", "1"))
    assert "2" in _text(outputs)
    assert bridged.process.poll() is None


def test_deno_dies_of_sigint(bridged: Bridged, runtime: Runtime) -> None:
    """Why Deno's interrupt_mode is "message": a SIGINT (what "signal" would send) ends it."""
    if runtime.name != "deno":
        pytest.skip("Deno's behaviour")
    bridged.kernel().send_signal(signal.SIGINT)
    assert bridged.process.wait(timeout=30) == 128 + signal.SIGINT


def test_the_bridge_exits_with_the_kernels_status(bridged: Bridged) -> None:
    bridged.kernel().kill()
    assert bridged.process.wait(timeout=30) == 128 + signal.SIGKILL


def test_sigterm_ends_kernel_and_bridge(bridged: Bridged) -> None:
    kernel = bridged.kernel()
    bridged.process.terminate()
    assert bridged.process.wait(timeout=30) == 128 + signal.SIGTERM
    assert not kernel.is_running()


def test_the_kernel_dies_with_the_bridge(bridged: Bridged) -> None:
    kernel = bridged.kernel()
    bridged.process.kill()
    bridged.process.wait(timeout=30)
    kernel.wait(timeout=30)  # PR_SET_PDEATHSIG; in the sandbox its PID namespace too


def test_malformed_messages_do_not_stop_it(bridged: Bridged) -> None:
    info = bridged.connection_info
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    for channel in ("shell", "control", "stdin", "hb"):
        sock = context.socket(zmq.DEALER)
        sock.connect(f"ipc://{info['ip']}-{info[f'{channel}_port']}")
        for frames in (
            [b"junk"],
            [b"<IDS|MSG>"],
            [b"<IDS|MSG>", b"sig", b"{not json", b"{}", b"{}", b"{}"],
            [b"<IDS|MSG>", b"sig", b'{"msg_type": "interrupt_request"}', b"{}", b"{}", b"{}"],
            [b"<IDS|MSG>", b"", b"[]", b"[]", b"[]", b"[]", b"x" * 100_000],
        ):
            sock.send_multipart(frames)
        sock.close(linger=1000)
    reply = bridged.client.kernel_info(reply=True, timeout=10)
    assert reply["content"]["status"] == "ok"
    assert bridged.process.poll() is None


def test_signal_mode_answers_interrupt_request_itself(bridged: Bridged, runtime: Runtime) -> None:
    """IRkernel does not answer interrupt_request (nor kernel_info on control): the bridge
    does, signed with the session's key, to the requester."""
    if runtime.interrupt_mode != "signal":
        pytest.skip("a signal-mode kernel's")
    reply = bridged.control("interrupt_request")
    assert reply["msg_type"] == "interrupt_reply"
    assert reply["content"] == {"status": "ok"}
    # the kernel, idle, took the SIGINT as nothing
    _, outputs = bridged.execute(runtime.read_x.replace("x", "1"))
    assert "2" in _text(outputs)


def test_the_bridge_imports_only_the_standard_library_and_pyzmq() -> None:
    """Only its file is mounted in the sandbox: nothing of this package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(BRIDGE.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    assert found - set(sys.stdlib_module_names) == {"zmq"}
