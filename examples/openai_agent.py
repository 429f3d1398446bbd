"""An agent loop with the OpenAI SDK and kernel-service as its code interpreter.

Works against any OpenAI-compatible endpoint that supports tool calls (OpenAI, vLLM with
`--enable-auto-tool-choice`, SGLang with a tool-call parser, Ollama), parallel tool calls
included. Configure it with environment variables:

    OPENAI_BASE_URL        the chat endpoint, e.g. http://127.0.0.1:11434/v1 for Ollama
    OPENAI_API_KEY         its key ("EMPTY" is fine for a local server)
    MODEL                  the model name, e.g. qwen2.5:7b
    KERNEL_SERVICE_URL     default http://127.0.0.1:8000
    KERNEL_SERVICE_API_KEY if the service has API keys
    VISION=1               send plots to the model as images (for vision models)

    python examples/openai_agent.py "Plot sin(x) on [0, 2π] and tell me its maximum"
"""

import json
import os
import sys
from typing import Any

from openai import OpenAI

from kernel_service_client.client import Client
from kernel_service_client.tools.openai import openai_tools, run_tool_calls

MAX_TURNS = 10


def run_agent(question: str) -> str:
    """Ask, run every tool call the model makes in one kernel session, until it answers."""
    model = OpenAI(
        base_url=os.environ.get("OPENAI_BASE_URL"),
        api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
    )
    model_name = os.environ.get("MODEL", "qwen2.5")
    vision = os.environ.get("VISION") == "1"
    with (
        Client(
            os.environ.get("KERNEL_SERVICE_URL", "http://127.0.0.1:8000"),
            api_key=os.environ.get("KERNEL_SERVICE_API_KEY"),
        ) as service,
        service.session() as session,  # one kernel for the whole conversation
    ):
        tools = openai_tools(service)
        messages: list[Any] = [{"role": "user", "content": question}]
        for _ in range(MAX_TURNS):
            reply = (
                model.chat.completions.create(model=model_name, messages=messages, tools=tools)
                .choices[0]
                .message
            )
            messages.append(reply.model_dump(exclude_none=True))
            if not reply.tool_calls:
                return reply.content or ""
            for call in reply.tool_calls:
                print(f"--- {call.function.name}\n{_code_of(call.function.arguments)}")
            for message in run_tool_calls(reply.tool_calls, session, vision=vision):
                print(f"--- result\n{_text_of(message)}")
                messages.append(message)
    return f"(no answer after {MAX_TURNS} turns)"


def _code_of(arguments: str) -> str:
    try:
        return str(json.loads(arguments).get("code", arguments))
    except (ValueError, AttributeError):
        return arguments


def _text_of(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "[image]") for part in content)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} QUESTION")
    print(f"=== answer\n{run_agent(sys.argv[1])}")
