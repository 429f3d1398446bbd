"""The cluster's commands: `kernel-service proxy-config` prints HAProxy's configuration for N
cells at given addresses (a Kubernetes ConfigMap's content); `kernel-service cluster` runs N
cells behind HAProxy on this machine."""

import argparse
import sys
from pathlib import Path
from typing import Any

from kernel_service.cluster.haproxy import DEFAULT_BODY_BUFFER, MAX_CELLS, Cell, Front, render
from kernel_service.config import Settings

COMMANDS = ("proxy-config", "cluster")
# The cells' settings the cluster takes as flags (and passes to each cell's `serve`).
_CELL_FLAGS = ("max_sessions", "session_ttl", "default_timeout", "max_timeout", "log_level")


def _cell_count(text: str) -> int:
    count = int(text)
    if not 1 <= count <= MAX_CELLS:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_CELLS}, got {count}")
    return count


def add_commands(commands: Any, tuning: argparse.ArgumentParser) -> None:
    """Both commands on the CLI's subparsers; `tuning`: the cells' flags serve has too."""
    config = commands.add_parser(
        "proxy-config",
        help="print HAProxy's configuration for a cluster's front (docs/scaling.md)",
        description="Print haproxy.cfg for N cells (indexes 0..N-1) at the addresses "
        "--cell-address gives.",
    )
    config.add_argument("--cells", type=_cell_count, required=True, help="how many cells")
    config.add_argument(
        "--cell-address",
        required=True,
        help="each cell's host:port, {index} (and {tag}) replaced, e.g. "
        "'kernel-service-{index}.kernel-service:8000'",
    )
    config.add_argument(
        "--listen", default="127.0.0.1:8000", help="the front's host:port (default 127.0.0.1:8000)"
    )
    config.add_argument(
        "--status-address",
        help="host:port of a status endpoint for the front's GET /healthz (default: a cell's)",
    )
    config.add_argument(
        "--body-buffer",
        type=int,
        default=DEFAULT_BODY_BUFFER,
        help="bytes of a request body read to find its session (default 64 KiB)",
    )
    config.add_argument(
        "--server-timeout",
        type=float,
        default=3600.0,
        help="seconds an answer may take (default 3600; keep it above 2 x the cells' max timeout)",
    )
    config.add_argument(
        "--tunnel-timeout",
        type=float,
        default=3600.0,
        help="seconds a WebSocket may stay silent (default 3600)",
    )
    cluster = commands.add_parser(
        "cluster",
        parents=[tuning],
        help="run N cells behind HAProxy on this machine, in the foreground",
    )
    cluster.add_argument("--cells", type=_cell_count, default=2, help="how many cells (2)")
    # not KERNEL_SERVICE_HOST and _PORT: those of the front, not of the cells
    cluster.add_argument(
        "--host", dest="front_host", default="127.0.0.1", help="the front's address (127.0.0.1)"
    )
    cluster.add_argument(
        "--port", dest="front_port", type=int, default=8000, help="the front's port (8000)"
    )
    cluster.add_argument(
        "--dir",
        type=Path,
        help="where the cells' directories go: a new or empty directory, or one a cluster "
        "made (default: a temporary one, removed at the end)",
    )
    cluster.add_argument(
        "--keep-kernels",
        action="store_true",
        default=None,
        help="on SIGTERM, cells leave their sessions for the next start on --dir",
    )


def print_proxy_config(args: argparse.Namespace) -> int:
    try:
        cells = tuple(
            Cell(index, args.cell_address.format(index=index, tag=f"{index:04x}"))
            for index in range(args.cells)
        )
    except (KeyError, IndexError, ValueError) as exc:
        print(
            f"kernel-service proxy-config: --cell-address {args.cell_address!r} is not a "
            f"template with {{index}} or {{tag}}: {exc!r}",
            file=sys.stderr,
        )
        return 2
    try:
        front = Front(
            listen=args.listen,
            cells=cells,
            status=args.status_address,
            body_buffer=args.body_buffer,
            server_timeout=args.server_timeout,
            tunnel_timeout=args.tunnel_timeout,
        )
    except ValueError as exc:
        print(f"kernel-service proxy-config: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(front))
    return 0


def cluster_settings(args: argparse.Namespace) -> Settings:
    """The cells' settings (raises pydantic's ValidationError)."""
    given = {
        key: getattr(args, key)
        for key in (*_CELL_FLAGS, "keep_kernels")
        if getattr(args, key) is not None
    }
    return Settings(**given)


def serve_flags(args: argparse.Namespace) -> tuple[str, ...]:
    """The flags each cell's `serve` gets from the cluster's command line."""
    flags: list[str] = []
    for key in _CELL_FLAGS:
        value = getattr(args, key)
        if value is not None:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    flags += ["--keep-kernels"] if args.keep_kernels else []
    return tuple(flags)
