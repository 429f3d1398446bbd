"""The Jupyter kernel API (/api/kernels, its WebSocket) driven by the real, unmodified
client programs that speak it, as installed from PyPI (the dev extra): Jupyter Server in
gateway mode (JupyterLab's back end), AutoGen's and AG2's Jupyter code executors,
smolagents' remote-executor helpers, and Open WebUI's code-interpreter call sequence
(replayed here: Open WebUI itself is too heavy to install).

Each one runs against a real kernel-service on a loopback port with an API key, and each
kernel it makes is one of the service's sessions (same id, same history).
"""

import asyncio
import base64
import contextlib
import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import Server, alive, running_server, stop_process, wait_for

# what the clients' own dependencies say when imported: not this test's business
pytestmark = pytest.mark.filterwarnings(
    "ignore:Support for class-based `config` is deprecated",  # autogen-ext's pydantic model
    "ignore:jsonschema.RefResolver is deprecated",  # AG2
    "ignore:Accessing jsonschema.__version__ is deprecated",  # AG2
)

KEY = "jupyter-clients-key-0123456789"  # the service's API key
JS_TOKEN = "jupyter-server-token-9876543210"  # Jupyter Server's own token


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One kernel-service with an API key, its client carrying the key."""
    with running_server(tmp_path_factory.mktemp("jupyter-clients"), api_key=KEY) as server:
        server.client.headers["Authorization"] = f"Bearer {KEY}"
        yield server


@pytest.fixture
def no_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    """No Docker daemon can be reached: the executors named for Docker use only the
    `docker` package's import, never a daemon."""
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")


def sessions_of(service: Server) -> set[str]:
    """The ids of the key's sessions, as the service's own API lists them."""
    response = service.client.get("/sessions")
    assert response.status_code == 200, response.text
    return {s["session_id"] for s in response.json()["sessions"]}


def history_codes(service: Server, session_id: str) -> list[str]:
    response = service.client.get(f"/sessions/{session_id}/history")
    assert response.status_code == 200, response.text
    return [e["code"] for e in response.json()["executions"]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------- Jupyter Server


@dataclass
class JupyterServer:
    process: "subprocess.Popen[bytes]"
    base_url: str
    client: httpx.Client
    log: Path
    # its child processes, seen while it ran (none are expected in gateway mode)
    children: set[int] = field(default_factory=set)

    def ws_url(self, kernel_id: str) -> str:
        ws_base = self.base_url.replace("http", "ws", 1)
        return f"{ws_base}/api/kernels/{kernel_id}/channels?session_id={uuid.uuid4()}"

    def note_children(self) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            found = psutil.Process(self.process.pid).children(recursive=True)
            self.children |= {child.pid for child in found}

    def shut_down(self) -> int:
        """Stop it as its API does (POST /api/shutdown); its exit status."""
        self.note_children()
        assert self.client.post("/api/shutdown").status_code == 200
        return self.process.wait(timeout=60)


@contextmanager
def jupyter_server(service: Server, tmp: Path) -> Iterator[JupyterServer]:
    """`jupyter server` (as `python -m jupyter_server`, the same application without the
    `jupyter` launcher on PATH) in gateway mode on a free loopback port, its gateway our service
    (with the key); its configuration and runtime files in `tmp`. Killed at the end if it
    did not stop by itself; its log in tmp/jupyter-server.log."""
    port = free_port()
    gateway = service.base_url
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNEL_", "JUPYTER"))}
    for name in ("config", "data", "runtime"):
        (tmp / name).mkdir()
        env[f"JUPYTER_{name.upper()}_DIR"] = str(tmp / name)
    (tmp / "root").mkdir()
    log = tmp / "jupyter-server.log"
    command = [
        sys.executable, "-m", "jupyter_server",
        "--allow-root", "--no-browser",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        f"--ServerApp.root_dir={tmp / 'root'}",
        f"--IdentityProvider.token={JS_TOKEN}",
        f"--GatewayClient.url={gateway}",
        f"--GatewayClient.ws_url={gateway.replace('http', 'ws', 1)}",
        f"--GatewayClient.auth_token={KEY}",
        "--GatewayClient.request_timeout=60",
    ]  # fmt: skip
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp
        )
    base_url = f"http://127.0.0.1:{port}"
    client = httpx.Client(
        base_url=base_url, headers={"Authorization": f"token {JS_TOKEN}"}, timeout=120
    )

    def ready() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return client.get("/api").status_code == 200
        except httpx.TransportError:
            return False

    js = JupyterServer(process, base_url, client, log)
    try:
        assert wait_for(ready, 120), log.read_text()
        js.note_children()
        yield js
    finally:
        client.close()
        js.note_children()
        stop_process(process)  # still running if the test failed half-way
        # nothing of it is left: not it, nor what it started, nor any server on its port
        assert wait_for(lambda: not [pid for pid in js.children if alive(pid)], 30)
        on_port = [
            p for p in psutil.process_iter(["cmdline"])
            if f"--ServerApp.port={port}" in (p.info["cmdline"] or [])
        ]  # fmt: skip
        assert on_port == []


def jupyter_message(msg_type: str, content: dict[str, Any], session: str) -> dict[str, Any]:
    """A request as a Jupyter front end writes it (JSON text, a `channel` field)."""
    return {
        "header": {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "test",
            "session": session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        },
        "parent_header": {},
        "metadata": {},
        "content": content,
        "channel": "shell",
        "buffers": [],
    }


def exchange(
    ws: Any, request: dict[str, Any], until: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """Send `request` on a websocket-client socket; the messages answering it (by parent
    msg_id), up to the first for which `until` holds."""
    ws.send(json.dumps(request))
    msg_id = request["header"]["msg_id"]
    answers = []
    while True:
        message = json.loads(ws.recv())
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        answers.append(message)
        if until(message):
            return answers


def idle(message: dict[str, Any]) -> bool:
    return bool(message["msg_type"] == "status" and message["content"]["execution_state"] == "idle")


def execute(ws: Any, code: str, session: str) -> list[dict[str, Any]]:
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}  # fmt: skip
    return exchange(ws, jupyter_message("execute_request", content, session), idle)


def outputs(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(msg_type, what it carries) of each output message."""
    found: list[tuple[str, Any]] = []
    for m in messages:
        content = m["content"]
        if m["msg_type"] == "stream":
            found.append(("stream", (content["name"], content["text"])))
        elif m["msg_type"] == "execute_result":
            found.append(("execute_result", content["data"]["text/plain"]))
        elif m["msg_type"] == "error":
            found.append(("error", content["ename"]))
    return found


def check_kernelspecs(js: JupyterServer) -> None:
    """Our kernel spec, and its logo, through Jupyter Server."""
    # the first answer may be Jupyter Server's own default; the second is the gateway's
    for _ in range(2):
        specs = js.client.get("/api/kernelspecs")
        assert specs.status_code == 200, specs.text
    body = specs.json()
    assert body["default"] == "python3"
    ours = body["kernelspecs"]["python3"]
    assert ours["spec"]["display_name"] == "Python 3 (kernel-service)"
    assert ours["spec"]["language"] == "python"
    # a logo, which Jupyter Server fetches from the gateway for its browser
    logo = js.client.get(ours["resources"]["logo-64x64"])
    assert logo.status_code == 200, logo.text
    assert logo.content.startswith(b"\x89PNG")


def drive_kernel(js: JupyterServer, service: Server, kernel_id: str) -> None:
    """A front end's WebSocket through Jupyter Server: kernel_info, executions whose state
    persists, an error, an interrupt and a restart through Jupyter Server's REST API."""
    from websocket import create_connection

    header = [f"Authorization: token {JS_TOKEN}"]  # no subprotocols: Jupyter Server picks none
    ws = create_connection(js.ws_url(kernel_id), header=header, timeout=120)
    with closing(ws):
        session = uuid.uuid4().hex
        info = exchange(
            ws,
            jupyter_message("kernel_info_request", {}, session),
            lambda m: m["msg_type"] == "kernel_info_reply",
        )
        reply = info[-1]["content"]
        assert reply["status"] == "ok"
        assert reply["language_info"]["name"] == "python"

        first = execute(ws, "x = 41\nprint('hi')\nx + 1", session)
        assert outputs(first) == [("stream", ("stdout", "hi\n")), ("execute_result", "42")]
        assert idle(first[-1]) and first[-1]["channel"] == "iopub"
        second = execute(ws, "print(x * 2)", session)  # the state persists
        assert outputs(second) == [("stream", ("stdout", "82\n"))]
        failed = execute(ws, "1 / 0", session)
        assert outputs(failed) == [("error", "ZeroDivisionError")]

        # interrupt, through Jupyter Server, code that would run for ever, once it runs (its
        # sleep is the kernel's workload, never waited out: the test waits for 'started')
        endless = jupyter_message(
            "execute_request",
            {"code": "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.05)",
             "silent": False, "store_history": True, "user_expressions": {},
             "allow_stdin": False},
            session,
        )  # fmt: skip
        answers = exchange(ws, endless, lambda m: m["msg_type"] == "stream")
        assert outputs(answers)[-1] == ("stream", ("stdout", "started\n"))
        assert service.status(kernel_id) == "busy"
        interrupted = js.client.post(f"/api/kernels/{kernel_id}/interrupt")
        assert interrupted.status_code == 204, interrupted.text
        while not idle(answers[-1]):
            message = json.loads(ws.recv())
            if message["parent_header"].get("msg_id") == endless["header"]["msg_id"]:
                answers.append(message)
        assert ("error", "KeyboardInterrupt") in outputs(answers)
        assert outputs(execute(ws, "x", session)) == [("execute_result", "41")]

        # restart, through Jupyter Server: the variables are gone, the socket still works
        restarted = js.client.post(f"/api/kernels/{kernel_id}/restart")
        assert restarted.status_code == 200, restarted.text
        assert restarted.json()["id"] == kernel_id
        after = execute(ws, "'x' in globals()", session)
        assert outputs(after) == [("execute_result", "False")]


def test_jupyter_server_in_gateway_mode(service: Server, tmp_path: Path) -> None:
    """Jupyter Server (JupyterLab's back end) with our service as its kernel gateway:
    kernel specs, kernels, a notebook session, its WebSocket relayed both ways, interrupt,
    restart, delete, and its shutdown ending the kernels it still had."""
    before = sessions_of(service)
    with jupyter_server(service, tmp_path) as js:
        check_kernelspecs(js)

        started = js.client.post("/api/kernels", json={"name": "python3"})
        assert started.status_code == 201, started.text
        kernel_id = started.json()["id"]
        assert started.json()["name"] == "python3"
        assert sessions_of(service) == before | {kernel_id}  # the kernel is our session

        # Jupyter Server's list parses every model (last_activity strictly)
        listed = js.client.get("/api/kernels")
        assert listed.status_code == 200, listed.text
        [model] = [k for k in listed.json() if k["id"] == kernel_id]
        assert model["name"] == "python3"
        assert model["execution_state"] in ("starting", "idle", "busy")

        drive_kernel(js, service, kernel_id)
        # what ran through Jupyter Server is the session's history on our side
        codes = history_codes(service, kernel_id)
        assert codes[:3] == ["x = 41\nprint('hi')\nx + 1", "print(x * 2)", "1 / 0"]
        assert codes[-2:] == ["x", "'x' in globals()"]

        # a notebook's session: Jupyter Server starts another kernel on the gateway
        notebook = js.client.post(
            "/api/sessions",
            json={"path": "a.ipynb", "type": "notebook", "name": "a.ipynb",
                  "kernel": {"name": "python3"}},
        )  # fmt: skip
        assert notebook.status_code == 201, notebook.text
        other = notebook.json()["kernel"]["id"]
        assert other != kernel_id
        assert sessions_of(service) == before | {kernel_id, other}

        deleted = js.client.delete(f"/api/kernels/{kernel_id}")
        assert deleted.status_code == 204, deleted.text
        assert sessions_of(service) == before | {other}
        assert js.client.get(f"/api/kernels/{kernel_id}").status_code == 404

        # a kernel that ends on our side (deleted, culled) leaves Jupyter Server's list
        third = js.client.post("/api/kernels", json={"name": "python3"}).json()["id"]
        assert third in {k["id"] for k in js.client.get("/api/kernels").json()}
        assert service.client.delete(f"/sessions/{third}").status_code == 204
        assert {k["id"] for k in js.client.get("/api/kernels").json()} == {other}
        assert js.client.get(f"/api/kernels/{third}").status_code == 404

        # a clean stop: Jupyter Server shuts down the kernels it still has, on the gateway
        assert js.shut_down() == 0, js.log.read_text()
    assert sessions_of(service) == before


# ---------------------------------------------------------------- AutoGen and AG2

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"


@pytest.mark.usefixtures("no_docker")
def test_autogen_docker_jupyter_executor(service: Server, tmp_path: Path) -> None:
    """AutoGen's DockerJupyterCodeExecutor (autogen-ext) pointed at the service: code
    blocks, state across calls, a plot saved as a file, an error, a restart that loses the
    state, and its stop deleting the kernel."""
    from autogen_core import CancellationToken
    from autogen_core.code_executor import CodeBlock
    from autogen_ext.code_executors.docker_jupyter import DockerJupyterCodeExecutor
    from autogen_ext.code_executors.docker_jupyter._jupyter_server import JupyterConnectionInfo

    assert "docker" in sys.modules  # the package is imported; its daemon is never asked
    port = int(service.base_url.rsplit(":", 1)[1])
    info = JupyterConnectionInfo(host="127.0.0.1", use_https=False, port=port, token=KEY)
    before = sessions_of(service)

    async def run() -> str:
        async def blocks(executor: DockerJupyterCodeExecutor, *codes: str) -> Any:
            code_blocks = [CodeBlock(code=code, language="python") for code in codes]
            return await executor.execute_code_blocks(code_blocks, CancellationToken())

        async with DockerJupyterCodeExecutor(
            jupyter_server=info, timeout=120, output_dir=tmp_path
        ) as executor:
            [kernel_id] = sessions_of(service) - before
            first = await blocks(executor, "x = 41\nprint('hi')", "x + 1")
            assert (first.exit_code, first.output) == (0, "hi\n\n42")
            second = await blocks(executor, "print(x * 2)")
            assert (second.exit_code, second.output.strip()) == (0, "82")
            plot = await blocks(executor, PLOT)
            assert plot.exit_code == 0, plot.output
            [png] = plot.output_files
            assert png.parent == tmp_path and png.read_bytes().startswith(b"\x89PNG")
            failed = await blocks(executor, "print('before')", "1 / 0", "print('never')")
            assert failed.exit_code == 1
            assert "before" in failed.output and "ZeroDivisionError" in failed.output
            assert "never" not in failed.output
            await executor.restart()
            after = await blocks(executor, "print('x' in globals())")
            assert (after.exit_code, after.output.strip()) == (0, "False")
            assert sessions_of(service) == before | {kernel_id}  # the same kernel
            codes = history_codes(service, kernel_id)  # each block an execution of ours
            assert codes == ["x = 41\nprint('hi')", "x + 1", "print(x * 2)", PLOT,
                             "print('before')", "1 / 0", "print('x' in globals())"]  # fmt: skip
        return kernel_id

    kernel_id = asyncio.run(run())
    assert kernel_id not in sessions_of(service)  # deleted on the way out
    assert sessions_of(service) == before


@pytest.mark.usefixtures("no_docker")
def test_ag2_jupyter_code_executor(service: Server, tmp_path: Path) -> None:
    """AG2's (`autogen` 0.14, the classic API) JupyterCodeExecutor pointed at the
    service: the same checks, synchronously (requests and websocket-client)."""
    from autogen.coding import CodeBlock
    from autogen.coding.jupyter import JupyterCodeExecutor, JupyterConnectionInfo

    port = int(service.base_url.rsplit(":", 1)[1])
    info = JupyterConnectionInfo(host="127.0.0.1", use_https=False, port=port, token=KEY)
    before = sessions_of(service)

    def blocks(executor: JupyterCodeExecutor, *codes: str) -> Any:
        return executor.execute_code_blocks([CodeBlock(code=c, language="python") for c in codes])

    with JupyterCodeExecutor(info, kernel_name="python3", timeout=120, output_dir=tmp_path) as ex:
        [kernel_id] = sessions_of(service) - before
        first = blocks(ex, "x = 41\nprint('hi')", "x + 1")
        assert (first.exit_code, first.output) == (0, "hi\n\n42")
        second = blocks(ex, "print(x * 2)")
        assert (second.exit_code, second.output.strip()) == (0, "82")
        plot = blocks(ex, PLOT)
        assert plot.exit_code == 0, plot.output
        [png] = plot.output_files
        assert Path(png).parent == tmp_path and Path(png).read_bytes().startswith(b"\x89PNG")
        failed = blocks(ex, "print('before')", "1 / 0", "print('never')")
        # AG2 keeps only the error's output, and stops at the failed block
        assert failed.exit_code == 1
        assert failed.output.startswith("ERROR: ERROR: ZeroDivisionError: division by zero")
        assert "----> 1 1 / 0" in failed.output  # the kernel's traceback, verbatim
        ex.restart()
        after = blocks(ex, "print('x' in globals())")
        assert (after.exit_code, after.output.strip()) == (0, "False")
        assert sessions_of(service) == before | {kernel_id}
        codes = history_codes(service, kernel_id)
        assert codes == ["x = 41\nprint('hi')", "x + 1", "print(x * 2)", PLOT,
                         "print('before')", "1 / 0", "print('x' in globals())"]  # fmt: skip
    assert sessions_of(service) == before


# ---------------------------------------------------------------- Open WebUI


async def open_webui_execute(ws: Any, code: str) -> tuple[str, str, list[str]]:
    """Open WebUI's one execute_request on an open socket, sent at once (no kernel_info
    first), and its reading of the answer until the request's idle: stdout, stderr (where
    a traceback goes too) and results (a PNG as a data URI, else the plain text)."""
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "user",
              "session": uuid.uuid4().hex, "date": "", "version": "5.3"}  # fmt: skip
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": True}  # fmt: skip
    request = {"header": header, "parent_header": {}, "metadata": {}, "content": content,
               "channel": "shell"}  # fmt: skip
    await ws.send(json.dumps(request))
    stdout = stderr = ""
    results: list[str] = []
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), 120))
        if message.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        body, kind = message["content"], message.get("msg_type")
        if kind == "stream" and body["name"] == "stdout":
            stdout += body["text"]
        elif kind == "stream" and body["name"] == "stderr":
            stderr += body["text"]
        elif kind in ("execute_result", "display_data") and "image/png" in body["data"]:
            results.append(f"data:image/png;base64,{body['data']['image/png']}")
        elif kind in ("execute_result", "display_data") and "text/plain" in body["data"]:
            results.append(body["data"]["text/plain"])
        elif kind == "error":
            stderr += "\n".join(body["traceback"])
        elif kind == "status" and body["execution_state"] == "idle":
            return stdout, stderr, results


async def open_webui_run(base_url: str, code: str, token: str, sent: list[Any]) -> dict[str, str]:
    """Open WebUI's code interpreter with a Jupyter token (open_webui/utils/
    code_interpreter.py, 0.12), its calls replayed: a kernel made with an empty POST, the
    token in the query (REST and WebSocket, no headers), one execution, the kernel
    deleted. Its answer as Open WebUI makes it: stdout, stderr and result (a failure's
    message in stderr). The HTTP requests' headers go to `sent`."""
    import aiohttp
    import websockets

    async def on_headers(_: Any, __: Any, params: aiohttp.TraceRequestHeadersSentParams) -> None:
        sent.append((params.method, params.url.path, dict(params.headers)))

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(on_headers)
    params = {"token": token}
    stdout = stderr = ""
    results: list[str] = []
    kernel_id = ""
    async with aiohttp.ClientSession(
        base_url=base_url + "/", trust_env=True, trace_configs=[trace]
    ) as http:
        try:
            async with http.post("api/kernels", params=params) as response:
                response.raise_for_status()
                kernel_id = (await response.json())["id"]
            ws_url = f"{base_url.replace('http', 'ws', 1)}/api/kernels/{kernel_id}/channels"
            async with websockets.connect(f"{ws_url}?token={token}", additional_headers={}) as ws:
                stdout, stderr, results = await open_webui_execute(ws, code)
        except Exception as error:  # as Open WebUI does: the failure is the answer
            stderr = f"Error: {error}"
        finally:
            if kernel_id:
                async with http.delete(f"api/kernels/{kernel_id}", params=params) as response:
                    response.raise_for_status()
    return {"stdout": stdout.strip(), "stderr": stderr.strip(), "result": "\n".join(results)}


def test_open_webui_code_interpreter(service: Server) -> None:
    """Open WebUI's code interpreter calls, replayed (aiohttp, websockets): a fresh kernel
    for each run made from an empty POST, `?token=` on REST and the WebSocket, stdout and
    stderr apart, a plot as a PNG data URI, a traceback, the kernel deleted; a wrong
    token refused with 401."""
    import websockets

    before = sessions_of(service)
    base = service.base_url

    async def run() -> None:
        sent: list[Any] = []
        printed = await open_webui_run(
            base, "import sys\nprint('hi')\nprint('err', file=sys.stderr)\n41 + 1", KEY, sent
        )
        assert printed == {"stdout": "hi", "stderr": "err", "result": "42"}
        # the POST that made the kernel had no body, typed as bytes (as aiohttp sends it)
        method, path, headers = sent[0]
        assert (method, path) == ("POST", "/api/kernels")
        assert headers["Content-Length"] == "0"
        assert headers["Content-Type"] == "application/octet-stream"
        assert "Authorization" not in headers
        assert [m for m, _, _ in sent] == ["POST", "DELETE"]
        assert sent[1][1].startswith("/api/kernels/")

        plotted = await open_webui_run(base, f"print('plotted')\n{PLOT}", KEY, [])
        assert plotted["stdout"] == "plotted" and plotted["stderr"] == ""
        prefix = "data:image/png;base64,"
        assert plotted["result"].startswith(prefix)
        png = base64.b64decode(plotted["result"].removeprefix(prefix))
        assert png.startswith(b"\x89PNG\r\n\x1a\n")

        failed = await open_webui_run(base, "print('before')\n1 / 0", KEY, [])
        assert failed["stdout"] == "before" and failed["result"] == ""
        assert "ZeroDivisionError" in failed["stderr"] and "1 / 0" in failed["stderr"]

        fresh = await open_webui_run(base, "'x' in globals()", KEY, [])
        assert fresh["result"] == "False"  # each run a new kernel

        refused = await open_webui_run(base, "print(1)", "wrong-token", [])
        assert refused["stderr"].startswith("Error: 401"), refused
        assert refused["stdout"] == refused["result"] == ""

        # the WebSocket checks the token too, before it is accepted
        kernel_id = service.client.post("/api/kernels").json()["id"]
        try:
            ws_base = base.replace("http", "ws", 1)
            with pytest.raises(websockets.InvalidStatus) as refusal:
                await websockets.connect(
                    f"{ws_base}/api/kernels/{kernel_id}/channels?token=wrong-token"
                )
            assert refusal.value.response.status_code == 401
        finally:
            assert service.client.delete(f"/api/kernels/{kernel_id}").status_code == 204

    asyncio.run(run())
    assert sessions_of(service) == before  # every kernel deleted


# ---------------------------------------------------------------- smolagents


def smolagents_executor(base_url: str, token: str) -> Any:
    """A smolagents remote executor on the service, made as its Docker executor is but
    for the server it starts: a kernel from `_create_kernel_http` (which wants 201), each
    run on a new WebSocket through `_websocket_run_code_raise_errors`, `?token=` on both;
    `cleanup` (which CodeAgent calls at its end) deletes the kernel. The final-answer
    tool's packages count as installed (no `!pip install` in the sandbox)."""
    from smolagents.monitoring import AgentLogger, LogLevel
    from smolagents.remote_executors import (
        RemotePythonExecutor,
        _create_kernel_http,
        _websocket_run_code_raise_errors,
    )
    from websocket import create_connection

    class KernelServiceExecutor(RemotePythonExecutor):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__([], AgentLogger(level=LogLevel.ERROR))
            self.kernel_id = _create_kernel_http(
                f"{base_url}/api/kernels?token={token}", self.logger
            )
            ws_base = base_url.replace("http", "ws", 1)
            self.ws_url = f"{ws_base}/api/kernels/{self.kernel_id}/channels?token={token}"
            self.installed_packages = ["PIL", "numpy"]

        def run_code_raise_errors(self, code: str) -> Any:
            with closing(create_connection(self.ws_url, timeout=120)) as ws:
                return _websocket_run_code_raise_errors(code, ws, self.logger, self.allow_pickle)

        def cleanup(self) -> None:
            url = f"{base_url}/api/kernels/{self.kernel_id}"
            assert httpx.delete(url, params={"token": token}).status_code == 204

    return KernelServiceExecutor()


def test_smolagents_remote_executor(service: Server) -> None:
    """smolagents' Kernel Gateway helpers against the service: code runs, its state
    persists from one socket to the next, an error raises AgentError (the socket closed
    before idle, the next run unharmed), variables sent, and `final_answer` comes back
    through the error smolagents raises for it (its ename and evalue untouched)."""
    from smolagents.default_tools import FinalAnswerTool
    from smolagents.utils import AgentError

    before = sessions_of(service)
    executor = smolagents_executor(service.base_url, KEY)
    try:
        assert sessions_of(service) == before | {executor.kernel_id}
        executor.send_tools({"final_answer": FinalAnswerTool()})
        first = executor("x = 41\nprint('hi')\nx + 1")
        assert (first.output, first.logs, first.is_final_answer) == ("42", "hi\n", False)
        assert executor("x * 2").output == "82"
        with pytest.raises(AgentError) as failed:
            executor("print('before')\n1 / 0")
        assert "ZeroDivisionError" in str(failed.value)
        assert executor("x").output == "41"
        executor.send_variables({"y": [1, 2, 3]})
        assert executor("sum(y)").output == "6"
        final = executor("final_answer({'v': x + 1, 'y': y})")
        assert (final.output, final.is_final_answer) == ({"v": 42, "y": [1, 2, 3]}, True)
    finally:
        executor.cleanup()
    assert sessions_of(service) == before


def test_smolagents_code_agent(service: Server) -> None:
    """A whole smolagents CodeAgent on the service, its model scripted: two steps whose
    state carries over, then the final answer."""
    from smolagents import CodeAgent
    from smolagents.models import ChatMessage, MessageRole, Model

    class ScriptedModel(Model):  # type: ignore[misc]
        def __init__(self, replies: list[str]) -> None:
            super().__init__(model_id="scripted")
            self.replies = replies

        def generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))

    model = ScriptedModel(
        [
            "Thought: add them up.\n<code>\ntotal = sum(range(10))\nprint(total)\n</code>",
            "Thought: double it.\n<code>\nfinal_answer(total * 2)\n</code>",
        ]
    )
    before = sessions_of(service)
    executor = smolagents_executor(service.base_url, KEY)
    with CodeAgent(tools=[], model=model, executor=executor, max_steps=3) as agent:
        kernel_id = executor.kernel_id
        assert agent.run("Twice the sum of 0..9?") == 90
        codes = history_codes(service, kernel_id)
        assert "total = sum(range(10))\nprint(total)" in codes
        assert "final_answer(total * 2)" in codes
    assert model.replies == []
    assert sessions_of(service) == before  # the agent's cleanup deleted the kernel
