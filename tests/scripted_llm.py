"""A scripted OpenAI-compatible chat endpoint that plays the model in agent tests.

It is a real HTTP server (uvicorn on 127.0.0.1, `POST /v1/chat/completions`, streaming and
not), so every framework talks to it through its own OpenAI client. Each request is answered
by the next turn of a script: a function of the request body returning the assistant
message (`content` and/or `tool_calls`). Every request is recorded for the test to inspect.
"""

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

Turn = Callable[[dict[str, Any]], dict[str, Any]]
MODEL = "scripted-model"


def tool_call(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """One entry of an assistant message's `tool_calls`."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def said(request: dict[str, Any]) -> str:
    """Everything the conversation holds so far as one text (tool results included)."""
    parts = []
    for message in request["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n".join(parts)


class ScriptedModel:
    """Serves the turns in order; `requests` holds every request body it got."""

    def __init__(self, turns: list[Turn]) -> None:
        self.turns = list(turns)
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.base_url = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            if not self.turns:
                self.errors.append("the script ran out of turns")
                return JSONResponse({"error": {"message": "script exhausted"}}, status_code=500)
            try:
                message = self.turns.pop(0)(body)
            except Exception as exc:  # the test reads it from `errors`
                self.errors.append(f"turn {len(self.requests)} failed: {exc!r}")
                return JSONResponse({"error": {"message": repr(exc)}}, status_code=500)
            if body.get("stream"):
                return StreamingResponse(_chunks(message), media_type="text/event-stream")
            return JSONResponse(_completion(message))

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": MODEL, "object": "model"}]}

        return app


def _finish_reason(message: dict[str, Any]) -> str:
    return "tool_calls" if message.get("tool_calls") else "stop"


def _completion(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, **message},
                "finish_reason": _finish_reason(message),
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunks(message: dict[str, Any]) -> Iterator[str]:
    base = {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": MODEL,
    }
    delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    first = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    last = {
        **base,
        "choices": [{"index": 0, "delta": {}, "finish_reason": _finish_reason(message)}],
    }
    yield f"data: {json.dumps(first)}\n\n"
    yield f"data: {json.dumps(last)}\n\n"
    yield "data: [DONE]\n\n"


@contextmanager
def serving(model: ScriptedModel) -> Iterator[ScriptedModel]:
    """The model served on a free loopback port; `model.base_url` ends in `/v1`."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(model.app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "scripted model did not start"
        time.sleep(0.01)
    model.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield model
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
