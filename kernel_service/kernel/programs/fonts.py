"""Builds matplotlib's font cache once for all kernels, and rebuilds it when fonts change.

A kernel that starts with an empty cache spends seconds scanning fonts, and a cache made
before a CJK font was installed hides that font for good. Run as a module in a subprocess
(`python -m kernel_service.kernel.programs.fonts`) with MPLCONFIGDIR set; the service does it at
start.
"""

import asyncio
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


async def prepare_font_cache(matplotlib_dir: Path) -> None:
    """Make sure MPLCONFIGDIR holds a font cache that knows every installed font."""
    matplotlib_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, at start)
    env = {**os.environ, "MPLCONFIGDIR": str(matplotlib_dir), "MPLBACKEND": "agg"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kernel_service.kernel.programs.fonts",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        log.warning("matplotlib font cache not prepared: %s", output.decode(errors="replace"))
    else:
        log.info("matplotlib font cache: %s", output.decode(errors="replace").strip())


def _refresh_cache() -> str:
    from matplotlib import font_manager

    known = {font.fname for font in font_manager.fontManager.ttflist}
    installed = set(font_manager.findSystemFonts())
    if installed <= known:
        return f"up to date ({len(known)} fonts) in {os.environ.get('MPLCONFIGDIR')}"
    import matplotlib

    fresh = font_manager.FontManager()
    cache = (
        Path(matplotlib.get_cachedir()) / f"fontlist-v{font_manager.FontManager.__version__}.json"
    )
    font_manager.json_dump(fresh, str(cache))
    return f"rebuilt ({len(fresh.ttflist)} fonts) in {cache}"


if __name__ == "__main__":
    print(_refresh_cache())
