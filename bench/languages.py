"""Each language's sessions side by side in one service (the defaults, sandboxed, no warm
pools): a new session and its first `1+1` (POST /execute with `language`, the session made
for it), and the memory an idle session costs.

Python's sessions fork from its zygote; the others start their runtime afresh (Bash's
kernel is a Python process of its own; Deno, R and the JVM run under the in-sandbox bridge,
a small Python process beside each). Idle memory is the PSS of every process the service
started, with IDLE sessions of the language sitting idle after one `1+1` each, less the
same before they existed, per session: what one more idle session costs the machine.
"""

import asyncio
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from bench.service import Service
from bench.stats import MIB, memory

# The first execution of each language, and what it must answer.
FIRST = {
    "python": ("1+1", "2"),
    "bash": ("echo $((1+1))", "2"),
    "javascript": ("1+1", "2"),
    "typescript": ("const n: number = 1 + 1; n", "2"),
    "r": ("1+1", "[1] 2"),
    "java": ("1+1", "2"),
}
ROUNDS = 5  # new sessions per language
IDLE = 4  # idle sessions per language for its memory
_SETTLE = 2.0  # seconds for start-up garbage and page faults to settle before measuring


@dataclass
class LanguageFigures:
    language: str
    ready: bool
    problem: str | None = None
    new_session_ms: list[float] = field(default_factory=list)
    idle_mib: float | None = None  # PSS per idle session
    errors: list[str] = field(default_factory=list)


async def run(root: Path, rounds: int = ROUNDS) -> list[LanguageFigures]:
    """Every shipped language the service has, in one service process."""
    settings = {"pool_size": 0, "max_sessions": IDLE + 8, "log_level": "warning"}
    service = Service("languages", root, settings)
    await service.start()
    try:
        listed = (await service.http.get("/kernelspecs")).json()["kernelspecs"]
        ready = {}
        for spec in listed:
            for name in spec["languages"]:
                ready[name] = (spec["ready"], spec["problem"])
        figures = []
        for language in FIRST:
            is_ready, problem = ready.get(language, (False, "not offered"))
            figure = LanguageFigures(language, is_ready, problem)
            if is_ready:
                await _measure(service, figure, rounds)
            figures.append(figure)
        return figures
    finally:
        await service.stop()


async def _measure(service: Service, figure: LanguageFigures, rounds: int) -> None:
    code, wanted = FIRST[figure.language]
    loop = asyncio.get_running_loop()
    for _ in range(rounds):
        started = loop.time()
        answer = await service.execute(code, language=figure.language)
        figure.new_session_ms.append((loop.time() - started) * 1000)
        if "session_id" not in answer:
            figure.errors.append(f"new session: {answer}")
            return
        if wanted.strip() not in answer.get("text", ""):  # R's value is a display
            figure.errors.append(f"first result: {answer.get('text')!r}")
        await service.delete(answer["session_id"])
    before = memory(service.children())
    sessions = []
    try:
        for _ in range(IDLE):
            answer = await service.execute(code, language=figure.language)
            sessions.append(answer["session_id"])
        await asyncio.sleep(_SETTLE)  # the measured processes settle: not a synchronisation
        after = memory(service.children())
        figure.idle_mib = (after.pss - before.pss) / IDLE / MIB
    finally:
        for session in sessions:
            await service.delete(session)


def lines(figures: list[LanguageFigures]) -> tuple[list[str], list[str]]:
    """The section's table, and its verdicts (every ready language answered)."""
    table = [
        "| language (one service, sandboxed, no pools) | new session + first result, "
        "median (min-max) | idle session, PSS |",
        "|---|---|---|",
    ]
    for figure in figures:
        if not figure.ready:
            table.append(f"| {figure.language} | not ready: {figure.problem} | - |")
            continue
        ms = figure.new_session_ms
        timing = f"{statistics.median(ms):.0f} ms ({min(ms):.0f}-{max(ms):.0f})" if ms else "-"
        idle = f"{figure.idle_mib:.0f} MiB" if figure.idle_mib is not None else "-"
        table.append(f"| {figure.language} | {timing} | {idle} |")
    answered = all(not f.errors for f in figures if f.ready)
    met = "met" if answered else "MISSED"
    verdicts = [f"- {met}: every ready language makes sessions and answers its first call"]
    return table, verdicts
