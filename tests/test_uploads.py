"""An upload into a work directory without a server: written off the event loop in batches,
put in place whole, and leaving nothing behind when refused, aborted or cancelled."""

import asyncio
import os
from pathlib import Path

import pytest

from kernel_service.errors import FileTooLarge, IsADirectory, WorkspaceFull
from kernel_service.workdir.uploads import WRITE_BATCH, Upload

MAX = 4 * WRITE_BATCH


def _everything(work_dir: Path) -> list[str]:
    """Every name below `work_dir`, hidden ones included."""
    return sorted(
        str(Path(top, name).relative_to(work_dir))
        for top, dirs, files in os.walk(work_dir)
        for name in [*dirs, *files]
    )


async def _upload(work_dir: Path, path: str, chunks: list[bytes], room: int | None = None) -> bool:
    """Upload `chunks` to `path`; whether it replaced a file."""
    upload = Upload(work_dir, path, MAX, room)
    try:
        await upload.open()
        for chunk in chunks:
            await upload.write(chunk)
        await upload.commit()
    except BaseException:
        await upload.abort()
        raise
    return upload.replaces


def test_chunks_are_put_in_place_whole(tmp_path: Path) -> None:
    chunks = [bytes([i]) * (WRITE_BATCH // 3) for i in range(7)]  # past two batches
    assert not asyncio.run(_upload(tmp_path, "a/b/data.bin", chunks))
    assert (tmp_path / "a/b/data.bin").read_bytes() == b"".join(chunks)
    assert asyncio.run(_upload(tmp_path, "a/b/data.bin", [b"new"]))
    assert (tmp_path / "a/b/data.bin").read_bytes() == b"new"
    assert _everything(tmp_path) == ["a", "a/b", "a/b/data.bin"]


@pytest.mark.parametrize(
    ("room", "refusal"), [(None, FileTooLarge), (WRITE_BATCH, WorkspaceFull)], ids=["max", "room"]
)
def test_a_file_past_its_bounds_is_refused_and_nothing_is_left(
    tmp_path: Path, room: int | None, refusal: type[Exception]
) -> None:
    chunks = [b"x" * WRITE_BATCH] * 5
    with pytest.raises(refusal):
        asyncio.run(_upload(tmp_path, "new/dir/big.bin", chunks, room))
    assert _everything(tmp_path) == []


def test_a_directory_is_not_written_over(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectory):
        asyncio.run(_upload(tmp_path, "d", [b"x"]))
    assert _everything(tmp_path) == ["d"]


def test_an_abort_undoes_an_open_whether_it_ran_or_was_cancelled(tmp_path: Path) -> None:
    """Cancelled before its thread ran, or run to its end, the open is undone by the abort
    that follows (which waits for a step still running in its thread)."""

    async def scenario(cancelled: bool) -> None:
        upload = Upload(tmp_path, "x/y/z/file.bin", MAX, None)
        opening = asyncio.create_task(upload.open())
        if cancelled:
            opening.cancel()
        await asyncio.wait([opening])
        assert opening.cancelled() == cancelled
        await upload.abort()

    for cancelled in (True, False):
        asyncio.run(scenario(cancelled))
        assert _everything(tmp_path) == []
