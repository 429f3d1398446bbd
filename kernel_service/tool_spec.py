"""The `code_interpreter` tool as this service describes it: its description follows the
service's settings (timeouts, sandbox, full output); its formats live with the client."""

from typing import Any

from kernel_service.config import Settings
from kernel_service_client.tools.spec import TOOL_NAME, ToolSpec


def tool_description(settings: Settings) -> str:
    """What a model needs to know to use the tool well."""
    lines = [
        "Run Python code in a persistent IPython kernel (like a Jupyter notebook cell) and "
        "get back what it printed, the value of the last expression, any error with its "
        "traceback, and plots as images.",
        "- State persists between calls: variables, imports and functions defined in one "
        "call are available in the next.",
        "- Use print() for what you want to see; the value of the last line is shown too.",
        "- numpy, pandas and matplotlib are installed; a matplotlib figure (plt.show() or a "
        "figure as the last expression) comes back as an image.",
        "- There is no keyboard: input() fails; do not wait for user input.",
    ]
    if settings.sandbox != "none":
        lines.append(
            "- There is no network access: pip install and downloads fail; use what is installed."
        )
    lines += [
        "- Files are read and written in the current working directory.",
        f"- Each call may run at most {settings.default_timeout:g} seconds; longer code is "
        "interrupted (and if it ignores the interrupt the kernel restarts and earlier state "
        "is lost).",
        "- Long output is cut in the middle: print summaries (df.head(), len(x)) rather than "
        "whole data sets.",
    ]
    if settings.full_output_mb:
        lines[-1] += " The whole output is then kept in a file the answer names (open() it)."
    return "\n".join(lines)


def tool_parameters() -> dict[str, Any]:
    """JSON Schema of the tool's arguments."""
    return {
        "type": "object",
        "properties": {
            "code": {
                "type": "string",
                "description": "The Python code to run. Its last expression's value is shown.",
            }
        },
        "required": ["code"],
    }


def tool_spec(settings: Settings) -> ToolSpec:
    return ToolSpec(TOOL_NAME, tool_description(settings), tool_parameters())
