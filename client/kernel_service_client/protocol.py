"""The HTTP side of the client, without I/O: requests to build, answers to read, the steps a
flow asks its driver for, and Server-Sent Events parsed a line at a time.

A flow (`kernel_service_client.flows`) is a generator. It yields steps (`Send`, `Open`,
`NextLine`, `Wait`, or an event for the caller) and is sent each step's answer; it returns
its value. A driver (`kernel_service_client.drivers`) does the I/O, sync or async, so each
flow is written once.
"""

from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

# Executions can legitimately take as long as the server's time limit: the server enforces
# it, so reads wait; connecting and the other calls are bounded.
TIMEOUT = httpx.Timeout(60.0)
EXECUTE_TIMEOUT = httpx.Timeout(60.0, read=None)


class KernelServiceError(Exception):
    """An error answer of the service: `status` (HTTP), `code` (machine-readable), message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


# ---------------------------------------------------------------- steps


@dataclass(frozen=True)
class Send:
    """Send the request and read the whole answer; answered with the `httpx.Response`."""

    request: httpx.Request


@dataclass(frozen=True)
class Open:
    """Send the request and leave a 200's body unread, to be read by lines; answered with
    `Opened`."""

    request: httpx.Request


@dataclass(frozen=True)
class Opened:
    """An answer being streamed: `lines` is the driver's own iterator over its body's lines.
    Only a 200's body is left unread; any other is read, so its error can be checked."""

    response: httpx.Response
    lines: Iterator[str] | AsyncIterator[str]


@dataclass(frozen=True)
class NextLine:
    """Read the next line of an opened body; answered with it, or None at the end."""

    opened: Opened


@dataclass(frozen=True)
class Wait:
    """Wait this many seconds; answered with None."""

    seconds: float


Step = Send | Open | NextLine | Wait


# How a flow takes a step (`response = yield from send(request)`), its answer typed.
def send(request: httpx.Request) -> Generator[Send, Any, httpx.Response]:
    response = yield Send(request)
    assert isinstance(response, httpx.Response)
    return response


def open_body(request: httpx.Request) -> Generator[Open, Any, Opened]:
    opened = yield Open(request)
    assert isinstance(opened, Opened)
    return opened


def next_line(opened: Opened) -> Generator[NextLine, Any, str | None]:
    line = yield NextLine(opened)
    assert line is None or isinstance(line, str)
    return line


def wait(seconds: float) -> Generator[Wait, Any, None]:
    yield Wait(seconds)


# ---------------------------------------------------------------- requests and answers


class Protocol:
    """Builds the requests of one service: its base URL and API key."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        """A request for `path` under the base URL (or for an absolute URL of the service)."""
        timeout = kwargs.pop("timeout", TIMEOUT)
        return httpx.Request(
            method,
            self.url(path),
            headers=self.headers,
            extensions={"timeout": timeout.as_dict()},
            **kwargs,
        )

    def url(self, path: str) -> str:
        """An absolute URL for a path the service returned (an image's `url`)."""
        return path if "://" in path else self.base_url + path


def check(response: httpx.Response) -> httpx.Response:
    """The response, if it is a success; else its error body as a `KernelServiceError`."""
    if response.is_success:
        return response
    try:
        body = response.json()
        code, detail = str(body.get("code", "http_error")), body.get("detail", response.text)
    except ValueError:
        code, detail = "http_error", response.text
    message = detail if isinstance(detail, str) else str(detail)
    raise KernelServiceError(response.status_code, code, message)


def parse(model: type[M], response: httpx.Response) -> M:
    return model.model_validate_json(check(response).content)


def is_session_gone(response: httpx.Response) -> bool:
    """A 404 that says the session does not exist (not any 404), or a 410 that says it was
    lost with its cell (a cell of a cluster whose state was lost)."""
    gone = {404: "session_not_found", 410: "session_lost_with_cell"}.get(response.status_code)
    if gone is None:
        return False
    try:
        return bool(response.json().get("code") == gone)
    except ValueError:
        return False


def unreachable(request: httpx.Request, exc: httpx.TransportError) -> KernelServiceError:
    """A failure to reach the service, as a service error (status 0)."""
    return KernelServiceError(
        0,
        "service_unreachable",
        f"kernel-service at {request.url.scheme}://{request.url.netloc.decode()} could not be "
        f"reached or did not answer ({type(exc).__name__}: {exc}). If it was restarted, "
        "sessions may have been lost.",
    )


# ---------------------------------------------------------------- Server-Sent Events


class EventParser:
    """Server-Sent Events read a line at a time (lines without their line break)."""

    def __init__(self) -> None:
        self._name = "message"
        self._data: list[str] = []

    def line(self, line: str) -> tuple[str, str] | None:
        """Take one line; the (event, data) pair it completes, if it is the blank line that
        ends an event with data."""
        if not line:
            return self.end()
        if line.startswith(":"):
            return None  # a comment: keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._name = value
        elif field == "data":
            self._data.append(value)
        return None

    def end(self) -> tuple[str, str] | None:
        """The event in progress (when it has data), and a fresh start."""
        event = (self._name, "\n".join(self._data)) if self._data else None
        self._name, self._data = "message", []
        return event


def parse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of a Server-Sent Events stream, given its lines."""
    parser = EventParser()
    for line in lines:
        if (event := parser.line(line)) is not None:
            yield event
    if (event := parser.end()) is not None:
        yield event
