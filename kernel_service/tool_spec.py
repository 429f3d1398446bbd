"""The `code_interpreter` tool as this service describes it: its description follows the
service's settings (timeouts, sandbox, full output) and the language of its sessions; its
formats live with the client."""

from typing import Any

from kernel_service.config import Settings
from kernel_service_client.tools.spec import TOOL_NAME, ToolSpec

# What a model needs to know of each shipped language, besides what every one shares.
_LANGUAGE_LINES = {
    "python": [
        "Run Python code in a persistent IPython kernel (like a Jupyter notebook cell) and "
        "get back what it printed, the value of the last expression, any error with its "
        "traceback, and plots as images.",
        "- State persists between calls: variables, imports and functions defined in one "
        "call are available in the next.",
        "- Use print() for what you want to see; the value of the last line is shown too.",
        "- numpy, pandas and matplotlib are installed; a matplotlib figure (plt.show() or a "
        "figure as the last expression) comes back as an image.",
        "- There is no keyboard: input() fails; do not wait for user input.",
    ],
    "bash": [
        "Run Bash commands in a persistent bash shell and get back what they printed; a "
        "command that fails is reported with its message.",
        "- State persists between calls: variables, functions and the current directory.",
        "- There is no keyboard: do not run commands that wait for input (read, editors, "
        "pagers); python3 and the usual command-line tools are installed.",
        "- To show an image file, pipe it to display: display < plot.png",
    ],
    "javascript": [
        "Run JavaScript in a persistent Deno kernel (TypeScript is accepted too) and get back "
        "what it printed (console.log), the value of the last expression and any error.",
        "- State persists between calls: top-level const, let, function and class "
        "declarations are available in the next call.",
        "- Top-level await works; modules come only from what is installed (npm: and "
        "https: imports need the network).",
    ],
    "typescript": [
        "Run TypeScript in a persistent Deno kernel and get back what it printed "
        "(console.log), the value of the last expression and any error.",
        "- State persists between calls: top-level const, let, function, class and type "
        "declarations are available in the next call.",
        "- Top-level await works; modules come only from what is installed (npm: and "
        "https: imports need the network).",
    ],
    "r": [
        "Run R code in a persistent R session (IRkernel) and get back what it printed, the "
        "value of the last expression, any error, and plots as PNG images.",
        "- State persists between calls: variables, functions and loaded libraries.",
        "- A plot (plot(), hist(), ...) comes back as an image.",
    ],
    "java": [
        "Run Java in a persistent JShell-based kernel (JJava) and get back what it printed "
        "(System.out.println), the value of the last expression and any exception.",
        "- State persists between calls: variables, methods and classes declared in one "
        "call are available in the next; statements need no class or main method.",
        "- Only the Java standard library is available.",
    ],
}
# Languages in which the value of a call's last expression is shown.
_SHOWS_LAST_VALUE = {"python", "javascript", "typescript", "r", "java"}


def tool_description(settings: Settings, language: str = "python") -> str:
    """What a model needs to know to use the tool well, in sessions of `language`."""
    lines = list(
        _LANGUAGE_LINES.get(language)
        or [
            f"Run {language} code in a persistent Jupyter kernel and get back what it "
            "printed, its results and any error.",
            "- State persists between calls.",
        ]
    )
    if settings.sandbox != "none":
        lines.append(
            "- There is no network access: package installs and downloads fail; use what is "
            "installed."
        )
    lines += [
        "- Files are read and written in the current working directory.",
        f"- Each call may run at most {settings.default_timeout:g} seconds; longer code is "
        "interrupted (and if it ignores the interrupt the kernel restarts and earlier state "
        "is lost).",
        "- Long output is cut in the middle: print summaries rather than whole data sets.",
    ]
    if settings.full_output_mb:
        lines[-1] += " The whole output is then kept in a file the answer names (open it)."
    return "\n".join(lines)


def languages_description(settings: Settings, languages: list[str]) -> str:
    """The description of a tool that runs any of `languages` (the first the default), each
    in a session of its own."""
    if len(languages) < 2:
        return tool_description(settings, languages[0] if languages else "python")
    others = ", ".join(languages[1:])
    return (
        f"{tool_description(settings, languages[0])}\n"
        f"- Set `language` to run {others} instead; each language runs in a session of its "
        "own (its own variables and files: write a file in one language and it is not seen "
        "from another)."
    )


def tool_parameters(language: str = "python", languages: list[str] | None = None) -> dict[str, Any]:
    """JSON Schema of the tool's arguments: `code` in `language`; with `languages` (more
    than one), a `language` argument choosing among them too."""
    what = "Python" if language == "python" else language
    shown = " Its last expression's value is shown." if language in _SHOWS_LAST_VALUE else ""
    properties: dict[str, Any] = {
        "code": {"type": "string", "description": f"The {what} code to run.{shown}"}
    }
    if languages and len(languages) > 1:
        properties["code"]["description"] = (
            "The code to run, in `language`. Its last expression's value is shown (in a "
            "shell, what the commands print)."
        )
        properties["language"] = {
            "type": "string",
            "enum": languages,
            "description": f"The language of `code` (default {languages[0]}).",
        }
    return {"type": "object", "properties": properties, "required": ["code"]}


def tool_spec(settings: Settings, language: str = "python") -> ToolSpec:
    """The tool of a session in `language` (its adapters hold one session)."""
    return ToolSpec(TOOL_NAME, tool_description(settings, language), tool_parameters(language))
