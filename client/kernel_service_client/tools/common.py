"""What the adapters share: reading a tool call's arguments and wording a result."""

import json
import re
from collections.abc import Callable
from typing import Any

from kernel_service_client.models import ExecutionResult


class BadToolCall(ValueError):
    """The model's arguments cannot be run; the message is written for the model to read."""


def code_argument(arguments: str | dict[str, Any] | None) -> str:
    """The `code` of a tool call's arguments (a JSON object, or its text)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise BadToolCall(
                f"The arguments are not valid JSON ({exc.msg} at position {exc.pos}). Call "
                'the tool with {"code": "<python source>"}.'
            ) from None
    if not isinstance(arguments, dict):
        raise BadToolCall('The arguments must be a JSON object: {"code": "<python source>"}.')
    code = arguments.get("code")
    if not isinstance(code, str) or not code.strip():
        raise BadToolCall(
            'The arguments lack "code": call the tool with {"code": "<python source>"}.'
        )
    return code


def text_with_urls(result: ExecutionResult, absolute: Callable[[str], str]) -> str:
    """The result's text for a model, with the URLs of its images, the files it changed and
    its full output made absolute (a person can open them)."""
    urls = [image.url for image in result.images] + [file.url for file in result.files]
    if result.full_output is not None:
        urls.append(result.full_output.url)
    if not urls:
        return result.text
    # one pass, longest first: `out.csv` must not be replaced inside `out.csv.bak`'s URL
    pattern = "|".join(re.escape(url) for url in sorted(set(urls), key=len, reverse=True))
    return re.sub(pattern, lambda match: absolute(match.group(0)), result.text)


def data_url(mime: str, data: str) -> str:
    return f"data:{mime};base64,{data}"
