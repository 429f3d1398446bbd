"""The OpenAI tool-call loop: the real `openai` SDK against a scripted model over HTTP,
tool calls run in kernel-service (examples/openai_agent.py included)."""

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import httpx
from openai import OpenAI
from openai.types.chat import ChatCompletionFunctionToolParam

from kernel_service_client.client import Client
from kernel_service_client.tools.openai import openai_tools, run_tool_call, run_tool_calls
from tests.conftest import Server
from tests.scripted_llm import MODEL, ScriptedModel, serving, tool_call

ROOT = Path(__file__).parent.parent
PLOT = "import matplotlib.pyplot as plt\nplt.plot(range(x))\nplt.title(f'x = {x}')\nplt.show()"


def _tool_results(request: dict[str, Any]) -> list[str]:
    """The text of every tool message the model has been sent."""
    texts = []
    for message in request["messages"]:
        if message["role"] == "tool":
            content = message["content"]
            if isinstance(content, list):
                content = "\n".join(p.get("text", "") for p in content if p["type"] == "text")
            texts.append(content)
    return texts


def define_x(request: dict[str, Any]) -> dict[str, Any]:
    assert [t["function"]["name"] for t in request["tools"]] == ["code_interpreter"]
    return {
        "tool_calls": [tool_call("call_1", "code_interpreter", {"code": "x = 6 * 7\nprint(x)"})]
    }


def use_x_and_plot(request: dict[str, Any]) -> dict[str, Any]:
    assert _tool_results(request)[-1] == "42"
    # two calls at once: they run in order in one session
    return {
        "tool_calls": [
            tool_call("call_2", "code_interpreter", {"code": "y = x * 2\nprint(y)"}),
            tool_call("call_3", "code_interpreter", {"code": PLOT}),
        ]
    }


def answer(request: dict[str, Any]) -> dict[str, Any]:
    doubled, plot = _tool_results(request)[-2:]
    [url] = re.findall(r"\[image: image/png \d+x\d+, (\S+)\]", plot)
    return {"content": f"x doubled is {doubled}; the plot is at {url}"}


def conversation() -> ScriptedModel:
    return ScriptedModel([define_x, use_x_and_plot, answer])


def test_openai_sdk_loop_keeps_state_across_turns_and_returns_the_plot(server: Server) -> None:
    with serving(conversation()) as model, Client(server.base_url) as service:
        llm = OpenAI(base_url=model.base_url, api_key="EMPTY")
        # the SDK types its parameter as TypedDicts; the service's spec is that shape
        tools = cast("list[ChatCompletionFunctionToolParam]", openai_tools(service))
        messages: list[Any] = [{"role": "user", "content": "Double 6*7 and plot range of it"}]
        with service.session() as session:
            while True:
                reply = (
                    llm.chat.completions.create(model=MODEL, messages=messages, tools=tools)
                    .choices[0]
                    .message
                )
                messages.append(reply.model_dump(exclude_none=True))
                if not reply.tool_calls:
                    break
                messages += run_tool_calls(reply.tool_calls, session)
            assert session.info().execution_count == 3
        assert model.errors == []
        assert reply.content is not None
        assert reply.content.startswith("x doubled is 84; the plot is at http://127.0.0.1:")
        # the tool messages answer their calls, in order
        assert [m["tool_call_id"] for m in messages if m["role"] == "tool"] == [
            "call_1",
            "call_2",
            "call_3",
        ]
        assert messages[-1]["content"].endswith(".png")
        # the model was told the tool's real description and limits
        assert model.requests[0]["tools"] == tools
        assert "persist" in tools[0]["function"]["description"]


def test_vision_mode_shows_plots_in_a_user_message(server: Server) -> None:
    with Client(server.base_url) as service, service.session() as session:
        session.execute("x = 5")
        calls = [
            {
                "id": "c1",
                "function": {"name": "code_interpreter", "arguments": json.dumps({"code": PLOT})},
            },
            {"id": "c2", "function": {"name": "code_interpreter", "arguments": '{"code": "x"}'}},
        ]
        tool_1, tool_2, images = run_tool_calls(calls, session, vision=True)
        # tool messages carry text only (the OpenAI API takes images in user messages)
        assert tool_1["role"] == "tool"
        assert tool_1["tool_call_id"] == "c1"
        assert "[image: image/png" in tool_1["content"]
        assert tool_2["content"] == "Out[3]: 5"
        assert images["role"] == "user"
        text, image = images["content"]
        assert text["type"] == "text"
        assert image["type"] == "image_url"
        prefix = "data:image/png;base64,"
        assert image["image_url"]["url"].startswith(prefix)
        assert (
            base64.b64decode(image["image_url"]["url"][len(prefix) :])[:8] == b"\x89PNG\r\n\x1a\n"
        )
        # without vision: text only, and the URL is absolute and serves the PNG
        [plain] = run_tool_calls(calls[:1], session)
        [url] = re.findall(r"(http://\S+\.png)", plain["content"])
        assert httpx.get(url).content[:4] == b"\x89PNG"
        # an SVG is not shown to a vision model
        svg = "from IPython.display import SVG, display\ndisplay(SVG('<svg xmlns=\"http://www.w3.org/2000/svg\"/>'))"
        call = {
            "id": "c3",
            "function": {"name": "code_interpreter", "arguments": json.dumps({"code": svg})},
        }
        assert len(run_tool_calls([call], session, vision=True)) == 1


def test_bad_tool_calls_are_answered_for_the_model(server: Server) -> None:
    with Client(server.base_url) as service, service.session() as session:
        broken = run_tool_call(
            {"id": "a", "function": {"name": "code_interpreter", "arguments": '{"code": '}},
            session,
        )
        assert broken["content"].startswith("The arguments are not valid JSON")
        missing = run_tool_call(
            {"id": "b", "function": {"name": "code_interpreter", "arguments": '{"source": "1"}'}},
            session,
        )
        assert 'lack "code"' in missing["content"]
        unknown = run_tool_call(
            {"id": "c", "function": {"name": "web_search", "arguments": "{}"}}, session
        )
        assert unknown["content"] == (
            "There is no tool 'web_search'; the only tool is 'code_interpreter'."
        )
        assert session.id is None  # none of them started a kernel
        error = run_tool_call(
            {"id": "d", "function": {"name": "code_interpreter", "arguments": '{"code": "1/0"}'}},
            session,
        )
        assert "ZeroDivisionError: division by zero" in error["content"]


def test_the_example_agent_runs_against_an_openai_compatible_endpoint(server: Server) -> None:
    before = server.client.get("/sessions").json()["sessions"]
    with serving(conversation()) as model:
        env = {
            **os.environ,
            "OPENAI_BASE_URL": model.base_url,
            "OPENAI_API_KEY": "EMPTY",
            "MODEL": MODEL,
            "KERNEL_SERVICE_URL": server.base_url,
        }
        done = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "openai_agent.py"), "Double 6*7, plot it"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    assert model.errors == []
    assert "--- result\n42\n" in done.stdout
    assert "=== answer\nx doubled is 84; the plot is at http://127.0.0.1:" in done.stdout
    # the example closed its session
    assert server.client.get("/sessions").json()["sessions"] == before
