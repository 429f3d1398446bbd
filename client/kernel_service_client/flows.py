"""Each call of the client, written once as a flow (see `kernel_service_client.protocol`): the
requests it makes, how it reads their answers, and what it does when a session is gone.

A session that the service no longer has (deleted, culled after idling, or lost in a
restart: 404 `session_not_found`) is handled here, once: the code runs in a new session
(with the same id when the caller chose it) and the result says that earlier state is gone
(`state_lost` true and a notice at the top of `text`), so an agent's history stays true.
"""

import json
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import httpx
from pydantic import TypeAdapter

from kernel_service_client.models import (
    ExecutionResult,
    Health,
    KernelSpecInfo,
    KernelSpecList,
    Output,
    SessionInfo,
    SessionList,
)
from kernel_service_client.protocol import (
    EXECUTE_TIMEOUT,
    EventParser,
    KernelServiceError,
    Protocol,
    Step,
    check,
    is_session_gone,
    next_line,
    open_body,
    parse,
    send,
    wait,
)
from kernel_service_client.tools.spec import ToolFormat, ToolSpec

T = TypeVar("T")
# How long a chosen id that another call is making (409) is waited for.
_MAKING_TIMEOUT = 120.0
_MAKING_POLL = 0.05


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed execution: an `output` as it arrived (a stream output holds
    only the new text), or, last, the whole `result`."""

    kind: Literal["output", "result"]
    output: Output | None = None
    result: ExecutionResult | None = None


# A flow yields steps for its driver and events for its caller (answered with None), and
# returns its value.
Flow = Generator[Step | StreamEvent, Any, T]

_OUTPUT = TypeAdapter[Output](Output)


def lost_state_notice(old_id: str, new_id: str) -> str:
    """What a result says when its code ran in a new session because the old one was gone."""
    same = "a new session with the same id" if old_id == new_id else f"new session {new_id!r}"
    return (
        f"[Session {old_id!r} had expired (deleted, or culled after being idle), so this code "
        f"ran in {same}: variables, imports and files from earlier calls are gone. Re-run "
        "whatever this code depends on.]"
    )


class SessionState:
    """What a session handle knows (its id once it has one, and whether it has run code), and
    the flows of its calls."""

    def __init__(
        self, protocol: Protocol, session_id: str | None, language: str | None = None
    ) -> None:
        self.protocol = protocol
        self.language = language  # of the session it makes (None: the service's default)
        self.id = session_id
        self.chosen_id = session_id  # the caller's id is kept when the session is remade
        self.used = False

    def execute(self, code: str, timeout: float | None) -> Flow[ExecutionResult]:
        if self.id is None:  # made first, so that interrupt() can reach this execution
            yield from self._create(None)
        # session_id first: a proxy in front of cells reads only the head of a long body
        body = self._language({"session_id": self.id, "code": code, "timeout": timeout})
        response = yield from send(self._execute_request(body))
        if not is_session_gone(response):
            return self.ran(parse(ExecutionResult, response))
        lost = yield from self._remake(body)
        response = yield from send(self._execute_request(body))
        return self.ran(parse(ExecutionResult, response), lost)

    def stream(self, code: str, timeout: float | None) -> Flow[None]:
        """As `execute`, as Server-Sent Events: yields each event, the result last."""
        if self.id is None:
            yield from self._create(None)
        body = self._language(
            {"session_id": self.id, "code": code, "timeout": timeout, "stream": True}
        )
        opened = yield from open_body(self._execute_request(body))
        lost_from = None
        if is_session_gone(opened.response):
            lost_from = yield from self._remake(body)
            opened = yield from open_body(self._execute_request(body))
        check(opened.response)
        parser = EventParser()
        while True:
            line = yield from next_line(opened)
            found = parser.end() if line is None else parser.line(line)
            if found is not None:
                event = stream_event(self, *found, lost_from)
                if event is not None:
                    yield event
            if line is None:
                return

    def interrupt(self) -> Flow[bool]:
        if self.id is None:
            return False
        response = yield from send(self.protocol.request("POST", f"/sessions/{self.id}/interrupt"))
        if is_session_gone(response):
            return False
        return bool(check(response).json()["interrupted"])

    def restart(self) -> Flow[SessionInfo]:
        if self.id is not None:
            request = self.protocol.request("POST", f"/sessions/{self.id}/restart")
            response = yield from send(request)
            if not is_session_gone(response):
                return parse(SessionInfo, response)
        self.id = None
        return (yield from self._create(self.chosen_id))

    def info(self) -> Flow[SessionInfo]:
        if self.id is None:
            yield from self._create(self.chosen_id)
        response = yield from send(self.protocol.request("GET", f"/sessions/{self.id}"))
        return parse(SessionInfo, response)

    def close(self) -> Flow[None]:
        if self.id is None:
            return
        response = yield from send(self.protocol.request("DELETE", f"/sessions/{self.id}"))
        if not is_session_gone(response):
            check(response)
        self.id = None

    def ran(self, result: ExecutionResult, lost_from: str | None = None) -> ExecutionResult:
        """Note that code ran; with `lost_from`, say that the state of that session is gone."""
        if lost_from is not None:
            notice = lost_state_notice(lost_from, result.session_id)
            result = result.model_copy(
                update={"state_lost": True, "text": f"{notice}\n{result.text}"}
            )
        self.id = result.session_id
        self.used = True
        return result

    def _create(self, session_id: str | None) -> Flow[SessionInfo]:
        """Make the session (with the chosen id, if any). When another call is making or
        ending a session of that id (409), wait until it is there, or gone and made anew."""
        waited = 0.0
        while True:
            body: dict[str, Any] = {"session_id": session_id}
            if self.language is not None:  # sent only when chosen: older services refuse it
                body["language"] = self.language
            request = self.protocol.request("POST", "/sessions", json=body)
            response = yield from send(request)
            if response.status_code != 409 or session_id is None:
                info = parse(SessionInfo, response)
                self.id = info.session_id
                return info
            existing = yield from send(self.protocol.request("GET", f"/sessions/{session_id}"))
            if existing.status_code != 404 or waited > _MAKING_TIMEOUT:
                info = parse(SessionInfo, existing)
                self.id = session_id
                return info
            yield from wait(_MAKING_POLL)  # still being made (or ended) by another call
            waited += _MAKING_POLL

    def _remake(self, body: dict[str, Any]) -> Flow[str | None]:
        """The session is gone: make it again (with the caller's id, if chosen), point `body`
        at it; the old id if state was lost (code had run there)."""
        old_id = self.id
        yield from self._create(self.chosen_id)
        body["session_id"] = self.id
        return old_id if self.used else None

    def _language(self, body: dict[str, Any]) -> dict[str, Any]:
        """`body` with the handle's language, when it was chosen: the service refuses code
        for a session of another language (409 language_mismatch), such as one of a chosen
        id that already existed."""
        if self.language is not None:
            body["language"] = self.language
        return body

    def _execute_request(self, body: dict[str, Any]) -> httpx.Request:
        return self.protocol.request("POST", "/execute", json=body, timeout=EXECUTE_TIMEOUT)


def stream_event(state: SessionState, name: str, data: str, lost_from: str | None
                 ) -> StreamEvent | None:  # fmt: skip
    """The event, the result noted as ran; an `error` event raised; unknown events None."""
    if name == "output":
        return StreamEvent("output", output=_OUTPUT.validate_json(data))
    if name == "result":
        result = state.ran(ExecutionResult.model_validate_json(data), lost_from)
        return StreamEvent("result", result=result)
    if name == "error":
        error = json.loads(data)
        raise KernelServiceError(int(error.get("status", 500)), error["code"], error["detail"])
    return None


# ---------------------------------------------------------------- calls of the service


def tool_spec(protocol: Protocol) -> Flow[ToolSpec]:
    response = yield from send(protocol.request("GET", "/tools"))
    return ToolSpec.from_openai(check(response).json()[0])


def tools(protocol: Protocol, fmt: ToolFormat) -> Flow[Any]:
    response = check((yield from send(protocol.request("GET", "/tools", params={"format": fmt}))))
    return response.text if fmt.startswith("react") else response.json()


def image(protocol: Protocol, url: str) -> Flow[bytes]:
    return check((yield from send(protocol.request("GET", url)))).content


def sessions(protocol: Protocol) -> Flow[list[SessionInfo]]:
    response = yield from send(protocol.request("GET", "/sessions"))
    return parse(SessionList, response).sessions


def kernelspecs(protocol: Protocol) -> Flow[list[KernelSpecInfo]]:
    response = yield from send(protocol.request("GET", "/kernelspecs"))
    return parse(KernelSpecList, response).kernelspecs


def health(protocol: Protocol) -> Flow[Health]:
    return parse(Health, (yield from send(protocol.request("GET", "/healthz"))))
