"""The `kernel-service` command: parse flags over KERNEL_SERVICE_* settings, then run the HTTP
service (`serve`, under uvicorn: see api/server.py) or the MCP server over stdio (`mcp`)."""

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from kernel_service import __version__
from kernel_service.cluster.commands import COMMANDS as CLUSTER_COMMANDS
from kernel_service.cluster.commands import add_commands as add_cluster_commands
from kernel_service.config import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernel-service",
        description="Persistent IPython kernels behind HTTP. Flags override KERNEL_SERVICE_* "
        "environment variables.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True)
    tuning = argparse.ArgumentParser(add_help=False)  # how kernels run, for every command
    tuning.add_argument("--max-sessions", type=int, help="live sessions at most")
    tuning.add_argument("--session-ttl", type=float, help="idle seconds before culling (0: never)")
    tuning.add_argument("--default-timeout", type=float, help="execution timeout in seconds")
    tuning.add_argument("--max-timeout", type=float, help="cap on a caller's timeout")
    tuning.add_argument("--log-level", help="debug, info, warning, error")
    shared = argparse.ArgumentParser(add_help=False, parents=[tuning])  # and where (one service)
    shared.add_argument("--connection-dir", type=Path, help="where connection files go")
    shared.add_argument("--work-dir", type=Path, help="parent of the sessions' work dirs")
    shared.add_argument("--state-dir", type=Path, help="where the session registry is kept")
    serve = commands.add_parser("serve", parents=[shared], help="run the HTTP service")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000; 0 picks a free one)")
    serve.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="allow a non-loopback --host without an API key",
    )
    serve.add_argument(
        "--cell", type=int, help="this service's index as a cell of a cluster (0-65535)"
    )
    serve.add_argument(
        "--keep-kernels",
        action="store_true",
        default=None,
        help="on SIGTERM, leave sessions and kernels running for the next start (an upgrade)",
    )
    commands.add_parser(
        "mcp",
        parents=[shared],
        help="run the MCP server over stdin and stdout (for desktop clients); logs go to stderr",
    )
    drain = commands.add_parser(
        "drain",
        help="tell a running service to make no new sessions, and wait until none of its "
        "executions runs (a Kubernetes preStop hook)",
    )
    drain.add_argument("--url", default="http://127.0.0.1:8000", help="the service's address")
    drain.add_argument(
        "--api-key", help="one of its keys (default: KERNEL_SERVICE_API_KEY's first)"
    )
    drain.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait for executions to end (0: none)"
    )
    add_cluster_commands(commands, tuning)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "drain":
        from kernel_service.drain import drain

        sys.exit(drain(args.url, args.api_key or _first_key(), args.wait))
    if args.command in CLUSTER_COMMANDS:
        _cluster_command(args)
    overrides: dict[str, Any] = {
        key: value for key, value in vars(args).items() if key != "command" and value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        _refuse(_bad_settings(exc, flags=set(vars(args)) - {"command"}))
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kernel_service.kernel.kernelspecs import KernelChoiceError
    from kernel_service.kernel.sandbox import SandboxUnavailable
    from kernel_service.kernel.uids import UidRangeInUse
    from kernel_service.store.locks import DirectoryInUse
    from kernel_service.workdir.workspaces import ForeignWorkRoot

    # What is known to stop a start is said in one line; anything else is a bug: traceback.
    try:
        if args.command == "mcp":
            _serve_mcp(settings)
        else:
            _serve_http(settings)
    except SandboxUnavailable as exc:
        _refuse(f"the sandbox is not available: {exc}")
    except (DirectoryInUse, UidRangeInUse, _PortInUse, ForeignWorkRoot, KernelChoiceError) as exc:
        _refuse(str(exc))


def _cluster_command(args: argparse.Namespace) -> NoReturn:
    from kernel_service.cluster import commands

    if args.command == "proxy-config":
        sys.exit(commands.print_proxy_config(args))
    try:
        settings = commands.cluster_settings(args)
    except ValidationError as exc:
        _refuse(_bad_settings(exc, flags=set(vars(args)) - {"command"}))
    if not settings.api_keys() and not _is_loopback(args.front_host):
        # the cells listen on loopback; without keys each takes only requests named for
        # this machine (its Host check), so a front elsewhere could not reach them
        _refuse(
            f"the cluster would listen on {args.front_host} without an API key: set "
            "KERNEL_SERVICE_API_KEY (a cluster's front on another address always needs keys)"
        )
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="cluster | %(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from kernel_service.cluster.local import ClusterOptions, ClusterRefused, run_cluster

    options = ClusterOptions(
        cells=args.cells,
        host=args.front_host,
        port=args.front_port,
        directory=args.dir,
        serve_flags=commands.serve_flags(args),
        settings=settings,
    )
    try:
        sys.exit(run_cluster(options))
    except ClusterRefused as exc:
        _refuse(str(exc))


def _first_key() -> str | None:
    keys = os.environ.get("KERNEL_SERVICE_API_KEY", "")
    return next((key.strip() for key in keys.split(",") if key.strip()), None)


class _PortInUse(Exception):
    pass


def _refuse(reason: str) -> NoReturn:
    sys.exit(f"kernel-service: refusing to start: {reason}")


def _bad_settings(exc: ValidationError, flags: set[str]) -> str:
    """One line naming each setting that is wrong (never echoing an API key)."""
    problems = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:  # a rule over several settings: the message names them
            problems.append(message)
            continue
        name = str(error["loc"][0])
        flag = f" (--{name.replace('_', '-')})" if name in flags else ""
        got = "" if "key" in name else f", got {error['input']!r}"
        problems.append(f"KERNEL_SERVICE_{name.upper()}{flag}: {message}{got}")
    return "bad setting: " + "; ".join(problems)


def _serve_http(settings: Settings) -> None:
    from kernel_service.api import create_app
    from kernel_service.api.server import serve

    if not settings.api_keys() and not settings.insecure and not _is_loopback(settings.host):
        sys.exit(
            f"kernel-service: refusing to listen on {settings.host} without an API key: set "
            "KERNEL_SERVICE_API_KEY, or pass --insecure if something else guards the service"
        )
    if settings.port != 0:
        _check_port(settings.host, settings.port)
    app = create_app(settings)
    app.state.runtime.claim()
    if not serve(app, settings):
        sys.exit("kernel-service: the HTTP server did not start (see the log above)")


def _serve_mcp(settings: Settings) -> None:
    from kernel_service.api.mcp import serve_stdio
    from kernel_service.runtime import Runtime

    private = None
    if not {"state_dir", "connection_dir", "work_dir"} & settings.model_fields_set:
        # Its sessions end with the client: a directory of its own, so that any number of
        # clients can each run one (a service's directories are its alone).
        private = Path(tempfile.mkdtemp(prefix="kernel-service-mcp-"))
        settings = settings.model_copy(
            update={
                "state_dir": private / "state",
                "connection_dir": private / "connection",
                "work_dir": private / "work",
            }
        )
    try:
        runtime = Runtime(settings)
        runtime.claim()
    except BaseException:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        raise
    signalled = False

    def stopped() -> None:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
        if signalled:
            # The SDK reads stdin in a thread that a signal cannot cancel: it would hold the
            # process until stdin closes. Every kernel and work dir is gone by now.
            logging.shutdown()
            os._exit(0)

    async def until_signalled() -> None:
        # SIGTERM and SIGINT unwind the server, so every kernel and work dir is cleaned up
        main = asyncio.current_task()
        assert main is not None

        def stop() -> None:
            nonlocal signalled
            signalled = True
            main.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, stop)
        await serve_stdio(runtime, on_stopped=stopped)

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(until_signalled())
    finally:
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)


def _check_port(host: str, port: int) -> None:
    """Raises _PortInUse if the port cannot be listened on now (the server binds it only
    once kernels are carried on: a refusal then would come late and long)."""
    from kernel_service.cluster.local import listen_refusal

    refusal = listen_refusal(host, port)
    if refusal is not None:
        raise _PortInUse(refusal)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
