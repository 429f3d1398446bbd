"""The files API while the session's code changes the same paths: every request ends in a
clear answer (2xx, or a 4xx that says what happened), never a 500 or a broken connection,
and nothing outside the work directory is touched; a download is one consistent file."""

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

from kernel_service.api.files import DOWNLOAD_WHOLE
from kernel_service.config import MIB
from tests.conftest import Server, wait_for

# The kernel turns `x` into a directory with files, then nothing, then a link out of the
# work directory, then nothing, as fast as it can: until the file `stop` appears, 30 s at
# most. `cycles` counts the turns.
SWAPPER = """
import os, shutil, threading, time

cycles = 0

def _swap(outside, deadline):
    global cycles
    while not os.path.exists("stop") and time.monotonic() < deadline:
        cycles += 1
        for step in (
            lambda: os.makedirs("d/sub", exist_ok=True),
            lambda: open("d/f", "w").write("mine" * 1000),
            lambda: os.rename("d", "x"),
            lambda: os.rename("x", "d"),
            lambda: os.symlink(outside, "x"),
            lambda: os.unlink("x"),
        ):
            try:
                step()
            except OSError:
                pass
        # whatever the service left at x (a file, a directory it made): gone, to go on
        if os.path.isdir("x") and not os.path.islink("x"):
            shutil.rmtree("x", ignore_errors=True)

threading.Thread(target=_swap, args=({outside!r}, time.monotonic() + 30), daemon=True).start()
"""

# 4xx a race may end in: a link on the path (400), a directory where a file was meant
# (400), nothing there (404), changed while the service was at it (409).
CLEAR = {400: {"symlink_refused", "not_a_file"}, 404: {"file_not_found"}, 409: {"file_changed"}}


def _answer(response: httpx.Response) -> str:
    if response.status_code < 300:
        return str(response.status_code)
    assert response.status_code in CLEAR, (response.status_code, response.text)
    body = response.json()
    assert body["code"] in CLEAR[response.status_code], body
    assert body["detail"]
    return f"{response.status_code} {body['code']}"


def test_requests_racing_a_kernel_that_swaps_a_directory_and_a_link(
    server: Server, session: str, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "f").write_text("not the session's")
    files = f"/sessions/{session}/files"
    server.execute(SWAPPER.format(outside=str(outside)), session)
    requests: list[Callable[[], httpx.Response]] = [
        lambda: server.client.put(f"{files}/x/f", content=b"uploaded"),
        lambda: server.client.put(f"{files}/x/sub/g", content=b"uploaded"),
        lambda: server.client.put(f"{files}/x", content=b"uploaded"),
        lambda: server.client.get(f"{files}/x/f"),
        lambda: server.client.get(f"{files}/x"),
        lambda: server.client.delete(f"{files}/x/f"),
        lambda: server.client.delete(f"{files}/x"),
        lambda: server.client.get(files),
    ]
    answers: Counter[str] = Counter()
    for _ in range(200):
        for request in requests:
            answers[_answer(request())] += 1
    assert server.client.put(f"{files}/stop", content=b"").status_code == 201
    cycles = server.execute("print(cycles)", session)["stdout"]
    print(f"{cycles.strip()} swaps; answers: {dict(answers)}")
    assert int(cycles) > 200  # the kernel raced all along
    # nothing outside the work directory was touched
    assert [p.name for p in outside.iterdir()] == ["f"]
    assert (outside / "f").read_text() == "not the session's"


# Once `cut` appears, the kernel cuts `big` to 1000 bytes in place, or puts another file
# in its place; then it writes `done`.
CUTTER = """
import os, threading, time

def _cut(replace, deadline):
    while not os.path.exists("cut") and time.monotonic() < deadline:
        time.sleep(0.005)
    if replace:
        open("new", "wb").write(b"new" * 100)
        os.rename("new", "big")
    else:
        with open("big", "r+b") as f:
            f.truncate(1000)
    open("done", "w").close()

threading.Thread(target=_cut, args=({replace}, time.monotonic() + 60), daemon=True).start()
"""


def _download_while_the_code_cuts(
    server: Server, session: str, size: int, replace: bool = False
) -> tuple[bytes, Exception | None]:
    """What a client reads of `big` (`size` bytes) when the code changes it after the first
    64 KiB arrived (and its answer, if the download did not end well)."""
    files = f"/sessions/{session}/files"
    server.execute(f"open('big', 'wb').write(bytes(range(256)) * {size // 256})", session)
    server.execute(CUTTER.format(replace=replace), session)
    received = []
    reader = httpx.Client(base_url=server.base_url, timeout=60)
    with reader, reader.stream("GET", f"{files}/big") as download:
        assert download.status_code == 200
        assert download.headers["content-length"] == str(size)
        chunks = download.iter_raw(64 * 1024)
        received.append(next(chunks))
        # the code changes the file while the rest is on its way
        assert server.client.put(f"{files}/cut", content=b"").status_code == 201
        assert wait_for(lambda: server.client.get(f"{files}/done").status_code == 200, 30)
        now = 300 if replace else 1000
        assert server.client.get(f"{files}/big").headers["content-length"] == str(now)
        try:
            received += list(chunks)
        except httpx.HTTPError as exc:
            return b"".join(received), exc
    return b"".join(received), None


def test_a_file_cut_short_while_it_downloads_comes_whole(server: Server, session: str) -> None:
    """Up to DOWNLOAD_WHOLE, the download is the file as it was when it was asked for: its
    Content-Length and all of its bytes, though the code cuts it after the first bytes
    went out."""
    size = 4 * MIB
    assert size <= DOWNLOAD_WHOLE
    received, failed = _download_while_the_code_cuts(server, session, size)
    assert failed is None
    assert received == bytes(range(256)) * (size // 256)


def test_a_large_file_replaced_while_it_downloads_comes_whole(server: Server, session: str) -> None:
    """Streamed from the one descriptor opened: the file as it was, though the code puts
    another in its place meanwhile."""
    size = DOWNLOAD_WHOLE + 4 * MIB
    received, failed = _download_while_the_code_cuts(server, session, size, replace=True)
    assert failed is None
    assert received == bytes(range(256)) * (size // 256)


def test_a_large_file_cut_in_place_while_it_downloads_is_an_incomplete_download(
    server: Server, session: str
) -> None:
    """Past DOWNLOAD_WHOLE the bytes promised are not there to send: the download ends early,
    which the client sees as an incomplete body, never as a complete shorter file."""
    size = DOWNLOAD_WHOLE + 4 * MIB
    received, failed = _download_while_the_code_cuts(server, session, size)
    assert isinstance(failed, httpx.RemoteProtocolError)
    assert "incomplete" in str(failed) or "without sending complete message body" in str(failed)
    assert len(received) < size
    assert received == (bytes(range(256)) * (size // 256))[: len(received)]
    # the service goes on: the file as it is now
    assert server.client.get(f"/sessions/{session}/files/big").content == received[:1000]
