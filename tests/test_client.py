"""The Python client (kernel_service_client.client), sync and async, against a live server."""

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kernel_service_client.client import AsyncClient, Client, KernelServiceError
from tests.conftest import Server, running_server, wait_for


def test_a_session_keeps_state_and_is_made_on_first_use(server: Server) -> None:
    with Client(server.base_url) as client:
        before = {s.session_id for s in client.sessions()}
        with client.session() as session:
            assert session.id is None
            assert {s.session_id for s in client.sessions()} == before  # nothing started yet
            first = session.execute("x = 6 * 7\nprint(x)")
            assert first.status == "ok"
            assert first.stdout == "42\n"
            assert session.id == first.session_id
            second = session.execute("x * 2")
            assert second.result == "84"
            assert second.state_lost is False
            assert session.info().execution_count == 2
            session_id = session.id
        # leaving the block deleted it
        assert session_id not in {s.session_id for s in client.sessions()}
        assert session.id is None


def test_images_errors_and_timeouts_are_typed_results(server: Server) -> None:
    with Client(server.base_url) as client, client.session() as session:
        plot = session.execute("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()")
        [image] = plot.images
        assert image.mime == "image/png"
        assert client.image(image.url) == base64.b64decode(image.data)
        assert client.url(image.url).startswith(server.base_url + "/sessions/")

        failed = session.execute("1 / 0")
        assert failed.status == "error"
        assert failed.error is not None
        assert failed.error.ename == "ZeroDivisionError"

        slow = session.execute("import time\ntime.sleep(30)", timeout=0.5)
        assert slow.status == "timeout"
        assert session.execute("print('still here')").stdout == "still here\n"


def test_the_first_execution_can_be_interrupted(server: Server) -> None:
    with Client(server.base_url) as client, client.session() as session:
        results = []
        runner = threading.Thread(
            target=lambda: results.append(session.execute("import time\ntime.sleep(60)"))
        )
        runner.start()
        assert wait_for(lambda: session.id is not None, timeout=30)
        server.wait_busy(str(session.id))
        assert session.interrupt() is True
        runner.join(timeout=30)
        [interrupted] = results
        assert interrupted.error is not None
        assert interrupted.error.ename == "KeyboardInterrupt"


def test_handles_racing_to_make_one_chosen_id_share_it(server: Server) -> None:
    with Client(server.base_url) as client:
        handles = [client.session("raced") for _ in range(4)]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda h: h[1].execute(f"n = {h[0]}\nn"), enumerate(handles)))
        assert [r.status for r in results] == ["ok"] * 4
        assert {r.session_id for r in results} == {"raced"}
        assert [r.state_lost for r in results] == [False] * 4
        handles[0].close()


def test_an_unreachable_service_is_a_service_error() -> None:
    with Client("http://127.0.0.1:1") as client, pytest.raises(KernelServiceError) as raised:
        client.session().execute("1")
    assert raised.value.status == 0
    assert raised.value.code == "service_unreachable"
    assert "127.0.0.1:1 could not be reached" in raised.value.message


def test_interrupt_from_another_thread_and_restart(server: Server) -> None:
    with Client(server.base_url) as client, client.session() as session:
        assert session.interrupt() is False  # no session yet, nothing to interrupt
        session.execute("kept = 1")
        results = []
        runner = threading.Thread(
            target=lambda: results.append(session.execute("import time\ntime.sleep(60)"))
        )
        runner.start()
        server.wait_busy(str(session.id))
        assert session.interrupt() is True
        runner.join(timeout=30)
        [interrupted] = results
        assert interrupted.error is not None
        assert interrupted.error.ename == "KeyboardInterrupt"
        assert session.execute("kept").result == "1"

        restarted = session.restart()
        assert restarted.session_id == session.id
        assert restarted.execution_count == 0
        gone = session.execute("kept")
        assert gone.error is not None
        assert gone.error.ename == "NameError"


def test_a_deleted_session_is_replaced_and_the_result_says_state_was_lost(
    server: Server,
) -> None:
    with Client(server.base_url) as client, client.session() as session:
        session.execute("x = 1")
        old_id = session.id
        assert server.client.delete(f"/sessions/{old_id}").status_code == 204

        result = session.execute("print('after')")
        assert result.status == "ok"
        assert result.stdout == "after\n"
        assert result.state_lost is True
        assert result.session_id != old_id
        assert result.text.startswith(f"[Session {old_id!r} had expired")
        assert "variables, imports and files from earlier calls are gone" in result.text
        assert session.id == result.session_id
        # from then on it is an ordinary session again
        assert session.execute("y = 2; y").state_lost is False


def test_a_chosen_id_is_made_on_first_use_and_kept_when_remade(server: Server) -> None:
    with Client(server.base_url) as client, client.session("conversation-17") as session:
        first = session.execute("x = 1")
        assert first.session_id == "conversation-17"
        assert first.state_lost is False  # nothing was there to lose
        assert "expired" not in first.text
        server.client.delete("/sessions/conversation-17")
        again = session.execute("x")
        assert again.session_id == "conversation-17"
        assert again.state_lost is True
        assert again.error is not None
        assert again.error.ename == "NameError"
        # a second handle on the same id shares the session
        other = client.session("conversation-17")
        other.execute("z = 5")
        assert session.execute("z").result == "5"


def test_a_culled_session_is_replaced(tmp_path: Path) -> None:
    with running_server(tmp_path, session_ttl=1.0) as server, Client(server.base_url) as client:
        session = client.session()
        session.execute("x = 1")
        old_id = session.id
        assert wait_for(lambda: not client.sessions(), timeout=10)
        result = session.execute("'x' in globals()")
        assert result.result == "False"
        assert result.state_lost is True
        assert old_id is not None
        assert old_id in result.text.splitlines()[0]
        session.close()


def test_service_errors_raise_with_their_code(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, api_key="right-key", max_code_bytes=1000) as server,
        Client(server.base_url, api_key="right-key") as client,
    ):
        with client.session() as session:
            with pytest.raises(KernelServiceError) as too_large:
                session.execute("x = 1\n" * 1000)
            assert too_large.value.status == 413
            assert too_large.value.code == "code_too_large"
            assert session.execute("1 + 1").result == "2"
        with Client(server.base_url, api_key="wrong") as wrong:
            with pytest.raises(KernelServiceError) as unauthorized:
                wrong.session().execute("1")
            assert unauthorized.value.status == 401
            assert unauthorized.value.code == "unauthorized"
        assert client.health().sessions == 0


def test_tool_formats(server: Server) -> None:
    with Client(server.base_url) as client:
        spec = client.tool_spec()
        assert spec.name == "code_interpreter"
        for phrase in ("persist", "print", "last", "image", "working directory", "seconds"):
            assert phrase in spec.description
        [openai_tool] = client.tools("openai")
        assert openai_tool["function"]["parameters"]["required"] == ["code"]
        [qwen] = client.tools("qwen")
        assert qwen["parameters"] == [
            {
                "name": "code",
                "type": "string",
                "description": spec.parameters["properties"]["code"]["description"],
                "required": True,
            }
        ]
        [toolbench] = client.tools("toolbench")
        assert toolbench["parameters"]["optional"] == []
        assert toolbench["parameters"]["properties"]["code"]["example_value"]
        react = client.tools("react")
        assert "Action: the action to take, should be one of [code_interpreter]" in react
        assert spec.description.splitlines()[0] in react
        assert "Action Input:" in client.tools("react_zh")
    bad = server.client.get("/tools", params={"format": "yaml"})
    assert bad.status_code == 422
    assert bad.json()["code"] == "invalid_request"


def test_async_client(server: Server) -> None:
    async def conversation() -> None:
        async with AsyncClient(server.base_url) as client:
            async with client.session() as session:
                await session.execute("x = 6 * 7")
                assert (await session.execute("x")).result == "42"
                running = asyncio.create_task(session.execute("import time\ntime.sleep(60)"))
                await asyncio.to_thread(server.wait_busy, str(session.id))
                started = time.monotonic()
                assert await session.interrupt() is True
                interrupted = await running
                assert time.monotonic() - started < 10
                assert interrupted.error is not None
                assert interrupted.error.ename == "KeyboardInterrupt"
                server.client.delete(f"/sessions/{session.id}")
                replaced = await session.execute("1")
                assert replaced.state_lost is True
                assert (await session.restart()).execution_count == 0
                spec = await client.tool_spec()
                assert spec.name == "code_interpreter"
            assert session.id is None

    asyncio.run(conversation())
