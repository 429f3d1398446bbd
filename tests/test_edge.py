"""The HTTP edge before any key is checked, attacked with raw sockets on loopback: request
heads over the size limit, heads that never finish (slowloris), thousands of connections
and idle kept-alive ones. The service closes them and keeps answering everyone else."""

import contextlib
import json
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from pydantic import ValidationError

from kernel_service.api.server import connection_cap
from kernel_service.config import Settings
from tests.conftest import running_server, service_process, wait_for

MIB = 1024 * 1024
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def connect(port: int, data: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        sock.sendall(data)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool:
    """The server has closed it (EOF or reset); any answer before that is read and skipped."""
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    return True


def all_closed(socks: list[socket.socket], timeout: float) -> bool:
    """Until the server has closed every one of `socks` (or `timeout` passes)."""
    open_ones = list(socks)

    def none_open() -> bool:
        open_ones[:] = [sock for sock in open_ones if not closed_by_server(sock)]
        return not open_ones

    return wait_for(none_open, timeout)


def answer(sock: socket.socket, timeout: float = 30) -> bytes:
    """What the server sends until it has sent a whole response (or closes): status line,
    headers and a Content-Length body."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(ConnectionError):
        while b"\r\n\r\n" not in data or len(data) < _answer_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    sock.setblocking(False)
    return data


def _answer_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return len(head) + 4


def refused(reply: bytes, status: int, code: str) -> bool:
    """The server's refusal, or nothing: a close with unread data may reset the connection
    before the client reads the answer."""
    if not reply:
        return True
    head, _, body = reply.partition(b"\r\n\r\n")
    return head.startswith(f"HTTP/1.1 {status} ".encode()) and json.loads(body)["code"] == code


@contextlib.contextmanager
def sockets() -> Iterator[list[socket.socket]]:
    """A list to put sockets in, all closed at the end."""
    opened: list[socket.socket] = []
    try:
        yield opened
    finally:
        for sock in opened:
            sock.close()


def enough_open_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"{needed} open files needed, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class EndlessHeader(threading.Thread):
    """Streams one header without end, over one connection after another (each closed by
    the server), until stopped; counts what each connection took before its close."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopped = threading.Event()
        self.sent_per_connection: list[int] = []

    def run(self) -> None:
        chunk = b"a" * 65536
        deadline = time.monotonic() + 120  # stops by itself whatever happens
        while not self.stopped.is_set() and time.monotonic() < deadline:
            sent = 0
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
                    while not self.stopped.is_set() and sent < 1024 * MIB:
                        sent += sock.send(chunk)
            except OSError:  # closed by the server: reset, broken pipe or a timeout
                pass
            self.sent_per_connection.append(sent)


def execute_one_plus_one(client: httpx.Client, session_id: str) -> None:
    response = client.post("/execute", json={"code": "1+1", "session_id": session_id})
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["result"]) == ("ok", "2")


@pytest.mark.parametrize("max_connections", [None, 256], ids=["cap-from-file-limit", "cap-256"])
def test_a_flood_of_unfinished_heads_and_an_endless_header_leave_the_service_serving(
    tmp_path: Path, max_connections: int | None
) -> None:
    flood = 3000
    enough_open_files(flood + 1000)
    env = {"KERNEL_SERVICE_HEAD_TIMEOUT": "2"}
    if max_connections is not None:
        env["KERNEL_SERVICE_MAX_CONNECTIONS"] = str(max_connections)
    with service_process(tmp_path, env=env) as (_, base_url), sockets() as held:
        port = int(base_url.rsplit(":", 1)[1])
        with httpx.Client(base_url=base_url, timeout=60) as client:
            session_id = client.post("/sessions", json={}).json()["session_id"]
            execute_one_plus_one(client, session_id)
        endless = EndlessHeader(port)
        endless.start()
        try:
            for n in range(flood):  # half send nothing, half the start of a head
                held.append(connect(port, PARTIAL_HEAD if n % 2 else b""))
            # connections are taken in turn: this one comes once the server holds the flood
            assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
            for _ in range(5):  # each on a new connection, as a new client would
                with httpx.Client(base_url=base_url, timeout=60) as client:
                    started = time.monotonic()
                    assert client.get("/healthz").status_code == 200
                    assert time.monotonic() - started < 1
                    execute_one_plus_one(client, session_id)
            assert all_closed(held, 30), "unfinished heads still open after 30 s"
            assert wait_for(lambda: len(endless.sent_per_connection) >= 3, 30)
        finally:
            endless.stopped.set()
            endless.join(30)
        # each endless head was cut off long before its end (socket buffers hold a few MiB)
        assert max(endless.sent_per_connection) < 64 * MIB, endless.sent_per_connection
        with httpx.Client(base_url=base_url, timeout=60) as client:
            assert client.get("/healthz").status_code == 200
            client.delete(f"/sessions/{session_id}")


def test_an_oversized_head_is_refused_without_being_read(tmp_path: Path) -> None:
    with service_process(tmp_path) as (process, base_url):
        port = int(base_url.rsplit(":", 1)[1])
        service = psutil.Process(process.pid)
        rss_before = service.memory_info().rss
        sent = 0
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            try:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
                while sent < 256 * MIB:
                    sent += sock.send(b"a" * MIB)
            except OSError:
                pass
            reply = answer(sock)
        assert sent < 64 * MIB  # what the socket buffers took before the close
        assert refused(reply, 431, "head_too_large")
        assert service.memory_info().rss - rss_before < 32 * MIB
        assert httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200


def test_a_head_is_held_to_the_configured_size(tmp_path: Path) -> None:
    with running_server(tmp_path, max_head_bytes=8192) as server, sockets() as held:
        fits = connect(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 7000)
        held.append(fits)
        fits.sendall(b"\r\n\r\n")
        assert answer(fits).startswith(b"HTTP/1.1 200 ")
        # a later request on the same connection is held to the limit too
        fits.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n")
        reply = answer(fits)
        assert refused(reply, 431, "head_too_large")
        assert all_closed([fits], 10)
        for head in (  # in one piece, and a byte short of the end then the rest
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 8200,
        ):
            sock = connect(server.port, head)
            held.append(sock)
            reply = answer(sock)
            assert refused(reply, 431, "head_too_large")
            assert all_closed([sock], 10)
        assert server.client.get("/healthz").status_code == 200


def test_over_the_cap_a_connection_is_refused_at_once_while_the_others_are_served(
    tmp_path: Path,
) -> None:
    with (
        running_server(
            tmp_path, max_connections=8, head_timeout=120, keep_alive_timeout=120
        ) as server,
        sockets() as held,
    ):
        server.client.close()  # only the connections below
        kept_alive = connect(server.port)
        held.append(kept_alive)
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer(kept_alive).startswith(b"HTTP/1.1 200 ")
        for _ in range(7):  # requests whose bodies are still to come: none waits on a head
            sock = connect(
                server.port,
                b"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n",
            )
            held.append(sock)
            assert answer(sock).startswith(b"HTTP/1.1 100 ")
        over = connect(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(over)
        started = time.monotonic()
        reply = answer(over)
        assert refused(reply, 503, "too_many_connections")
        assert all_closed([over], 10)
        assert time.monotonic() - started < 5  # at once, not at a timeout
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer(kept_alive).startswith(b"HTTP/1.1 200 ")
        for sock in held[1:8]:  # the bodies come: each request is answered (no code: 422)
            sock.sendall(b"{}")
            assert answer(sock).startswith(b"HTTP/1.1 422 ")
        for sock in held:
            sock.close()
        assert wait_for(lambda: _healthz_answers(server.base_url), 30)


def _healthz_answers(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/healthz", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


def test_at_the_cap_a_new_connection_takes_the_place_of_the_oldest_unfinished_head(
    tmp_path: Path,
) -> None:
    with (
        running_server(tmp_path, max_connections=8, head_timeout=120) as server,
        sockets() as held,
    ):
        server.client.close()
        for _ in range(8):
            held.append(connect(server.port, PARTIAL_HEAD))
        assert httpx.get(f"{server.base_url}/healthz", timeout=10).status_code == 200
        assert all_closed(held[:1], 10)  # the oldest made room
        assert not any(closed_by_server(sock) for sock in held[1:])


def test_silent_and_idle_connections_are_closed(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, head_timeout=1, keep_alive_timeout=1) as server,
        sockets() as held,
    ):
        held.append(connect(server.port))  # says nothing
        held.append(connect(server.port, PARTIAL_HEAD))  # never finishes its head
        kept_alive = connect(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(kept_alive)
        assert answer(kept_alive).startswith(b"HTTP/1.1 200 ")
        assert all_closed(held, 15)
        # a later request on a kept-alive connection has its head timed too
        slow = connect(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        held.append(slow)
        assert answer(slow).startswith(b"HTTP/1.1 200 ")
        slow.sendall(PARTIAL_HEAD)
        assert all_closed([slow], 15)


def test_the_connection_cap_leaves_the_kernels_their_files() -> None:
    defaults = Settings(max_sessions=64, pool_size=2)
    # what 66 kernels need comes off the limit, or a quarter of it stays for HTTP
    assert connection_cap(defaults, open_file_limit=20000) == 20000 - 128 - 16 * 66
    assert connection_cap(defaults, open_file_limit=1024) == 256
    assert connection_cap(Settings(max_sessions=8, pool_size=0), 1024) == 1024 - 128 - 16 * 8
    assert connection_cap(Settings(max_connections=50), open_file_limit=1024) == 50
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connection_cap(defaults) == connection_cap(defaults, soft)


def test_edge_settings_that_would_refuse_every_request_are_refused() -> None:
    # overrides as a caller would pass them: Settings' keyword arguments have many types
    bad_settings: list[dict[str, Any]] = [
        {"max_head_bytes": 100},
        {"head_timeout": 0},
        {"keep_alive_timeout": 0},
    ]
    for bad in bad_settings:
        with pytest.raises(ValidationError, match=next(iter(bad))):
            Settings(**bad)


def test_a_body_that_still_comes_after_an_early_answer_has_the_time_of_a_head(
    tmp_path: Path,
) -> None:
    with (
        running_server(tmp_path, api_key="key-0123456789", head_timeout=1) as server,
        sockets() as held,
    ):
        trickle = connect(
            server.port,
            b"POST /execute HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{",
        )
        held.append(trickle)
        assert answer(trickle).startswith(b"HTTP/1.1 401 ")  # no key: answered at once

        def closed_while_trickling() -> bool:
            with contextlib.suppress(OSError):
                trickle.send(b" ")
            return closed_by_server(trickle)

        assert wait_for(closed_while_trickling, 15)
