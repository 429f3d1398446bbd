"""Runs flows (`kernel_service_client.flows`) over httpx: `SyncDriver` with its blocking
client, `AsyncDriver` with its asyncio one. They only do the steps' I/O; what each call
means is in its flow, written once for both."""

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Generator, Iterator
from typing import Any, TypeVar

import httpx

from kernel_service_client.flows import Flow, StreamEvent
from kernel_service_client.protocol import NextLine, Open, Opened, Send, Step, unreachable

T = TypeVar("T")


class SyncDriver:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def run(self, flow: Flow[T]) -> T:
        """The flow's value (a flow run this way has no events)."""
        try:
            event = next(self.drive(flow))
        except StopIteration as done:
            value: T = done.value
            return value
        raise AssertionError(f"a flow run for its value yielded {event!r}")

    def drive(self, flow: Flow[T]) -> Generator[StreamEvent, None, T]:
        """Do the flow's steps, yielding its events; its value is returned. A body it opened
        is closed at the end, or as soon as the caller stops listening."""
        opened: list[httpx.Response] = []
        answer: Any = None
        try:
            while True:
                try:
                    step = flow.send(answer)
                except StopIteration as done:
                    value: T = done.value
                    return value
                if isinstance(step, StreamEvent):
                    yield step
                    answer = None
                else:
                    answer = self._answer(step, opened)
        finally:
            flow.close()
            for response in opened:
                response.close()

    def _answer(self, step: Step, opened: list[httpx.Response]) -> Any:
        if isinstance(step, Send):
            return self._send(step.request, stream=False)
        if isinstance(step, Open):
            response = self._send(step.request, stream=True)
            opened.append(response)
            if response.status_code != 200:
                response.read()
            return Opened(response, response.iter_lines())
        if isinstance(step, NextLine):
            lines = step.opened.lines
            assert isinstance(lines, Iterator)
            return next(lines, None)
        time.sleep(step.seconds)
        return None

    def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            return self.http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise unreachable(request, exc) from exc


class AsyncDriver:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def run(self, flow: Flow[T]) -> T:
        """As `SyncDriver.run`."""
        answer: Any = None
        while True:
            try:
                step = flow.send(answer)
            except StopIteration as done:
                value: T = done.value
                return value
            assert not isinstance(step, StreamEvent)
            answer = await self._answer(step, [])

    async def events(self, flow: Flow[None]) -> AsyncGenerator[StreamEvent, None]:
        """As `SyncDriver.drive`; close it (`contextlib.aclosing`) to stop early."""
        opened: list[httpx.Response] = []
        answer: Any = None
        try:
            while True:
                try:
                    step = flow.send(answer)
                except StopIteration:
                    return
                if isinstance(step, StreamEvent):
                    yield step
                    answer = None
                else:
                    answer = await self._answer(step, opened)
        finally:
            flow.close()
            for response in opened:
                await response.aclose()

    async def _answer(self, step: Step, opened: list[httpx.Response]) -> Any:
        if isinstance(step, Send):
            return await self._send(step.request, stream=False)
        if isinstance(step, Open):
            response = await self._send(step.request, stream=True)
            opened.append(response)
            if response.status_code != 200:
                await response.aread()
            return Opened(response, response.aiter_lines())
        if isinstance(step, NextLine):
            lines = step.opened.lines
            assert isinstance(lines, AsyncIterator)
            return await anext(lines, None)
        await asyncio.sleep(step.seconds)
        return None

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        try:
            return await self.http.send(request, stream=stream)
        except httpx.TransportError as exc:
            raise unreachable(request, exc) from exc
