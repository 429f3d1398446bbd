"""The Qwen-Agent tool: Qwen-Agent's own `Assistant` against a scripted model over HTTP (the
real `openai` client inside Qwen-Agent), tool calls run in a real kernel-service.

Qwen-Agent reaches an OpenAI-compatible server in one of three ways, and each is driven
here: by default it writes the tools into the system prompt and parses `<tool_call>` text
(Nous/Hermes format, "nous"); with `use_raw_api` it sends `tools=` and reads native
`tool_calls` ("raw"); with `fncall_prompt_type: qwen` it uses its ✿FUNCTION✿ text format
("qwen"), where `code_interpreter`'s code comes in a ``` block.
"""

import ipaddress
import itertools
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
from qwen_agent.agents import Assistant
from qwen_agent.llm import get_chat_model
from qwen_agent.tools.base import TOOL_REGISTRY, ToolServiceError

from kernel_service_client.tools.qwen_agent import (
    STATE_LOST,
    TOOL_NAME,
    KernelServiceCodeInterpreter,
    code_from_params,
    register,
)
from tests.conftest import Server, running_server
from tests.scripted_llm import MODEL, ScriptedModel, Turn, said, serving, tool_call

Mode = Literal["nous", "qwen", "raw"]
PLOT = "import matplotlib.pyplot as plt\nplt.plot(range(y))\nplt.title(f'y = {y}')\nplt.show()"
_call_ids = itertools.count(1)
FIGURE = re.compile(r"!\[fig-(\d{3})\]\((http://127\.0\.0\.1:\d+/sessions/[^)\s]+\.png)\)")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A service of this module's own: every tool must have closed its session by the end."""
    with running_server(tmp_path_factory.mktemp("qwen-agent")) as server:
        yield server
        left = server.client.get("/sessions").json()["sessions"]
        assert left == [], "a tool left its kernel session open"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Qwen-Agent may reach nothing but loopback (no DashScope, no tokenizer download), and
    writes its `workspace` directory in the test's own tmp dir."""
    monkeypatch.chdir(tmp_path)
    attempts: list[str] = []
    real_getaddrinfo = socket.getaddrinfo
    real_connect = socket.socket.connect

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            attempts.append(f"resolve {host}")
            raise OSError(f"tests reach loopback only, not {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connect {address}")
            raise OSError(f"tests reach loopback only, not {address}")
        real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    yield
    assert attempts == []


def _is_loopback(host: Any) -> bool:
    if host is None or host in ("localhost", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------- the scripted model's side


def llm_config(model: ScriptedModel, mode: Mode) -> dict[str, Any]:
    generate_cfg: dict[str, Any] = {}  # "nous" is Qwen-Agent's default
    if mode == "qwen":
        generate_cfg["fncall_prompt_type"] = "qwen"
    elif mode == "raw":
        generate_cfg["use_raw_api"] = True
    return {
        "model": MODEL,
        "model_server": model.base_url,
        "api_key": "EMPTY",
        "generate_cfg": generate_cfg,
    }


def calls(mode: Mode, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """The assistant message that calls tool `name`, as a model speaks in `mode`."""
    if mode == "raw":
        return {"tool_calls": [tool_call(f"call_{next(_call_ids)}", name, arguments)]}
    if mode == "nous":
        payload = json.dumps({"name": name, "arguments": arguments})
        return {"content": f"<tool_call>\n{payload}\n</tool_call>"}
    # Qwen's own format; for `code_interpreter` Qwen-Agent asks for the code in a ``` block
    return {"content": f"✿FUNCTION✿: {name}\n✿ARGS✿: ```py\n{arguments['code']}\n```"}


def tool_results(request: dict[str, Any]) -> list[str]:
    """Every tool result the model has been sent, in whichever form Qwen-Agent sent it."""
    results = [m["content"] for m in request["messages"] if m["role"] == "tool"]
    text = said(request)
    results += re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.DOTALL)
    results += re.findall(r"✿RESULT✿: (.*?)\n✿RETURN✿", text, re.DOTALL)
    return results


def advertised(request: dict[str, Any], mode: Mode) -> str:
    """What the model was told about the tools."""
    if mode == "raw":
        return json.dumps(request["tools"])
    system = request["messages"][0]
    assert system["role"] == "system"
    assert "tools" not in request  # the tools are in the prompt, as text
    return str(system["content"])


def three_turns(mode: Mode, name: str) -> list[Turn]:
    """Define x, then use it and plot, then answer with what came back."""

    def define_x(request: dict[str, Any]) -> dict[str, Any]:
        told = advertised(request, mode)
        assert name in told
        assert "State persists between calls" in told  # the service's own description
        return calls(mode, name, {"code": "x = 6 * 7\nprint(x)"})

    def use_x_and_plot(request: dict[str, Any]) -> dict[str, Any]:
        assert tool_results(request)[-1] == "stdout:\n\n```\n42\n```"
        return calls(mode, name, {"code": f"y = x * 2\nprint(y)\n{PLOT}"})

    def answer(request: dict[str, Any]) -> dict[str, Any]:
        last = tool_results(request)[-1]
        assert last.startswith("stdout:\n\n```\n84\n```\n\n")
        [(number, url)] = FIGURE.findall(last)
        assert number == "001"
        return {"content": f"x doubled is 84.\n\n![the plot]({url})"}

    return [define_x, use_x_and_plot, answer]


def function_messages(response: list[dict[str, Any]]) -> list[str]:
    return [m["content"] for m in response if m["role"] == "function"]


def sessions(server: Server) -> set[str]:
    return {s["session_id"] for s in server.client.get("/sessions").json()["sessions"]}


# ---------------------------------------------------------------- conversations


@pytest.mark.parametrize("mode", ["nous", "raw"])
def test_assistant_defines_uses_and_plots_in_one_kernel(service: Server, mode: Mode) -> None:
    with serving(ScriptedModel(three_turns(mode, TOOL_NAME))) as model:
        bot = Assistant(
            llm=llm_config(model, mode),
            function_list=[{"name": TOOL_NAME, "base_url": service.base_url}],
        )
        tool = bot.function_map[TOOL_NAME]
        assert isinstance(tool, KernelServiceCodeInterpreter)
        try:
            response = bot.run_nonstream([{"role": "user", "content": "Double 6*7 and plot it"}])
            assert model.errors == []
            defined, plotted = function_messages(response)
            assert defined == "stdout:\n\n```\n42\n```"
            [(_, url)] = FIGURE.findall(plotted)
            png = httpx.get(url)  # the link the model got serves the plot
            assert png.status_code == 200
            assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
            info = service.client.get(f"/sessions/{tool.session_id}").json()
            assert info["execution_count"] == 2  # both calls ran in one kernel
        finally:
            tool.close()
    final = response[-1]
    assert final["role"] == "assistant"
    assert final["content"] == f"x doubled is 84.\n\n![the plot]({url})"
    # the model was sent both results
    assert tool_results(model.requests[-1]) == [defined, plotted]
    if mode == "raw":
        [advertised_tool] = model.requests[0]["tools"]
        assert advertised_tool["function"]["parameters"]["required"] == ["code"]


def test_state_persists_across_two_runs_of_one_assistant(service: Server) -> None:
    turns: list[Turn] = [
        lambda _: calls("nous", TOOL_NAME, {"code": "x = 6 * 7"}),
        lambda request: {"content": f"Done: {tool_results(request)[-1]}"},
        lambda _: calls("nous", TOOL_NAME, {"code": "x * 2"}),
        lambda request: {"content": f"It is {tool_results(request)[-1]}"},
    ]
    with (
        serving(ScriptedModel(turns)) as model,
        KernelServiceCodeInterpreter({"base_url": service.base_url}) as tool,
    ):
        bot = Assistant(llm=llm_config(model, "nous"), function_list=[tool])
        messages: list[dict[str, Any]] = [{"role": "user", "content": "Set x to 6*7"}]
        first = bot.run_nonstream(messages)
        session_id = tool.session_id
        messages += [*first, {"role": "user", "content": "Now double it"}]
        second = bot.run_nonstream(messages)
        assert model.errors == []
        assert function_messages(first) == ["Finished execution."]
        assert function_messages(second) == ["execute_result:\n\n```\n84\n```"]
        assert second[-1]["content"] == "It is execute_result:\n\n```\n84\n```"
        assert tool.session_id == session_id
        assert service.client.get(f"/sessions/{session_id}").json()["execution_count"] == 2


def test_register_replaces_the_builtin_code_interpreter(
    service: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    builtin = TOOL_REGISTRY["code_interpreter"]
    monkeypatch.setitem(TOOL_REGISTRY, "code_interpreter", builtin)  # restored afterwards
    first = register(base_url="http://127.0.0.1:1")
    assert TOOL_REGISTRY["code_interpreter"] is first
    assert issubclass(first, KernelServiceCodeInterpreter)
    replacement = register(base_url=service.base_url)  # ours may be registered again
    assert TOOL_REGISTRY["code_interpreter"] is replacement
    with pytest.raises(ValueError, match="already has a tool 'doc_parser'"):
        register("doc_parser", base_url=service.base_url)  # another tool's name is refused

    with serving(ScriptedModel(three_turns("nous", "code_interpreter"))) as model:
        bot = Assistant(llm=llm_config(model, "nous"), function_list=["code_interpreter"])
        tool = bot.function_map["code_interpreter"]
        assert isinstance(tool, replacement)  # not the built-in, which would start Docker
        try:
            response = bot.run_nonstream([{"role": "user", "content": "Double 6*7 and plot it"}])
        finally:
            tool.close()
    assert model.errors == []
    defined, plotted = function_messages(response)
    assert defined == "stdout:\n\n```\n42\n```"
    assert FIGURE.search(plotted)


def test_qwen_prompt_code_in_a_block_runs(service: Server) -> None:
    """With its ✿FUNCTION✿ prompt, Qwen-Agent asks for `code_interpreter`'s code in a ```
    block. (Qwen-Agent 0.0.34's FnCallAgent fails on that prompt's tool calls, any tool's,
    reading `extra` that its parser leaves None, so the model is driven through its LLM.)"""
    turns: list[Turn] = [lambda _: calls("qwen", "code_interpreter", {"code": "print(6 * 7)"})]
    with (
        serving(ScriptedModel(turns)) as model,
        KernelServiceCodeInterpreter(
            {"name": "code_interpreter", "base_url": service.base_url}
        ) as tool,
    ):
        llm = get_chat_model(llm_config(model, "qwen"))
        *_, reply = llm.chat(
            messages=[{"role": "user", "content": "Print 6*7"}], functions=[tool.function]
        )
        [message] = reply
        assert message["function_call"]["name"] == "code_interpreter"
        arguments = message["function_call"]["arguments"]
        assert arguments == "```py\nprint(6 * 7)\n```"
        assert tool.call(arguments) == "stdout:\n\n```\n42\n```"
    assert model.errors == []
    system = advertised(model.requests[0], "qwen")
    assert "### code_interpreter" in system
    assert "Enclose the code within triple backticks" in system
    assert "State persists between calls" in system


def test_a_config_name_replaces_the_builtin_without_touching_the_registry(
    service: Server,
) -> None:
    registered = dict(TOOL_REGISTRY)
    with (
        KernelServiceCodeInterpreter(
            {"name": "code_interpreter", "base_url": service.base_url}
        ) as tool,
        serving(ScriptedModel([])) as model,
    ):
        bot = Assistant(llm=llm_config(model, "nous"), function_list=[tool])
        assert bot.function_map == {"code_interpreter": tool}
        assert tool.function["name"] == "code_interpreter"
        assert tool.call('{"code": "print(6 * 7)"}') == "stdout:\n\n```\n42\n```"
    assert dict(TOOL_REGISTRY) == registered


def test_bad_arguments_are_answered_to_the_model_without_a_kernel(service: Server) -> None:
    broken = '<tool_call>\n{"name": "%s", "arguments": {"code": "print(1)\n</tool_call>'
    turns: list[Turn] = [
        lambda _: calls("nous", TOOL_NAME, {"script": "print(1)"}),
        lambda _: {"content": broken % TOOL_NAME},
        lambda request: {"content": "Sorry: " + " | ".join(tool_results(request))},
    ]
    with (
        serving(ScriptedModel(turns)) as model,
        KernelServiceCodeInterpreter({"base_url": service.base_url}) as tool,
    ):
        bot = Assistant(llm=llm_config(model, "nous"), function_list=[tool])
        response = bot.run_nonstream([{"role": "user", "content": "Run something"}])
        assert model.errors == []
        no_code, not_json = function_messages(response)
        assert (
            no_code == 'The arguments lack "code": call the tool with {"code": "<python source>"}.'
        )
        assert not_json.startswith("The arguments are not a valid JSON object (")
        assert response[-1]["content"] == f"Sorry: {no_code} | {not_json}"
        assert tool.session_id is None  # nothing was run, no kernel was started


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("", "The call has no code"),
        ("   \n", "The call has no code"),
        ("{}", 'The arguments lack "code"'),
        ('{"code": ""}', 'The arguments lack "code"'),
        ('{"code": 42}', 'The arguments lack "code"'),
        ({"cmd": "ls"}, 'The arguments lack "code"'),
        ('{"code": "print(1)', "The arguments are not a valid JSON object"),
        ("```python\n\n```", "The ``` block is empty"),
    ],
)
def test_bad_arguments(service: Server, params: Any, message: str) -> None:
    with KernelServiceCodeInterpreter({"base_url": service.base_url}) as tool:
        assert tool.call(params).startswith(message)
        assert tool.session_id is None


@pytest.mark.parametrize(
    "params",
    [
        {"code": "print(6 * 7)"},
        '{"code": "print(6 * 7)"}',
        "{code: 'print(6 * 7)'}",  # json5, as Qwen-Agent's own tool reads it
        "```py\nprint(6 * 7)\n```",  # the ``` convention of Qwen's prompts
        "Here it is:\n```python\nprint(6 * 7)\n```\n",
        '{"code": "```python\\nprint(6 * 7)\\n```"}',  # a block inside the JSON string
        '"print(6 * 7)"',
        "print(6 * 7)",  # bare code
    ],
)
def test_the_code_arrives_however_qwen_agent_sends_it(params: Any) -> None:
    assert code_from_params(params).strip() == "print(6 * 7)"


# ---------------------------------------------------------------- results and sessions


def test_results_have_the_builtin_shape(service: Server) -> None:
    with KernelServiceCodeInterpreter({"base_url": service.base_url, "timeout": 2}) as tool:
        assert tool.call({"code": "x = 1"}) == "Finished execution."
        printed = tool.call(
            {"code": "import sys\nprint('out')\nprint('err', file=sys.stderr)\nx+1"}
        )
        assert printed == (
            "stdout:\n\n```\nout\n```\n\nstderr:\n\n```\nerr\n```\n\nexecute_result:\n\n```\n2\n```"
        )
        failed = tool.call({"code": "def f():\n    return 1 / 0\nf()"})
        assert failed.startswith("error:\n\n```\nZeroDivisionError")
        assert failed.endswith("ZeroDivisionError: division by zero\n```")
        assert "return 1 / 0" in failed
        assert "-----" not in failed
        two_plots = (
            "import matplotlib.pyplot as plt\nfor n in (1, 2):\n    plt.plot([n])\n    plt.show()"
        )
        two = tool.call({"code": two_plots})
        figures = FIGURE.findall(two)
        assert [number for number, _ in figures] == ["001", "002"]
        assert two == "\n\n".join(f"![fig-{n}]({url})" for n, url in figures)
        for _, url in figures:
            assert httpx.get(url).content.startswith(b"\x89PNG")
        slow = tool.call({"code": "import time\ntime.sleep(30)"})
        assert "TimeoutError: Execution exceeded the 2 s time limit and was interrupted" in slow
        assert tool.call("x") == "execute_result:\n\n```\n1\n```"  # the kernel survived


def test_a_lost_session_is_said_in_the_result(service: Server) -> None:
    with KernelServiceCodeInterpreter({"base_url": service.base_url}) as tool:
        tool.call({"code": "x = 1"})
        assert service.client.delete(f"/sessions/{tool.session_id}").status_code == 204
        lost = tool.call({"code": "x"})
        assert lost.startswith("error:\n\n```\n")
        assert "NameError: name 'x' is not defined" in lost
        assert lost.endswith(STATE_LOST)


def test_close_ends_the_kernel_session(service: Server) -> None:
    tool = KernelServiceCodeInterpreter({"base_url": service.base_url})
    assert tool.session_id is None  # nothing starts before the first call
    tool.call({"code": "print(1)"})
    session_id = tool.session_id
    assert session_id in sessions(service)
    tool.close()
    assert session_id not in sessions(service)
    assert tool.session_id is None
    tool.close()  # twice is fine

    with KernelServiceCodeInterpreter(
        {"base_url": service.base_url, "session_id": "qwen-conversation-1"}
    ) as chosen:
        assert chosen.call({"code": "print(2)"}) == "stdout:\n\n```\n2\n```"
        assert "qwen-conversation-1" in sessions(service)
    assert "qwen-conversation-1" not in sessions(service)


def test_service_faults_reach_the_application_not_the_model(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # (a short path: kernels' Unix sockets live under it)
    with (
        running_server(tmp_path_factory.mktemp("full"), max_sessions=1) as full,
        serving(ScriptedModel([lambda _: calls("nous", TOOL_NAME, {"code": "1 + 1"})])) as model,
    ):
        full.new_session()  # the only session the service allows
        tool = KernelServiceCodeInterpreter({"base_url": full.base_url})
        with pytest.raises(ToolServiceError) as raised:
            tool.call({"code": "1 + 1"})
        assert raised.value.code == "too_many_sessions"
        bot = Assistant(llm=llm_config(model, "nous"), function_list=[tool])
        with pytest.raises(ToolServiceError):
            bot.run_nonstream([{"role": "user", "content": "Add"}])
        tool.close()
    with pytest.raises(ToolServiceError, match=re.escape("127.0.0.1:1 could not be reached")):
        KernelServiceCodeInterpreter({"base_url": "http://127.0.0.1:1"})
