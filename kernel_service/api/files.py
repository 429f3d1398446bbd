"""The files of a session's work directory over HTTP: upload, download, list, remove.

The work directory is the code's current directory (`/workspace` in the sandbox): a file
uploaded as `data.csv` is `open('data.csv')` to the code, and what the code writes there
is downloadable. Paths are checked and walked without following a link (see
`kernel_service.workdir.paths`); disk work is done in threads, off the event loop.
"""

import asyncio
import contextlib
import logging
import mimetypes
import os
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from kernel_service.api.errors import InvalidUpload
from kernel_service.api.routes import Config, Owner, Registry, SessionId, _errors
from kernel_service.config import MIB
from kernel_service.errors import FileTooLarge
from kernel_service.workdir.listing import file_ref, list_files
from kernel_service.workdir.paths import split_path
from kernel_service.workdir.reading import open_file, read_whole
from kernel_service.workdir.removal import remove
from kernel_service.workdir.uploads import Upload, room_for_upload
from kernel_service_client.models import FileList, FileRef

log = logging.getLogger(__name__)
router = APIRouter()

FilePath = Annotated[
    str,
    Path(
        description="The file's path in the session's work directory, e.g. `data.csv` or "
        "`results/out.csv` (no `..`, no leading `/`, no symbolic links on the way)."
    ),
]
# Room for a multipart body's boundaries and part headers around the file.
MULTIPART_OVERHEAD = 64 * 1024
# Read at a time when a file is downloaded.
DOWNLOAD_CHUNK = 1024 * 1024
# A file up to this size is read whole before it is sent, so the download is the file as
# it was at one moment even while the code changes it; a larger one is streamed. Files read
# whole and not yet sent hold at most DOWNLOAD_WHOLE_TOTAL bytes: past it, they stream too.
DOWNLOAD_WHOLE = 8 * MIB
DOWNLOAD_WHOLE_TOTAL = 64 * MIB
MAX_LISTED = 10_000
_UPLOAD_PATH = re.compile(r"^/sessions/[^/]+/files/")
_BINARY = {"type": "string", "format": "binary"}
_UPLOAD_BODY: dict[str, Any] = {
    "required": True,
    "description": "The file's bytes as the body, or a multipart/form-data form with one "
    "file field.",
    "content": {
        "application/octet-stream": {"schema": _BINARY},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": _BINARY},
                "required": ["file"],
            }
        },
    },
}


def is_upload(scope: Scope) -> bool:
    """A request whose body is a file (limited by KERNEL_SERVICE_MAX_FILE_MB here, not by
    the body limit of the other routes)."""
    return scope.get("method") == "PUT" and bool(_UPLOAD_PATH.match(scope.get("path", "")))


@router.put(
    "/sessions/{session_id}/files/{file_path:path}",
    status_code=status.HTTP_201_CREATED,
    response_model=FileRef,
    responses={
        200: {"model": FileRef, "description": "An existing file was replaced."},
        **_errors(400, 404, 409, 413, 422, 507),
    },
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def put_file(
    *,
    session_id: SessionId,
    file_path: FilePath,
    request: Request,
    registry: Registry,
    settings: Config,
    owner: Owner,
) -> Response:
    """Write a file into the session's work directory (missing directories are made): 201
    when it is new, 200 when it replaced one. The code sees it at once."""
    session = registry.get(session_id, owner)
    split_path(file_path)  # refused before the body is read
    max_bytes = settings.max_file_mb * MIB
    media_type, options = parse_options_header(request.headers.get("content-type"))
    multipart = media_type == b"multipart/form-data"
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + (MULTIPART_OVERHEAD if multipart else 0):
        raise FileTooLarge(max_bytes)
    room = await asyncio.to_thread(
        room_for_upload, session.work_dir, settings.session_files_mb * MIB
    )
    upload = Upload(session.work_dir, file_path, max_bytes, room)
    with session.files.writing():  # not one of the next execution's changes
        try:
            await upload.open()
            if multipart:
                await _receive_form(request, options.get(b"boundary"), upload)
            else:
                async for chunk in request.stream():
                    await upload.write(chunk)
            stored = await upload.commit()
        except ClientDisconnect:
            await upload.abort()
            return Response(status_code=499)  # nobody reads it
        except BaseException:
            await upload.abort()
            raise
    return Response(
        file_ref(session_id, stored).model_dump_json(),
        status_code=status.HTTP_200_OK if upload.replaces else status.HTTP_201_CREATED,
        media_type="application/json",
    )


async def _receive_form(request: Request, boundary: bytes | None, upload: Upload) -> None:
    """The one part of a multipart/form-data body, written to `upload` as it arrives."""
    if not boundary:
        raise InvalidUpload("a multipart/form-data body needs a boundary in its Content-Type")
    parts = 0
    ended = False
    received: list[bytes] = []  # the file's bytes in the chunk just parsed

    def on_part_begin() -> None:
        nonlocal parts
        parts += 1
        if parts > 1:
            raise InvalidUpload("the form has more than one field: send one file field")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        received.append(data[start:end])

    def on_end() -> None:
        nonlocal ended
        ended = True

    try:
        parser = MultipartParser(
            boundary,
            {"on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_end": on_end},
        )
        async for chunk in request.stream():
            parser.write(chunk)
            for data in received:
                await upload.write(data)
            received.clear()
        parser.finalize()
    except (MultipartParseError, ValueError) as exc:
        raise InvalidUpload(f"the multipart/form-data body is malformed ({exc})") from None
    if not ended or parts != 1:
        raise InvalidUpload("the form has no file field, or ends before its closing boundary")


@router.get(
    "/sessions/{session_id}/files/{file_path:path}",
    response_class=Response,
    responses={
        200: {
            "content": {"*/*": {"schema": _BINARY}},
            "description": "The file's bytes, as an attachment; its type guessed from its name.",
        },
        **_errors(400, 404, 409, 422),
    },
)
async def get_file(
    session_id: SessionId, file_path: FilePath, registry: Registry, owner: Owner
) -> Response:
    """Download a file of the session's work directory."""
    session = registry.get(session_id, owner)
    fd, found = open_file(session.work_dir, file_path)
    name = file_path.rsplit("/", 1)[-1]
    headers = {
        "Content-Type": mimetypes.guess_type(name)[0] or "application/octet-stream",
        "Content-Disposition": _attachment(name),
        # a file written by user code: never let a browser run it on our origin
        "Content-Security-Policy": "sandbox",
        "X-Content-Type-Options": "nosniff",
    }
    if found.st_size <= DOWNLOAD_WHOLE and _held.take(found.st_size):
        try:
            data = await asyncio.to_thread(read_whole, fd, file_path, found)
        except BaseException:
            _held.give_back(found.st_size)
            raise
        finally:
            os.close(fd)
        return _Whole(data, headers)
    # read from the one descriptor: a file the code replaces or removes meanwhile is sent
    # whole as it was; one it cuts short in place ends the download early (see _Stream)
    file = os.fdopen(fd, "rb", buffering=0)  # closed when read, or when dropped unread
    headers["Content-Length"] = str(found.st_size)
    return _Stream(_read(file, file_path, found.st_size), headers=headers)


class _Held:
    """Bytes of downloads read whole and not yet sent (on the event loop: no lock)."""

    def __init__(self) -> None:
        self.bytes = 0

    def take(self, size: int) -> bool:
        if self.bytes + size > DOWNLOAD_WHOLE_TOTAL:
            return False
        self.bytes += size
        return True

    def give_back(self, size: int) -> None:
        self.bytes -= size


_held = _Held()


class _Whole(Response):
    """A file read whole: its bytes are given back to `_held` once sent (or not sent)."""

    def __init__(self, data: bytes, headers: dict[str, str]) -> None:
        super().__init__(data, headers=headers)
        self._size = len(data)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            _held.give_back(self._size)
            self.body = b""


class _CutShort(Exception):
    """The file ended before the bytes its Content-Length promised."""


class _Stream(StreamingResponse):
    """A streamed file; cut short by the code while it is sent, it ends with fewer bytes
    than its Content-Length said and the server closes the connection: the one way HTTP/1.1
    has to tell the client that the body is incomplete (not a service fault to log as one)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        with contextlib.suppress(_CutShort):
            await super().__call__(scope, receive, send)


async def _read(file: Any, path: str, size: int) -> AsyncIterator[bytes]:
    """`size` bytes of `file`, read off the event loop; _CutShort if it has fewer now."""
    try:
        left = size
        while left > 0:
            chunk: bytes = await asyncio.to_thread(file.read, min(left, DOWNLOAD_CHUNK))
            if not chunk:
                log.info(
                    "download of %r ended early, after %d of %d bytes: the code cut the file "
                    "while it was sent",
                    path,
                    size - left,
                    size,
                )
                raise _CutShort
            left -= len(chunk)
            yield chunk
    finally:
        file.close()


def _attachment(name: str) -> str:
    plain = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{quote(name, safe='')}"


@router.get("/sessions/{session_id}/files", response_model=FileList, responses=_errors(404, 422))
async def get_files(
    session_id: SessionId,
    registry: Registry,
    owner: Owner,
    limit: Annotated[
        int, Query(ge=1, le=MAX_LISTED, description="At most this many files.")
    ] = 1000,
    hidden: Annotated[
        bool,
        Query(
            description="Include hidden files and directories (names starting with `.`), "
            "such as `.outputs`."
        ),
    ] = False,
) -> Response:
    """The regular files of the session's work directory, in all its directories, in path
    order (symbolic links are not followed; `truncated` says when there are more)."""
    session = registry.get(session_id, owner)
    found, truncated = await asyncio.to_thread(list_files, session.work_dir, limit, hidden)
    listing = FileList(
        session_id=session_id,
        files=[file_ref(session_id, f) for f in found],
        limit=limit,
        truncated=truncated,
    )
    return Response(listing.model_dump_json(), media_type="application/json")


@router.delete(
    "/sessions/{session_id}/files/{file_path:path}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=_errors(400, 404, 409, 422),
)
async def delete_file(
    session_id: SessionId, file_path: FilePath, registry: Registry, owner: Owner
) -> Response:
    """Remove a file, or a directory with everything in it (a symbolic link is removed
    itself, never what it points to)."""
    session = registry.get(session_id, owner)
    with session.files.writing():
        await asyncio.to_thread(remove, session.work_dir, file_path)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
