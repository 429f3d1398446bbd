"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis) against a real server with
real kernels: no 500, no hang, every answer as the schema declares it (status, media type,
body, headers). Then the answers fuzzing rarely reaches (real sessions, images, the ReAct
prompt, 401, 409, 413) are checked against the schema one by one."""

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.routing import APIRoute
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import CheckFunction, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.schemas import OpenApiSchema

from kernel_service.api.files import router as files_router
from kernel_service.api.history import router as history_router
from kernel_service.api.jupyter.rest import router as jupyter_router
from kernel_service.api.routes import router
from tests.conftest import Server, running_server

# Every operation of the API, from its routes: one more route is one more fuzzed operation.
ROUTES = [*router.routes, *history_router.routes, *files_router.routes, *jupyter_router.routes]
OPERATIONS = [
    f"{method} {route.path_format}"  # `{file_path}`, not `{file_path:path}`, as the schema
    for route in ROUTES
    if isinstance(route, APIRoute) and route.include_in_schema
    for method in sorted(route.methods or ())
]
# Fuzzed on the shared server: all but POST /drain, which would leave it draining (making no
# new sessions) for good; tests/test_cells.py drives it.
FUZZED = [label for label in OPERATIONS if label != "POST /drain"]
# Generated requests per operation and mode (valid data, invalid data), on top of the
# coverage phase's fixed cases (boundaries, wrong types, missing parts, other methods).
MAX_EXAMPLES = 100
# Cases tried in all, at least (the last run tried more; see the printed count).
MIN_CASES = 1000
# No request may take longer: executions are capped at 2 s, kernels start in well under.
REQUEST_TIMEOUT = 20
FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same cases on every run, in CI too
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short executions and few sessions: generated calls stay cheap."""
    with running_server(
        tmp_path_factory.mktemp("fuzz"), default_timeout=2, max_timeout=2, max_sessions=4
    ) as server:
        yield server


def delete_all_sessions(server: Server) -> None:
    for session in server.client.get("/sessions").json()["sessions"]:
        server.client.delete(f"/sessions/{session['session_id']}")


def schema_of(server: Server) -> OpenApiSchema:
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")


def validated_call(
    schema: OpenApiSchema,
    server: Server,
    label: str,
    *,
    headers: dict[str, str] | None = None,
    body: object = None,
    excluded_checks: list[CheckFunction] | None = None,
    **parts: Any,
) -> int:
    """One request made by hand, its answer checked against the schema; its status."""
    operation = schema.find_operation_by_label(label)
    assert operation is not None
    if body is not None:
        parts["body"] = body
    case = operation.Case(**parts)
    response = case.call_and_validate(
        base_url=server.base_url,
        headers=headers,
        excluded_checks=excluded_checks,
        timeout=REQUEST_TIMEOUT,
    )
    return response.status_code


@pytest.fixture(scope="module")
def fuzzed_schema(fuzzed_server: Server) -> OpenApiSchema:
    return schema_of(fuzzed_server)


@pytest.fixture(scope="module")
def cases_tried() -> Counter[str]:
    """The cases sent, per operation."""
    return Counter()


def test_the_schema_has_every_route(fuzzed_schema: OpenApiSchema) -> None:
    paths = fuzzed_schema.raw_schema["paths"]
    labels = [f"{method.upper()} {path}" for path in paths for method in paths[path]]
    assert sorted(labels) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", FUZZED)
def test_every_answer_is_as_the_schema_says(
    label: str, fuzzed_schema: OpenApiSchema, fuzzed_server: Server, cases_tried: Counter[str]
) -> None:
    operation = fuzzed_schema.find_operation_by_label(label)
    assert operation is not None

    def check(case: schemathesis.Case[Any]) -> None:
        cases_tried[label] += 1
        try:
            case.call_and_validate(base_url=fuzzed_server.base_url, timeout=REQUEST_TIMEOUT)
        finally:
            # each case starts afresh: a session it made would soon fill the service (429)
            delete_all_sessions(fuzzed_server)

    generation = fuzzed_schema.config.generation_for(operation=operation, phase="coverage")
    for case in fuzzed_schema.iter_coverage_cases(
        operation, generation_modes=list(GenerationMode), generation_config=generation
    ):
        check(case)
    for mode in GenerationMode:

        @given(case=operation.as_strategy(generation_mode=mode))
        @FUZZ_SETTINGS
        def fuzz(case: schemathesis.Case[Any]) -> None:
            check(case)

        try:
            fuzz()
        except Unsatisfiable:
            # nothing of it can be made invalid: no parameters, or free strings in the path
            assert mode is GenerationMode.NEGATIVE, label
    # the server is fine after it all
    assert fuzzed_server.client.get("/healthz").status_code == 200


def test_enough_cases_were_tried(
    cases_tried: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    if set(cases_tried) != set(FUZZED):
        pytest.skip("only part of the fuzzing ran")
    with capsys.disabled():
        print(f"\nfuzz: {cases_tried.total()} cases tried")
        for label in FUZZED:
            print(f"  {cases_tried[label]:5}  {label}")
    assert cases_tried.total() >= MIN_CASES


def test_real_answers_are_as_the_schema_says(tmp_path: Path) -> None:
    """Sessions, images and texts that generated data does not reach, each validated."""
    with running_server(tmp_path) as server:
        walk_through_the_api(server)


def walk_through_the_api(server: Server) -> None:
    schema = schema_of(server)

    def call(label: str, **parts: Any) -> int:
        return validated_call(schema, server, label, **parts)

    plot = (
        "import matplotlib.pyplot as plt\nfrom IPython.display import SVG, display\n"
        "plt.plot([1, 2]); plt.show()\n"
        'display(SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>\'))\n'
        "print('out'); 1 / 0"
    )
    assert call("POST /sessions", body={"session_id": "walk"}) == 201
    assert call("POST /sessions", body={"session_id": "walk"}) == 409
    assert call("POST /execute", body={"code": plot, "session_id": "walk"}) == 200
    assert call("POST /execute", body={"code": "2 + 2", "session_id": "walk", "timeout": 5}) == 200
    assert call("POST /execute", body={"code": "#" * (1024 * 1024 + 1)}) == 413
    assert call("POST /execute", body={"code": "#" * (7 * 1024 * 1024)}) == 413  # body refused
    assert call("GET /sessions") == 200
    walk = {"session_id": "walk"}
    assert call("GET /sessions/{session_id}", path_parameters=walk) == 200
    for image_id in ("1.png", "2.svg", "3.png"):
        path = {**walk, "image_id": image_id}
        expected = 404 if image_id == "3.png" else 200
        assert (
            call("GET /sessions/{session_id}/images/{image_id}", path_parameters=path) == expected
        )
    for route in ("history", "notebook"):  # with the image, the value, the error
        assert call(f"GET /sessions/{{session_id}}/{route}", path_parameters=walk) == 200
    since = {"since": 1}
    assert call("GET /sessions/{session_id}/history", path_parameters=walk, query=since) == 200
    walk_through_the_files(call, walk)
    assert call("POST /sessions/{session_id}/interrupt", path_parameters=walk) == 200
    assert call("POST /sessions/{session_id}/restart", path_parameters=walk) == 200
    for fmt in ("openai", "qwen", "toolbench", "react", "react_zh"):
        assert call("GET /tools", query={"format": fmt}) == 200
    assert call("GET /healthz") == 200
    assert call("DELETE /sessions/{session_id}", path_parameters=walk) == 204
    assert call("DELETE /sessions/{session_id}", path_parameters=walk) == 404
    walk_through_jupyter(call, server)


def walk_through_jupyter(call: Callable[..., int], server: Server) -> None:
    """Jupyter's kernel API: kernels, their specs and logos, Jupyter sessions."""
    assert call("GET /api") == 200
    assert call("GET /api/kernelspecs") == 200
    for name, expected in (("python3", 200), ("nope", 404)):
        assert call("GET /api/kernelspecs/{name}", path_parameters={"name": name}) == expected
    for resource in ("logo-64x64.png", "logo-svg.svg", "other.png"):
        path = {"name": "python3", "resource": resource}
        expected = 404 if resource == "other.png" else 200
        assert call("GET /kernelspecs/{name}/{resource}", path_parameters=path) == expected
    assert call("POST /api/kernels", body={"name": "python3"}) == 201
    kernel = {"kernel_id": server.client.get("/api/kernels").json()[0]["id"]}
    assert call("GET /api/kernels") == 200
    assert call("GET /api/kernels/{kernel_id}", path_parameters=kernel) == 200
    assert call("POST /api/kernels/{kernel_id}/interrupt", path_parameters=kernel) == 204
    assert call("POST /api/kernels/{kernel_id}/restart", path_parameters=kernel) == 200
    notebook = {
        "path": "a.ipynb",
        "name": "a",
        "type": "notebook",
        "kernel": {"id": kernel["kernel_id"]},
    }
    assert call("POST /api/sessions", body=notebook) == 201
    jupyter_session = {"session_id": kernel["kernel_id"]}
    assert call("GET /api/sessions") == 200
    assert call("GET /api/sessions/{session_id}", path_parameters=jupyter_session) == 200
    renamed = {"path": "b.ipynb"}
    assert (
        call("PATCH /api/sessions/{session_id}", path_parameters=jupyter_session, body=renamed)
        == 200
    )
    assert call("DELETE /api/sessions/{session_id}", path_parameters=jupyter_session) == 204
    assert call("DELETE /api/kernels/{kernel_id}", path_parameters=kernel) == 404


def walk_through_the_files(call: Callable[..., int], walk: dict[str, str]) -> None:
    files = "/sessions/{session_id}/files"
    one = f"{files}/{{file_path}}"
    csv = {**walk, "file_path": "data/in.csv"}
    raw = {"body": b"a,b\n1,2\n", "media_type": "application/octet-stream"}
    assert call(f"PUT {one}", path_parameters=csv, **raw) == 201
    assert call(f"PUT {one}", path_parameters=csv, **raw) == 200  # replaced
    form = {"body": {"file": b"\x00\xff"}, "media_type": "multipart/form-data"}
    assert call(f"PUT {one}", path_parameters={**walk, "file_path": "f.bin"}, **form) == 201
    assert call(f"GET {files}", path_parameters=walk) == 200
    assert call(f"GET {files}", path_parameters=walk, query={"hidden": True, "limit": 1}) == 200
    assert call(f"GET {one}", path_parameters=csv) == 200
    assert call(f"GET {one}", path_parameters={**walk, "file_path": "f.bin"}) == 200
    for bad in ("x\x00y", "data"):  # data: a directory (the client resolves `..`, `//`)
        assert call(f"GET {one}", path_parameters={**walk, "file_path": bad}) == 400, bad
        assert call(f"PUT {one}", path_parameters={**walk, "file_path": bad}, **raw) == 400, bad
    assert call(f"DELETE {one}", path_parameters=csv) == 204
    assert call(f"DELETE {one}", path_parameters=csv) == 404
    assert call(f"GET {one}", path_parameters=csv) == 404


def test_too_many_sessions_is_as_the_schema_says(
    fuzzed_schema: OpenApiSchema, fuzzed_server: Server
) -> None:
    def call(label: str, **parts: Any) -> int:
        return validated_call(fuzzed_schema, fuzzed_server, label, **parts)

    try:
        for _ in range(fuzzed_server.settings.max_sessions):
            assert call("POST /sessions") == 201
        assert call("POST /sessions") == 429
        assert call("POST /execute", body={"code": "1"}) == 429
    finally:
        delete_all_sessions(fuzzed_server)


KEY = "fuzz-key-0123456789"


def test_refusals_are_as_the_schema_says(tmp_path_factory: pytest.TempPathFactory) -> None:
    """401 from every route but /healthz and /readyz without the key; 503 when no kernel can
    start."""
    with running_server(
        tmp_path_factory.mktemp("keyed"), api_key=KEY, kernel_start_timeout=0.01
    ) as keyed:
        schema = schemathesis.openapi.from_url(
            f"{keyed.base_url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}
        )
        path = {
            "session_id": "s",
            "image_id": "1.png",
            "file_path": "a.txt",
            "kernel_id": "k",
            "name": "python3",
            "resource": "logo-64x64.png",
        }
        for label in OPERATIONS:
            parameters = {name: value for name, value in path.items() if f"{{{name}}}" in label}
            body = {"code": "1"} if label == "POST /execute" else None
            expected = 200 if label in ("GET /healthz", "GET /readyz") else 401
            assert validated_call(schema, keyed, label, path_parameters=parameters, body=body) == (
                expected
            ), label
        # with the key: no kernel starts, and 503 is the right answer (a server error)
        key = {"Authorization": f"Bearer {KEY}"}
        for label, body in (
            ("POST /sessions", None),
            ("POST /execute", {"code": "1"}),
            ("POST /api/kernels", None),
        ):
            status = validated_call(
                schema, keyed, label, headers=key, body=body, excluded_checks=[not_a_server_error]
            )
            assert status == 503, label
