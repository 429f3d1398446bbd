"""Jupyter's REST API for kernels, as Jupyter Server and Kernel Gateway answer it: kernel
specs, kernels and the sessions API, over the session registry. A kernel *is* a session:
its id is the session's, and what is made here is a session everywhere else (GET
/sessions, the inspector, the history), and the other way round.

Shapes and statuses are Jupyter's (POST /api/kernels → 201 with the kernel model;
errors `{"reason", "message"}` besides the service's `{"detail", "code"}`), checked
against what Jupyter Server's gateway client, JupyterLab, AutoGen, AG2, Open WebUI and
smolagents read (docs/jupyter.md).
"""

import importlib.util
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request, Response, status
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from kernel_service import __version__
from kernel_service.api.errors import InvalidJupyterRequest, NoJupyterSession, NoSuchKernelSpec
from kernel_service.api.jupyter.bridge import Connections
from kernel_service.api.routes import Config, Owner, Registry
from kernel_service.config import Settings
from kernel_service.kernel.kernelspecs import PYTHON, KernelKind
from kernel_service.sessions.registry import SessionRegistry
from kernel_service.sessions.session import Session

_LOGOS = {
    "logo-32x32": "logo-32x32.png",
    "logo-64x64": "logo-64x64.png",
    "logo-svg": "logo-svg.svg",
}
_LOGO_TYPES = {".png": "image/png", ".svg": "image/svg+xml"}


def _logo_dir() -> Path | None:
    """ipykernel's logos (found, not imported: importing ipykernel costs the service)."""
    spec = importlib.util.find_spec("ipykernel")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "resources"


PYTHON_LOGO_DIR = _logo_dir()


def _logos(kind: KernelKind) -> dict[str, Path]:
    """The kernel's logos by file name: ipykernel's for Python, its kernelspec's for
    another (none for a kernel the service found as a program)."""
    directory = PYTHON_LOGO_DIR if kind.is_python else kind.resource_dir
    if directory is None:
        return {}
    return {f: directory / f for f in _LOGOS.values() if (directory / f).is_file()}


def kernelspec(settings: Settings, kind: KernelKind) -> dict[str, Any]:
    """A kernel spec as Jupyter's API gives it: one of the service's kernels, in its
    sandbox (its argv shown by program name: the host's paths are not the client's)."""
    argv = (
        ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        if kind.is_python
        else [Path(arg).name if arg.startswith("/") else arg for arg in kind.argv]
    )
    logos = _logos(kind)
    return {
        "name": kind.name,
        "spec": {
            "argv": argv,
            "env": {},
            "display_name": f"{kind.display_name} (kernel-service)",
            "language": kind.language,
            "interrupt_mode": "message",  # the service's interrupt, whatever the kernel's
            "metadata": {
                "kernel_service": {
                    "version": __version__,
                    "default_timeout": settings.default_timeout,
                    "max_timeout": settings.max_timeout,
                }
            },
        },
        "resources": {
            name: f"/kernelspecs/{kind.name}/{file}"
            for name, file in _LOGOS.items()
            if file in logos
        },
    }


def _offered(registry: SessionRegistry) -> dict[str, KernelKind]:
    """The kernels Jupyter's clients are shown: those that can run here."""
    return {name: kind for name, kind in registry.catalog.kinds.items() if kind.ready}


def _offered_kind(registry: SessionRegistry, name: str) -> KernelKind:
    kind = _offered(registry).get(name)
    if kind is None:
        raise NoSuchKernelSpec(name, list(_offered(registry)))
    return kind


def _timestamp(moment: datetime) -> str:
    """Jupyter's form, which Jupyter Server's gateway client parses strictly: microseconds
    and a Z, always."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def kernel_model(session: Session, connections: Connections) -> dict[str, Any]:
    return {
        "id": session.session_id,
        "name": session.kind.name,
        "last_activity": _timestamp(session.last_activity),
        "execution_state": session.status,  # Jupyter's words too: starting, idle, busy, dead
        "connections": connections.count(session),
    }


def _connections(request: Request) -> Connections:
    connections: Connections = request.app.state.jupyter_connections
    return connections


router = APIRouter(tags=["jupyter"])


KernelId = Annotated[str, PathParam(description="The kernel's id: its session's id.")]


# ---------------------------------------------------------------- the shapes, for the schema


class JupyterErrorBody(BaseModel):
    """An error on Jupyter's paths: the service's body and Jupyter's fields."""

    reason: str = Field(description="The status's phrase, e.g. `Not Found`.")
    message: str = Field(description="What went wrong, and what to do.")
    detail: Any
    code: str


class KernelModel(BaseModel):
    id: str = Field(description="The kernel's id: its session's.")
    name: str = Field(description="Its kernel spec's name.")
    last_activity: str = Field(description="UTC, with microseconds: `%Y-%m-%dT%H:%M:%S.%fZ`.")
    execution_state: str = Field(description="`starting`, `idle`, `busy` or `dead`.")
    connections: int = Field(description="Its open WebSockets.")


class KernelSpecs(BaseModel):
    default: str
    kernelspecs: dict[str, dict[str, Any]]


class JupyterSessionModel(BaseModel):
    id: str
    path: str
    name: str
    type: str
    kernel: KernelModel
    notebook: dict[str, str]


class ApiVersion(BaseModel):
    version: str


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route can give (401 with API keys, 403 for another origin's
    page, 404, 422 for a path or query it cannot take), and `codes`."""
    return {code: {"model": JupyterErrorBody} for code in (401, 403, 404, 422, *codes)}


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """An optional JSON body, for the schema (the routes read it themselves: clients send
    none, or any content type)."""
    return {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": schema}},
        }
    }


_START_BODY = _body(
    {
        "type": "object",
        "properties": {
            "name": {
                "type": ["string", "null"],
                "description": "The kernel spec: `python3` (null or absent: the default), or "
                "another of GET /api/kernelspecs.",
            },
            "env": {"type": ["object", "null"], "description": "Accepted, not used."},
        },
    }
)
_SESSION_BODY = _body(
    {
        "type": "object",
        "properties": {
            "path": {"type": ["string", "null"], "maxLength": 4096},
            "name": {"type": ["string", "null"], "maxLength": 4096},
            "type": {"type": ["string", "null"], "maxLength": 4096},
            "kernel": {
                "type": ["object", "null"],
                "properties": {
                    "name": {"type": ["string", "null"]},
                    "id": {"type": ["string", "null"]},
                },
            },
        },
    }
)


def _json(value: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(value), status_code=status_code, media_type="application/json",
        headers=headers,
    )  # fmt: skip


@router.get("/api", response_model=ApiVersion, responses=_errors())
async def api_version() -> Response:
    """The version, as Jupyter Server answers (here the service's)."""
    return _json({"version": __version__})


@router.get("/api/kernelspecs", response_model=KernelSpecs, responses=_errors())
async def list_kernelspecs(settings: Config, registry: Registry) -> Response:
    specs = {name: kernelspec(settings, kind) for name, kind in _offered(registry).items()}
    return _json({"default": PYTHON, "kernelspecs": specs})


@router.get("/api/kernelspecs/{name}", response_model=dict[str, Any], responses=_errors())
async def get_kernelspec(name: str, settings: Config, registry: Registry) -> Response:
    return _json(kernelspec(settings, _offered_kind(registry, name)))


@router.get(
    "/kernelspecs/{name}/{resource}",
    response_class=Response,
    responses={
        200: {
            "content": {
                mime: {"schema": {"type": "string", "format": "binary"}}
                for mime in _LOGO_TYPES.values()
            },
            "description": "The logo.",
        },
        **_errors(),
    },
)
async def get_kernelspec_resource(name: str, resource: str, registry: Registry) -> Response:
    """A kernel spec's logo."""
    logos = _logos(_offered_kind(registry, name))
    path = logos.get(resource)
    if path is None:
        raise NoSuchKernelSpec(f"{name}/{resource}", [f"{name}/{f}" for f in logos])
    content = path.read_bytes()
    return Response(content, media_type=_LOGO_TYPES[path.suffix])


@router.get("/api/kernels", response_model=list[KernelModel], responses=_errors())
async def list_kernels(request: Request, registry: Registry, owner: Owner) -> Response:
    """The caller's kernels: every session of its API key."""
    connections = _connections(request)
    return _json([kernel_model(s, connections) for s in registry.sessions(owner)])


async def _kernel_name(request: Request) -> str | None:
    """The kernel name a start asks for: a JSON body `{"name": ...}` (Jupyter Server sends
    `env` too, which is not used: kernels get the sandbox's environment), or none at all
    (Open WebUI and smolagents send no body)."""
    body = await request.body()
    if not body.strip():
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidJupyterRequest(
            'the body is not JSON: send {"name": "python3"}, or no body at all'
        ) from None
    if not isinstance(value, dict):
        raise InvalidJupyterRequest('the body must be a JSON object such as {"name": "python3"}')
    name, env = value.get("name"), value.get("env")
    if not isinstance(env, dict | None):
        raise InvalidJupyterRequest("`env` must be an object of variables")
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise InvalidJupyterRequest('`name` must be a kernel spec\'s name, such as "python3"')
    return name


async def _new_session(registry: SessionRegistry, owner: str | None, name: str | None) -> Session:
    """A session on the kernel spec `name` (None: Python's), with a UUID for its id."""
    if name is not None:
        _offered_kind(registry, name)  # a kernel spec's name: Jupyter's 404 for another
    return await registry.create(registry.cell.new_uuid(), owner, language=name)


@router.post(
    "/api/kernels",
    status_code=status.HTTP_201_CREATED,
    response_model=KernelModel,
    responses=_errors(400, 413, 429, 503, 507),
    openapi_extra=_START_BODY,
)
async def start_kernel(request: Request, registry: Registry, owner: Owner) -> Response:
    """Start a kernel: a new session (its id a UUID, as Jupyter clients expect)."""
    session = await _new_session(registry, owner, await _kernel_name(request))
    model = kernel_model(session, _connections(request))
    return _json(model, 201, {"Location": f"/api/kernels/{session.session_id}"})


@router.get("/api/kernels/{kernel_id}", response_model=KernelModel, responses=_errors())
async def get_kernel(
    kernel_id: KernelId, request: Request, registry: Registry, owner: Owner
) -> Response:
    return _json(kernel_model(registry.get(kernel_id, owner), _connections(request)))


@router.delete(
    "/api/kernels/{kernel_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(),
)
async def delete_kernel(kernel_id: KernelId, registry: Registry, owner: Owner) -> Response:
    """End the kernel: its session is deleted, with its work directory."""
    await registry.close(kernel_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/api/kernels/{kernel_id}/interrupt",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(),
)
async def interrupt_kernel(kernel_id: KernelId, registry: Registry, owner: Owner) -> Response:
    registry.get(kernel_id, owner).interrupt()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/api/kernels/{kernel_id}/restart",
    response_model=KernelModel,
    responses=_errors(503),
)
async def restart_kernel(
    kernel_id: KernelId, request: Request, registry: Registry, owner: Owner
) -> Response:
    """A fresh kernel in the session (its variables are gone; its files stay)."""
    session = registry.get(kernel_id, owner)
    await session.restart()
    return _json(kernel_model(session, _connections(request)))


# ---------------------------------------------------------------- sessions


@dataclass
class _Notebook:
    path: str
    name: str
    type: str


def _notebooks(request: Request) -> dict[str, _Notebook]:
    notebooks: dict[str, _Notebook] = request.app.state.jupyter_notebooks
    return notebooks


def _session_model(session: Session, notebook: _Notebook, request: Request) -> dict[str, Any]:
    return {
        "id": session.session_id,
        "path": notebook.path,
        "name": notebook.name,
        "type": notebook.type,
        "kernel": kernel_model(session, _connections(request)),
        "notebook": {"path": notebook.path, "name": notebook.name},
    }


async def _session_body(request: Request) -> dict[str, Any]:
    try:
        value = orjson.loads(await request.body() or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidJupyterRequest("the body is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidJupyterRequest("the body must be a JSON object")
    return value


def _text(body: dict[str, Any], name: str, default: str) -> str:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > 4096:
        raise InvalidJupyterRequest(f"`{name}` must be a string of at most 4096 characters")
    return value


def _listed(registry: Any, owner: str | None, notebooks: dict[str, _Notebook]) -> list[Session]:
    """The caller's sessions that have a Jupyter session (a notebook path)."""
    return [s for s in registry.sessions(owner) if s.key in notebooks]


@router.get("/api/sessions", response_model=list[JupyterSessionModel], responses=_errors())
async def list_jupyter_sessions(request: Request, registry: Registry, owner: Owner) -> Response:
    """Jupyter sessions: the caller's kernels started through POST /api/sessions, each
    with the notebook path it was given. Kept in memory: a restart of the service keeps
    the kernels (GET /api/kernels), not their paths."""
    notebooks = _notebooks(request)
    return _json(
        [_session_model(s, notebooks[s.key], request) for s in _listed(registry, owner, notebooks)]
    )


@router.post(
    "/api/sessions",
    status_code=status.HTTP_201_CREATED,
    response_model=JupyterSessionModel,
    responses=_errors(400, 413, 429, 503, 507),
    openapi_extra=_SESSION_BODY,
)
async def create_jupyter_session(request: Request, registry: Registry, owner: Owner) -> Response:
    """A Jupyter session: a notebook path bound to a kernel, a new one unless `kernel.id`
    names one of the caller's. Its id is its kernel's."""
    body = await _session_body(request)
    path = _text(body, "path", "")
    notebook = _Notebook(path=path, name=_text(body, "name", ""), type=_text(body, "type", ""))
    kernel = body.get("kernel")
    kernel = {} if kernel is None else kernel
    if not isinstance(kernel, dict):
        raise InvalidJupyterRequest(
            '`kernel` must be an object: {"name": "python3"} or {"id": ...}'
        )
    kernel_id, name = kernel.get("id"), kernel.get("name")
    if not isinstance(kernel_id, str | None) or not isinstance(name, str | None):
        raise InvalidJupyterRequest("`kernel.id` and `kernel.name` must be strings")
    if kernel_id is not None:
        session = registry.get(kernel_id, owner)
    else:
        session = await _new_session(registry, owner, name or None)
    notebooks = _notebooks(request)
    for key in [k for k in notebooks if not registry.holds(k)]:  # their kernels ended
        del notebooks[key]
    notebooks[session.key] = notebook
    model = _session_model(session, notebook, request)
    return _json(model, 201, {"Location": f"/api/sessions/{session.session_id}"})


def _jupyter_session(
    request: Request, registry: Any, owner: str | None, session_id: str
) -> Session:
    session = registry.get(session_id, owner)
    if session.key not in _notebooks(request):
        raise NoJupyterSession(session_id)
    assert isinstance(session, Session)
    return session


@router.get("/api/sessions/{session_id}", response_model=JupyterSessionModel, responses=_errors())
async def get_jupyter_session(
    session_id: str, request: Request, registry: Registry, owner: Owner
) -> Response:
    session = _jupyter_session(request, registry, owner, session_id)
    return _json(_session_model(session, _notebooks(request)[session.key], request))


@router.patch(
    "/api/sessions/{session_id}",
    response_model=JupyterSessionModel,
    responses=_errors(400, 413),
    openapi_extra=_SESSION_BODY,
)
async def rename_jupyter_session(
    session_id: str, request: Request, registry: Registry, owner: Owner
) -> Response:
    """A new path, name or type (a notebook renamed); its kernel stays (`kernel` is not
    read)."""
    session = _jupyter_session(request, registry, owner, session_id)
    body = await _session_body(request)
    notebook = _notebooks(request)[session.key]
    notebook.path = _text(body, "path", notebook.path)
    notebook.name = _text(body, "name", notebook.name)
    notebook.type = _text(body, "type", notebook.type)
    return _json(_session_model(session, notebook, request))


@router.delete(
    "/api/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(),
)
async def delete_jupyter_session(
    session_id: str, request: Request, registry: Registry, owner: Owner
) -> Response:
    """End the Jupyter session and its kernel."""
    session = _jupyter_session(request, registry, owner, session_id)
    await registry.close(session.session_id, owner)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
