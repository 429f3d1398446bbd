"""Every way an execution ends early leaves its session ready: the next call runs (and is not
aborted by the kernel's stop_on_error because it arrived while the cut-short code was still
ending)."""

import asyncio
import contextlib
import json
import os
import socket
import threading
from pathlib import Path

import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent

from kernel_service.execution.collector import OutputLimits
from kernel_service.kernel import Kernel
from kernel_service.runtime import Runtime
from kernel_service_client.models import ExecuteResultOutput
from kernel_service_client.tools.spec import TOOL_NAME
from tests.conftest import Server, make_settings, running_server, wait_for

# Long enough that only an ending from outside stops it; ignores nothing.
LONG = "import time\nfor _ in range(600):\n    time.sleep(0.1)\n"


def text_of(result: object) -> str:
    content = getattr(result, "content", [])
    return "\n".join(c.text for c in content if isinstance(c, TextContent))


def open_fds() -> list[str]:
    """What this process's descriptors point at."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            found.append(os.readlink(fd))
    return found


def assert_ready(server: Server, session: str) -> None:
    after = server.execute("print('next'); x + 1", session)
    assert after["status"] == "ok", after["text"]
    assert (after["stdout"], after["result"]) == ("next\n", "42")


def test_an_mcp_client_that_gives_up_leaves_the_session_ready(tmp_path: Path) -> None:
    async def scenario(url: str) -> tuple[str, str]:
        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300))
        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            await client.call_tool(TOOL_NAME, {"code": "x = 41"})
            # the SDK's own read timeout: the client gives up and tells the server so
            with pytest.raises((MCPError, TimeoutError)):
                await client.call_tool(TOOL_NAME, {"code": LONG}, read_timeout_seconds=1.5)
            after = await client.call_tool(TOOL_NAME, {"code": "print('next'); x + 1"})
            again = await client.call_tool(TOOL_NAME, {"code": "x * 2"})
            return text_of(after), text_of(again)

    with running_server(tmp_path) as server:
        after, again = asyncio.run(scenario(f"{server.base_url}/mcp"))
        assert "ExecutionAborted" not in after
        assert "next" in after and "Out[" in after and "42" in after, after
        assert "82" in again, again


@pytest.mark.parametrize("how", ["disconnect", "sse_close", "interrupt", "timeout"])
def test_every_early_ending_leaves_the_session_ready(
    server: Server, session: str, how: str
) -> None:
    server.execute("x = 41", session)
    body = {"code": LONG, "session_id": session}
    if how == "timeout":
        result = server.execute(LONG, session, timeout=1)
        assert result["status"] == "timeout"
    elif how == "interrupt":
        worker = threading.Thread(target=server.execute, args=(LONG, session))
        worker.start()
        server.wait_busy(session)
        assert server.client.post(f"/sessions/{session}/interrupt").json()["interrupted"]
        worker.join(timeout=60)
        assert not worker.is_alive()
    elif how == "sse_close":
        client = httpx.Client(base_url=server.base_url, timeout=120)
        with client, client.stream("POST", "/execute", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            server.wait_busy(session)
            # leaving the block closes the stream before the result
    else:
        payload = json.dumps(body).encode()
        head = (
            f"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            raw.sendall(head + payload)
            server.wait_busy(session)
            # the socket closes here, before the answer
    assert wait_for(
        lambda: server.client.get(f"/sessions/{session}").json()["status"] == "idle", 30
    )
    assert_ready(server, session)


def test_code_given_up_on_as_it_begins_is_interrupted_while_it_settles(tmp_path: Path) -> None:
    """A caller that gives up just before or just as the kernel begins the code: the
    interrupt is held for the code's start and sent again while the cut-short code neither
    raised nor ended (ipykernel can swallow a SIGINT that lands between announcing the code
    and running it), for as long as it settles; the kernel lives on and runs the next code."""
    settings = make_settings(tmp_path, interrupt_grace=20)
    limits = OutputLimits(text=settings.output_limit, rich=settings.rich_output_limit)

    async def scenario() -> list[tuple[str, bool, str | None]]:
        runtime = Runtime(settings)
        async with runtime.running():
            work_dir = tmp_path / "work" / "direct"
            work_dir.mkdir(parents=True)
            kernel = await Kernel.start(runtime.launcher, runtime.options, work_dir)
            rounds: list[tuple[str, bool, str | None]] = []
            try:
                for begun in (False, True) * 3:
                    cut = asyncio.create_task(
                        kernel.execute(LONG, timeout=600, interrupt_grace=20, limits=limits)
                    )
                    await asyncio.sleep(0)  # one step: the request is sent
                    active = kernel._active
                    assert active is not None
                    while begun and not active.started and active.reply is None:  # noqa: ASYNC110
                        await asyncio.sleep(0)  # a step at a time: cut as it begins
                    cut.cancel()
                    with pytest.raises(asyncio.CancelledError):
                        await cut
                    after = await kernel.execute(
                        "1 + 1", timeout=60, interrupt_grace=20, limits=limits
                    )
                    values = [
                        o.data.get("text/plain")
                        for o in after.collector.outputs()
                        if isinstance(o, ExecuteResultOutput)
                    ]
                    rounds.append((after.ending, kernel.alive, values[0] if values else None))
            finally:
                await kernel.shutdown()
            return rounds

    assert asyncio.run(scenario()) == [("done", True, "2")] * 6


def test_what_cut_short_code_prints_as_it_ends_is_not_spilled(tmp_path: Path) -> None:
    """The caller is gone and the execution over (its spill closed): what the code prints
    while it ends opens no file, no descriptor and no writing thread."""
    code = (
        "import sys, time\n"
        "try:\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    sys.stdout.write('x' * 600_000)\n"
        "    sys.stdout.flush()\n"
    )
    with running_server(tmp_path, interrupt_grace=30) as server:
        session = server.new_session()
        with pytest.raises(httpx.ReadTimeout):  # the client gives up: the server cancels
            httpx.post(
                f"{server.base_url}/execute",
                json={"code": code, "session_id": session},
                timeout=httpx.Timeout(60, read=1.5),
            )
        # the next execution runs once the cut-short one has ended, its output all come
        assert server.execute("1", session)["status"] == "ok"
        outputs = server.app.state.registry.get(session).work_dir / ".outputs"
        assert not (outputs / "1.txt").exists()
        assert [fd for fd in open_fds() if ".outputs" in fd] == []
        assert [t for t in threading.enumerate() if t.name.startswith("full-output")] == []
