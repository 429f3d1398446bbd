"""How kernels are made, whatever the launcher: the options from Settings, and the
arguments and environment every kernel gets."""

import json
from dataclasses import dataclass
from pathlib import Path

STARTUP_FILE = Path(__file__).parent / "programs" / "startup.py"


@dataclass(frozen=True)
class KernelOptions:
    """How kernels are made; built once from Settings."""

    connection_dir: Path
    matplotlib_dir: Path
    start_timeout: float
    preload_modules: tuple[str, ...]
    # Largest message read from a kernel; a larger one is refused unread (see wire.py).
    max_message_bytes: int


def kernel_args(options: KernelOptions) -> list[str]:
    # Run from its file in a namespace of its own: the kernel may not see our package (in a
    # sandbox only this file is mounted) and user code should not see the startup's names.
    startup = (
        f"exec(compile(open({str(STARTUP_FILE)!r}).read(), {str(STARTUP_FILE)!r}, 'exec'), "
        f"{{'__name__': '__kernel_service_startup__', "
        f"'PRELOAD': {list(options.preload_modules)!r}}})"
    )
    return [
        f"--IPKernelApp.exec_lines={json.dumps([startup])}",
        "--HistoryManager.enabled=False",
        "--InteractiveShell.colors=nocolor",
        "--IPKernelApp.log_level=WARN",
    ]


def kernel_env(options: KernelOptions) -> dict[str, str]:
    """What the kernel needs, whatever the launcher; nothing of the service's own (keys)."""
    return {
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TERM": "dumb",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "MPLCONFIGDIR": str(options.matplotlib_dir),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
