"""The files API against real kernels: upload, download, list, delete; the files a cell
writes reported in its result; paths that try to leave the work directory, and symbolic
links the kernel plants, refused with nothing touched; limits; the full output of a cell
whose output was cut, kept as a file."""

import asyncio
import http.client
import json
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kernel_service.execution.full_output import KEPT_FILES, MEMORY_BYTES, FullOutputSpill
from kernel_service.execution.render import human_size
from kernel_service_client.models import (
    DisplayDataOutput,
    ErrorOutput,
    ExecuteResultOutput,
    Output,
    StreamOutput,
)
from tests.conftest import SANDBOXED, Server, running_server, wait_for

CSV = b"city,temp\nOslo,4\nLima,19\n"
BINARY = bytes(range(256)) * 64 + os.urandom(4096)


def work_dir(server: Server, session: str) -> Path:
    return server.settings.work_dir.resolve() / session


def names_in(server: Server, session: str) -> list[str]:
    """What the work dir holds at its top, but IPython's own `.ipython`."""
    return sorted(p.name for p in work_dir(server, session).iterdir() if p.name != ".ipython")


def raw_request(
    server: Server, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    """A request whose path is sent as written (httpx would resolve `..` segments)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        connection.close()


def test_upload_list_download_and_delete(server: Server, session: str) -> None:
    files = f"/sessions/{session}/files"
    created = server.client.put(f"{files}/data.csv", content=CSV)
    assert created.status_code == 201, created.text
    assert created.json()["path"] == "data.csv"
    assert created.json()["size"] == len(CSV)
    assert created.json()["url"] == f"{files}/data.csv"
    # multipart, into directories that do not exist yet
    form = server.client.put(f"{files}/raw/blob.bin", files={"file": ("ignored-name.bin", BINARY)})
    assert form.status_code == 201, form.text
    assert form.json()["size"] == len(BINARY)
    # replaced: 200
    replaced = server.client.put(f"{files}/data.csv", content=CSV + b"Rome,15\n")
    assert replaced.status_code == 200, replaced.text

    listing = server.client.get(files).json()
    assert [(f["path"], f["size"]) for f in listing["files"]] == [
        ("data.csv", len(CSV) + 8),
        ("raw/blob.bin", len(BINARY)),
    ]
    assert listing["truncated"] is False
    assert all(f["modified"] and f["url"] == f"{files}/{f['path']}" for f in listing["files"])
    limited = server.client.get(files, params={"limit": 1}).json()
    assert len(limited["files"]) == 1 and limited["truncated"] is True

    download = server.client.get(f"{files}/raw/blob.bin")
    assert download.status_code == 200
    assert download.content == BINARY
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.headers["content-disposition"].startswith('attachment; filename="blob.bin"')
    assert download.headers["x-content-type-options"] == "nosniff"
    csv = server.client.get(f"{files}/data.csv")
    assert csv.content == CSV + b"Rome,15\n"
    assert csv.headers["content-type"] == "text/csv"

    # on the host: in the work dir, owned by whoever owns it (the kernel's uid)
    root = work_dir(server, session)
    assert (root / "raw" / "blob.bin").read_bytes() == BINARY
    owner = root.stat().st_uid
    assert {(root / p).stat().st_uid for p in ("raw", "raw/blob.bin", "data.csv")} == {owner}
    assert not [p for p in root.iterdir() if p.name.startswith(".upload-")]

    assert server.client.delete(f"{files}/data.csv").status_code == 204
    assert server.client.get(f"{files}/data.csv").status_code == 404
    assert server.client.delete(f"{files}/data.csv").json()["code"] == "file_not_found"
    assert server.client.delete(f"{files}/raw").status_code == 204  # a directory, whole
    assert server.client.get(files).json()["files"] == []


def test_an_uploaded_file_is_the_code_s_to_read_and_write(server: Server, session: str) -> None:
    assert server.client.put(f"/sessions/{session}/files/data.csv", content=CSV).status_code == 201
    assert server.client.put(f"/sessions/{session}/files/in/x.txt", content=b"x").status_code == 201
    result = server.execute(
        "import pandas as pd\n"
        "print(open('data.csv').read() == 'city,temp\\nOslo,4\\nLima,19\\n')\n"
        "open('data.csv', 'a').write('Rome,15\\n')\n"  # the kernel's own file: writable
        "open('in/y.txt', 'w').write('y')\n"  # and the directory made for it
        "pd.read_csv('data.csv').temp.sum()",
        session,
    )
    assert result["status"] == "ok", result["text"]
    assert result["stdout"] == "True\n"
    assert result["result"] == "np.int64(38)"


def test_files_a_cell_writes_are_in_its_result(server: Server, session: str) -> None:
    assert server.execute("x = 1", session)["files"] == []
    result = server.execute(
        "import pandas as pd, os\n"
        "pd.DataFrame({'a': range(100)}).to_csv('out.csv', index=False)\n"
        "os.makedirs('plots', exist_ok=True)\n"
        "open('plots/p.txt', 'w').write('p')\n"
        "open('.hidden', 'w').write('h')",
        session,
    )
    assert result["status"] == "ok", result["text"]
    paths = [f["path"] for f in result["files"]]
    assert paths == ["out.csv", "plots/p.txt"]  # hidden files are not reported
    out = result["files"][0]
    assert out["url"] == f"/sessions/{session}/files/out.csv"
    assert out["size"] == len("a\n" + "".join(f"{i}\n" for i in range(100)))
    plots = f"/sessions/{session}/files/plots/p.txt"
    line = f"[files changed: out.csv (292 B) {out['url']}, plots/p.txt (1 B) {plots}]"
    assert result["text"] == f"Out[2]: 1\n{line}"
    download = server.client.get(out["url"])
    assert download.status_code == 200
    assert download.text == "a\n" + "".join(f"{i}\n" for i in range(100))
    # unchanged files are not reported again; a changed one is
    assert server.execute("1 + 1", session)["files"] == []
    changed = server.execute("open('out.csv', 'a').write('100\\n')", session)
    assert [f["path"] for f in changed["files"]] == ["out.csv"]


def test_only_what_changed_since_the_last_result_is_reported(server: Server, session: str) -> None:
    """The snapshot after one execution is the next one's before: what the API writes
    between them is not the code's; what code left running writes is reported next."""
    files, work = f"/sessions/{session}/files", server.settings.work_dir / session
    assert server.client.put(f"{files}/up.txt", content=b"up").status_code == 201
    assert server.execute("1", session)["files"] == []  # uploaded before it: not its change
    started = server.execute(
        "import os, threading, time\n"
        "def later():\n"
        "    while not os.path.exists('go'):\n"
        "        time.sleep(0.01)  # the kernel's own thread, polling for the test's signal\n"
        "    open('late.txt', 'w').write('late')\n"
        "threading.Thread(target=later).start()",
        session,
    )
    assert started["status"] == "ok" and started["files"] == []
    (work / "go").write_text("")  # outside the API, after the result: the next one's news
    assert wait_for((work / "late.txt").exists, 30)
    assert [f["path"] for f in server.execute("2", session)["files"]] == ["go", "late.txt"]
    assert server.client.put(f"{files}/up.txt", content=b"again").status_code == 200
    assert server.client.delete(f"{files}/late.txt").status_code == 204
    assert server.execute("3", session)["files"] == []
    changed = server.execute("open('up.txt', 'a').write('!')", session)
    assert [f["path"] for f in changed["files"]] == ["up.txt"]


TRAVERSALS = [
    "../{name}",
    "../../{name}",
    "a/../../{name}",
    "%2E%2E/{name}",
    "..%2F..%2F{name}",
    "./{name}",
    "a//{name}",
    "/tmp/{name}",  # absolute: the path is `//tmp/...` after files
    "%2Ftmp%2F{name}",
    "{name}%00.txt",
    "{name}/",
]


@pytest.mark.parametrize("template", TRAVERSALS)
def test_paths_out_of_the_work_dir_are_refused(
    server: Server, session: str, template: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    name = f"escape-{uuid.uuid4().hex}"
    path = template.format(name=name)
    for method in ("PUT", "GET", "DELETE"):
        status, body = raw_request(
            server, method, f"/sessions/{session}/files/{path}", b"x" if method == "PUT" else None
        )
        assert (status, body.get("code")) == (400, "invalid_file_path"), (method, path, body)
    # nothing written anywhere: not in the work dirs, the test's directories, /tmp or /
    roots = [server.settings.work_dir.resolve().parent, Path("/tmp"), Path("/")]
    assert not [p for p in roots[0].rglob(f"*{name}*")]
    assert not [p for root in roots[1:] for p in root.glob(f"*{name}*")]
    assert names_in(server, session) == []


def test_symlinks_the_kernel_plants_are_not_followed(server: Server, session: str) -> None:
    passwd = Path("/etc/passwd")
    before = passwd.read_bytes(), passwd.stat().st_mtime_ns
    name = f"planted-{uuid.uuid4().hex}"
    result = server.execute(
        "import os\n"
        "os.symlink('/etc', 'evil')\n"
        "os.symlink('/etc/passwd', 'p')\n"
        "os.makedirs('d')\n"
        "os.symlink('/', 'd/root')\n"
        "open('d/ok.txt', 'w').write('ok')",
        session,
    )
    assert result["status"] == "ok", result["text"]
    assert [f["path"] for f in result["files"]] == ["d/ok.txt"]  # nothing through the links
    files = f"/sessions/{session}/files"
    for path in ("evil/passwd", "p", "d/root/etc/passwd", f"evil/{name}"):
        got = server.client.get(f"{files}/{path}")
        assert (got.status_code, got.json()["code"]) == (400, "symlink_refused"), path
    for path in ("p", f"evil/{name}", f"evil/{name}/deeper", f"d/root/tmp/{name}"):
        put = server.client.put(f"{files}/{path}", content=b"pwned\n")
        assert (put.status_code, put.json()["code"]) == (400, "symlink_refused"), path
        form = server.client.put(f"{files}/{path}", files={"file": ("x", b"pwned\n")})
        assert form.status_code == 400, path
    assert (passwd.read_bytes(), passwd.stat().st_mtime_ns) == before
    assert not list(Path("/etc").glob(f"{name}*")) and not list(Path("/tmp").glob(f"{name}*"))
    # links are not listed, nor walked into; removing one removes the link only
    listing = server.client.get(files, params={"hidden": True}).json()
    assert [f["path"] for f in listing["files"]] == ["d/ok.txt"]
    assert server.client.delete(f"{files}/p").status_code == 204
    assert passwd.read_bytes() == before[0]
    assert not (work_dir(server, session) / "p").is_symlink()
    assert server.client.get(f"{files}/d/ok.txt").text == "ok"


def test_a_planted_outputs_link_keeps_no_full_output(server: Server, session: str) -> None:
    """The service writes `.outputs/<n>.txt` itself: a `.outputs` link to /etc is refused."""
    server.execute("import os; os.symlink('/etc', '.outputs')", session)
    result = server.execute("print('y' * 300_000)", session)
    assert result["status"] == "ok"
    assert result["full_output"] is None
    assert not [p for p in Path("/etc").iterdir() if p.name.endswith(".txt") and p.stem.isdigit()]


def test_missing_files_and_other_sessions_files_are_404(server: Server, session: str) -> None:
    other = server.new_session()
    try:
        assert (
            server.client.put(f"/sessions/{other}/files/mine.txt", content=b"m").status_code == 201
        )
        for path in (f"/sessions/{session}/files/mine.txt", f"/sessions/{session}/files/no/such"):
            got = server.client.get(path)
            assert (got.status_code, got.json()["code"]) == (404, "file_not_found")
        gone = server.client.get("/sessions/no-such-session/files/mine.txt")
        assert (gone.status_code, gone.json()["code"]) == (404, "session_not_found")
        assert server.client.get("/sessions/no-such-session/files").status_code == 404
        assert server.client.get(f"/sessions/{session}/files").json()["files"] == []
    finally:
        server.client.delete(f"/sessions/{other}")


def test_a_file_as_a_directory_or_a_directory_as_a_file_is_refused(
    server: Server, session: str
) -> None:
    files = f"/sessions/{session}/files"
    assert server.client.put(f"{files}/f", content=b"f").status_code == 201
    assert server.client.put(f"{files}/d/g", content=b"g").status_code == 201
    for method, path in (("PUT", "f/x"), ("GET", "f/x"), ("PUT", "d"), ("GET", "d")):
        got = server.client.request(method, f"{files}/{path}", content=b"x")
        assert (got.status_code, got.json()["code"]) == (400, "not_a_file"), (method, path)


def test_full_output_of_a_cut_print_is_kept(server: Server, session: str) -> None:
    lines = 160_000
    printed = "".join(f"{i}\n" for i in range(lines))  # 1 MB
    assert human_size(len(printed)) == "1.0 MB"
    result = server.execute(f"for i in range({lines}): print(i)", session)
    assert result["status"] == "ok"
    assert "output truncated" in result["stdout"]
    assert len(result["text"]) <= server.settings.text_limit + 100  # the cut's own note
    full = result["full_output"]
    assert full is not None and full["complete"] is True
    assert full["path"].startswith(".outputs/") and full["path"].endswith(".txt")
    assert full["url"] == f"/sessions/{session}/files/{full['path']}"
    assert full["size"] == len(printed)
    assert result["text"].endswith(
        f"[output truncated; the full output (1.0 MB): {full['url']}, "
        f"or open('{full['path']}') in code]"
    )
    assert server.client.get(full["url"]).text == printed
    check = server.execute(
        f"text = open({full['path']!r}).read()\nlen(text), text == "
        f"''.join(f'{{i}}\\n' for i in range({lines}))",
        session,
    )
    assert check["result"] == f"({len(printed)}, True)"
    # an output that was not cut leaves no file behind
    assert server.execute("print('short')", session)["full_output"] is None
    kept = server.client.get(f"/sessions/{session}/files", params={"hidden": True}).json()
    assert [f["path"] for f in kept["files"] if f["path"].startswith(".outputs/")] == [full["path"]]


def test_full_output_past_the_text_limit_only(server: Server, session: str) -> None:
    """Cut only by the `text` limit (the outputs are whole): the file is still kept, and
    holds values and tracebacks as well as prints."""
    result = server.execute("print('a' * 20_000)\n'b' * 20", session)
    full = result["full_output"]
    assert full is not None
    assert not any(o["output_type"] == "truncated" for o in result["outputs"])
    text = server.client.get(full["url"]).text
    assert text == "a" * 20_000 + "\nOut[1]: '" + "b" * 20 + "'\n"


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """1 MiB per upload, 2 MiB of files per session (not a filesystem of its own), 1 MiB
    of full output per execution."""
    with running_server(
        tmp_path_factory.mktemp("limited"),
        max_file_mb=1,
        session_files_mb=2,
        sandbox_work_dir_mb=0,
        full_output_mb=1,
    ) as server:
        yield server


@pytest.fixture
def limited_session(limited: Server) -> Iterator[str]:
    session_id = limited.new_session()
    yield session_id
    limited.client.delete(f"/sessions/{session_id}")


def test_uploads_past_the_size_limit_are_refused(limited: Server, limited_session: str) -> None:
    files = f"/sessions/{limited_session}/files"
    mib = 1024 * 1024
    assert limited.client.put(f"{files}/exact.bin", content=b"e" * mib).status_code == 201

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while it streams
        for _ in range(3):
            yield b"c" * (mib // 2)

    requests: list[tuple[str, Callable[[], httpx.Response]]] = [
        ("length", lambda: limited.client.put(f"{files}/big.bin", content=b"b" * (mib + 1))),
        ("chunked", lambda: limited.client.put(f"{files}/big.bin", content=chunks())),
        ("form", lambda: limited.client.put(f"{files}/big.bin", files={"f": b"b" * 2 * mib})),
    ]
    for label, request in requests:
        response = request()
        assert (response.status_code, response.json()["code"]) == (413, "file_too_large"), label
    assert limited.client.get(f"{files}/big.bin").status_code == 404
    assert names_in(limited, limited_session) == ["exact.bin"]
    # the session's total: 2 MiB (IPython's files count too)
    assert limited.client.put(f"{files}/two.bin", content=b"2" * (mib // 2)).status_code == 201
    full = limited.client.put(f"{files}/three.bin", content=b"3" * mib)
    assert (full.status_code, full.json()["code"]) == (507, "workspace_full")
    assert limited.client.get(f"{files}/three.bin").status_code == 404
    assert names_in(limited, limited_session) == ["exact.bin", "two.bin"]
    # replacing a file counts only what it adds
    assert limited.client.put(f"{files}/exact.bin", content=b"r" * mib).status_code == 200


def test_malformed_forms_are_refused(limited: Server, limited_session: str) -> None:
    files = f"/sessions/{limited_session}/files"
    two = limited.client.put(f"{files}/x", files={"a": b"1", "b": b"2"})
    assert (two.status_code, two.json()["code"]) == (422, "invalid_request")
    cut = limited.client.put(
        f"{files}/x",
        content=b'--B\r\nContent-Disposition: form-data; name="f"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=B"},
    )
    assert cut.status_code == 422
    no_boundary = limited.client.put(
        f"{files}/x", content=b"abc", headers={"content-type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 422
    assert limited.client.get(f"{files}/x").status_code == 404
    assert names_in(limited, limited_session) == []


def test_full_output_is_bounded(limited: Server, limited_session: str) -> None:
    result = limited.execute("for i in range(300_000): print(i)", limited_session)
    full = result["full_output"]
    assert full is not None and full["complete"] is False
    assert "the start of the full output" in result["text"]
    text = limited.client.get(full["url"]).text
    kept = "".join(f"{i}\n" for i in range(300_000))[: 1024 * 1024]
    assert text.startswith(kept)
    note = text[len(kept) :]
    assert note.lstrip("\n").startswith("[... ") and note.endswith(" ...]\n")
    assert "more characters of output not kept" in note and "FULL_OUTPUT_MB" in note
    assert full["size"] == len(text)


@pytest.mark.skipif(not SANDBOXED, reason="a work dir of its own filesystem needs root")
def test_a_full_work_dir_answers_507(server: Server, session: str) -> None:
    """As root, the work dir is a filesystem of its own: ENOSPC becomes 507, nothing left."""
    filled = server.execute(
        "import os, shutil\n"
        "with open('filler', 'wb') as f:\n"
        "    os.posix_fallocate(f.fileno(), 0, shutil.disk_usage('.').free - 2**20)\n",
        session,
    )
    assert filled["status"] == "ok", filled["text"]
    response = server.client.put(
        f"/sessions/{session}/files/more.bin", content=b"m" * (8 * 1024 * 1024)
    )
    assert (response.status_code, response.json()["code"]) == (507, "workspace_full")
    assert names_in(server, session) == ["filler"]


def test_an_upload_the_client_abandons_leaves_nothing(server: Server, session: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"a" * 65536
        raise RuntimeError("the client gives up")

    with pytest.raises((RuntimeError, httpx.HTTPError)):
        server.client.put(f"/sessions/{session}/files/half.bin", content=chunks())
    assert wait_for(lambda: names_in(server, session) == [])


def test_the_full_output_spill_keeps_text_in_order_and_within_its_bound(tmp_path: Path) -> None:
    """The spill alone (no kernel): values and tracebacks on lines of their own, a message
    larger than the memory buffer written straight on, a cut that splits no character,
    nothing left by an execution that was not kept, the last KEPT_FILES kept."""
    outputs: list[Output] = [
        StreamOutput(name="stdout", text="half a line"),
        ExecuteResultOutput(execution_count=3, data={"text/plain": "42"}),
        ErrorOutput(ename="E", evalue="v", traceback=["Traceback", "E: v"]),
        DisplayDataOutput(data={"image/png": "iVBO"}),
        StreamOutput(name="stderr", text="é" * MEMORY_BYTES),  # 2 bytes each
    ]
    spill = FullOutputSpill(tmp_path, "s", 1, 3 * MEMORY_BYTES)
    listen = spill.listener()
    assert listen is not None
    for output in outputs:
        listen(output)
    kept = asyncio.run(spill.keep())
    spill.close()
    assert kept is not None and kept.complete is True
    text = (tmp_path / ".outputs" / "1.txt").read_text()
    assert text == "half a line\nOut[3]: 42\nTraceback\nE: v\n[display: image/png]\n" + (
        "é" * MEMORY_BYTES
    )
    assert kept.size == len(text.encode())
    assert kept.url == "/sessions/s/files/.outputs/1.txt"

    small = FullOutputSpill(tmp_path, "s", 2, 101)  # the cut falls inside an "é"
    for output in outputs:
        small.add(output)
    cut = asyncio.run(small.keep())
    small.close()
    assert cut is not None and cut.complete is False
    text = (tmp_path / ".outputs" / "2.txt").read_text()  # valid UTF-8
    head = "half a line\nOut[3]: 42\nTraceback\nE: v\n[display: image/png]\n"
    assert text.startswith(head + "é" * ((101 - len(head)) // 2) + "\n[... ")
    assert text.endswith(" more characters of output not kept: an execution keeps its first "
                         "101 bytes (KERNEL_SERVICE_FULL_OUTPUT_MB) ...]\n")  # fmt: skip

    dropped = FullOutputSpill(tmp_path, "s", 3, 10 * MEMORY_BYTES)
    dropped.add(StreamOutput(name="stdout", text="x" * 2 * MEMORY_BYTES))  # to disk already
    assert wait_for((tmp_path / ".outputs" / "3.txt").exists)
    dropped.close()
    assert wait_for(lambda: not (tmp_path / ".outputs" / "3.txt").exists())

    for seq in range(4, 4 + KEPT_FILES + 5):
        spill = FullOutputSpill(tmp_path, "s", seq, 1000)
        spill.add(StreamOutput(name="stdout", text="x"))
        assert asyncio.run(spill.keep()) is not None
        spill.close()
    names = sorted(int(p.stem) for p in (tmp_path / ".outputs").iterdir())
    assert names == list(range(9, 4 + KEPT_FILES + 5))
    assert FullOutputSpill(tmp_path, "s", 99, 0).listener() is None  # turned off


def test_adapters_make_file_urls_absolute_once_each() -> None:
    from kernel_service_client.models import ExecutionResult, FileRef
    from kernel_service_client.tools.common import text_with_urls

    files = [
        FileRef(path=name, size=1, modified=None, url=f"/sessions/s/files/{name}")
        for name in ("out.csv", "out.csv.bak")
    ]
    text = "[files changed: out.csv (1 B) /sessions/s/files/out.csv, out.csv.bak (1 B) " \
        "/sessions/s/files/out.csv.bak]"  # fmt: skip
    result = ExecutionResult(
        session_id="s", status="ok", execution_count=1, outputs=[], error=None, images=[],
        text=text, duration_ms=1.0, state_lost=False, files=files,
    )  # fmt: skip
    absolute = text_with_urls(result, lambda url: f"http://h{url}")
    assert absolute == text.replace("/sessions", "http://h/sessions")


def test_delete_removes_a_deep_tree_and_refuses_a_deeper_one(server: Server, session: str) -> None:
    """One descriptor per level is held while a directory is removed: 256 levels at most."""
    files = f"/sessions/{session}/files"
    make = "import os\nos.makedirs('/'.join(['{top}'] + ['d'] * {depth}))\nopen('{top}/f', 'w')"
    server.execute(make.format(top="deep", depth=200), session)
    assert server.client.delete(f"{files}/deep").status_code == 204
    assert "deep" not in names_in(server, session)
    server.execute(make.format(top="deeper", depth=300), session)
    refused = server.client.delete(f"{files}/deeper")
    assert (refused.status_code, refused.json()["code"]) == (400, "not_a_file")
    assert "nested more than 256 deep" in refused.json()["detail"]
