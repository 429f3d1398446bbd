"""Observability: `GET /metrics` moves with what happens (executions, kernel deaths, sessions
made, deleted and culled), sits behind the API key, and each execution logs one line that
holds neither its code nor its output."""

import logging
import os
import signal
import threading
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import HOLD, Server, kernel_processes, running_server, wait_for, zygotes

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

# a 1×1 PNG: rich output of a known size
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4"
    "2mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
SHOW_PNG = f"from IPython.display import display\ndisplay({{'image/png': {PNG!r}}}, raw=True)"


def scrape(client: httpx.Client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_follow_executions_kernel_deaths_and_sessions(tmp_path: Path) -> None:
    with running_server(tmp_path, pool_size=1) as server:
        assert wait_for(
            lambda: value(scrape(server.client), "kernel_service_warm_kernels") == 1, timeout=60
        )
        before = scrape(server.client)
        # every series is there from the start, at zero
        for status in ("ok", "error", "timeout"):
            assert (
                value(before, "kernel_service_executions_total", status=status, language="python")
                == 0
            )
        for cause in ("shutdown", "timeout", "exited", "signal", "out_of_memory", "unknown"):
            assert value(before, "kernel_service_kernel_deaths_total", cause=cause) == 0
        assert value(before, "kernel_service_sessions", status="idle") == 0
        assert value(before, "kernel_service_kernel_starts_total", launch="pool", outcome="ok") >= 1

        session = server.new_session("watched")
        live = scrape(server.client)
        assert value(live, "kernel_service_sessions", status="idle") == 1
        assert (
            value(live, "kernel_service_sessions_created_total", kernel="warm", language="python")
            == 1
        )

        # a busy session is seen busy at the next scrape
        holder = threading.Thread(target=server.execute, args=(HOLD, session))
        holder.start()
        server.wait_busy(session)
        assert value(scrape(server.client), "kernel_service_sessions", status="busy") == 1
        server.let_end(session)
        holder.join()

        assert server.execute("print('hello')", session)["status"] == "ok"
        assert server.execute(SHOW_PNG, session)["status"] == "ok"
        assert server.execute("1 / 0", session)["status"] == "error"
        interrupted = server.execute(
            "import time\nwhile True: time.sleep(0.01)", session, timeout=1
        )
        assert (interrupted["status"], interrupted["state_lost"]) == ("timeout", False)
        killed = server.execute("sum(range(10**10))", session, timeout=1)
        assert (killed["status"], killed["state_lost"]) == ("timeout", True)
        for death in (
            "import os\nos._exit(3)",
            "import ctypes\nctypes.string_at(0)",
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        ):
            died = server.execute(death, session)
            assert (died["status"], died["state_lost"]) == ("error", True)
        assert wait_for(
            lambda: server.client.get(f"/sessions/{session}").json()["status"] == "idle"
        )

        after = scrape(server.client)
        executions = {
            status: value(
                after, "kernel_service_executions_total", status=status, language="python"
            )
            for status in ("ok", "error", "timeout")
        }
        assert executions == {"ok": 3, "error": 4, "timeout": 2}
        assert value(after, "kernel_service_execution_duration_seconds_count") == 9
        assert value(after, "kernel_service_execution_duration_seconds_sum") >= 2  # two 1 s limits
        assert value(after, "kernel_service_execution_duration_seconds_bucket", le="600.0") == 9
        assert value(after, "kernel_service_execution_duration_seconds_bucket", le="0.5") < 9
        assert value(after, "kernel_service_output_bytes_total", kind="rich") == len(PNG)
        assert value(after, "kernel_service_output_bytes_total", kind="text") > len("hello\n")
        assert value(after, "kernel_service_state_lost_total") == 4
        deaths = {
            cause: value(after, "kernel_service_kernel_deaths_total", cause=cause)
            for cause in ("shutdown", "timeout", "exited", "signal", "out_of_memory")
        }
        # the SIGKILL it sent itself: its memory cgroup, if it has one, says it was not the
        # OOM killer's; without one it is taken for the OOM killer's
        cgroups = server.client.get("/healthz").json()["isolation"].get("memory_cgroup_mb")
        sigkill = "signal" if cgroups else "out_of_memory"
        expected = {"shutdown": 0, "timeout": 1, "exited": 1, "signal": 1, "out_of_memory": 0}
        assert deaths == expected | {sigkill: expected[sigkill] + 1}
        starts = "kernel_service_kernel_starts_total"
        assert value(after, starts, launch="replacement", outcome="ok") == 4
        assert value(after, starts, launch="session", outcome="ok") == 0  # the pool served it

        assert server.client.delete(f"/sessions/{session}").status_code == 204
        gone = scrape(server.client)
        assert value(gone, "kernel_service_sessions_closed_total", reason="deleted") == 1
        assert value(gone, "kernel_service_kernel_deaths_total", cause="shutdown") == 1
        assert sum(v for (name, _), v in gone.items() if name == "kernel_service_sessions") == 0


def test_culled_sessions_are_counted(tmp_path: Path) -> None:
    with running_server(tmp_path, session_ttl=0.5) as server:
        server.new_session()
        culled = ("kernel_service_sessions_closed_total", (("reason", "culled"),))
        assert wait_for(lambda: scrape(server.client)[culled] == 1, timeout=10)
        # its kernel ends just after the session leaves the registry
        ended = ("kernel_service_kernel_deaths_total", (("cause", "shutdown"),))
        assert wait_for(lambda: scrape(server.client)[ended] == 1)
        samples = scrape(server.client)
        assert (
            value(
                samples,
                "kernel_service_sessions_created_total",
                kernel="started",
                language="python",
            )
            == 1
        )
        starts = "kernel_service_kernel_starts_total"
        assert value(samples, starts, launch="session", outcome="ok") == 1
        assert value(samples, "kernel_service_sessions", status="idle") == 0


def test_the_end_of_a_kernel_whose_parent_is_gone_has_an_unknown_cause(tmp_path: Path) -> None:
    with running_server(tmp_path) as server:
        server.new_session()
        [zygote] = zygotes(server)
        [kernel] = kernel_processes(server.connection_dir)
        os.kill(zygote.pid, signal.SIGKILL)
        # gone, so its kernel is an orphan now, whose end nobody reports
        assert wait_for(lambda: not zygote.is_running() or zygote.status() == "zombie", 60)
        kernel.kill()
        deaths = "kernel_service_kernel_deaths_total"
        assert wait_for(lambda: value(scrape(server.client), deaths, cause="unknown") == 1)
        assert value(scrape(server.client), deaths, cause="out_of_memory") == 0


def test_metrics_need_the_api_key(tmp_path: Path) -> None:
    key = "key-metrics-0123456789"
    with running_server(tmp_path, api_key=key) as server:
        assert server.client.get("/healthz").status_code == 200
        refused = server.client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["code"] == "unauthorized"
        with httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client:
            assert value(scrape(client), "kernel_service_warm_kernels") == 0


def test_openmetrics_when_the_scraper_asks(server: Server) -> None:
    response = server.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_one_log_line_per_execution_without_code_or_output(
    server: Server, session: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kernel_service")
    # the marker in the output is not in the code: it is put together by the kernel
    server.execute("# CODE_MARKER_7f3a\nprint('OUTPUT' + '_MARKER_9b2c')", session)
    server.execute("1 / 0  # CODE_MARKER_7f3a", session)
    server.execute(SHOW_PNG, session)

    lines = [
        record
        for record in caplog.records
        if record.name == "kernel_service.sessions.session"
        and record.getMessage().startswith("execution ")
    ]
    assert len(lines) == 3
    fields = [dict(part.split("=", 1) for part in r.getMessage().split()[1:]) for r in lines]
    assert fields[0] == {
        "session_id": session,
        "language": "python",
        "execution_count": "1",
        "status": "ok",
        "duration_ms": fields[0]["duration_ms"],
        "bytes_out": str(len("OUTPUT_MARKER_9b2c\n")),
        "images": "0",
        "state_lost": "False",
    }
    assert float(fields[0]["duration_ms"]) > 0
    assert (fields[1]["status"], fields[1]["execution_count"]) == ("error", "2")
    assert (fields[2]["images"], fields[2]["bytes_out"]) == ("1", str(len(PNG)))
    # the same fields as record attributes, for a structured (JSON) formatter
    attributes = vars(lines[2])
    assert {name: attributes[name] for name in ("session_id", "status", "images", "bytes_out")} == {
        "session_id": session,
        "status": "ok",
        "images": 1,
        "bytes_out": len(PNG),
    }
    # nothing logged holds the code or its output (the traceback quotes the code), at any level
    for record in caplog.records:
        everything = f"{record.getMessage()} {vars(record)}"
        assert "CODE_MARKER_7f3a" not in everything
        assert "OUTPUT_MARKER_9b2c" not in everything
