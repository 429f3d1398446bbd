"""A session's history: its executions as JSON, and the session as a Jupyter notebook."""

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query, Response

from kernel_service.api.routes import Owner, Registry, SessionId, _errors
from kernel_service.store.history import notebook, session_history
from kernel_service_client.models import SessionHistory

router = APIRouter()

NOTEBOOK_MEDIA_TYPE = "application/x-ipynb+json"
_MAX_SEQ = 2**63 - 1  # SQLite's largest integer


@router.get(
    "/sessions/{session_id}/history",
    response_model=SessionHistory,
    responses=_errors(404, 422),
)
async def get_history(
    session_id: SessionId,
    registry: Registry,
    owner: Owner,
    since: Annotated[
        int,
        Query(
            ge=0,
            le=_MAX_SEQ,
            description="Only executions numbered after this one (`seq`): poll with the last "
            "`seq` you have seen whose status is not `running`.",
        ),
    ] = 0,
    limit: Annotated[
        int | None,
        Query(ge=1, le=_MAX_SEQ, description="At most this many executions, oldest first."),
    ] = None,
) -> Response:
    """Every execution of the session, oldest first: code, status, timing and outputs.

    Outputs are as stored, images base64 in them: a long session's history can be
    megabytes (`since` and `limit` keep polls small)."""
    records = await registry.get(session_id, owner).history(since, limit)
    # Parsed and serialised off the event loop: results can carry megabytes of images.
    body = await asyncio.to_thread(lambda: session_history(session_id, records).model_dump_json())
    return Response(body, media_type="application/json")


@router.get(
    "/sessions/{session_id}/notebook",
    response_class=Response,
    responses={
        200: {
            "content": {NOTEBOOK_MEDIA_TYPE: {"schema": {"type": "object"}}},
            "description": "The session as a Jupyter notebook (nbformat 4): one code cell per "
            "execution, with its outputs and execution count.",
        },
        **_errors(404, 422),
    },
)
async def get_notebook(session_id: SessionId, registry: Registry, owner: Owner) -> Response:
    """The session's executions as a notebook to open (and re-run) in Jupyter."""
    session = registry.get(session_id, owner)
    records = await session.history()
    body = await asyncio.to_thread(notebook, session_id, records, session.notebook_metadata())
    return Response(
        body,
        media_type=NOTEBOOK_MEDIA_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{session_id}.ipynb"'},
    )
