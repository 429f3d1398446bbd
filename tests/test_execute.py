"""POST /execute against real kernels: persistence, outputs, errors, images, timeouts, deaths."""

import base64
import io
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import Server, processes_running, running_server, wait_for


def test_variables_persist_across_calls(server: Server, session: str) -> None:
    first = server.execute("x = 20\ny = x + 1", session)
    assert first["status"] == "ok"
    second = server.execute("x + y", session)
    assert second["result"] == "41"
    assert second["execution_count"] == 2
    assert second["text"] == "Out[2]: 41"


def test_without_session_id_a_new_session_is_made(server: Server) -> None:
    result = server.execute("a = 1\na")
    session_id = result["session_id"]
    assert result["result"] == "1"
    assert server.execute("a + 1", session_id)["result"] == "2"
    assert server.client.get(f"/sessions/{session_id}").json()["execution_count"] == 2
    assert server.client.delete(f"/sessions/{session_id}").status_code == 204


def test_stdout_stderr_and_value_in_order(server: Server, session: str) -> None:
    code = (
        "import sys\n"
        "print('one', flush=True)\n"
        "print('two', file=sys.stderr, flush=True)\n"
        "print('three')\n"
        "'value'"
    )
    result = server.execute(code, session)
    assert result["stdout"] == "one\nthree\n"
    assert result["stderr"] == "two\n"
    assert result["result"] == "'value'"
    kinds = [(o["output_type"], o.get("name")) for o in result["outputs"]]
    assert kinds == [
        ("stream", "stdout"),
        ("stream", "stderr"),
        ("stream", "stdout"),
        ("execute_result", None),
    ]
    assert result["text"] == "one\n[stderr]\ntwo\nthree\nOut[1]: 'value'"


def test_error_with_traceback(server: Server, session: str) -> None:
    result = server.execute("def f():\n    return 1 / 0\nf()", session)
    assert result["status"] == "error"
    error = result["error"]
    assert error["ename"] == "ZeroDivisionError"
    assert error["evalue"] == "division by zero"
    joined = "\n".join(error["traceback"])
    assert "return 1 / 0" in joined
    assert "\x1b[" not in joined
    assert result["text"].endswith("ZeroDivisionError: division by zero")
    assert result["state_lost"] is False
    # the session goes on
    assert server.execute("2 + 2", session)["result"] == "4"


def test_plot_comes_back_as_png_of_the_right_size(server: Server, session: str) -> None:
    code = (
        "import matplotlib.pyplot as plt\n"
        "%config InlineBackend.print_figure_kwargs = {'bbox_inches': None}\n"
        "fig = plt.figure(figsize=(4, 3), dpi=100)\n"
        "plt.plot([1, 3, 2])\n"
        "plt.show()"
    )
    result = server.execute(code, session)
    assert result["status"] == "ok", result["text"]
    [image] = result["images"]
    assert image["mime"] == "image/png"
    assert (image["width"], image["height"]) == (400, 300)
    decoded = Image.open(io.BytesIO(base64.b64decode(image["data"])))
    assert decoded.size == (400, 300)
    served = server.client.get(image["url"])
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(served.content)).size == (400, 300)
    assert f"[image: image/png 400x300, {image['url']}]" in result["text"]


def test_figure_as_last_expression_is_an_image(server: Server, session: str) -> None:
    result = server.execute(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar([1, 2], [3, 4])\nfig",
        session,
    )
    # Jupyter shows it as the value and again as the open figure; both are PNG images.
    assert result["images"]
    assert {i["mime"] for i in result["images"]} == {"image/png"}


def _cjk_font_installed() -> bool:
    if not shutil.which("fc-list"):
        return False
    fonts = subprocess.run(["fc-list"], capture_output=True, text=True, check=False).stdout
    return any(name in fonts for name in ("WenQuanYi", "Noto Sans CJK", "Source Han"))


@pytest.mark.skipif(
    not _cjk_font_installed(), reason="no CJK font installed (scripts/setup installs one as root)"
)
def test_chinese_labels_render_without_missing_glyphs(server: Server, session: str) -> None:
    code = (
        "import warnings, matplotlib.pyplot as plt\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('error')\n"
        "    plt.plot([1, 2]); plt.title('销售额 (万元)'); plt.xlabel('月份')\n"
        "    plt.gcf().canvas.draw()\n"
        "plt.show()"
    )
    result = server.execute(code, session)
    assert result["status"] == "ok", result["text"]
    assert "missing from font" not in result["stderr"]
    assert len(result["images"]) == 1


def test_svg_html_and_json_displays(server: Server, session: str) -> None:
    code = (
        "from IPython.display import SVG, HTML, JSON, display\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        '<rect width="10" height="10"/></svg>\'))\n'
        "display(HTML('<b>bold</b>'))\n"
        "display(JSON({'a': 1}))\n"
        "import pandas as pd\n"
        "pd.DataFrame({'n': [1, 2]})"
    )
    result = server.execute(code, session)
    assert result["status"] == "ok", result["text"]
    svg, html, json_out, frame = result["outputs"]
    assert "<rect" in svg["data"]["image/svg+xml"]
    assert html["data"]["text/html"] == "<b>bold</b>"
    assert json_out["data"]["application/json"] == {"a": 1}
    assert frame["output_type"] == "execute_result"
    assert "<table" in frame["data"]["text/html"]
    [image] = result["images"]
    assert image["mime"] == "image/svg+xml"
    assert b"<rect" in base64.b64decode(image["data"])
    served = server.client.get(image["url"])
    assert served.headers["content-type"].startswith("image/svg+xml")


def test_input_fails_fast(server: Server, session: str) -> None:
    started = time.monotonic()
    result = server.execute("name = input('Your name? ')", session)
    assert time.monotonic() - started < 5
    assert result["status"] == "error"
    assert result["error"]["ename"] == "StdinNotImplementedError"
    assert result["error"]["evalue"].startswith("input() is not available: ")


def test_timeout_interrupts_and_the_session_survives(server: Server, session: str) -> None:
    server.execute("kept = 'still here'", session)
    started = time.monotonic()
    result = server.execute("import time\nwhile True:\n    time.sleep(0.01)", session, timeout=1)
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout"
    assert result["state_lost"] is False
    assert 1 <= elapsed < 15  # (the loop never ends by itself; a bound that holds under load)
    assert result["error"]["ename"] == "TimeoutError"
    assert "interrupted" in result["text"] and "intact" in result["text"]
    assert server.execute("kept", session)["result"] == "'still here'"


@pytest.mark.parametrize(
    "code",
    [
        "sum(range(10**10))",  # one long C call: interrupts wait for it
        # code that swallows the interrupt and carries on
        "while True:\n    try:\n        while True:\n            pass\n"
        "    except KeyboardInterrupt:\n        pass",
    ],
)
def test_timeout_of_uninterruptible_code_restarts_the_kernel(
    server: Server, session: str, code: str
) -> None:
    server.execute("lost = 1", session)
    started = time.monotonic()
    result = server.execute(code, session, timeout=1)
    elapsed = time.monotonic() - started
    assert result["status"] == "timeout"
    assert result["state_lost"] is True
    assert elapsed < 15  # (the code runs for minutes or for ever; a bound that holds under load)
    assert "restarted" in result["text"] and "lost" in result["text"]
    after = server.execute("'lost' in globals()", session)
    assert after["result"] == "False"
    assert after["state_lost"] is False


def test_timeout_is_capped_by_the_configured_maximum(tmp_path: Path) -> None:
    with running_server(tmp_path, default_timeout=1, max_timeout=1) as server:
        started = time.monotonic()
        result = server.execute("import time\ntime.sleep(30)", timeout=10**9)
        assert result["status"] == "timeout"
        assert time.monotonic() - started < 20  # long before the 30 s sleep ends
        assert "1 s time limit (the most this service allows)" in result["text"]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os\nprint('bye', flush=True)\nos._exit(3)", "exited with code 3"),
        ("import ctypes\nctypes.string_at(0)", "segmentation fault"),
        # (out of memory or not: its memory cgroup tells, tests/test_sandbox.py)
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "killed by SIGKILL"),
    ],
)
def test_kernel_death_is_reported_and_a_fresh_kernel_follows(
    server: Server, session: str, code: str, reason: str
) -> None:
    server.execute("before = 1", session)
    started = time.monotonic()
    result = server.execute(code, session, timeout=60)
    assert time.monotonic() - started < 30, "death must be noticed, not waited out (60 s)"
    assert result["status"] == "error"
    assert result["state_lost"] is True
    assert result["error"]["ename"] == "KernelDied"
    assert reason in result["error"]["evalue"]
    assert "died" in result["text"]
    after = server.execute("'before' in globals()", session)
    assert after["status"] == "ok"
    assert after["result"] == "False"


def test_death_between_calls_is_reported_on_the_next_call(server: Server, session: str) -> None:
    server.execute(
        "import threading, os, time\n"
        "threading.Thread(target=lambda: (time.sleep(0.3), os._exit(7)), daemon=True).start()",
        session,
    )
    # the service saw the kernel end (a new one is started at the next call)
    assert wait_for(lambda: server.status(session) == "dead", 60)
    result = server.execute("1 + 1", session)
    assert result["status"] == "ok"
    assert result["result"] == "2"
    assert result["state_lost"] is True
    assert "exited with code 7" in result["text"]


def test_huge_output_is_cut_to_head_and_tail(server: Server, session: str) -> None:
    limit = server.settings.output_limit
    result = server.execute("print('x' * 50_000_000)\nprint('the end')", session, timeout=120)
    assert result["status"] == "ok"
    stdout = result["stdout"]
    assert len(stdout) < limit + 200
    assert stdout.startswith("xxxx")
    assert stdout.endswith("the end\n")
    assert "output truncated" in stdout and "omitted" in stdout
    cut = next(o for o in result["outputs"] if o["output_type"] == "truncated")
    assert cut["omitted_chars"] == 50_000_000 + len("\nthe end\n") - limit
    assert len(result["text"]) <= server.settings.text_limit + 100


def test_many_small_prints_are_bounded_too(server: Server, session: str) -> None:
    result = server.execute("for i in range(300_000):\n    print(i)", session, timeout=120)
    assert result["stdout"].startswith("0\n1\n2\n")
    assert result["stdout"].endswith("299998\n299999\n")
    assert len(result["stdout"]) < server.settings.output_limit + 200


def test_a_message_over_the_size_cap_is_dropped_and_the_session_goes_on(tmp_path: Path) -> None:
    with running_server(tmp_path, max_message_bytes=1024 * 1024) as server:
        session_id = server.new_session()
        server.execute("kept = 1", session_id)
        code = "display({'text/plain': 'y' * 5_000_000}, raw=True)\n'value'"
        result = server.execute(code, session_id)
        assert result["status"] == "error"  # never "ok" with output missing
        assert result["error"]["ename"] == "OutputLost"
        assert "more than the service accepts" in result["error"]["evalue"]
        assert "y" * 100 not in result["stdout"]
        assert "OutputLost" in result["text"]
        after = server.execute("print('small'); kept", session_id)
        assert after["stdout"] == "small\n"
        assert after["result"] == "1"


def test_every_figure_of_a_call_comes_back_even_beside_long_output(
    server: Server, session: str
) -> None:
    code = (
        "import matplotlib.pyplot as plt, numpy as np\n"
        "print('x' * 300_000)\n"
        "rng = np.random.default_rng(0)\n"
        "for i in range(3):\n"
        "    plt.figure(); plt.scatter(rng.random(5000), rng.random(5000)); plt.show()\n"
        "print('y' * 300_000)"
    )
    result = server.execute(code, session)
    assert result["status"] == "ok", result["text"][-500:]
    assert len(result["images"]) == 3
    assert all(len(image["data"]) > 50_000 for image in result["images"])
    assert "output truncated" in result["stdout"]


def test_a_large_value_is_cut_in_the_middle(server: Server, session: str) -> None:
    result = server.execute("'start' + 'x' * 500_000 + 'end'", session)
    assert result["result"].startswith("'startxxx")
    assert result["result"].endswith("xxxend'")
    assert "characters omitted" in result["result"]
    assert len(result["result"]) < server.settings.output_limit


def test_user_made_displays_do_not_break_the_answer(server: Server, session: str) -> None:
    result = server.execute(
        "from IPython.display import display\n"
        "display('shown', display_id=5)\n"
        "display({'image/png': 'not base64!!', 'text/plain': 'fake'}, raw=True)",
        session,
    )
    assert result["status"] == "ok"
    assert result["outputs"][0]["display_id"] == "5"
    assert result["images"] == []


def test_svg_is_served_so_it_cannot_run_script(server: Server, session: str) -> None:
    result = server.execute(
        "from IPython.display import SVG\n"
        "SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"><script>alert(1)</script></svg>')",
        session,
    )
    served = server.client.get(result["images"][0]["url"])
    assert served.headers["content-security-policy"] == "sandbox"
    assert served.headers["x-content-type-options"] == "nosniff"


def test_what_a_dying_kernel_started_dies_with_it(server: Server, session: str) -> None:
    result = server.execute(
        "import subprocess, os, time\n"
        "child = subprocess.Popen(['sleep', '300.1'])\n"
        "time.sleep(0.3)\n"
        "os._exit(1)",
        session,
    )
    assert result["error"]["ename"] == "KernelDied"
    assert wait_for(lambda: not processes_running("sleep", "300.1"))


def test_a_session_whose_work_dir_was_removed_recovers(server: Server, session: str) -> None:
    result = server.execute(
        "import os, shutil\nshutil.rmtree(os.getcwd(), ignore_errors=True)\nos._exit(1)", session
    )
    assert result["error"]["ename"] == "KernelDied"
    after = server.execute("open('probe.txt', 'w').write('written')", session)
    assert after["status"] == "ok", after["text"]
    assert after["result"] == "7"


def test_an_output_with_invalid_image_data_does_not_take_a_real_images_place(
    server: Server, session: str
) -> None:
    result = server.execute(
        "from IPython.display import display\n"
        "display({'image/png': 'not an image!!', 'text/plain': 'fake'}, raw=True)\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()",
        session,
    )
    [image] = result["images"]
    fake, real = result["text"].splitlines()
    assert fake == "fake"
    assert real == f"[image: image/png {image['width']}x{image['height']}, {image['url']}]"


def test_output_with_an_undecodable_file_name_is_kept(server: Server, session: str) -> None:
    printed = server.execute("print('caf' + b'\\xe9'.decode('utf-8', 'surrogateescape'))", session)
    assert printed["status"] == "ok"
    assert "caf" in str(printed["outputs"]), printed


def test_an_error_naming_an_undecodable_file_is_that_error(server: Server, session: str) -> None:
    failed = server.execute(
        "raise FileNotFoundError('caf' + b'\\xe9'.decode('utf-8', 'surrogateescape'))", session
    )
    assert failed["status"] == "error"
    assert "FileNotFoundError" in str(failed), failed
    assert "KeyboardInterrupt" not in str(failed), failed
