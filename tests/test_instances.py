"""Several instances on one host with no configuration: each claims uids of its own for its
kernels (several stdio MCP clients, two services); every refusal to start is one line."""

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import TextContent

from kernel_service.kernel.uids import UidRange, claim
from kernel_service_client.tools.spec import TOOL_NAME
from tests.conftest import SANDBOXED, descendants, wait_for

needs_sandbox = pytest.mark.skipif(not SANDBOXED, reason="sandbox uids need root and bubblewrap")
REFUSAL = "kernel-service: refusing to start: "


def default_env() -> dict[str, str]:
    """This environment with no KERNEL_SERVICE_* setting: every instance as it comes."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KERNEL_SERVICE_")}


def claimed_uids(log: str) -> UidRange:
    """The kernel uids an instance says it claimed, in its start-up log."""
    found = re.search(r"kernel uids (\d+-\d+)", log)
    uids = UidRange.parse(found.group(1) if found else None)
    assert uids is not None, log
    return uids


def assert_released(ranges: list[UidRange]) -> None:
    """No instance holds these uids any more: they can be claimed exactly."""
    for uids in ranges:
        claim(uids.count, uids.first).release()


@needs_sandbox
def test_three_stdio_clients_at_once_each_have_uids_of_their_own(tmp_path: Path) -> None:
    before = descendants()
    env = {name: value for name in ("PYTHONPATH",) if (value := os.environ.get(name))}
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "kernel_service", "mcp"], env=env
    )
    logs = [tmp_path / f"mcp-{n}.log" for n in range(3)]

    async def client(log: Path) -> int:
        with log.open("w") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as mcp:
                result = await mcp.call_tool(TOOL_NAME, {"code": "import os\nos.getuid()"})
                assert not result.is_error, result
                [out] = [c.text for c in result.content if isinstance(c, TextContent)]
                return int(out.removeprefix("Out[1]: "))

    async def all_at_once() -> list[int]:
        return list(await asyncio.gather(*(client(log) for log in logs)))

    uids = asyncio.run(all_at_once())
    texts = [log.read_text() for log in logs]
    ranges = [claimed_uids(text) for text in texts]
    # each kernel runs as a uid of its own instance's range, and the ranges do not meet
    for uid, uids_of_its_own in zip(uids, ranges, strict=True):
        assert uid in uids_of_its_own.uids
    assert len({uids.first for uids in ranges}) == 3
    for a, b in zip(ranges, ranges[1:] + ranges[:1], strict=True):
        assert not set(a.uids) & set(b.uids)
    # each ended with its client: kernels, private directories, uids all let go
    for text in texts:
        assert "all sessions closed" in text
        [private] = re.findall(r"state in (\S+)/state,", text)
        assert wait_for(lambda: not Path(private).exists(), 60), private  # noqa: B023
    assert wait_for(lambda: not descendants() - before, 60), "processes left behind"
    assert_released(ranges)


class Service:
    """`kernel-service serve` as a process of its own, started without waiting for it."""

    def __init__(self, directory: Path, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.log = directory / "service.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kernel_service", "serve", "--port", str(self.port),
             "--state-dir", str(directory / "state"),
             "--connection-dir", str(directory / "connection"),
             "--work-dir", str(directory / "work")],
            stdout=subprocess.DEVNULL, stderr=self.log.open("wb"), env=env,
        )  # fmt: skip
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def services(tmp_path: Path, count: int, env: dict[str, str]) -> Iterator[list[Service]]:
    """`count` services started at once, each on directories of its own; stopped after."""
    with ExitStack() as stack:
        started = []
        for n in range(count):
            (tmp_path / str(n)).mkdir(parents=True)
            started.append(Service(tmp_path / str(n), env))
            stack.callback(started[-1].stop)
        assert wait_for(lambda: all(s.ready() for s in started), 120)
        yield started


@needs_sandbox
def test_two_services_at_once_with_default_uids_both_start(tmp_path: Path) -> None:
    before = descendants()
    env = {**default_env(), "KERNEL_SERVICE_POOL_SIZE": "0"}
    with services(tmp_path, 2, env) as both:
        kernel_uids = []
        for service in both:
            answer = service.client.post("/execute", json={"code": "import os\nos.getuid()"})
            assert answer.json()["status"] == "ok", answer.text
            kernel_uids.append(int(answer.json()["result"]))
        ranges = [claimed_uids(service.log.read_text()) for service in both]
        for uid, uids_of_its_own in zip(kernel_uids, ranges, strict=True):
            assert uid in uids_of_its_own.uids
        assert not set(ranges[0].uids) & set(ranges[1].uids)
    assert all("all sessions closed" in service.log.read_text() for service in both)
    assert wait_for(lambda: not descendants() - before, 60), "processes left behind"
    assert_released(ranges)


def refusal(args: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    """The stderr of a `kernel-service` that must refuse to start: one line, non-zero exit."""
    done = subprocess.run(
        [sys.executable, "-m", "kernel_service", *args], env=env, cwd=cwd, check=False,
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(REFUSAL), done.stderr
    return lines[0].removeprefix(REFUSAL)


@needs_sandbox
@pytest.mark.parametrize("command", ["serve", "mcp"])
def test_a_busy_explicit_uid_range_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    with services(tmp_path, 1, {**default_env(), "KERNEL_SERVICE_POOL_SIZE": "0"}) as [first]:
        busy = claimed_uids(first.log.read_text())
        env = {**default_env(), "KERNEL_SERVICE_SANDBOX_UID_BASE": str(busy.first + 1)}
        other = tmp_path / "other"
        args = [command, "--state-dir", str(other / "state"), "--connection-dir",
                str(other / "c"), "--work-dir", str(other / "w")]  # fmt: skip
        reason = refusal(args + (["--port", "0"] if command == "serve" else []), env)
        assert f"the sandbox uids {busy.first + 1}-" in reason
        assert "claimed by another kernel-service" in reason
        # the first one is untouched
        answer = first.client.post("/execute", json={"code": "1 + 1"})
        assert answer.json()["result"] == "2"
    # unsandboxed, a service needs no uids: the same setting does not stop it
    if command == "serve":
        env["KERNEL_SERVICE_SANDBOX"] = "none"
        with services(tmp_path / "other", 1, env) as [plain]:
            assert plain.client.get("/healthz").json()["sandbox"] == "none"


def test_bad_settings_are_refused_in_one_line_naming_the_setting(tmp_path: Path) -> None:
    env = {**default_env(), "KERNEL_SERVICE_SANDBOX": "none"}
    reason = refusal(["serve", "--port", "70000"], env, cwd=tmp_path)
    assert reason.startswith("bad setting: KERNEL_SERVICE_PORT (--port): "), reason
    reason = refusal(["mcp"], {**env, "KERNEL_SERVICE_SANDBOX_UID_COUNT": "many"}, tmp_path)
    assert reason.startswith("bad setting: KERNEL_SERVICE_SANDBOX_UID_COUNT: "), reason
    reason = refusal(["serve"], {**env, "KERNEL_SERVICE_DEFAULT_TIMEOUT": "900"}, tmp_path)
    assert "KERNEL_SERVICE_DEFAULT_TIMEOUT must not exceed KERNEL_SERVICE_MAX_TIMEOUT" in reason


def test_a_port_in_use_is_refused_in_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        reason = refusal(
            ["serve", "--port", str(port), "--state-dir", str(tmp_path / "state"),
             "--connection-dir", str(tmp_path / "c"), "--work-dir", str(tmp_path / "w")],
            {**default_env(), "KERNEL_SERVICE_SANDBOX": "none"},
        )  # fmt: skip
    assert reason == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    assert not (tmp_path / "state").exists()  # refused before anything was made


@needs_sandbox
@pytest.mark.parametrize("command", ["serve", "mcp"])
def test_a_sandbox_that_cannot_work_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    env = {**default_env(), "PATH": "/nonexistent"}  # no bubblewrap to be found
    args = [command, "--port", "0"] if command == "serve" else [command]
    reason = refusal(args, env, cwd=tmp_path)  # (default directories: in the working one)
    assert reason.startswith("the sandbox is not available: bubblewrap, setpriv and prlimit")


def test_directories_of_a_running_service_are_refused_in_one_line(tmp_path: Path) -> None:
    env = {**default_env(), "KERNEL_SERVICE_SANDBOX": "none", "KERNEL_SERVICE_POOL_SIZE": "0"}
    with services(tmp_path, 1, env):
        other = ["--connection-dir", str(tmp_path / "c"), "--work-dir", str(tmp_path / "w")]
        reason = refusal(["mcp", "--state-dir", str(tmp_path / "0" / "state"), *other], env)
    assert reason.startswith(f"another kernel-service process uses {tmp_path / '0' / 'state'}")


@needs_sandbox
def test_claims_made_at_once_never_overlap() -> None:
    """Eight processes claim a block each at the same moment (they wait on one pipe)."""
    code = (
        "import sys\nfrom kernel_service.kernel.uids import claim\n"
        "sys.stdin.readline()\nprint(claim(100).range, flush=True)\nsys.stdin.read()"
    )
    claimants = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]  # fmt: skip
    try:
        for claimant in claimants:
            assert claimant.stdin is not None
            claimant.stdin.write("go\n")
            claimant.stdin.flush()
        ranges = []
        for claimant in claimants:
            assert claimant.stdout is not None
            ranges.append(UidRange.parse(claimant.stdout.readline().strip()))
    finally:
        for claimant in claimants:
            claimant.communicate(timeout=60)  # stdin closed: it exits, its claim goes
    assert None not in ranges
    uids = [uid for uids in ranges if uids for uid in uids.uids]
    assert len(uids) == len(set(uids)) == 800
    assert_released([uids for uids in ranges if uids])


@needs_sandbox
def test_a_block_some_process_runs_as_is_passed_over_unless_it_is_ours() -> None:
    free = claim(100)
    free.release()
    uid = free.range.first + 5
    squatter = subprocess.Popen(["sleep", "600"], user=uid, group=uid)
    try:
        assert wait_for(lambda: psutil.Process(squatter.pid).uids().real == uid, 60)
        other = claim(100)
        assert uid not in other.range.uids  # a killed service's kernel, say
        other.release()
        # a restart whose recorded kernel it is gets its range back
        again = claim(100, earlier=free.range, own={uid})
        assert again.range == free.range
        again.release()
    finally:
        squatter.kill()
        squatter.wait()
