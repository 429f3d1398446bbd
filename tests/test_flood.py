"""Every byte a kernel sends is bounded: messages too large to keep are refused unread, every
field of an output counts, a slow stream client holds a bounded queue, and another
session's answers stay exact while one kernel floods the service.

The service runs in this process (conftest's Server), so this process's RSS is the
service's; kernels are processes of their own.
"""

import re
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from kernel_service_client.client import parse_events
from tests.conftest import Server, running_server, wait_for

MIB = 1024 * 1024
# Kernel code: send one raw iopub message for the running cell, as user code can.
SEND = (
    "k = get_ipython().kernel\n"
    "def send(msg_type, content, **kw):\n"
    "    k.session.send(k.iopub_socket, msg_type, content, parent=k.get_parent(),\n"
    "                   ident=msg_type.encode(), **kw)\n"
)


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def test_a_message_of_many_large_parts_is_refused_before_it_is_read(tmp_path: Path) -> None:
    # libzmq buffers every part of a multipart message before handing any over, whatever
    # MAXMSGSIZE says: 40 parts of 4 MiB would have cost the service 160 MiB
    with running_server(tmp_path) as server:
        session = server.new_session()
        server.execute(SEND, session)
        before = rss()
        code = (
            "buf = b'x' * (4 << 20)\n"
            "send('stream', {'name': 'stdout', 'text': 'bomb'}, buffers=[buf] * 40)\n"
            "del buf\n"
        )
        result = server.execute(code, session)
        assert rss() - before < 64 * MIB
        assert result["status"] == "error"
        assert result["error"]["ename"] == "OutputLost"
        assert "more than" in result["error"]["evalue"]
        many = "send('stream', {'name': 'stdout', 'text': 'parts'}, buffers=[b'x'] * 100)"
        result = server.execute(many, session)
        assert result["error"]["ename"] == "OutputLost"
        assert "parts" in result["error"]["evalue"]
        # the session goes on, exact
        after = server.execute("print('fine'); 6 * 7", session)
        assert after["status"] == "ok", after["text"]
        assert (after["stdout"], after["result"]) == ("fine\n", "42")


def test_every_field_of_an_output_counts_toward_the_limits(server: Server, session: str) -> None:
    code = SEND + (
        "send('error', {'ename': 'E' * 10_000_000, 'evalue': 'v', 'traceback': []})\n"
        "display({'text/plain': 'meta'}, metadata={'big': 'M' * 5_000_000}, raw=True)\n"
        "display({'text/plain': 'id'}, display_id='D' * 1_000_000, raw=True)\n"
        "print('done')\n"
    )
    response = server.client.post("/execute", json={"code": code, "session_id": session})
    assert response.status_code == 200
    # what comes back (and what is stored) is within the output limits
    assert len(response.content) < 4 * server.settings.output_limit
    result = response.json()
    error = next(o for o in result["outputs"] if o["output_type"] == "error")
    assert len(error["ename"]) <= 200
    displays = [o for o in result["outputs"] if o["output_type"] == "display_data"]
    assert [d["data"]["text/plain"] for d in displays] == ["meta", "id"]
    assert displays[0]["metadata"] == {}
    assert result["stdout"].startswith("done\n")  # then the note of what was cut
    history = server.client.get(f"/sessions/{session}/history").content
    assert len(history) < 8 * server.settings.output_limit


def test_a_long_print_is_counted_whole_in_the_text(server: Server, session: str) -> None:
    result = server.execute("print('x' * 50_000_000)", session, timeout=120)
    assert result["status"] == "ok"
    counts = re.findall(r"\[\.\.\. ([\d,]+) characters omitted", result["text"])
    assert counts, result["text"][:300]
    omitted = int(counts[0].replace(",", ""))
    shown = result["text"].count("x")
    assert abs(omitted - (50_000_000 - shown)) <= 100  # what was printed, not what was kept


def test_a_slow_stream_client_holds_a_bounded_queue(server: Server, session: str) -> None:
    # 40 images of 2 MB, streamed to a client that reads nothing until the code has ended
    code = "for i in range(40):\n    display({'image/png': 'A' * 2_000_000}, raw=True)\n'end'"
    body = {"code": code, "session_id": session, "stream": True, "timeout": 120}
    with httpx.Client(base_url=server.base_url, timeout=120) as reader:
        before = rss()
        with reader.stream("POST", "/execute", json=body) as response:
            assert response.status_code == 200
            assert wait_for(
                lambda: server.client.get(f"/sessions/{session}").json()["status"] == "busy", 30
            )
            assert wait_for(
                lambda: server.client.get(f"/sessions/{session}").json()["status"] == "idle", 120
            )
            held = rss() - before
            seen = list(parse_events(response.iter_lines()))
    # what waited for the client: at most PENDING_LIMIT of the 80 MB; the rest of the
    # growth is the result (its 32 MiB of images, in outputs and in images, as JSON too),
    # kept within the output limits, and what the allocator keeps of freed memory
    assert held < 300 * MIB, held // MIB
    names = [name for name, _ in seen]
    assert names[-1] == "result"
    images = [data for name, data in seen if name == "output" and "image/png" in data]
    # what waited in the queue, and the few that loopback's socket buffers took: not all 40
    assert len(images) < 20
    assert any("not streamed" in data for name, data in seen if name == "output")


def test_a_bystander_is_exact_while_another_key_floods(tmp_path: Path) -> None:
    keys = ("flooder-key-0123456789", "bystander-key-0123456789")
    with running_server(tmp_path, api_key=",".join(keys)) as server:
        flooder = httpx.Client(
            base_url=server.base_url, timeout=120, headers={"Authorization": f"Bearer {keys[0]}"}
        )
        bystander = httpx.Client(
            base_url=server.base_url, timeout=120, headers={"Authorization": f"Bearer {keys[1]}"}
        )
        with flooder, bystander:
            flood_id = flooder.post("/sessions", json={}).json()["session_id"]
            calm_id = bystander.post("/sessions", json={}).json()["session_id"]
            assert (
                bystander.post("/execute", json={"code": "1", "session_id": calm_id}).status_code
                == 200
            )
            # kept-size images, messages over the limit, and long prints, until told to stop
            flood = SEND + (
                "import os, time\n"
                "end = time.monotonic() + 60\n"
                "img = 'A' * (15 << 20)\n"
                "while time.monotonic() < end and not os.path.exists('stop'):\n"
                "    display({'image/png': img}, raw=True)\n"
                "    send('stream', {'name': 'stdout', 'text': 'z' * (30 << 20)})\n"
                "    print('y' * 2_000_000)\n"
            )
            answers: list[httpx.Response] = []
            worker = threading.Thread(
                target=lambda: answers.append(
                    flooder.post(
                        "/execute", json={"code": flood, "session_id": flood_id, "timeout": 120}
                    )
                )
            )
            before = rss()
            worker.start()
            peak = before
            try:
                assert wait_for(
                    lambda: flooder.get(f"/sessions/{flood_id}").json()["status"] == "busy", 30
                )
                health: list[float] = []
                for i in range(20):
                    started = time.monotonic()
                    assert httpx.get(f"{server.base_url}/healthz", timeout=30).status_code == 200
                    health.append(time.monotonic() - started)
                    code = f"print('line', {i})\n{i} * 2"
                    response = bystander.post(
                        "/execute", json={"code": code, "session_id": calm_id}
                    )
                    result: dict[str, Any] = response.json()
                    assert result["status"] == "ok", result["text"]
                    assert result["stdout"] == f"line {i}\n"
                    assert result["result"] == str(i * 2)
                    peak = max(peak, rss())
            finally:
                flooder.put(f"/sessions/{flood_id}/files/stop", content=b"")
                worker.join(timeout=180)
            assert max(health) < 3.0, health
            assert peak - before < 400 * MIB, (peak - before) // MIB
            assert answers and answers[0].status_code == 200
            flooded = answers[0].json()
            # its messages over the limit were refused; or its kernel ran out of memory first
            assert flooded["status"] == "error"
            assert flooded["error"]["ename"] in ("OutputLost", "KernelDied")
            # within the limits: images count once in outputs and again in `images`
            limits = server.settings
            assert len(answers[0].content) < 2 * limits.rich_output_limit + 8 * limits.output_limit
