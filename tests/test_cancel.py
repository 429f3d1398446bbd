"""Every way an execution ends early leaves its session ready: the next call runs (and is not
aborted by the kernel's stop_on_error because it arrived while the cut-short code was still
ending)."""

import asyncio
import json
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

from kernel_service_client.tools.spec import TOOL_NAME
from tests.conftest import Server, running_server, wait_for

# Long enough that only an ending from outside stops it; ignores nothing.
LONG = "import time\nfor _ in range(600):\n    time.sleep(0.1)\n"


def text_of(result: object) -> str:
    content = getattr(result, "content", [])
    return "\n".join(c.text for c in content if isinstance(c, TextContent))


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
