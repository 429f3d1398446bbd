"""The Lagent action against a live service, and Lagent agents (`ReAct`, `Internlm2Agent`)
driven through Lagent's own OpenAI-compatible wrapper (`GPTAPI`) by a scripted model over
HTTP, each protocol spoken as that agent parses it."""

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from lagent.actions import ActionExecutor
from lagent.agents import Internlm2Agent, Internlm2Protocol, ReAct
from lagent.llms import GPTAPI
from lagent.schema import ActionReturn, ActionStatusCode

from kernel_service_client.client import Client, KernelServiceError
from kernel_service_client.tools.lagent import KernelServiceInterpreter, lagent_description
from tests.conftest import Server, running_server
from tests.scripted_llm import ScriptedModel, serving

DEFINE_X = "x = 6 * 7\nprint(x)"
USE_X_AND_PLOT = (
    "print(x * 2)\nimport matplotlib.pyplot as plt\nplt.plot(range(x))\n"
    "plt.title(f'x = {x}')\nplt.show()"
)
PNG = b"\x89PNG\r\n\x1a\n"
IMAGE_URL = re.compile(r"\[image: image/png \d+x\d+, (http://\S+\.png)\]")
IMAGE_PATH = re.compile(r"\[image\]\((\S+\.png)\)")  # how Lagent's format_result shows images


def _lagent_llm(model: ScriptedModel, model_type: str) -> GPTAPI:
    """Lagent's OpenAI-compatible wrapper (plain HTTP with `requests`) on the scripted model."""
    return GPTAPI(
        model_type=model_type,  # GPTAPI shapes the request by the name's prefix: gpt, internlm
        key="EMPTY",
        openai_api_base=f"{model.base_url}/chat/completions",
        proxies={"http": None, "https": None},  # loopback only, whatever the environment says
        query_per_second=20,  # its rate limiter would otherwise space calls by a second
        retry=1,
    )


def _sessions(server: Server) -> set[str]:
    return {s["session_id"] for s in server.client.get("/sessions").json()["sessions"]}


def _check_plot(action_return: ActionReturn, work_dir: Path, service: Client) -> str:
    """The plot call's result: text with `84` and the image URL, the image saved as a file."""
    assert action_return.state == ActionStatusCode.SUCCESS
    text, image = action_return.result
    assert text["type"] == "text"
    assert text["content"].startswith("84\n[image: image/png ")
    [url] = IMAGE_URL.findall(text["content"])
    assert isinstance(url, str)
    assert image["type"] == "image"
    path = Path(image["content"])
    assert path.parent == work_dir.resolve()
    assert path.read_bytes()[:8] == PNG
    assert path.read_bytes() == service.image(url)
    return url


# ---------------------------------------------------------------- ReAct (text protocol)


def react_define_x(request: dict[str, Any]) -> dict[str, Any]:
    [system, user] = request["messages"]
    # the tool as the service describes it, in ReAct's prompt
    assert "Action Input" in system["content"]
    assert "'name': 'code_interpreter'" in system["content"]
    assert "State persists between calls" in system["content"]
    assert user == {"role": "user", "content": "What is 6*7, doubled? Plot range of it."}
    action_input = json.dumps({"code": DEFINE_X})
    return {"content": f"Thought: x first.\nAction: code_interpreter\nAction Input: {action_input}"}


def react_use_x_and_plot(request: dict[str, Any]) -> dict[str, Any]:
    assert request["messages"][-1] == {"role": "system", "content": "Response:42\n"}
    action_input = json.dumps({"code": USE_X_AND_PLOT})
    return {
        "content": (
            f"Thought: now double and plot it.\nAction: code_interpreter\n"
            f"Action Input: {action_input}"
        )
    }


def react_answer(request: dict[str, Any]) -> dict[str, Any]:
    response = request["messages"][-1]["content"]
    assert response.startswith("Response:84\n[image: image/png ")
    [url] = IMAGE_URL.findall(response)
    [path] = IMAGE_PATH.findall(response)
    assert Path(path).read_bytes()[:8] == PNG
    return {"content": f"Thought: done.\nFinal Answer: 6*7 doubled is 84; the plot is at {url}"}


# GPTAPI always sends top_k, and warns that OpenAI deprecated it
@pytest.mark.filterwarnings("ignore:`top_k` parameter is deprecated:DeprecationWarning")
def test_react_agent_keeps_state_and_gets_the_numbers_and_the_plot(
    server: Server, tmp_path: Path
) -> None:
    model = ScriptedModel([react_define_x, react_use_x_and_plot, react_answer])
    with (
        serving(model),
        Client(server.base_url) as service,
        KernelServiceInterpreter(server.base_url, work_dir=tmp_path) as interpreter,
    ):
        agent = ReAct(
            llm=_lagent_llm(model, "gpt-4o-mini"),
            action_executor=ActionExecutor([interpreter]),
        )
        reply = agent.chat("What is 6*7, doubled? Plot range of it.")
        assert model.errors == []
        session_id = interpreter.session.id
        assert interpreter.session.info().execution_count == 2
        defined, plotted, finished = reply.actions
        url = _check_plot(plotted, tmp_path, service)
    assert len(model.requests) == 3
    assert defined.state == ActionStatusCode.SUCCESS
    assert defined.type == "code_interpreter"
    assert defined.args == {"code": DEFINE_X}
    assert defined.result == [{"type": "text", "content": "42"}]
    assert finished.type == "FinishAction"
    assert reply.response.strip() == f"6*7 doubled is 84; the plot is at {url}"
    # the agent's own record of the conversation holds both results
    responses = [step["content"] for step in reply.inner_steps if step["role"] == "system"]
    assert responses[0] == "Response:42\n"
    assert responses[1].startswith("Response:84\n") and url in responses[1]
    # leaving the block ended the kernel session
    assert session_id not in _sessions(server)


# ---------------------------------------------------------------- Internlm2Agent (interpreter)

INTERPRETER_PROMPT = "Run Python with <|action_start|><|interpreter|>.\n{code_prompt}"


def _interpreter_block(code: str) -> str:
    return f"<|action_start|><|interpreter|>\n```python\n{code}\n```<|action_end|>\n"


def internlm_define_x(request: dict[str, Any]) -> dict[str, Any]:
    interpreter_prompt = request["messages"][1]
    assert interpreter_prompt["name"] == "interpreter"
    assert "State persists between calls" in interpreter_prompt["content"]
    return {"content": "Let me compute x." + _interpreter_block(DEFINE_X)}


def internlm_use_x_and_plot(request: dict[str, Any]) -> dict[str, Any]:
    # the call as the model wrote it, then its result, as Internlm2Protocol formats them
    call, result = request["messages"][-2:]
    assert call["role"] == "assistant"
    assert call["content"].startswith("Let me compute x.<|action_start|><|interpreter|>\n")
    assert result == {"role": "system", "content": "42", "name": "interpreter"}
    return {"content": "Now double it and plot." + _interpreter_block(USE_X_AND_PLOT)}


def internlm_answer(request: dict[str, Any]) -> dict[str, Any]:
    result = request["messages"][-1]["content"]
    assert result.startswith("84\n[image: image/png ")
    [url] = IMAGE_URL.findall(result)
    [path] = IMAGE_PATH.findall(result)
    assert Path(path).read_bytes()[:8] == PNG
    return {"content": f"6*7 doubled is 84; the plot is at {url}"}


def test_internlm2_agent_uses_the_action_as_its_interpreter(server: Server, tmp_path: Path) -> None:
    model = ScriptedModel([internlm_define_x, internlm_use_x_and_plot, internlm_answer])
    with (
        serving(model),
        Client(server.base_url) as service,
        KernelServiceInterpreter(server.base_url, work_dir=tmp_path) as interpreter,
    ):
        agent = Internlm2Agent(
            llm=_lagent_llm(model, "internlm2_5-7b-chat"),
            interpreter_executor=ActionExecutor([interpreter]),
            protocol=Internlm2Protocol(interpreter_prompt=INTERPRETER_PROMPT),
            max_turn=5,
        )
        reply = agent.chat("What is 6*7, doubled? Plot range of it.")
        assert model.errors == []
        session_id = interpreter.session.id
        defined, plotted = reply.actions
        url = _check_plot(plotted, tmp_path, service)
    assert len(model.requests) == 3
    # the code came as Internlm2Agent hands it ({"command": ...}), out of its fence
    assert defined.args == {"code": DEFINE_X}
    assert defined.result == [{"type": "text", "content": "42"}]
    assert reply.response == f"6*7 doubled is 84; the plot is at {url}"
    results = [step["content"] for step in reply.inner_steps if step["role"] == "environment"]
    assert results[0] == "42"
    assert results[1].startswith("84\n") and url in results[1]
    assert session_id not in _sessions(server)


# ---------------------------------------------------------------- the action itself


def test_the_action_describes_the_service_tool_and_returns_lagent_results(
    server: Server, tmp_path: Path
) -> None:
    with Client(server.base_url) as service:
        spec = service.tool_spec()
        with KernelServiceInterpreter(client=service, work_dir=tmp_path / "images") as action:
            assert action.name == "code_interpreter"
            assert not action.is_toolkit
            description = action.description
            assert description["description"] == spec.description
            assert description["parameters"] == lagent_description(spec)["parameters"]
            assert description["parameters"][0]["name"] == "code"
            assert description["parameters"][0]["type"] == "STRING"
            assert description["required"] == ["code"]
            assert action.session.id is None  # nothing started before the first call

            # a JSON text, as ReAct hands it
            defined = action('{"code": "x = 6 * 7\\nprint(x)"}')
            assert defined.state == ActionStatusCode.SUCCESS
            assert defined.result == [{"type": "text", "content": "42"}]
            assert defined.errmsg is None
            # a fenced block in Internlm2Agent's {"command": ...}
            plotted = action({"command": f"```python\n{USE_X_AND_PLOT}\n```"})
            _check_plot(plotted, tmp_path / "images", service)
            assert plotted.format_result().startswith("84\n[image: image/png ")
            # the value of the last expression
            assert action({"code": "x + 1"}).result == [{"type": "text", "content": "Out[3]: 43"}]

            failed = action({"code": "print('before')\n1 / 0"})
            assert failed.state == ActionStatusCode.API_ERROR
            assert failed.errmsg.startswith("before\n")
            assert failed.errmsg.endswith("ZeroDivisionError: division by zero")
            assert failed.result == [{"type": "text", "content": failed.errmsg}]

            action.timeout = 0.5
            slow = action({"code": "import time\ntime.sleep(30)"})
            assert slow.state == ActionStatusCode.API_ERROR
            assert "TimeoutError" in slow.errmsg
            action.timeout = None

            not_json = action("print(1)")
            assert not_json.state == ActionStatusCode.ARGS_ERROR
            assert not_json.errmsg.startswith("The arguments are not valid JSON")
            missing = action({"source": "1"})
            assert missing.state == ActionStatusCode.ARGS_ERROR
            assert 'lack "code"' in missing.errmsg
            # a python fence is taken as code, a JSON fence as arguments
            assert action("```python\nprint(x)\n```").result[0]["content"] == "42"
            assert action('```json\n{"code": "print(x)"}\n```').result[0]["content"] == "42"

            action.reset()
            gone = action({"code": "x"})
            assert gone.state == ActionStatusCode.API_ERROR
            assert "NameError" in gone.errmsg
            session_id = action.session.id
            assert session_id in _sessions(server)
        assert session_id not in _sessions(server)
        # a client passed in stays open
        assert service.health().status == "ok"


def test_service_refusals_and_outages_are_http_errors(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, max_code_bytes=1000) as server,
        KernelServiceInterpreter(server.base_url, work_dir=tmp_path) as action,
    ):
        too_large = action({"code": "x = 1\n" * 1000})
        assert too_large.state == ActionStatusCode.HTTP_ERROR
        assert "413 code_too_large" in too_large.errmsg
        assert action({"code": "1 + 1"}).state == ActionStatusCode.SUCCESS

    closed = socket.socket()  # bound, not listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with closed:
        with pytest.raises(KernelServiceError):  # the description is asked of the service
            KernelServiceInterpreter(url)
        with KernelServiceInterpreter(url, description=action.description) as offline:
            down = offline({"code": "1"})
            assert down.state == ActionStatusCode.HTTP_ERROR
            assert down.errmsg.startswith("kernel-service at http://127.0.0.1:")
            assert "could not be reached" in down.errmsg
