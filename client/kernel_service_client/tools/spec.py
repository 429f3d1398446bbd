"""The `code_interpreter` tool: one spec (name, description, parameters), rendered in every
format an agent framework reads. The service serves the spec (`GET /tools`)."""

import json
from dataclasses import dataclass
from typing import Any, Literal, get_args

TOOL_NAME = "code_interpreter"

ToolFormat = Literal["openai", "qwen", "toolbench", "react", "react_zh"]
TOOL_FORMATS: tuple[ToolFormat, ...] = get_args(ToolFormat)


@dataclass(frozen=True)
class ToolSpec:
    """The tool itself; every format below is a rendering of it."""

    name: str
    description: str
    parameters: dict[str, Any]

    @classmethod
    def from_openai(cls, tool: dict[str, Any]) -> "ToolSpec":
        """Back from the OpenAI format, as `GET /tools` serves it (how clients learn the spec)."""
        function = tool["function"]
        return cls(function["name"], function["description"], function["parameters"])


def openai_format(spec: ToolSpec) -> dict[str, Any]:
    """The OpenAI `tools` entry (also what vLLM, SGLang and Ollama accept)."""
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters,
        },
    }


def qwen_format(spec: ToolSpec) -> dict[str, Any]:
    """Qwen-Agent's own form: `parameters` as a list of named arguments."""
    required = set(spec.parameters.get("required", []))
    return {
        "name": spec.name,
        "description": spec.description,
        "parameters": [
            {
                "name": name,
                "type": schema.get("type", "string"),
                "description": schema.get("description", ""),
                "required": name in required,
            }
            for name, schema in spec.parameters["properties"].items()
        ],
    }


def toolbench_format(spec: ToolSpec) -> dict[str, Any]:
    """ToolBench's form: JSON Schema plus `optional` and an `example_value` per argument."""
    required = list(spec.parameters.get("required", []))
    properties = {
        name: {**schema, "example_value": _EXAMPLES.get(name, "")}
        for name, schema in spec.parameters["properties"].items()
    }
    return {
        "name": spec.name,
        "description": spec.description,
        "parameters": {
            "type": "object",
            "properties": properties,
            "required": required,
            "optional": [name for name in properties if name not in required],
        },
    }


_EXAMPLES = {"code": "import numpy as np\nx = np.arange(10)\nx.mean()"}

_REACT = {
    "react": (
        "Answer the following questions as best you can. You have access to the following "
        "tools:\n\n{tools}\n\nUse the following format:\n\n"
        "Thought: you should always think about what to do\n"
        "Action: the action to take, should be one of [{names}]\n"
        "Action Input: the input to the action, as JSON, e.g. {example}\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n\nBegin!"
    ),
    "react_zh": (
        "尽你所能回答以下问题。你拥有如下工具:\n\n{tools}\n\n以下格式回答:\n\n"
        "Thought: 思考你应该做什么\n"
        "Action: 工具的名称,必须是[{names}]之一\n"
        "Action Input: 工具的输入,JSON 格式,例如 {example}\n"
        "Observation: 工具返回的结果\n"
        "... (Thought/Action/Action Input/Observation的过程可以重复零次或多次)\n"
        "Thought: 我现在知道最终答案了\n"
        "Final Answer: 对输入问题的最终答案\n\n开始!"
    ),
}


def react_prompt(spec: ToolSpec, language: Literal["react", "react_zh"] = "react") -> str:
    """A ReAct system prompt (English or Chinese) for models without native tool calls.

    Stop generation at `Observation:`, run the Action Input's `code`, and append the result's
    `text` after `Observation: `.
    """
    tool = {"name": spec.name, "description": spec.description, "parameters": spec.parameters}
    example = json.dumps({"code": "print(1 + 1)"})
    return _REACT[language].format(
        tools=json.dumps(tool, ensure_ascii=False), names=spec.name, example=example
    )


def render_tool(spec: ToolSpec, fmt: ToolFormat) -> dict[str, Any] | str:
    """The tool in the named format: a JSON object, or prompt text for the ReAct formats."""
    if fmt == "openai":
        return openai_format(spec)
    if fmt == "qwen":
        return qwen_format(spec)
    if fmt == "toolbench":
        return toolbench_format(spec)
    return react_prompt(spec, fmt)
