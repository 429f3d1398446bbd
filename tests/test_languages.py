"""Sessions in Bash, JavaScript, TypeScript, R and Java against a real server (sandboxed
where the suite can sandboxed): what Python sessions promise holds for each — state across
calls, errors with their message, the last expression's value, plots (R), timeouts and
kernel deaths reported honestly, notebook export, survival across a restart, metrics — and
the HTTP surface that chooses a language. A language GET /kernelspecs says is not ready
here is skipped with its reason."""

import json
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from kernel_service.errors import LanguageUnavailable
from kernel_service.kernel.kernelspecs import KernelCatalog
from kernel_service_client import Client, KernelServiceError
from tests.conftest import (
    Server,
    alive,
    read_notebook,
    running_server,
    service_process,
    wait_for,
)
from tests.test_metrics import scrape, value
from tests.test_survival import session_kernels


@dataclass(frozen=True)
class Lang:
    """A language's code for each scenario, and what its kernel answers."""

    name: str
    kernel: str  # the kernelspec that runs it
    set_x: str  # sets the variable x to 41
    show_x: str  # shows x (41); once x is gone, fails or shows something else
    error: str  # fails with a message holding "boom"
    expression: str | None  # a last expression worth 42 (None: the language has none)
    shown: str | None  # its value's text/plain
    busy: str  # a loop that never ends by itself
    die: str  # ends its kernel's process from inside


BASH = Lang(
    "bash",
    "bash",
    set_x="x=41",
    show_x="echo ${x:-unset}",
    error="echo boom >&2; ls /nonexistent-dir",
    expression=None,
    shown=None,
    busy="while true; do :; done",
    # the kernel: bash's parent ($$ is bash itself, which bash_kernel starts again)
    die="kill -9 $PPID",
)
JAVASCRIPT = Lang(
    "javascript",
    "deno",
    set_x="let x = 41;",
    show_x='typeof x === "undefined" ? "unset" : x',
    error='throw new Error("boom")',
    expression="const half = 21;\nhalf * 2",
    shown="42",
    busy="while (true) {}",
    die="Deno.exit(1)",
)
TYPESCRIPT = Lang(
    "typescript",
    "deno",
    set_x="let x: number = 41;",
    show_x='typeof x === "undefined" ? "unset" : x',
    error='function fail(): never {\n  throw new TypeError("boom");\n}\nfail()',
    expression="const twice = (n: number): number => n * 2;\ntwice(21)",
    shown="42",
    busy="while (true) {}",
    die="Deno.exit(1)",
)
R = Lang(
    "r",
    "ir",
    set_x="x <- 41",
    show_x='if (exists("x")) x else "unset"',
    error='stop("boom")',
    expression="half <- 21\nhalf * 2",
    shown="[1] 42",
    busy="while (TRUE) {}",
    # not quit(): IRkernel's asks the frontend to end it (an ask_exit payload) and goes on
    die="tools::pskill(Sys.getpid(), 9)",
)
JAVA = Lang(
    "java",
    "java",
    set_x="int x = 41;",
    show_x="x",
    error='throw new IllegalStateException("boom");',
    expression="int half = 21;\nhalf * 2",
    shown="42",
    busy="while (true) {}",
    die="System.exit(1);",
)
LANGUAGES = [BASH, JAVASCRIPT, TYPESCRIPT, R, JAVA]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for every language's sessions (each test makes its own)."""
    with running_server(tmp_path_factory.mktemp("languages")) as launched:
        yield launched


def skip_unless_ready(server: Server, language: str) -> None:
    """Skip the test, with the service's reason, if `language` cannot run on `server`."""
    for spec in server.client.get("/kernelspecs").json()["kernelspecs"]:
        if language in spec["languages"]:
            if not spec["ready"]:
                pytest.skip(f"{language} is not ready here: {spec['problem']}")
            return
    pytest.skip(f"{language} is not offered here")


@pytest.fixture(params=LANGUAGES, ids=[lang.name for lang in LANGUAGES])
def lang(request: pytest.FixtureRequest, server: Server) -> Lang:
    chosen: Lang = request.param
    skip_unless_ready(server, chosen.name)
    return chosen


@contextmanager
def session_in(server: Server, language: str) -> Iterator[str]:
    """A new session in `language`, deleted afterwards."""
    response = server.client.post("/sessions", json={"language": language})
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    try:
        yield session_id
    finally:
        server.client.delete(f"/sessions/{session_id}")


def has_x(result: dict[str, Any]) -> bool:
    """Whether `show_x` found x (41) still defined (IRkernel shows values as displays,
    not as the execute_result: its `text` is read)."""
    return result["status"] == "ok" and "41" in result["text"]


def test_state_persists_and_the_session_says_its_language(server: Server, lang: Lang) -> None:
    with session_in(server, lang.name) as session:
        info = server.client.get(f"/sessions/{session}").json()
        assert (info["language"], info["kernel"]) == (lang.name, lang.kernel)
        assert server.execute(lang.set_x, session)["status"] == "ok"
        shown = server.execute(lang.show_x, session)
        assert has_x(shown), shown
        # the language named again (as the E2B SDK does on every call) is the session's own
        again = server.execute(lang.show_x, session, language=lang.name)
        assert has_x(again), again
        assert server.client.get(f"/sessions/{session}").json()["execution_count"] == 3


def test_an_error_comes_with_its_message(server: Server, lang: Lang) -> None:
    with session_in(server, lang.name) as session:
        failed = server.execute(lang.error, session)
        assert failed["status"] == "error", failed
        assert failed["error"] is not None
        assert "boom" in failed["text"], failed["text"]
        if lang is BASH:
            # bash_kernel names no error, only the status: said in words
            assert failed["error"]["ename"] == "ExitStatus"
            assert failed["error"]["evalue"] == "the last command exited with status 2"
            assert "No such file or directory" in failed["stdout"]
        else:
            assert "boom" in failed["error"]["evalue"], failed["error"]
        # a failure is the code's, not the kernel's: the session goes on
        assert server.execute(lang.set_x, session)["status"] == "ok"
        assert has_x(server.execute(lang.show_x, session))


def test_the_last_expression_is_the_result(server: Server, lang: Lang) -> None:
    with session_in(server, lang.name) as session:
        if lang.expression is None:  # a shell has none: what it prints is the answer
            printed = server.execute("echo $((40 + 2))", session)
            assert (printed["result"], printed["stdout"]) == (None, "42\n"), printed
            return
        result = server.execute(lang.expression, session)
        assert result["status"] == "ok", result
        assert value_of(result) == lang.shown, result


def value_of(result: dict[str, Any]) -> str | None:
    """The value an execution showed: its execute_result, or the display IRkernel sends in
    its place (it never sends an execute_result)."""
    if result["result"] is not None:
        shown: str = result["result"]
        return shown
    displays = [o for o in result["outputs"] if o["output_type"] == "display_data"]
    return displays[-1]["data"].get("text/plain") if displays else None


def test_javascript_awaits_at_top_level_and_imports_modules(server: Server) -> None:
    skip_unless_ready(server, "javascript")
    with session_in(server, "javascript") as session:
        awaited = server.execute("await new Promise((done) => done(6 * 7))", session)
        assert awaited["result"] == "42", awaited
        imported = server.execute(
            'const { basename } = await import("node:path");\nbasename("/a/b/c.txt")', session
        )
        assert imported["result"] == '"c.txt"', imported


def test_r_plots_come_back_as_png(server: Server) -> None:
    skip_unless_ready(server, "r")
    with session_in(server, "r") as session:
        plotted = server.execute("plot(1:10)", session)
        assert plotted["status"] == "ok", plotted
        pngs = [image for image in plotted["images"] if image["mime"] == "image/png"]
        assert len(pngs) == 1, plotted["images"]
        image = server.client.get(pngs[0]["url"])
        assert image.status_code == 200
        assert image.content.startswith(b"\x89PNG\r\n\x1a\n")


def test_a_busy_loop_times_out_and_state_lost_tells_the_truth(server: Server, lang: Lang) -> None:
    with session_in(server, lang.name) as session:
        server.execute(lang.set_x, session)
        stopped = server.execute(lang.busy, session, timeout=2)
        assert stopped["status"] == "timeout", stopped
        assert stopped["error"]["ename"] == "TimeoutError"
        # interrupted (state kept) or killed and restarted (state lost): either, but said
        after = server.execute(lang.show_x, session)
        assert has_x(after) is not stopped["state_lost"], (stopped, after)
        if stopped["state_lost"]:
            assert "restarted" in stopped["error"]["evalue"]
        # the session works either way
        assert server.execute(lang.set_x, session)["status"] == "ok"
        assert has_x(server.execute(lang.show_x, session))


def test_a_kernel_killed_mid_run_is_reported_and_replaced(server: Server, lang: Lang) -> None:
    with session_in(server, lang.name) as session:
        server.execute(lang.set_x, session)
        died = server.execute(lang.die, session)
        assert (died["status"], died["state_lost"]) == ("error", True), died
        assert died["error"]["ename"] == "KernelDied", died["error"]
        assert "restarted" in died["error"]["evalue"]
        after = server.execute(lang.show_x, session)
        assert not has_x(after), after  # a fresh kernel, as the answer said
        assert server.execute(lang.set_x, session)["status"] == "ok"
        assert has_x(server.execute(lang.show_x, session))
        info = server.client.get(f"/sessions/{session}").json()
        assert (info["language"], info["kernel"]) == (lang.name, lang.kernel)


def test_a_killed_shell_is_reported_as_lost_state(server: Server) -> None:
    skip_unless_ready(server, "bash")
    with session_in(server, "bash") as session:
        server.execute(BASH.set_x, session)
        killed = server.execute("kill -9 $$", session)
        # bash_kernel would start a new shell and answer ok: the kernel ends instead, and
        # the service says so (bash_kernel_launch.py)
        assert killed["state_lost"], killed
        assert killed["error"]["ename"] == "KernelDied", killed
        after = server.execute(BASH.show_x, session)
        assert not has_x(after), after  # the shell's state is gone, as the answer said
        assert server.execute(BASH.set_x, session)["status"] == "ok"
        assert has_x(server.execute(BASH.show_x, session))


@pytest.mark.parametrize(("language", "kernel", "info_name"), [("bash", "bash", "bash"),
                                                                ("r", "ir", "r")])  # fmt: skip
def test_notebook_export_has_the_kernels_spec_and_language_info(
    server: Server, language: str, kernel: str, info_name: str
) -> None:
    skip_unless_ready(server, language)
    lang = next(lang for lang in LANGUAGES if lang.name == language)
    with session_in(server, language) as session:
        server.execute(lang.set_x, session)
        server.execute(lang.show_x, session)
        server.execute(lang.error, session)
        response = server.client.get(f"/sessions/{session}/notebook")
        assert response.status_code == 200, response.text
        nb = read_notebook(response.text)  # validated by nbformat
    assert nb.metadata["kernelspec"]["name"] == kernel
    assert nb.metadata["kernelspec"]["language"].lower() == info_name
    assert nb.metadata["kernelspec"]["display_name"]
    assert nb.metadata["language_info"]["name"].lower() == info_name
    assert nb.metadata["language_info"].get("file_extension")  # the kernel's own words
    assert [cell.source for cell in nb.cells] == [lang.set_x, lang.show_x, lang.error]
    assert [cell.execution_count for cell in nb.cells] == [1, 2, 3]
    assert any("41" in json.dumps(output) for output in nb.cells[1].outputs)
    assert [output.output_type for output in nb.cells[2].outputs][-1] == "error"


def test_kernelspecs_list_every_kernel_with_its_languages(server: Server) -> None:
    listed = server.client.get("/kernelspecs")
    assert listed.status_code == 200
    body = listed.json()
    assert body["default"] == "python"
    specs = {spec["name"]: spec for spec in body["kernelspecs"]}
    assert {"python3", "bash", "deno", "ir"} <= set(specs)
    for spec in specs.values():
        assert set(spec) == {
            "name", "display_name", "language", "languages", "ready", "problem", "warm_kernels"
        }  # fmt: skip
        assert spec["ready"] is (spec["problem"] is None)
        assert spec["warm_kernels"] == 0  # no pools for them by default
    assert specs["python3"]["ready"] and "python" in specs["python3"]["languages"]
    assert specs["bash"]["languages"][0] == "bash" and "sh" in specs["bash"]["languages"]
    assert {"javascript", "typescript", "js", "ts"} <= set(specs["deno"]["languages"])
    assert specs["ir"]["languages"][0] == "r" and specs["ir"]["language"] == "r"
    ready = [name for spec in specs.values() if spec["ready"] for name in spec["languages"]]
    assert set(server.client.get("/healthz").json()["languages"]) <= set(ready)


def test_an_unknown_language_is_400(server: Server) -> None:
    for path, body in (("/sessions", {}), ("/execute", {"code": "1"})):
        refused = server.client.post(path, json={**body, "language": "cobol"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["code"] == "unknown_language"
        assert "'cobol'" in refused.json()["detail"] and "bash" in refused.json()["detail"]
    assert server.client.get("/sessions").json()["sessions"] == []


def test_another_language_in_a_session_is_409(server: Server) -> None:
    skip_unless_ready(server, "bash")
    with session_in(server, "python") as session:
        refused = server.client.post(
            "/execute", json={"code": "echo hi", "session_id": session, "language": "bash"}
        )
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "language_mismatch"
        assert "python" in refused.json()["detail"]
        # the refused code never ran
        assert server.client.get(f"/sessions/{session}").json()["execution_count"] == 0
        # its own language, by an alias, is fine
        assert server.execute("1 + 1", session, language="py")["result"] == "2"
    with session_in(server, "sh") as session:
        assert server.client.get(f"/sessions/{session}").json()["language"] == "bash"
        refused = server.client.post(
            "/execute", json={"code": "1", "session_id": session, "language": "python"}
        )
        assert refused.status_code == 409, refused.text
        # the client's handle for that id in another language is refused the same way: its
        # code never runs in the wrong kernel
        with Client(server.base_url) as client:
            with pytest.raises(KernelServiceError) as mismatch:
                client.session(session, language="r").execute("x <- 1")
            assert (mismatch.value.status, mismatch.value.code) == (409, "language_mismatch")
            assert client.session(session, language="SH").execute("echo $((2+3))").stdout == "5\n"


def test_execute_without_a_session_makes_one_in_the_language(server: Server) -> None:
    skip_unless_ready(server, "bash")
    made = server.execute("echo $BASH_VERSION", None, language="bash")
    assert made["status"] == "ok" and made["stdout"].strip(), made
    info = server.client.get(f"/sessions/{made['session_id']}").json()
    assert (info["language"], info["kernel"]) == ("bash", "bash")
    server.client.delete(f"/sessions/{made['session_id']}")


def test_jupyter_clients_see_the_ready_kernels_and_start_an_r_kernel(server: Server) -> None:
    skip_unless_ready(server, "r")
    ready = {s["name"] for s in server.client.get("/kernelspecs").json()["kernelspecs"]
             if s["ready"]}  # fmt: skip
    jupyter = server.client.get("/api/kernelspecs").json()
    assert jupyter["default"] == "python3"
    assert set(jupyter["kernelspecs"]) == ready
    assert jupyter["kernelspecs"]["ir"]["spec"]["language"].lower() == "r"
    assert jupyter["kernelspecs"]["bash"]["spec"]["language"] == "bash"
    started = server.client.post("/api/kernels", json={"name": "ir"})
    assert started.status_code == 201, started.text
    kernel = started.json()
    assert kernel["name"] == "ir"
    try:
        info = server.client.get(f"/sessions/{kernel['id']}").json()
        assert (info["language"], info["kernel"]) == ("r", "ir")
        result = server.execute("paste('from', R.version$language)", kernel["id"])
        assert value_of(result) == '[1] "from R"', result
    finally:
        assert server.client.delete(f"/api/kernels/{kernel['id']}").status_code == 204


def test_the_tool_is_described_in_the_sessions_language(server: Server) -> None:
    skip_unless_ready(server, "bash")
    [tool] = server.client.get("/tools", params={"language": "bash"}).json()
    description = tool["function"]["description"]
    assert "Bash" in description and "Python" not in description.split(".")[0]
    code = tool["function"]["parameters"]["properties"]["code"]
    assert "bash" in code["description"].lower()
    unknown = server.client.get("/tools", params={"language": "cobol"})
    assert unknown.status_code == 400 and unknown.json()["code"] == "unknown_language"


def test_metrics_count_by_language(server: Server) -> None:
    ready = [lang for lang in (BASH, R) if _ready(server, lang.name)]
    if not ready:
        pytest.skip("neither bash nor r is ready here")
    before = scrape(server.client)
    for lang in ready:
        with session_in(server, lang.name) as session:
            server.execute(lang.set_x, session)
            server.execute(lang.error, session)
    after = scrape(server.client)
    for lang in ready:
        for status in ("ok", "error"):
            key = ("kernel_service_executions_total", (("language", lang.name), ("status", status)))
            assert after[key] - before.get(key, 0) == 1, (lang.name, status)
        created = value(after, "kernel_service_sessions_created_total",
                        kernel="started", language=lang.name)  # fmt: skip
        assert created >= 1


def _ready(server: Server, language: str) -> bool:
    specs = server.client.get("/kernelspecs").json()["kernelspecs"]
    return any(language in spec["languages"] and spec["ready"] for spec in specs)


def test_offered_kernels_and_missing_runtimes_at_the_http_edge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KERNEL_SERVICE_KERNELS narrows what is offered; a kernelspec whose program is missing
    is listed not ready, and a session in it is 503 with the reason (not a traceback at the
    first call)."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "ghost"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps({"argv": ["/nonexistent/ghost", "{connection_file}"], "language": "ghost",
                    "display_name": "Ghost"})
    )  # fmt: skip
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    with running_server(tmp_path / "service", kernels="bash,ghost") as narrowed:
        specs = {s["name"]: s for s in narrowed.client.get("/kernelspecs").json()["kernelspecs"]}
        assert set(specs) == {"python3", "bash", "ghost"}
        assert specs["ghost"]["ready"] is False
        # the host's path is not told to callers
        assert specs["ghost"]["problem"] == "its program 'ghost' is not installed"
        assert "ghost" not in narrowed.client.get("/healthz").json()["languages"]
        unavailable = narrowed.client.post("/sessions", json={"language": "ghost"})
        assert unavailable.status_code == 503, unavailable.text
        assert unavailable.json()["code"] == "language_unavailable"
        assert "its program 'ghost' is not installed" in unavailable.json()["detail"]
        assert "/nonexistent" not in unavailable.json()["detail"]
        left_out = narrowed.client.post("/sessions", json={"language": "r"})
        assert left_out.status_code == 400 and left_out.json()["code"] == "unknown_language"
        assert "ghost" not in narrowed.client.get("/api/kernelspecs").json()["kernelspecs"]


def processes_under(root: Path) -> list[psutil.Process]:
    """Live processes whose command line names a path under `root` (a sandbox's bwrap, a
    kernel, its bridge)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        if process.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        if any(str(root) in arg for arg in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("language", ["bash", "r"])
def test_a_session_survives_a_restart_with_keep_kernels(tmp_path: Path, language: str) -> None:
    lang = next(lang for lang in LANGUAGES if lang.name == language)
    # asked before the service starts: one stopped with keep_kernels leaves a reaper behind
    try:
        KernelCatalog.discover().resolve(language)
    except LanguageUnavailable as unavailable:
        pytest.skip(f"{language} is not ready here: {unavailable.problem}")
    keep = {"KERNEL_SERVICE_KEEP_KERNELS": "true"}
    with service_process(tmp_path, env=keep) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=120) as client:
            made = client.post("/sessions", json={"session_id": "s", "language": language})
            assert made.status_code == 201, made.text
            assert _run(client, lang.set_x)["status"] == "ok"
        [kernel] = session_kernels(tmp_path)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert alive(kernel)  # the kernel lives on without its service
    with service_process(tmp_path) as (process, base_url):
        with httpx.Client(base_url=base_url, timeout=120) as client:
            info = client.get("/sessions/s").json()
            assert (info["language"], info["kernel"]) == (language, lang.kernel), info
            shown = _run(client, lang.show_x)
            assert has_x(shown) and not shown["state_lost"], shown
            assert shown["execution_count"] == 2
            assert session_kernels(tmp_path) == {kernel}  # adopted, not started again
            nb = read_notebook(client.get("/sessions/s/notebook").text)
            assert nb.metadata["kernelspec"]["name"] == lang.kernel
        # without keep_kernels this time: the stop ends everything
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert wait_for(lambda: not processes_under(tmp_path / "connection"), 30)
    assert list((tmp_path / "connection").iterdir()) == []


def _run(client: httpx.Client, code: str) -> dict[str, Any]:
    response = client.post("/execute", json={"code": code, "session_id": "s"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body
