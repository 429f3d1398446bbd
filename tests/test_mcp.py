"""The MCP server, driven by the official SDK's client: at /mcp of a real server (streamable
HTTP) and as `kernel-service mcp` over stdio, with real kernels."""

import asyncio
import base64
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, ImageContent, TextContent
from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS, MODERN_PROTOCOL_VERSIONS

from kernel_service.config import MIB
from kernel_service_client.tools.spec import TOOL_NAME
from tests.conftest import (
    descendants,
    kernel_processes,
    make_settings,
    running_server,
    wait_for,
)

KEY_A, KEY_B = "mcp-key-alpha-0123456789", "mcp-key-bravo-9876543210"
# The first message of an MCP session, for the tests that speak JSON-RPC themselves.
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": HANDSHAKE_PROTOCOL_VERSIONS[-1],
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "0"},
    },
}

Connect = Callable[[], AbstractAsyncContextManager[Client]]


@asynccontextmanager
async def http_client(
    url: str, key: str | None = None, terminate_on_close: bool = True
) -> AsyncIterator[Client]:
    """An MCP client on its own MCP session at `url`."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = httpx2.Timeout(30, read=300)
    async with httpx2.AsyncClient(headers=headers, timeout=timeout) as http:
        transport = streamable_http_client(
            url, http_client=http, terminate_on_close=terminate_on_close
        )
        async with Client(transport) as client:
            # the handshake era: the one with MCP sessions
            assert client.protocol_version in HANDSHAKE_PROTOCOL_VERSIONS
            yield client


def stdio_env(tmp: Path) -> dict[str, str]:
    """KERNEL_SERVICE_* for `kernel-service mcp`, as the servers of the other tests get."""
    settings = make_settings(tmp, log_level="info")
    names = [
        "connection_dir",
        "work_dir",
        "state_dir",
        "sandbox",
        "sandbox_uid_count",
        "sandbox_work_dir_mb",
        "log_level",
        "pool_size",
    ]
    return {f"KERNEL_SERVICE_{name.upper()}": str(getattr(settings, name)) for name in names}


@pytest.fixture(params=["http", "stdio"])
def connect(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Connect]:
    """Opens MCP sessions over one transport; afterwards no kernel or process is left."""
    if request.param == "http":
        with running_server(tmp_path) as server:
            yield lambda: http_client(f"{server.base_url}/mcp")
        return
    before = descendants()
    env = stdio_env(tmp_path)
    log = tmp_path / "mcp.log"
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "kernel_service", "mcp"], env=env
    )

    @asynccontextmanager
    async def stdio() -> AsyncIterator[Client]:
        with log.open("a") as errlog:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                yield client

    yield stdio
    connection_dir = Path(env["KERNEL_SERVICE_CONNECTION_DIR"])
    # the server ended on its own when its stdin closed, and ended its kernels first
    assert "all sessions closed" in log.read_text()
    assert kernel_processes(connection_dir) == []
    assert list(connection_dir.iterdir()) == []
    assert wait_for(lambda: not descendants() - before), "processes left behind"


def text(result: CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def session_of(result: CallToolResult) -> str:
    assert result.meta is not None
    session_id: str = result.meta["session_id"]
    return session_id


def test_lists_the_tool_keeps_state_and_returns_images(connect: Connect) -> None:
    async def scenario() -> None:
        async with connect() as client:
            [tool] = (await client.list_tools()).tools
            assert tool.name == TOOL_NAME
            assert "persistent IPython kernel" in (tool.description or "")
            assert tool.input_schema["required"] == ["code"]
            properties = tool.input_schema["properties"]
            assert set(properties) == {"code", "language", "session_id", "timeout"}
            # the languages a call may use, Python (the default) first
            assert properties["language"]["enum"][0] == "python"
            assert "bash" in properties["language"]["enum"]

            first = await client.call_tool(TOOL_NAME, {"code": "x = 21\nprint('set')"})
            assert not first.is_error
            assert text(first) == "set"
            second = await client.call_tool(TOOL_NAME, {"code": "x * 2"})
            assert text(second) == "Out[2]: 42"
            assert session_of(second) == session_of(first)

            plot = await client.call_tool(
                TOOL_NAME,
                {"code": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"},
            )
            assert not plot.is_error
            [image] = [c for c in plot.content if isinstance(c, ImageContent)]
            assert image.mime_type == "image/png"
            assert base64.b64decode(image.data).startswith(b"\x89PNG\r\n\x1a\n")
            assert "[image: image/png" in text(plot)

            # an SVG is no image block (models behind MCP clients refuse SVG), only text
            svg = await client.call_tool(
                TOOL_NAME,
                {
                    "code": "from IPython.display import SVG\n"
                    'SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\')'
                },
            )
            assert [c for c in svg.content if isinstance(c, ImageContent)] == []
            assert "[image: image/svg+xml" in text(svg)

    asyncio.run(scenario())


def test_progress_notifications_arrive_during_a_long_run(connect: Connect) -> None:
    arrivals: list[tuple[float, float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        arrivals.append((time.monotonic(), progress, message))

    async def scenario() -> float:
        async with connect() as client:
            result = await client.call_tool(
                TOOL_NAME,
                {"code": "import time\ntime.sleep(3.5)\n'done'"},
                progress_callback=on_progress,
            )
            assert text(result) == "Out[1]: 'done'"
            return time.monotonic()

    finished = asyncio.run(scenario())
    assert len(arrivals) >= 2, arrivals
    assert arrivals[0][0] < finished - 1.5  # during the run, not all at its end
    progress = [p for _, p, _ in arrivals]
    assert progress == sorted(progress) and progress[0] > 0
    assert all(
        m is not None and m.startswith("running, ") and m.endswith(" s") for *_, m in arrivals
    )


def test_bad_calls_are_tool_errors_and_the_session_carries_on(connect: Connect) -> None:
    async def scenario() -> None:
        async with connect() as client:
            cases: list[tuple[dict[str, Any], str]] = [
                ({"code": "   "}, "code is empty"),
                ({}, "code: Field required"),
                ({"code": "1", "timeout": 0}, "timeout: Input should be greater than 0"),
                ({"code": "1", "colour": "red"}, "colour: Extra inputs are not permitted"),
                ({"code": "1", "session_id": "nope"}, "Session 'nope' does not exist"),
                ({"code": "#" * (MIB + 1)}, "the limit is 1,048,576 bytes"),
            ]
            for arguments, expected in cases:
                result = await client.call_tool(TOOL_NAME, arguments)
                assert result.is_error, arguments
                assert expected in text(result), (arguments, text(result))

            unknown = await client.call_tool("python", {"code": "1"})
            assert unknown.is_error
            assert "the only tool here is 'code_interpreter'" in text(unknown)

            assert not (await client.call_tool(TOOL_NAME, {"code": "kept = 'yes'"})).is_error
            slow = await client.call_tool(TOOL_NAME, {"code": "while True: pass", "timeout": 1})
            assert slow.is_error
            assert "TimeoutError" in text(slow)
            after = await client.call_tool(TOOL_NAME, {"code": "kept"})
            assert not after.is_error
            assert text(after).endswith("'yes'")

    asyncio.run(scenario())


def test_explicit_session_id_reaches_a_session_from_another_mcp_session(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        url = f"{server.base_url}/mcp"

        async def scenario() -> None:
            async with http_client(url) as other:
                async with http_client(url) as client:
                    made = await client.call_tool(TOOL_NAME, {"code": "secret = 42"})
                    session_id = session_of(made)
                    reached = await other.call_tool(
                        TOOL_NAME, {"code": "secret", "session_id": session_id}
                    )
                    assert text(reached) == "Out[2]: 42"
                    # without it, the other MCP session has a kernel session of its own
                    own = await other.call_tool(TOOL_NAME, {"code": "secret"})
                    assert own.is_error
                    assert "NameError" in text(own)
                    assert session_of(own) != session_id

                # once its MCP session ended, its kernel session is gone
                assert wait_for(
                    lambda: server.client.get(f"/sessions/{session_id}").status_code == 404
                )
                gone = await other.call_tool(TOOL_NAME, {"code": "1", "session_id": session_id})
                assert gone.is_error
                assert f"Session {session_id!r} does not exist" in text(gone)

                # a session made over HTTP is reachable by its id too
                server.new_session("shared")
                server.execute("answer = 'from http'", "shared")
                shared = await other.call_tool(
                    TOOL_NAME, {"code": "answer", "session_id": "shared"}
                )
                assert text(shared) == "Out[2]: 'from http'"

        asyncio.run(scenario())


def test_ending_an_mcp_session_ends_its_kernel(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        url = f"{server.base_url}/mcp"

        async def scenario() -> None:
            async with http_client(url) as client:
                session_id = session_of(await client.call_tool(TOOL_NAME, {"code": "1"}))
                assert len(kernel_processes(server.connection_dir)) == 1
            assert wait_for(lambda: not kernel_processes(server.connection_dir))
            assert server.client.get(f"/sessions/{session_id}").status_code == 404
            assert server.client.get("/sessions").json()["sessions"] == []

            # one that leaves without ending it: the app's shutdown ends it (running_server checks)
            async with http_client(url, terminate_on_close=False) as client:
                await client.call_tool(TOOL_NAME, {"code": "1"})
            assert len(kernel_processes(server.connection_dir)) == 1

        asyncio.run(scenario())


def test_a_conversation_whose_session_is_gone_goes_on_in_a_new_one(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        url = f"{server.base_url}/mcp"

        async def scenario() -> None:
            async with http_client(url) as client:
                # calls that arrive together at the start make one session
                first, second = await asyncio.gather(
                    client.call_tool(TOOL_NAME, {"code": "x = 1"}),
                    client.call_tool(TOOL_NAME, {"code": "y = 2"}),
                )
                session_id = session_of(first)
                assert session_of(second) == session_id
                assert len(kernel_processes(server.connection_dir)) == 1

                assert server.client.delete(f"/sessions/{session_id}").status_code == 204
                again = await client.call_tool(TOOL_NAME, {"code": "'x' in dir()"})
                assert not again.is_error
                assert session_of(again) != session_id
                notice, answer = (c.text for c in again.content if isinstance(c, TextContent))
                assert f"this conversation's session {session_id} had ended" in notice
                assert answer == "Out[1]: False"

        asyncio.run(scenario())


def test_a_client_without_mcp_sessions_gets_a_kernel_per_call(tmp_path: Path) -> None:
    """2026-07-28 has no MCP session: each call runs in a session that ends with it."""
    with running_server(tmp_path) as server:
        url = f"{server.base_url}/mcp"

        async def scenario() -> None:
            transport = streamable_http_client(url)
            async with Client(transport, mode=MODERN_PROTOCOL_VERSIONS[-1]) as client:
                assert not (await client.call_tool(TOOL_NAME, {"code": "x = 1"})).is_error
                assert not kernel_processes(server.connection_dir)
                forgotten = await client.call_tool(TOOL_NAME, {"code": "x"})
                assert forgotten.is_error
                assert "NameError" in text(forgotten)
            assert server.client.get("/sessions").json()["sessions"] == []

        asyncio.run(scenario())


def test_api_keys_guard_mcp_and_own_its_sessions(tmp_path: Path) -> None:
    with running_server(tmp_path, api_key=f"{KEY_A},{KEY_B}") as server:
        url = f"{server.base_url}/mcp"
        accept = {"Accept": "application/json, text/event-stream"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY_A}):
            refused = server.client.post("/mcp", json=INITIALIZE, headers={**accept, **headers})
            assert refused.status_code == 401
            assert refused.json()["code"] == "unauthorized"
        # behind a proxy that sends its own Host, the key is the guard
        proxied = {**accept, "Authorization": f"Bearer {KEY_A}", "Host": "kernels.example.com"}
        assert server.client.post("/mcp", json=INITIALIZE, headers=proxied).status_code == 200

        def listed(key: str) -> list[str]:
            response = server.client.get("/sessions", headers={"Authorization": f"Bearer {key}"})
            return [s["session_id"] for s in response.json()["sessions"]]

        async def scenario() -> None:
            async with http_client(url, KEY_A) as alpha, http_client(url, KEY_B) as bravo:
                session_id = session_of(await alpha.call_tool(TOOL_NAME, {"code": "n = 1"}))
                # the key's namespace: its own listing, not another key's
                assert listed(KEY_A) == [session_id]
                assert listed(KEY_B) == []
                refused = await bravo.call_tool(TOOL_NAME, {"code": "n", "session_id": session_id})
                assert refused.is_error
                assert "does not exist" in text(refused)

        asyncio.run(scenario())


def test_without_a_sandbox_mcp_refuses_to_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    refused = subprocess.run(
        [sys.executable, "-m", "kernel_service", "mcp"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": str(empty)},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert refused.returncode != 0
    assert "refusing to start: the sandbox is not available" in refused.stderr
    assert refused.stdout == ""


def test_without_keys_on_loopback_mcp_refuses_other_hosts(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        headers = {"Accept": "application/json, text/event-stream"}
        rebound = server.client.post(
            "/mcp", json=INITIALIZE, headers={**headers, "Host": "attacker.example"}
        )
        assert rebound.status_code == 421
        assert server.client.post("/mcp", json=INITIALIZE, headers=headers).status_code == 200


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stdio_server_ends_on_a_signal_with_stdin_still_open(tmp_path: Path, signum: int) -> None:
    before = descendants()
    env = {**os.environ, **stdio_env(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-m", "kernel_service", "mcp"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert server.stdin is not None and server.stdout is not None
    try:
        messages = [
            INITIALIZE,
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": TOOL_NAME, "arguments": {"code": "print('up')"}},
            },
        ]
        for message in messages:
            server.stdin.write(json.dumps(message).encode() + b"\n")
        server.stdin.flush()
        answers = [json.loads(server.stdout.readline()) for _ in range(2)]
        assert answers[1]["result"]["content"][0]["text"] == "up"
        assert kernel_processes(tmp_path / "connection")

        server.send_signal(signum)  # stdin stays open
        assert server.wait(timeout=30) == 0
    finally:
        server.kill()
        server.wait()
    assert kernel_processes(tmp_path / "connection") == []
    assert list((tmp_path / "connection").iterdir()) == []
    assert wait_for(lambda: not descendants() - before)


def test_an_mcp_session_belongs_to_the_key_that_opened_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another key holding an Mcp-Session-Id gets 404 for POST, GET and DELETE, as for an
    unknown session; the owner's session, its kernel and its GET stream are untouched; the
    id is never logged above debug."""
    caplog.set_level(logging.INFO)
    accept = {"Accept": "application/json, text/event-stream"}
    version = {"Mcp-Protocol-Version": HANDSHAKE_PROTOCOL_VERSIONS[-1]}
    with running_server(tmp_path, api_key=f"{KEY_A},{KEY_B}") as server:

        def headers(key: str, session_id: str) -> dict[str, str]:
            bearer = {"Authorization": f"Bearer {key}", "Mcp-Session-Id": session_id}
            return {**accept, **version, **bearer}

        def refused(response: httpx.Response) -> None:
            assert response.status_code == 404, response.text
            assert response.json()["error"]["message"] == "Session not found"

        def get_stream(key: str, session_id: str) -> int:
            with server.client.stream("GET", "/mcp", headers=headers(key, session_id)) as got:
                return got.status_code  # an owner's stream ends when this closes

        def attack(session_id: str) -> None:
            params = {"name": TOOL_NAME, "arguments": {"code": "n = 666"}}
            call = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
            refused(server.client.post("/mcp", json=call, headers=headers(KEY_B, session_id)))
            assert get_stream(KEY_B, session_id) == 404
            refused(server.client.delete("/mcp", headers=headers(KEY_B, session_id)))

        # an MCP session with no GET stream yet: the other key can neither take it nor end
        # the session, and the owner opens it after
        bearer_a = {"Authorization": f"Bearer {KEY_A}"}
        opened = server.client.post("/mcp", json=INITIALIZE, headers={**accept, **bearer_a})
        assert opened.status_code == 200, opened.text
        plain = opened.headers["mcp-session-id"]
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (
            server.client.post("/mcp", json=initialized, headers=headers(KEY_A, plain)).status_code
            == 202
        )
        attack(plain)
        assert get_stream(KEY_A, plain) == 200

        # the official client's session, with a kernel: the other key's call never runs
        seen: list[str] = []

        async def remember(response: httpx2.Response) -> None:
            if "mcp-session-id" in response.headers:
                seen.append(response.headers["mcp-session-id"])

        async def scenario() -> None:
            http = httpx2.AsyncClient(headers=bearer_a, event_hooks={"response": [remember]})
            transport = streamable_http_client(f"{server.base_url}/mcp", http_client=http)
            async with http, Client(transport) as alpha:
                first = await alpha.call_tool(TOOL_NAME, {"code": "n = 1"})
                [kernel] = kernel_processes(server.connection_dir)
                await asyncio.to_thread(attack, seen[-1])
                again = await alpha.call_tool(TOOL_NAME, {"code": "n"})
                assert text(again) == "Out[2]: 1"  # its variables, not the other key's
                assert session_of(again) == session_of(first)
                assert kernel_processes(server.connection_dir) == [kernel]

        asyncio.run(scenario())
        assert server.client.delete("/mcp", headers=headers(KEY_A, plain)).status_code == 200
    ids = {plain, *seen}
    assert len(ids) == 2
    # the service's records (the test's own MCP client logs the id it received)
    for record in caplog.records:
        if record.name.startswith("mcp.client."):
            continue
        message = record.getMessage()
        assert record.levelno <= logging.DEBUG or not any(i in message for i in ids), message


def test_the_sdks_records_of_session_ids_are_lowered_to_debug(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shown where the SDK's logger logs debug, as debug; an error keeps its level, the id
    cut out."""
    with running_server(tmp_path):
        caplog.set_level(logging.DEBUG, logger="mcp.server.streamable_http_manager")
        manager = logging.getLogger("mcp.server.streamable_http_manager")
        session_id = "0123456789abcdef0123456789abcdef"
        manager.info("Created new transport with session ID: %s", session_id)
        manager.error("Session %s crashed", session_id)
    seen = {r.getMessage(): r.levelname for r in caplog.records if r.name == manager.name}
    assert seen[f"Created new transport with session ID: {session_id}"] == "DEBUG"
    assert seen["Session <id> crashed"] == "ERROR"
    assert seen["StreamableHTTP session manager shutting down"] == "INFO"  # no id: as it was
