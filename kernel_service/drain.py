"""`kernel-service drain`: a running service (a cell about to be stopped or moved) is told to
make no new sessions (`POST /drain`), then watched until none of its executions runs, or
`wait` seconds pass. Its exit status says which: 0 drained, 1 executions still ran, 2 the
service could not be told."""

import sys
import time

import httpx

# How often the service is asked whether executions still run (seconds).
_POLL = 0.5
# Polls in a row it must fail to answer (a busy cell may miss one) to be taken as stopped.
_FAILURES = 5


def drain(url: str, api_key: str | None, wait: float) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=10.0) as client:
        try:
            answer = client.post("/drain")
        except httpx.HTTPError as exc:
            print(f"kernel-service drain: {url} could not be reached: {exc}", file=sys.stderr)
            return 2
        if answer.status_code != 200:
            print(f"kernel-service drain: {url} answered {answer.status_code}: {answer.text}",
                  file=sys.stderr)  # fmt: skip
            return 2
        executing = _executing(answer)
        if executing is None:
            print(f"kernel-service drain: {url} is not a kernel-service: {answer.text[:200]}",
                  file=sys.stderr)  # fmt: skip
            return 2
        deadline = time.monotonic() + wait
        failures = 0  # polls in a row the service did not answer
        while executing and time.monotonic() < deadline and failures < _FAILURES:
            time.sleep(_POLL)
            try:
                polled = _executing(client.get("/healthz"))
            except httpx.HTTPError:
                polled = None
            failures = failures + 1 if polled is None else 0
            executing = executing if polled is None else polled
        if failures >= _FAILURES:
            return 0  # the service stopped meanwhile: nothing of it runs
        if executing:
            ran = (
                "1 execution still runs" if executing == 1 else f"{executing} executions still run"
            )
            print(f"kernel-service drain: {ran}", file=sys.stderr)
            return 1
        print(f"kernel-service drain: {url} makes no new sessions; no execution runs")
        return 0


def _executing(answer: httpx.Response) -> int | None:
    """How many executions a service's answer says run (None: not a kernel-service's)."""
    try:
        return int(answer.json()["executing"])
    except (ValueError, KeyError, TypeError):
        return None
