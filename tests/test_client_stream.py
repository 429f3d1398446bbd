"""Streamed executions over httpx's MockTransport, sync and async: Server-Sent Events in
pieces of any size, gone sessions, errors, a stream left early; and the events parser."""

import asyncio
from collections.abc import AsyncGenerator, Generator

import httpx
import pytest

from kernel_service_client.client import AsyncClient, Client, KernelServiceError, parse_events
from kernel_service_client.models import StreamOutput
from tests.scripted_service import (
    MODES,
    URL,
    Mode,
    Service,
    connect,
    error,
    gone,
    info,
    result,
    result_json,
    sse,
    streamed,
)

OUTPUT = {"output_type": "stream", "name": "stdout", "text": "héllo ✓\n"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_stream_events_arrive_whatever_the_pieces_of_the_body(mode: Mode, piece: int) -> None:
    body = b": keep-alive\n\n" + sse(
        ("output", OUTPUT), ("shutdown", {}), ("output", OUTPUT), ("result", result_json("s"))
    )
    response, chunks = streamed(body, piece)
    service = Service(("POST", "/sessions", info("s")), ("POST", "/execute", response))
    session = connect(mode, service).session()
    events = list(session.stream("print('héllo ✓')", timeout=3))
    assert [e.kind for e in events] == ["output", "output", "result"]  # unknown events skipped
    assert events[0].output == StreamOutput(name="stdout", text="héllo ✓\n")
    last = events[-1].result
    assert last is not None and last.session_id == session.id == "s"
    sent = {"code": "print('héllo ✓')", "session_id": "s", "timeout": 3, "stream": True}
    assert service.body(1) == sent
    assert chunks.closed


@pytest.mark.parametrize("mode", MODES)
def test_a_streamed_execution_in_a_gone_session_says_state_was_lost(mode: Mode) -> None:
    response, _ = streamed(sse(("result", result_json("new", "x"))), 7)
    service = Service(
        ("POST", "/sessions", info("old")),
        ("POST", "/execute", result("old")),
        ("POST", "/execute", gone()),
        ("POST", "/sessions", info("new")),
        ("POST", "/execute", response),
    )
    session = connect(mode, service).session()
    session.execute("x = 1")
    [event] = session.stream("x")
    assert event.result is not None and event.result.state_lost
    assert event.result.text.startswith("[Session 'old' had expired")
    assert event.result.text.endswith("\nx")
    assert service.body(4)["stream"] is True and service.body(4)["session_id"] == "new"


@pytest.mark.parametrize("mode", MODES)
def test_stream_errors_are_service_errors(mode: Mode) -> None:
    failing = sse(("output", OUTPUT), ("error", {"detail": "full", "code": "state_full"}))
    response, chunks = streamed(failing, 4)
    service = Service(
        ("POST", "/execute", error(409, "session_busy", "busy")),
        ("POST", "/execute", response),
    )
    session = connect(mode, service).session("s")
    with pytest.raises(KernelServiceError) as busy:
        list(session.stream("1"))
    assert (busy.value.status, busy.value.code) == (409, "session_busy")
    with pytest.raises(KernelServiceError) as mid_stream:
        list(session.stream("1"))
    assert (mid_stream.value.status, mid_stream.value.code) == (500, "state_full")
    assert chunks.closed


def test_leaving_a_sync_stream_early_closes_its_body() -> None:
    response, chunks = streamed(sse(*[("output", OUTPUT)] * 5, ("result", result_json("s"))), 9)
    service = Service(("POST", "/execute", response))
    client = Client(URL, http=httpx.Client(transport=httpx.MockTransport(service)))
    events = client.session("s").stream("1")
    assert isinstance(events, Generator)
    assert next(events).kind == "output"
    assert not chunks.closed
    events.close()  # what leaving a for loop does, once the generator is dropped
    assert chunks.closed and chunks.sent < len(chunks.pieces)


def test_leaving_an_async_stream_early_closes_its_body() -> None:
    response, chunks = streamed(sse(*[("output", OUTPUT)] * 5, ("result", result_json("s"))), 9)
    service = Service(("POST", "/execute", response))
    client = AsyncClient(URL, http=httpx.AsyncClient(transport=httpx.MockTransport(service)))

    async def first_event_only() -> None:
        events = client.session("s").stream("1")
        assert isinstance(events, AsyncGenerator)
        assert (await anext(events)).kind == "output"
        assert not chunks.closed
        await events.aclose()

    asyncio.run(first_event_only())
    assert chunks.closed and chunks.sent < len(chunks.pieces)


# ---------------------------------------------------------------- Server-Sent Events


def test_parse_events() -> None:
    lines = [
        ": keep-alive",
        "",
        "data: no name",
        "",
        "event: output",
        "data:first",
        "data: second",
        "id: 7",
        "",
        "event: named but empty",
        "",
        "data: after an empty event the name is fresh",
        "",
        "event: result",
        "data: {}",  # the stream ends without the blank line
    ]
    assert list(parse_events(lines)) == [
        ("message", "no name"),
        ("output", "first\nsecond"),
        ("message", "after an empty event the name is fresh"),
        ("result", "{}"),
    ]
    assert list(parse_events([])) == []
