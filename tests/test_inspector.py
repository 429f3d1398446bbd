"""The web inspector at `/`: served without a key, and driven end to end in a real headless
Chromium (Debian's, through Playwright) against a real server with real kernels.

Playwright rather than Selenium: it talks to the browser over the DevTools protocol with no
chromedriver to keep in step with Chromium's version, and its assertions wait by themselves
for the page to get there (no sleeps, no polling loops), which keeps the test fast and
steady. Only its Python package is installed (dev extras); the browser is the system's
(`scripts/setup` installs Debian's `chromium`), never a download of Playwright's own.
"""

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Error, Page, Route, expect, sync_playwright

from kernel_service.api.inspector import CONTENT_SECURITY_POLICY
from tests.conftest import read_notebook, running_server

KEY = "inspector-key-0123456789"
CHROMIUM = (
    os.environ.get("KERNEL_SERVICE_TEST_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
ARTIFACTS = Path(__file__).parent / "artifacts"
# Flags for a machine with no screen and a closed network (see the machine notes): no GPU,
# no background calls home. Playwright adds --headless and, as we run as root, --no-sandbox.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PLOT = (
    "print('hello from the inspector')\n"
    "import time; time.sleep(1)\n"
    "import matplotlib.pyplot as plt\n"
    "plt.plot([1, 4, 2, 3]); plt.title('inspector'); plt.show()"
)
# HTML written by model code: a table to show, and script that must not run.
TABLE = (
    "import pandas as pd\n"
    "from IPython.display import HTML, display\n"
    "display(HTML('<b>bold</b><script>parent.document.title = \"pwned\"</script>'\n"
    "             '<img src=\"x\" onerror=\"parent.document.title = \\'pwned\\'\">'))\n"
    "pd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [4, 19]})"
)


def test_the_page_is_served_without_a_key(tmp_path: Path) -> None:
    with running_server(tmp_path, api_key=KEY) as server:
        client = server.client
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert '<script src="/static/inspector.js"' in page.text
        script = client.get("/static/inspector.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "Authorization" in script.text
        style = client.get("/static/inspector.css")
        assert style.status_code == 200
        assert style.headers["content-type"].startswith("text/css")
        # the data is not: everything else still needs the key
        assert client.get("/sessions").status_code == 401
        assert client.get("/static/other.js").status_code == 401
        keyed = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/static/other.js", headers=keyed).status_code == 404
        # and the page is no part of the API's schema
        paths = client.get("/openapi.json", headers=keyed).json()["paths"]
        assert "/" not in paths
        assert not any(path.startswith("/static") for path in paths)


@contextmanager
def chromium() -> Iterator[Browser]:
    """The system's Chromium, headless, closed (with Playwright's driver) at the end."""
    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine: scripts/setup installs Debian's chromium (as root, "
    "with apt), or set KERNEL_SERVICE_TEST_CHROMIUM to a Chromium binary",
)
def test_the_inspector_runs_code_and_shows_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    screenshot = ARTIFACTS / "inspector.png"
    ARTIFACTS.mkdir(exist_ok=True)
    with running_server(tmp_path, api_key=KEY) as server, chromium() as browser:
        keyed = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
        )
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(30_000)
        page_errors: list[Error] = []

        def page_error(error: Error) -> None:
            page_errors.append(error)

        page.on("pageerror", page_error)
        with keyed:
            responses = keyed.get("/openapi.json").json()["paths"]["/execute"]["post"]["responses"]
            streaming = "text/event-stream" in responses["200"]["content"]

            session_id = sign_in_and_make_a_session(page, server.base_url)
            run_a_plot(page, streaming)
            run_html(page)
            download_the_notebook(page, session_id)
            page.screenshot(path=str(screenshot), full_page=True)
            assert page_errors == []
            page.close()

            # what the page did, it did with the key: the session is that key's
            sessions = keyed.get("/sessions").json()["sessions"]
            assert [s["session_id"] for s in sessions] == [session_id]
            history = keyed.get(f"/sessions/{session_id}/history").json()["executions"]
            assert [(e["seq"], e["status"]) for e in history] == [(1, "ok"), (2, "ok")]
    with capsys.disabled():
        print(
            f"\ninspector: {time.monotonic() - began:.1f} s "
            f"({'streamed' if streaming else 'no streaming'}); screenshot: {screenshot}"
        )


def sign_in_and_make_a_session(page: Page, base_url: str) -> str:
    """Told that a key is needed, given it, a new session made and selected: its id."""
    page.goto(f"{base_url}/")
    expect(page.locator("#message")).to_contain_text("401 Unauthorized")
    expect(page.locator("#message")).to_contain_text("needs an API key")
    page.fill("#api-key", KEY)
    page.click("#use-key")
    expect(page.locator("#message")).to_be_hidden()
    expect(page.locator("#no-sessions")).to_be_visible()

    page.click("#new-session")
    expect(page.locator("#sessions li")).to_have_count(1)
    expect(page.locator("#session-status")).to_have_text("idle")
    session_id = page.locator("#session-title").inner_text()
    selected = page.locator("#sessions button[aria-current=true]")
    expect(selected).to_have_attribute("data-session", session_id)
    return session_id


def run_a_plot(page: Page, streaming: bool) -> None:
    """A cell that prints, waits and plots: with streaming, the print shows before the end;
    then the history has the cell, its text and its image."""
    page.fill("#code", PLOT)
    page.click("#run")
    live = page.locator("#history .cell.live")
    if streaming:
        expect(live.locator("pre.stream.stdout")).to_have_text("hello from the inspector\n")
        expect(page.locator("#run-status")).to_have_text("running…")
    cell = page.locator("#exec-1")
    expect(cell.locator("img")).to_be_visible()
    expect(live).to_have_count(0)
    expect(cell.locator(".prompt")).to_have_text("In [1]:")
    expect(cell.locator(".badge")).to_have_text("ok")
    expect(cell.locator("pre.code")).to_have_text(PLOT)
    expect(cell.locator("pre.stream.stdout")).to_have_text("hello from the inspector\n")
    image = cell.locator("img")
    assert image.evaluate("img => img.complete && img.naturalWidth") > 100
    assert (image.get_attribute("src") or "").startswith("data:image/png;base64,iVBOR")
    expect(page.locator("#run-status")).to_contain_text("ok in")


def run_html(page: Page) -> None:
    """HTML output, answered as plain JSON (the page's path for a service without
    streaming): a table in a sandboxed frame, and script in HTML output never run."""

    def as_json(route: Route) -> None:
        route.continue_(headers={**route.request.headers, "accept": "application/json"})

    page.route("**/execute", as_json)
    page.fill("#code", TABLE)
    page.press("#code", "Control+Enter")
    cell = page.locator("#exec-2")
    expect(cell.locator(".out-prompt")).to_have_text("Out[2]:")
    frames = cell.locator("iframe")
    expect(frames).to_have_count(2)
    for i in range(2):
        expect(frames.nth(i)).to_have_attribute("sandbox", "allow-same-origin")
    expect(page.frame_locator("#exec-2 iframe >> nth=0").locator("b")).to_have_text("bold")
    table = page.frame_locator("#exec-2 iframe >> nth=1").locator("table")
    expect(table).to_contain_text("Oslo")
    expect(table).to_contain_text("19")
    assert page.title() == "kernel-service inspector"
    page.unroute("**/execute")


def download_the_notebook(page: Page, session_id: str) -> None:
    with page.expect_download() as download:
        page.click("#download-notebook")
    assert download.value.suggested_filename == f"{session_id}.ipynb"
    nb = read_notebook(download.value.path().read_text())
    assert [c.source for c in nb.cells] == [PLOT, TABLE]
