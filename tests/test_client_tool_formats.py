"""The `code_interpreter` tool's formats (kernel_service_client.tools.spec): each a rendering
of one spec, and the OpenAI one read back into it."""

import json
from typing import Any, Literal

import pytest

from kernel_service_client.tools.spec import (
    TOOL_FORMATS,
    TOOL_NAME,
    ToolSpec,
    openai_format,
    qwen_format,
    react_prompt,
    render_tool,
    toolbench_format,
)

PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "description": "Python to run; {braces} are kept."},
        "note": {"description": "An argument without a type."},
    },
    "required": ["code"],
}
SPEC = ToolSpec(TOOL_NAME, "Runs Python in a persistent kernel — état gardé.", PARAMETERS)


def test_the_formats_are_the_five_the_service_serves() -> None:
    assert TOOL_FORMATS == ("openai", "qwen", "toolbench", "react", "react_zh")


def test_openai_and_back() -> None:
    tool = openai_format(SPEC)
    assert tool == {
        "type": "function",
        "function": {"name": TOOL_NAME, "description": SPEC.description, "parameters": PARAMETERS},
    }
    assert ToolSpec.from_openai(tool) == SPEC
    assert ToolSpec.from_openai(json.loads(json.dumps(tool))) == SPEC


def test_qwen_lists_the_arguments() -> None:
    assert qwen_format(SPEC) == {
        "name": TOOL_NAME,
        "description": SPEC.description,
        "parameters": [
            {
                "name": "code",
                "type": "string",
                "description": "Python to run; {braces} are kept.",
                "required": True,
            },
            {
                "name": "note",
                "type": "string",
                "description": "An argument without a type.",
                "required": False,
            },
        ],
    }


def test_toolbench_adds_optional_and_examples_without_touching_the_spec() -> None:
    before = json.dumps(PARAMETERS, sort_keys=True)
    tool = toolbench_format(SPEC)
    parameters = tool["parameters"]
    assert (tool["name"], tool["description"]) == (TOOL_NAME, SPEC.description)
    assert parameters["type"] == "object"
    assert parameters["required"] == ["code"]
    assert parameters["optional"] == ["note"]
    assert "np.arange" in parameters["properties"]["code"]["example_value"]
    assert parameters["properties"]["code"]["type"] == "string"
    assert parameters["properties"]["note"]["example_value"] == ""
    assert json.dumps(PARAMETERS, sort_keys=True) == before


@pytest.mark.parametrize(
    ("fmt", "words"),
    [
        ("react", ["Answer the following questions", "Final Answer:"]),
        ("react_zh", ["尽你所能回答以下问题", "开始!"]),
    ],
)
def test_react_prompts_name_the_tool_and_hold_its_spec(
    fmt: Literal["react", "react_zh"], words: list[str]
) -> None:
    prompt = react_prompt(SPEC, fmt)
    for word in words:
        assert word in prompt
    assert f"[{TOOL_NAME}]" in prompt
    assert '{"code": "print(1 + 1)"}' in prompt
    assert "Observation:" in prompt and "Action Input:" in prompt
    # the spec itself, as JSON, non-ASCII as it is
    tool = {"name": TOOL_NAME, "description": SPEC.description, "parameters": PARAMETERS}
    assert json.dumps(tool, ensure_ascii=False) in prompt
    assert "état gardé" in prompt


def test_render_tool_gives_each_format() -> None:
    assert render_tool(SPEC, "openai") == openai_format(SPEC)
    assert render_tool(SPEC, "qwen") == qwen_format(SPEC)
    assert render_tool(SPEC, "toolbench") == toolbench_format(SPEC)
    assert render_tool(SPEC, "react") == react_prompt(SPEC)
    assert render_tool(SPEC, "react_zh") == react_prompt(SPEC, "react_zh")
    for fmt in TOOL_FORMATS:
        rendered = render_tool(SPEC, fmt)
        assert isinstance(rendered, str) == fmt.startswith("react")
