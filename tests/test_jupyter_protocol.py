"""The kernels' WebSocket (`WS /api/kernels/{id}/channels`) against a real server and real
kernels, as a Jupyter client speaks it: message order and parentage, relayed requests,
interrupts, timeouts, deaths, several clients, sockets that come and go, malformed frames,
output floods, shutdowns, and both framings (legacy JSON text, v1 binary)."""

import itertools
import json
import signal
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close
from websockets.sync.client import ClientConnection, connect

from kernel_service.api.jupyter.bridge import MAX_RELAYED, QUEUED_CODE
from tests.conftest import HOLD, Server, read_notebook, running_server, service_process, wait_for

V1 = "v1.kernel.websocket.jupyter.org"
# A failure guard only: a message that comes in milliseconds may take seconds on a busy
# two-core machine; no test waits this long when the server is right.
RECV_TIMEOUT = 60.0


def _encode_v1(message: dict[str, Any]) -> bytes:
    """v1.kernel.websocket.jupyter.org: uint64 LE count of offsets, the offsets, the
    channel, header, parent header, metadata, content (JSON each), the buffers."""
    parts = [
        message["channel"].encode(),
        *(
            json.dumps(message[name]).encode()
            for name in ("header", "parent_header", "metadata", "content")
        ),
        *message.get("buffers", []),
    ]
    count = len(parts) + 1
    offsets = [8 * (count + 1)]
    for part in parts:
        offsets.append(offsets[-1] + len(part))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(parts)


def _decode_v1(data: bytes) -> dict[str, Any]:
    (count,) = struct.unpack("<Q", data[:8])
    offsets = struct.unpack(f"<{count}Q", data[8 : 8 * (count + 1)])
    assert offsets[-1] == len(data)
    parts = [data[a:b] for a, b in itertools.pairwise(offsets)]
    names = ("header", "parent_header", "metadata", "content")
    message: dict[str, Any] = {"channel": parts[0].decode()}
    message.update({name: json.loads(part) for name, part in zip(names, parts[1:5], strict=True)})
    message["buffers"] = parts[5:]
    return message


class Client:
    """A Jupyter client on one WebSocket: every message it received, in order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.v1 = ws.subprotocol == V1
        self.session = uuid.uuid4().hex
        self.seen: list[dict[str, Any]] = []

    def send(
        self,
        msg_type: str,
        content: dict[str, Any] | None = None,
        channel: str = "shell",
        metadata: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send a request; its header (what the answers name as their parent)."""
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "username": "test",
            "session": self.session,
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }
        message = {
            "channel": channel,
            "header": header,
            "parent_header": {},
            "metadata": metadata or {},
            "content": content or {},
        }
        if self.v1:
            self.ws.send(_encode_v1(message))
        else:
            self.ws.send(json.dumps(message))
        return header

    def recv(self) -> dict[str, Any]:
        data = self.ws.recv(timeout=RECV_TIMEOUT)
        if self.v1:
            assert isinstance(data, bytes), "a v1 client gets binary frames"
            message = _decode_v1(data)
        else:
            assert isinstance(data, str), "a legacy client gets text frames"
            message = json.loads(data)
        self.seen.append(message)
        return message

    def answer(self, header: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages parented to the request `header` until its reply and its iopub idle
        have both come (others received meanwhile are in `seen`)."""
        got: list[dict[str, Any]] = []
        replied = idle = False
        while not (replied and idle):
            message = self.recv()
            if message["parent_header"].get("msg_id") != header["msg_id"]:
                continue
            got.append(message)
            kind = message["header"]["msg_type"]
            if message["channel"] in ("shell", "control") and kind.endswith("_reply"):
                replied = True
            if kind == "status" and message["content"]["execution_state"] == "idle":
                assert message["channel"] == "iopub"
                idle = True
        return got

    def execute(
        self, code: str, metadata: dict[str, Any] | None = None, **content: Any
    ) -> list[dict[str, Any]]:
        return self.answer(
            self.send("execute_request", {"code": code, **content}, "shell", metadata)
        )

    def reply_to(self, header: dict[str, Any]) -> dict[str, Any]:
        """The reply to the request `header` (for requests answered by a reply alone)."""
        while True:
            message = self.recv()
            if message["parent_header"].get("msg_id") == header["msg_id"] and message["header"][
                "msg_type"
            ].endswith("_reply"):
                return message

    def until(self, msg_type: str) -> dict[str, Any]:
        """The next message of this type."""
        while True:
            message = self.recv()
            if message["header"]["msg_type"] == msg_type:
                return message

    def closed(self) -> Close:
        """Read until the server closes the socket; its close frame."""
        rcvd: Close | None = None
        while rcvd is None:
            try:
                self.recv()
            except ConnectionClosed as closed:
                rcvd = closed.rcvd or Close(0, "closed without a close frame")
        return rcvd


def ws_url(server: Server, kernel_id: str) -> str:
    return f"ws://127.0.0.1:{server.port}/api/kernels/{kernel_id}/channels"


@contextmanager
def channels(
    server: Server, kernel_id: str, subprotocols: list[str] | None = None
) -> Iterator[Client]:
    with connect(
        ws_url(server, kernel_id),
        subprotocols=subprotocols,  # type: ignore[arg-type]
        proxy=None,
        open_timeout=RECV_TIMEOUT,
        close_timeout=RECV_TIMEOUT,
        ping_interval=None,
        max_size=None,
    ) as ws:
        yield Client(ws)


def types(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["channel"], m["header"]["msg_type"]) for m in messages]


def of_type(messages: list[dict[str, Any]], msg_type: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["header"]["msg_type"] == msg_type]


def reply(messages: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [m for m in messages if m["header"]["msg_type"].endswith("_reply")]
    return found


def stdout(messages: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in of_type(messages, "stream")
        if m["content"]["name"] == "stdout"
    )


def result_text(messages: list[dict[str, Any]]) -> str:
    [result] = of_type(messages, "execute_result")
    text: str = result["content"]["data"]["text/plain"]
    return text


def start_kernel(server: Server) -> str:
    response = server.client.post("/api/kernels")
    assert response.status_code == 201, response.text
    kernel_id: str = response.json()["id"]
    return kernel_id


@pytest.fixture
def kernel(server: Server) -> Iterator[str]:
    """A kernel started over the Jupyter API on the shared server, ended afterwards."""
    kernel_id = start_kernel(server)
    yield kernel_id
    server.client.delete(f"/api/kernels/{kernel_id}")


@pytest.fixture
def client(server: Server, kernel: str) -> Iterator[Client]:
    with channels(server, kernel) as opened:
        yield opened


# ---------------------------------------------------------------- executions


def test_an_execution_in_jupyter_order_parented_to_the_request(client: Client) -> None:
    header = client.send("execute_request", {"code": "print('out')\n6 * 7"})
    messages = client.answer(header)
    assert types(messages) == [
        ("iopub", "status"),
        ("iopub", "execute_input"),
        ("iopub", "stream"),
        ("iopub", "execute_result"),
        ("shell", "execute_reply"),
        ("iopub", "status"),
    ]
    assert all(m["parent_header"] == header for m in messages)
    busy, executed, stream, result, answered, idle = messages
    assert busy["content"] == {"execution_state": "busy"}
    assert executed["content"]["code"] == "print('out')\n6 * 7"
    assert stream["content"] == {"name": "stdout", "text": "out\n"}
    assert result["content"]["data"]["text/plain"] == "42"
    assert answered["content"]["status"] == "ok"
    assert answered["content"]["execution_count"] == result["content"]["execution_count"] == 1
    assert answered["metadata"]["kernel_service"]["status"] == "ok"
    assert idle["content"] == {"execution_state": "idle"}
    # every message is a whole Jupyter message
    for message in messages:
        assert message["msg_id"] == message["header"]["msg_id"]
        assert message["msg_type"] == message["header"]["msg_type"]
        assert message["buffers"] == []
    # and the next execution counts on
    assert reply(client.execute("1"))["content"]["execution_count"] == 2


def test_a_code_error_is_an_iopub_error_an_error_reply_and_idle(client: Client) -> None:
    messages = client.execute("def f():\n    return 1 / 0\nf()")
    assert [t for t in types(messages) if t[1] != "execute_input"] == [
        ("iopub", "status"),
        ("iopub", "error"),
        ("shell", "execute_reply"),
        ("iopub", "status"),
    ]
    [error] = of_type(messages, "error")
    assert error["content"]["ename"] == "ZeroDivisionError"
    assert any("1 / 0" in line for line in error["content"]["traceback"])
    answered = reply(messages)["content"]
    assert (answered["status"], answered["ename"]) == ("error", "ZeroDivisionError")
    assert messages[-1]["content"]["execution_state"] == "idle"
    assert result_text(client.execute("'after'")) == "'after'"


# ---------------------------------------------------------------- relayed requests


def test_kernel_info_request(client: Client) -> None:
    header = client.send("kernel_info_request")
    messages = client.answer(header)
    answered = reply(messages)
    assert answered["channel"] == "shell"
    assert answered["header"]["msg_type"] == "kernel_info_reply"
    assert answered["parent_header"] == header
    content = answered["content"]
    assert content["status"] == "ok"
    assert content["language_info"]["name"] == "python"
    assert content["protocol_version"].startswith("5.")
    assert content["implementation"] == "ipython"
    assert [m["content"]["execution_state"] for m in of_type(messages, "status")] == [
        "busy",
        "idle",
    ]


def test_kernel_info_on_control(client: Client) -> None:
    header = client.send("kernel_info_request", channel="control")
    answered = reply(client.answer(header))
    assert answered["channel"] == "control"
    assert answered["content"]["language_info"]["name"] == "python"


def test_complete_inspect_and_is_complete_are_relayed(client: Client) -> None:
    client.execute("import os\nmy_variable = 1")
    completed = reply(
        client.answer(client.send("complete_request", {"code": "my_va", "cursor_pos": 5}))
    )
    assert completed["header"]["msg_type"] == "complete_reply"
    assert completed["content"]["status"] == "ok"
    assert "my_variable" in completed["content"]["matches"]
    assert completed["content"]["cursor_start"] == 0

    inspected = reply(
        client.answer(
            client.send(
                "inspect_request", {"code": "os.path.join", "cursor_pos": 12, "detail_level": 0}
            )
        )
    )
    assert inspected["header"]["msg_type"] == "inspect_reply"
    assert inspected["content"]["found"] is True
    assert "join" in inspected["content"]["data"]["text/plain"]

    for code, status in (
        ("for i in range(3):", "incomplete"),
        ("1 + 1", "complete"),
        ("1 +)", "invalid"),
    ):
        answered = reply(client.answer(client.send("is_complete_request", {"code": code})))
        assert answered["header"]["msg_type"] == "is_complete_reply"
        assert answered["content"]["status"] == status, code


def test_comm_info_request(client: Client) -> None:
    # The kernel's reply and its idle come on different sockets, in either order: asked
    # 20 times, so that both orders come (the reply must be relayed in both).
    for _ in range(20):
        header = client.send("comm_info_request", {})
        # shell replies come in order: kernel_info's reply comes after comm_info's
        client.reply_to(client.send("kernel_info_request"))
        [answered] = [
            m
            for m in client.seen
            if m["parent_header"].get("msg_id") == header["msg_id"] and m["channel"] == "shell"
        ]
        assert answered["header"]["msg_type"] == "comm_info_reply"
        assert answered["content"]["status"] == "ok"
        assert answered["content"]["comms"] == {}


# ---------------------------------------------------------------- endings


def test_interrupt_request_interrupts_a_running_execution(client: Client) -> None:
    client.execute("kept = 'still here'")
    # HOLD never ends by itself here; its first line says the code has begun
    running = client.send("execute_request", {"code": "print('running', flush=True)\n" + HOLD})
    started = client.until("stream")
    assert (started["parent_header"], started["content"]["text"]) == (running, "running\n")
    interrupt = client.send("interrupt_request", channel="control")
    messages = client.answer(running)
    interrupted = next(
        (m for m in client.seen if m["parent_header"].get("msg_id") == interrupt["msg_id"]),
        None,
    ) or client.reply_to(interrupt)
    assert (interrupted["channel"], interrupted["header"]["msg_type"]) == (
        "control",
        "interrupt_reply",
    )
    assert interrupted["content"]["status"] == "ok"
    [error] = of_type(messages, "error")
    assert error["content"]["ename"] == "KeyboardInterrupt"
    answered = reply(messages)["content"]
    assert (answered["status"], answered["ename"]) == ("error", "KeyboardInterrupt")
    assert messages[-1]["content"]["execution_state"] == "idle"
    assert result_text(client.execute("kept")) == "'still here'"


def test_a_timeout_is_an_iopub_timeout_error_and_the_state_stays(client: Client) -> None:
    client.execute("kept = 'still here'")
    # The kernel sleeps far longer than the 1 s the request's metadata asks for: the
    # service interrupts it at 1 s (the sleep is never waited out).
    messages = client.execute("import time\ntime.sleep(300)", metadata={"timeout": 1})
    errors = [m["content"]["ename"] for m in of_type(messages, "error")]
    # the service's first: clients stop reading at the first error (AutoGen, smolagents)
    assert errors == ["TimeoutError", "KeyboardInterrupt"]
    answered = reply(messages)
    assert (answered["content"]["status"], answered["content"]["ename"]) == (
        "error",
        "TimeoutError",
    )
    service = answered["metadata"]["kernel_service"]
    assert (service["status"], service["state_lost"]) == ("timeout", False)
    # the service's word comes before the reply and the closing idle
    kinds = [m["header"]["msg_type"] for m in messages]
    assert kinds.index("execute_reply") > max(i for i, k in enumerate(kinds) if k == "error")
    assert messages[-1]["content"]["execution_state"] == "idle"
    assert result_text(client.execute("kept")) == "'still here'"


def test_code_deaf_to_interrupts_is_killed_at_its_timeout(client: Client) -> None:
    client.execute("lost = 1")
    # swallows every KeyboardInterrupt and carries on for ever: only a kill ends it
    deaf = (
        "while True:\n    try:\n        while True:\n            pass\n"
        "    except KeyboardInterrupt:\n        pass"
    )
    messages = client.execute(deaf, metadata={"timeout": 1})
    [error] = of_type(messages, "error")
    assert error["content"]["ename"] == "TimeoutError"
    assert "restarted" in error["content"]["evalue"]
    answered = reply(messages)
    assert answered["content"]["status"] == "error"
    assert answered["metadata"]["kernel_service"]["state_lost"] is True
    assert messages[-1]["content"]["execution_state"] == "idle"
    assert result_text(client.execute("'lost' in globals()")) == "False"


@pytest.mark.parametrize(
    "code", ["import os\nos._exit(1)", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"]
)
def test_a_kernel_death_mid_run_then_a_fresh_kernel(client: Client, code: str) -> None:
    client.execute("before = 1")
    messages = client.execute(code)
    [error] = of_type(messages, "error")
    assert error["content"]["ename"] == "KernelDied"
    answered = reply(messages)
    assert (answered["content"]["status"], answered["content"]["ename"]) == ("error", "KernelDied")
    assert answered["metadata"]["kernel_service"]["state_lost"] is True
    assert messages[-2:] == [answered, messages[-1]]
    assert messages[-1]["content"]["execution_state"] == "idle"
    after = client.execute("'before' in globals()")
    assert reply(after)["content"]["status"] == "ok"
    assert result_text(after) == "False"


def test_input_is_refused_clearly_and_never_asked_for(client: Client) -> None:
    messages = client.execute("name = input('Your name? ')")
    [error] = of_type(messages, "error")
    assert error["content"]["ename"] == "StdinNotImplementedError"
    assert "input() is not available" in error["content"]["evalue"]
    assert reply(messages)["content"]["status"] == "error"
    assert not [m for m in client.seen if m["header"]["msg_type"] == "input_request"]
    assert not [m for m in client.seen if m["channel"] == "stdin"]


# ---------------------------------------------------------------- several clients, reconnects


def test_two_sockets_share_iopub_and_only_the_sender_gets_the_reply(
    server: Server, kernel: str
) -> None:
    with channels(server, kernel) as sender, channels(server, kernel) as watcher:
        # both attached before the execution: the kernel model counts them
        assert wait_for(
            lambda: server.client.get(f"/api/kernels/{kernel}").json()["connections"] == 2
        )
        header = sender.send("execute_request", {"code": "print('to everyone')"})
        sent = sender.answer(header)
        assert stdout(sent) == "to everyone\n"
        # the watcher sees the same iopub messages, up to the idle
        watched: list[dict[str, Any]] = []
        while True:
            message = watcher.recv()
            if message["parent_header"].get("msg_id") == header["msg_id"]:
                watched.append(message)
                if message["header"]["msg_type"] == "status" and (
                    message["content"]["execution_state"] == "idle"
                ):
                    break
        assert all(m["channel"] == "iopub" for m in watched)
        assert stdout(watched) == "to everyone\n"
        assert [m["header"]["msg_id"] for m in watched] == [
            m["header"]["msg_id"] for m in sent if m["channel"] == "iopub"
        ]
        # and no reply: anything more on its socket comes after its own request's reply
        own = watcher.send("kernel_info_request")
        watcher.answer(own)
        assert not [m for m in watcher.seen if m["header"]["msg_type"] == "execute_reply"]


def test_the_kernel_outlives_its_socket(server: Server, kernel: str) -> None:
    with channels(server, kernel) as first:
        first.execute("kept = 'across sockets'")
        # sent, and the socket closed while it runs: it still runs to its end
        first.send("execute_request", {"code": HOLD + "\nlate = 'done'"})
        server.wait_busy(kernel)
    server.let_end(kernel)

    def finished() -> bool:
        executions = server.client.get(f"/sessions/{kernel}/history").json()["executions"]
        return (
            bool(executions)
            and executions[-1]["status"] == "ok"
            and "late" in executions[-1]["code"]
        )

    assert wait_for(finished)
    with channels(server, kernel) as second:
        assert result_text(second.execute("kept, late")) == "('across sockets', 'done')"


def test_queued_executions_after_an_error_are_aborted(
    server: Server, client: Client, kernel: str
) -> None:
    failing = client.send("execute_request", {"code": HOLD + "\n1 / 0"})
    server.wait_busy(kernel)
    queued = [client.send("execute_request", {"code": f"ran_{n} = True"}) for n in (1, 2)]
    # on control while the shell is held: its answer proves the two above were queued
    client.answer(client.send("kernel_info_request", channel="control"))
    server.let_end(kernel)
    assert reply(client.answer(failing))["content"]["ename"] == "ZeroDivisionError"
    for header in queued:
        messages = client.answer(header)
        assert types(messages) == [("shell", "execute_reply"), ("iopub", "status")]
        assert messages[0]["content"]["status"] == "aborted"
    assert result_text(client.execute("'ran_1' in globals() or 'ran_2' in globals()")) == "False"


def test_stop_on_error_false_does_not_abort(server: Server, client: Client, kernel: str) -> None:
    failing = client.send("execute_request", {"code": HOLD + "\n1 / 0", "stop_on_error": False})
    server.wait_busy(kernel)
    queued = client.send("execute_request", {"code": "ran = 'yes'\nran"})
    client.answer(client.send("kernel_info_request", channel="control"))
    server.let_end(kernel)
    assert reply(client.answer(failing))["content"]["status"] == "error"
    after = client.answer(queued)
    assert reply(after)["content"]["status"] == "ok"
    assert result_text(after) == "'yes'"


@pytest.fixture(scope="module")
def small_code(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose cells are at most 1000 bytes: 64 000 characters may wait per kernel."""
    with running_server(tmp_path_factory.mktemp("small"), max_code_bytes=1000) as server:
        yield server


def test_waiting_executions_are_capped_per_kernel_across_sockets(small_code: Server) -> None:
    server = small_code
    kernel = start_kernel(server)
    cell = "#" * 990 + "\npass"  # 64 of them fill the room
    with channels(server, kernel) as first:
        first.send("execute_request", {"code": HOLD})
        server.wait_busy(kernel)
        for _ in range(QUEUED_CODE):
            first.send("execute_request", {"code": cell})
        # on control, sent after them: its answer proves they were all taken in
        first.answer(first.send("kernel_info_request", channel="control"))
    # the socket is gone, its executions wait on: a new socket does not start afresh
    with channels(server, kernel) as second:
        refused = second.reply_to(second.send("execute_request", {"code": cell}))
        assert refused["content"]["ename"] == "TooManyRequests"
        assert "Too many executions already wait on this kernel" in refused["content"]["evalue"]
        server.let_end(kernel)

        def all_ran() -> bool:
            executions = server.client.get(f"/sessions/{kernel}/history").json()["executions"]
            return len(executions) == 1 + QUEUED_CODE and all(
                e["status"] == "ok" for e in executions
            )

        assert wait_for(all_ran)
        assert result_text(second.execute("'room again'")) == "'room again'"
    server.client.delete(f"/api/kernels/{kernel}")


def test_a_relayed_request_is_answered_when_its_kernel_ends(
    server: Server, client: Client, kernel: str
) -> None:
    client.send("execute_request", {"code": HOLD})
    server.wait_busy(kernel)
    # waits in the kernel behind the held code (the control request's answer, sent after
    # it, proves it was sent); the kernel is then restarted before it answers
    pending = client.send("complete_request", {"code": "pri", "cursor_pos": 3})
    client.answer(client.send("kernel_info_request", channel="control"))
    assert server.client.post(f"/api/kernels/{kernel}/restart").status_code == 200
    answered = client.reply_to(pending)
    assert answered["header"]["msg_type"] == "complete_reply"
    assert (answered["content"]["status"], answered["content"]["ename"]) == (
        "error",
        "KernelDied",
    )
    assert result_text(client.execute("'fresh'")) == "'fresh'"


def test_a_request_the_kernel_cannot_be_sent_is_answered_and_frees_its_place(
    client: Client,
) -> None:
    # JSON nested deeper than the kernel's codec writes (255 levels): read, not sendable
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    for _ in range(MAX_RELAYED + 1):  # more than may await answers: each place was freed
        answered = client.reply_to(
            client.send("complete_request", {"code": "x", "cursor_pos": 1, "deep": deep})
        )
        assert answered["content"]["ename"] == "InvalidMessage"
    assert reply(client.answer(client.send("kernel_info_request")))["content"]["status"] == "ok"


def test_the_kernels_reply_decides_what_is_aborted(
    server: Server, client: Client, kernel: str
) -> None:
    # a display that fails shows an error, yet the kernel replies ok: nothing is aborted
    failing_display = "class Shown:\n    def _repr_json_(self):\n        raise ValueError('no')\n"
    first = client.send("execute_request", {"code": HOLD + "\n" + failing_display + "Shown()"})
    server.wait_busy(kernel)
    queued = client.send("execute_request", {"code": "'ran'"})
    client.answer(client.send("kernel_info_request", channel="control"))
    server.let_end(kernel)
    shown = client.answer(first)
    assert of_type(shown, "error"), "the failing display is shown as an error"
    assert reply(shown)["content"]["status"] == "ok"
    after = client.answer(queued)
    assert reply(after)["content"]["status"] == "ok"
    assert result_text(after) == "'ran'"


def test_a_request_type_the_protocol_has_not_is_refused(client: Client) -> None:
    answered = client.reply_to(client.send("launch_request", {"what": "anything"}))
    assert answered["header"]["msg_type"] == "launch_reply"
    assert answered["content"]["ename"] == "UnknownMessageType"
    assert "'launch_request' is not a request this kernel takes" in answered["content"]["evalue"]
    assert result_text(client.execute("'usable'")) == "'usable'"


# ---------------------------------------------------------------- one session, every door


def test_a_session_made_by_post_execute_is_a_kernel(server: Server) -> None:
    session_id = server.execute("made_by = 'POST /execute'")["session_id"]
    try:
        with channels(server, session_id) as client:
            assert result_text(client.execute("made_by")) == "'POST /execute'"
    finally:
        server.client.delete(f"/sessions/{session_id}")


def test_websocket_executions_are_in_the_history_and_notebook(
    server: Server, kernel: str, client: Client
) -> None:
    listed = server.client.get("/sessions").json()["sessions"]
    assert kernel in [s["session_id"] for s in listed]
    client.execute("print('from the socket')")
    client.execute("1 / 0")
    executions = server.client.get(f"/sessions/{kernel}/history").json()["executions"]
    assert [(e["code"], e["status"]) for e in executions] == [
        ("print('from the socket')", "ok"),
        ("1 / 0", "error"),
    ]
    assert executions[0]["outputs"] == [
        {"output_type": "stream", "name": "stdout", "text": "from the socket\n"}
    ]
    notebook = read_notebook(server.client.get(f"/sessions/{kernel}/notebook").text)
    assert [cell.source for cell in notebook.cells] == ["print('from the socket')", "1 / 0"]


# ---------------------------------------------------------------- malformed frames


def test_a_frame_that_is_not_json_closes_the_socket_with_1008(client: Client) -> None:
    client.ws.send("this is not JSON")
    closed = client.closed()
    assert closed.code == 1008
    assert closed.reason.startswith("Not a Jupyter message")


def test_execute_request_without_code_is_answered_and_the_socket_stays(client: Client) -> None:
    header = client.send("execute_request", {"silent": False})
    messages = client.answer(header)
    answered = reply(messages)
    assert answered["content"]["status"] == "error"
    assert answered["content"]["ename"] == "InvalidMessage"
    assert "code" in answered["content"]["evalue"]
    assert [m["header"]["msg_type"] for m in of_type(messages, "error")] == ["error"]
    assert result_text(client.execute("'usable'")) == "'usable'"


def test_content_that_is_not_an_object_is_answered_and_the_socket_stays(client: Client) -> None:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": "kernel_info_request", "version": "5.3"}
    client.ws.send(json.dumps({"channel": "shell", "header": header, "content": [1]}))
    answered = client.reply_to(header)  # (the service's own answer: a reply, no status)
    assert answered["header"]["msg_type"] == "kernel_info_reply"
    assert answered["content"]["status"] == "error"
    assert "content is not a JSON object" in answered["content"]["evalue"]
    assert result_text(client.execute("'usable'")) == "'usable'"


def test_an_unknown_channel_is_answered_and_the_socket_stays(client: Client) -> None:
    header = client.send("kernel_info_request", channel="nowhere")
    answered = client.reply_to(header)
    assert answered["content"]["status"] == "error"
    assert "unknown channel 'nowhere'" in answered["content"]["evalue"]
    assert result_text(client.execute("'usable'")) == "'usable'"


# ---------------------------------------------------------------- output floods


@pytest.fixture(scope="module")
def flooded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    """The messages of one execution printing far more than a small output_limit (2000)."""
    with running_server(tmp_path_factory.mktemp("flood"), output_limit=2000) as server:
        kernel_id = start_kernel(server)
        with channels(server, kernel_id) as client:
            yield client.execute("for i in range(200_000):\n    print(i)")
        server.client.delete(f"/api/kernels/{kernel_id}")


def test_an_output_flood_is_bounded_and_a_note_comes_before_idle(
    flooded: list[dict[str, Any]],
) -> None:
    assert len(stdout(flooded)) <= 2000
    notes = [
        i
        for i, m in enumerate(flooded)
        if m["header"]["msg_type"] == "stream"
        and m["content"]["name"] == "stderr"
        and "output truncated" in m["content"]["text"]
    ]
    assert len(notes) == 1
    kinds = [m["header"]["msg_type"] for m in flooded]
    assert notes[0] < kinds.index("execute_reply") == len(flooded) - 2
    note = flooded[notes[0]]["content"]["text"]
    assert "over the service's output limit" in note
    assert "characters omitted" in note
    assert reply(flooded)["content"]["status"] == "ok"
    assert flooded[-1]["content"]["execution_state"] == "idle"


def test_an_output_flood_still_shows_its_head(flooded: list[dict[str, Any]]) -> None:
    assert stdout(flooded).startswith("0\n1\n2\n")


# ---------------------------------------------------------------- shutdown, deletion


def test_shutdown_request_with_restart_loses_the_state(
    server: Server, kernel: str, client: Client
) -> None:
    client.execute("lost = 1")
    header = client.send("shutdown_request", {"restart": True}, channel="control")
    answered = client.until("shutdown_reply")
    assert answered["parent_header"] == header
    assert answered["channel"] == "control"
    assert answered["content"] == {"status": "ok", "restart": True}
    assert result_text(client.execute("'lost' in globals()")) == "False"
    assert server.client.get(f"/api/kernels/{kernel}").status_code == 200


def test_shutdown_request_without_restart_ends_the_kernel(server: Server) -> None:
    kernel_id = start_kernel(server)
    with channels(server, kernel_id) as client:
        header = client.send("shutdown_request", {"restart": False}, channel="control")
        answered = client.until("shutdown_reply")
        assert answered["parent_header"] == header
        assert answered["content"] == {"status": "ok", "restart": False}
        closed = client.closed()
        assert closed.code == 1001
    assert server.client.get(f"/api/kernels/{kernel_id}").status_code == 404


def test_deleting_the_kernel_closes_its_socket(server: Server) -> None:
    kernel_id = start_kernel(server)
    with channels(server, kernel_id) as client:
        client.execute("1")
        assert server.client.delete(f"/api/kernels/{kernel_id}").status_code == 204
        assert client.closed().code == 1001


# ---------------------------------------------------------------- subprotocols


def test_v1_is_chosen_when_offered_and_speaks_binary(server: Server, kernel: str) -> None:
    with channels(server, kernel, subprotocols=[V1]) as client:
        assert client.ws.subprotocol == V1
        assert client.v1
        header = client.send("execute_request", {"code": "print('binary')\n'v1'"})
        messages = client.answer(header)  # (recv asserts every frame is binary)
        assert all(m["parent_header"] == header for m in messages)
        assert stdout(messages) == "binary\n"
        assert result_text(messages) == "'v1'"
        assert reply(messages)["channel"] == "shell"
        info = reply(client.answer(client.send("kernel_info_request")))
        assert info["content"]["language_info"]["name"] == "python"


def test_no_subprotocol_offered_none_chosen_and_text_frames(server: Server, kernel: str) -> None:
    with channels(server, kernel) as client:
        assert client.ws.subprotocol is None
        assert not client.v1
        assert result_text(client.execute("'legacy'")) == "'legacy'"


# ---------------------------------------------------------------- culling and restarts


def test_an_idle_kernel_is_culled_and_its_socket_closed(tmp_path: Path) -> None:
    with running_server(tmp_path, session_ttl=1) as server:
        kernel_id = start_kernel(server)
        with channels(server, kernel_id) as client:
            client.execute("x = 1")
            # nothing more is sent: the culler ends the session, and closes its socket
            assert client.closed().code == 1001
        assert server.client.get(f"/api/kernels/{kernel_id}").status_code == 404


def test_a_kernel_survives_a_graceful_restart_of_the_service(tmp_path: Path) -> None:
    env = {"KERNEL_SERVICE_KEEP_KERNELS": "true"}
    with service_process(tmp_path, env=env) as (process, base_url):
        started = httpx.post(f"{base_url}/api/kernels", timeout=60)
        assert started.status_code == 201, started.text
        kernel_id = started.json()["id"]
        with _socket(base_url, kernel_id) as client:
            client.execute("x = 41")
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    with service_process(tmp_path) as (process, base_url):
        listed = httpx.get(f"{base_url}/api/kernels", timeout=60).json()
        assert [k["id"] for k in listed] == [kernel_id]
        with _socket(base_url, kernel_id) as client:
            assert result_text(client.execute("x + 1")) == "42"


@contextmanager
def _socket(base_url: str, kernel_id: str) -> Iterator[Client]:
    url = f"{base_url.replace('http', 'ws', 1)}/api/kernels/{kernel_id}/channels"
    with connect(url, proxy=None, open_timeout=RECV_TIMEOUT, ping_interval=None) as ws:
        yield Client(ws)
