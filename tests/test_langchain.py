"""kernel-service as a LangChain tool: invoked sync and async, sharing one kernel session."""

import asyncio
import base64

from langchain_core.messages import ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool

from kernel_service_client.client import Client
from kernel_service_client.models import ExecutionResult
from kernel_service_client.tools.langchain import KernelServiceTool
from tests.conftest import Server

PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.show()"


def test_the_tool_looks_to_a_model_as_the_service_describes_it(server: Server) -> None:
    tool = KernelServiceTool.from_service(server.base_url)
    with Client(server.base_url) as client:
        spec = client.tool_spec()
    schema = convert_to_openai_tool(tool)["function"]
    assert schema["name"] == "code_interpreter"
    assert schema["description"] == spec.description
    assert schema["parameters"]["required"] == ["code"]
    assert list(schema["parameters"]["properties"]) == ["code"]


def test_sync_and_async_calls_share_one_session(server: Server) -> None:
    tool = KernelServiceTool.from_service(server.base_url)
    assert tool.invoke({"code": "x = 6 * 7\nprint(x)"}) == "42"

    message = tool.invoke(
        {"type": "tool_call", "id": "call-1", "name": tool.name, "args": {"code": PLOT}}
    )
    assert isinstance(message, ToolMessage)
    assert message.tool_call_id == "call-1"
    assert isinstance(message.content, str)
    assert message.content.startswith("[image: image/png")
    assert server.base_url in message.content
    assert isinstance(message.artifact, ExecutionResult)
    [image] = message.artifact.images
    assert base64.b64decode(image.data)[:4] == b"\x89PNG"

    async def later_turns() -> None:
        assert await tool.ainvoke({"code": "x * 2"}) == "Out[3]: 84"
        failed = await tool.ainvoke({"code": "undefined_name"})
        assert "NameError: name 'undefined_name' is not defined" in failed
        await tool.aclose()

    asyncio.run(later_turns())
    sessions = server.client.get("/sessions").json()["sessions"]
    assert tool.session_id not in [s["session_id"] for s in sessions]


def test_each_tool_has_its_own_session_and_close_ends_it(server: Server) -> None:
    first = KernelServiceTool.from_service(server.base_url)
    second = KernelServiceTool.from_service(server.base_url)
    first.invoke({"code": "secret = 1"})
    assert "NameError" in second.invoke({"code": "secret"})
    assert server.client.get(f"/sessions/{first.session_id}").status_code == 200
    first.close()
    second.close()
    assert server.client.get(f"/sessions/{first.session_id}").status_code == 404
    assert server.client.get(f"/sessions/{second.session_id}").status_code == 404


def test_async_calls_work_from_one_event_loop_after_another(server: Server) -> None:
    tool = KernelServiceTool.from_service(server.base_url)
    assert asyncio.run(tool.ainvoke({"code": "x = 1\nprint(x)"})) == "1"
    assert asyncio.run(tool.ainvoke({"code": "print(x + 1)"})) == "2"
    tool.close()
    assert server.client.get(f"/sessions/{tool.session_id}").status_code == 404


def test_arguments_that_do_not_fit_are_answered_to_the_model(server: Server) -> None:
    tool = KernelServiceTool.from_service(server.base_url)
    answer = tool.invoke({"source": "1"})
    assert "code" in answer
    assert "Field required" in answer or "field required" in answer.lower()
    tool.close()
