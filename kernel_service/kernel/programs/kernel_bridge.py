"""The bridge: a kernel that speaks only TCP (Deno, IRkernel), reached over ipc sockets.

Run in the kernel's place, inside its sandbox, as

    python -I kernel_bridge.py IPC_CONNECTION_FILE signal|message -- KERNEL_ARGV...

where `{connection_file}` in KERNEL_ARGV stands for the TCP connection file written here.
It binds the sockets the service's ipc connection file names (`{ip}-{port}` for each
channel), writes a TCP connection file on 127.0.0.1 with the same key, starts the kernel
as its child, relays every message of every channel both ways unchanged (routing
identities included), and exits with the kernel's status (128 + N when signal N ended it)
as soon as the kernel ends. With `signal`, it answers `interrupt_request` on control
itself, for kernels that handle SIGINT but not that message: SIGINT to the kernel's
process group and a signed `interrupt_reply`.

It runs as a file (only it is mounted in the sandbox): the standard library and pyzmq,
nothing of this package. Messages are signed with hmac by hand: jupyter_client's
`Session` would double the bridge's memory (15 MiB → 34 MiB) for one reply.

One thread polls every socket, the kernel's pidfd and a signal wakeup fd: nothing is
shared, no lock is needed, and the kernel's end is seen the moment it happens. Memory is
bounded by high-water marks (a full queue drops, as PUB and ROUTER do) and a frame size
limit; the bridge parses nothing but the control channel's requests, and a message it
cannot read there is passed on for the kernel to refuse.
"""

import contextlib
import ctypes
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections import OrderedDict, deque
from datetime import UTC, datetime
from typing import Any

import zmq

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# The sockets the service (and any Jupyter client) connects to, and the bridge's ends of the
# kernel's: ROUTER ↔ DEALER keeps the routing identities as frames, so replies find their way
# back; XPUB ↔ XSUB relays iopub.
_SERVICE_SIDE = {"shell": zmq.ROUTER, "iopub": zmq.XPUB, "stdin": zmq.ROUTER,
                 "control": zmq.ROUTER, "hb": zmq.ROUTER}  # fmt: skip
_KERNEL_SIDE = {"shell": zmq.DEALER, "iopub": zmq.XSUB, "stdin": zmq.DEALER,
                "control": zmq.DEALER, "hb": zmq.DEALER}  # fmt: skip
# Messages queued per socket and direction: iopub carries many small outputs, the others a
# request or reply at a time. Past a mark PUB and ROUTER drop, DEALER refuses (and the bridge
# drops): a slow reader costs a bounded amount, counted in the kernel's own memory.
_HWM = {"shell": 100, "iopub": 1000, "stdin": 100, "control": 100, "hb": 100}
# Largest frame accepted from either side (libzmq closes the connection past it); above any
# message the service keeps (its own limit, a few MiB by default, refuses first).
_MAX_FRAME = 64 * 1024 * 1024
# Messages relayed from one socket per turn, so that a flood on one channel (iopub) cannot
# starve the others (control: interrupts).
_BATCH = 64
# After the kernel ended: how long its last messages may take to pass, and to be sent on.
_DRAIN_MS, _LINGER_MS = 50, 200
DELIMITER = b"<IDS|MSG>"
PROTOCOL_VERSION = "5.3"
_REMEMBERED = 1024  # signatures of answered interrupts, to ignore a replay
# Requests whose sender is remembered, for kernels that answer without the routing
# identities (see `Routes`).
_ROUTED = 1024
PR_SET_PDEATHSIG = 1
# Ports for the kernel are taken below the ephemeral range (where bind-to-0 and the source
# ports of outgoing connections come from), never from it: see `free_ports`.
_LOWEST_PORT = 1024
_DEFAULT_EPHEMERAL = (32768, 60999)


class BridgeError(Exception):
    """The bridge cannot start: bad arguments or connection file, or a socket not bound."""


def main(argv: list[str]) -> int:
    try:
        connection_file, mode, kernel_argv = parse_args(argv)
        info = read_connection_file(connection_file)
    except BridgeError as exc:
        print(f"kernel_bridge: {exc}", file=sys.stderr)
        return 2
    private_dir = tempfile.mkdtemp(prefix="kernel-bridge-")  # 0700, in $TMPDIR
    try:
        tcp_file = os.path.join(private_dir, "kernel.json")
        ports = free_ports(len(CHANNELS))
        write_tcp_connection_file(tcp_file, info, ports)
        argv_for_kernel = [arg.replace("{connection_file}", tcp_file) for arg in kernel_argv]
        # Signals forwarded from here on: one arriving before the kernel exists ends the
        # bridge as usual (nothing to forward it to).
        try:
            kernel = start_kernel(argv_for_kernel)
        except OSError as exc:
            print(f"kernel_bridge: cannot start {argv_for_kernel[0]!r}: {exc}", file=sys.stderr)
            return 127
        # The zmq context (and its threads) only after the fork: see `start_kernel`.
        bridge = Bridge(info, ports, mode, kernel)
        try:
            bridge.bind()
        except (BridgeError, zmq.ZMQError) as exc:
            print(f"kernel_bridge: {exc}", file=sys.stderr)
            bridge.close()
            _kill_group(kernel.pid, signal.SIGKILL)
            kernel.wait()
            return 1
        return bridge.run()
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    if len(argv) < 4 or argv[2] != "--" or argv[1] not in ("signal", "message"):
        raise BridgeError(
            "usage: kernel_bridge.py IPC_CONNECTION_FILE signal|message -- KERNEL_ARGV..."
        )
    return argv[0], argv[1], argv[3:]


def read_connection_file(path: str) -> dict[str, Any]:
    try:
        with open(path) as file:
            info = json.load(file)
    except (OSError, ValueError) as exc:
        raise BridgeError(f"cannot read the connection file {path}: {exc}") from exc
    if not isinstance(info, dict) or info.get("transport") != "ipc":
        raise BridgeError(f"{path} is not an ipc connection file")
    try:
        for channel in CHANNELS:
            int(info[f"{channel}_port"])
        str(info["ip"]), str(info["key"])
        _digest(str(info.get("signature_scheme", "hmac-sha256")))
    except (KeyError, ValueError, TypeError) as exc:
        raise BridgeError(f"{path} lacks or misstates a field: {exc}") from exc
    return info


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 now, and likely to stay free until the
    kernel binds them.

    Binding to port 0 and closing is racy: a port from the ephemeral range can be taken
    meanwhile by anyone's bind-to-0 or, more likely, as the source port of an outgoing
    connection — the bridge's own connections to the kernel's first sockets among them.
    So the ports come from below the ephemeral range, which the kernel (Linux) never hands
    out by itself: only a program binding that very port could take one. In the sandbox's
    private network namespace only the bridge and the kernel exist; outside a sandbox, a
    port taken after all makes the kernel fail to bind and exit, and the bridge with it: a
    failed start, never a crossed wire. All `count` are held at once while chosen, so they
    are distinct.
    """
    low = _ephemeral_range()[0]
    held: list[socket.socket] = []
    try:
        if low - _LOWEST_PORT >= 16 * count:
            candidates = random.sample(range(_LOWEST_PORT, low), min(low - _LOWEST_PORT, 512))
            for port in candidates:
                if len(held) == count:
                    break
                probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError:
                    probe.close()
                    continue
                held.append(probe)
        while len(held) < count:  # no room below the ephemeral range: the usual way
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probe.bind(("127.0.0.1", 0))
            held.append(probe)
        return [probe.getsockname()[1] for probe in held]
    finally:
        for probe in held:
            probe.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as file:
            low, high = (int(field) for field in file.read().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def write_tcp_connection_file(path: str, info: dict[str, Any], ports: list[int]) -> None:
    """The kernel's connection file (0600): the service's key and scheme, TCP on loopback."""
    tcp = {
        "transport": "tcp",
        "ip": "127.0.0.1",
        "key": info["key"],
        "signature_scheme": info.get("signature_scheme", "hmac-sha256"),
        **{f"{channel}_port": port for channel, port in zip(CHANNELS, ports, strict=True)},
    }
    if "kernel_name" in info:
        tcp["kernel_name"] = info["kernel_name"]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(tcp, file, indent=2)


def start_kernel(argv: list[str]) -> "subprocess.Popen[bytes]":
    """The kernel, as the bridge's child, in a process group of its own (its leader), killed
    by the system if the bridge dies (in a sandbox the PID namespace does that too: its init
    exits with the bridge). Started before the bridge has any thread: `preexec_fn` runs
    Python in the forked child, which is safe only when no other thread held a lock."""
    bridge_pid = os.getpid()

    def die_with_the_bridge() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != bridge_pid:  # the bridge died before the prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=die_with_the_bridge,  # noqa: PLW1509 (no thread yet: see above)
    )


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _digest(signature_scheme: str) -> str:
    algorithm = signature_scheme.removeprefix("hmac-")
    if algorithm == signature_scheme or algorithm not in hashlib.algorithms_available:
        raise ValueError(f"unknown signature scheme {signature_scheme!r}")
    return algorithm


def exit_status(wait_status: int) -> int:
    """A child's wait status as a shell reports it: its exit code, or 128 + N for signal N."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


class Routes:
    """Who sent each recent request on shell and control (its routing identities, by the
    `msg_id` in its header), so that a reply or input_request that comes back without them
    can be sent to its requester; failing that, to the last one on the channel."""

    def __init__(self) -> None:
        self._by_msg_id: OrderedDict[str, list[bytes]] = OrderedDict()
        self._last: dict[str, list[bytes]] = {}

    def request(self, channel: str, frames: list[bytes]) -> None:
        """A request from the service on `channel` (shell or control), as it arrived."""
        start = _delimiter(frames)
        if start is None or start == 0:
            return
        identities = frames[:start]
        self._last[channel] = identities
        msg_id = _field(frames, start + 2, "msg_id")
        if msg_id is not None:
            self._by_msg_id[msg_id] = identities
            self._by_msg_id.move_to_end(msg_id)
            if len(self._by_msg_id) > _ROUTED:
                self._by_msg_id.popitem(last=False)

    def addressed(self, channel: str, frames: list[bytes]) -> list[bytes] | None:
        """A message from the kernel on `channel` with its routing identities (as it came if
        it has them); None when nobody is known to send it to."""
        start = _delimiter(frames)
        if start is None or start > 0:
            return frames  # not a message (the kernel's mistake), or addressed already
        parent = _field(frames, 3, "msg_id")
        identities = self._by_msg_id.get(parent) if parent is not None else None
        if identities is None:
            # stdin's input_request answers a shell request
            identities = self._last.get("shell" if channel == "stdin" else channel)
        return None if identities is None else [*identities, *frames]


def _delimiter(frames: list[bytes]) -> int | None:
    with contextlib.suppress(ValueError):
        return frames.index(DELIMITER)
    return None


def _field(frames: list[bytes], index: int, name: str) -> str | None:
    """`name` of the JSON object in `frames[index]` (a header), if it is a string."""
    if index >= len(frames):
        return None
    try:
        part = json.loads(frames[index])
    except (ValueError, RecursionError):
        return None
    value = part.get(name) if isinstance(part, dict) else None
    return value if isinstance(value, str) else None


class Bridge:
    """The sockets on both sides, the relay loop, and the kernel's signals and end."""

    def __init__(
        self,
        info: dict[str, Any],
        ports: list[int],
        mode: str,
        kernel: "subprocess.Popen[bytes]",
    ) -> None:
        self._info = info
        self._ports = dict(zip(CHANNELS, ports, strict=True))
        self._answer_interrupts = mode == "signal"
        self._kernel = kernel
        self._hmac = hmac.new(
            str(info["key"]).encode(),
            digestmod=_digest(str(info.get("signature_scheme", "hmac-sha256"))),
        )
        self._session = uuid.uuid4().hex
        self._answered: deque[bytes] = deque(maxlen=_REMEMBERED)
        self._routes = Routes()
        self._context = zmq.Context(io_threads=1)
        self._service: dict[str, zmq.Socket[bytes]] = {}
        self._kernel_side: dict[str, zmq.Socket[bytes]] = {}
        self._peer: dict[zmq.Socket[bytes], tuple[str, zmq.Socket[bytes]]] = {}
        self._terms = 0
        self.dropped = 0  # messages dropped at a full queue

    def bind(self) -> None:
        # stdin's requests go to the identity of the shell request they belong to: the
        # kernel-side shell, stdin and control sockets share one, as a Jupyter client's do
        identity = f"bridge-{self._session}".encode()
        for channel in CHANNELS:
            service = self._socket(_SERVICE_SIDE[channel], channel)
            kernel = self._socket(_KERNEL_SIDE[channel], channel)
            if _SERVICE_SIDE[channel] == zmq.ROUTER:
                # a client reconnecting with its identity takes its place at once
                service.setsockopt(zmq.ROUTER_HANDOVER, 1)
            if _KERNEL_SIDE[channel] == zmq.DEALER and channel != "hb":
                kernel.setsockopt(zmq.ROUTING_ID, identity)
            service.bind(f"ipc://{self._info['ip']}-{self._info[f'{channel}_port']}")
            kernel.connect(f"tcp://127.0.0.1:{self._ports[channel]}")
            self._service[channel], self._kernel_side[channel] = service, kernel
            self._peer[service] = (channel, kernel)
            self._peer[kernel] = (channel, service)
        # All of the kernel's iopub, whoever subscribes here: the subscribers' own filters
        # are applied by the XPUB, and no subscription waits on two hops.
        self._kernel_side["iopub"].send(b"\x01")

    def _socket(self, kind: int, channel: str) -> "zmq.Socket[bytes]":
        sock: zmq.Socket[bytes] = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, _LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, _HWM[channel])
        sock.setsockopt(zmq.RCVHWM, _HWM[channel])
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_FRAME)
        return sock

    def run(self) -> int:
        """Relay until the kernel ends; its exit status."""
        wakeup_read, wakeup_write = socket.socketpair()
        wakeup_read.setblocking(False)
        wakeup_write.setblocking(False)
        previous_wakeup = signal.set_wakeup_fd(wakeup_write.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, self._on_signal)
        pidfd = os.pidfd_open(self._kernel.pid)
        poller = zmq.Poller()
        for sock in self._peer:
            poller.register(sock, zmq.POLLIN)
        poller.register(wakeup_read.fileno(), zmq.POLLIN)
        poller.register(pidfd, zmq.POLLIN)
        try:
            while True:
                try:
                    ready = dict(poller.poll())
                except InterruptedError:  # a signal: its handler has run
                    continue
                if wakeup_read.fileno() in ready:
                    with contextlib.suppress(BlockingIOError):
                        wakeup_read.recv(4096)
                for sock in ready:
                    if isinstance(sock, zmq.Socket):
                        self._pump(sock)
                if pidfd in ready:
                    break
            # The kernel is gone (a zombie: its pid, and so its group's id, still reserved):
            # end whatever it left in its group, pass on its last messages, and go.
            _kill_group(self._kernel.pid, signal.SIGKILL)
            status = exit_status(os.waitpid(self._kernel.pid, 0)[1])
            self._kernel.returncode = status  # reaped here; Popen must not wait again
            self._drain(poller)
            return status
        finally:
            os.close(pidfd)
            signal.set_wakeup_fd(previous_wakeup)
            wakeup_read.close()
            wakeup_write.close()
            self.close()

    def close(self) -> None:
        for sock in self._peer:
            sock.close()
        self._context.term()

    def _on_signal(self, signum: int, frame: object) -> None:
        """SIGTERM (and SIGHUP, SIGQUIT): the kernel is asked to end, and the bridge ends
        with it; asked again, the kernel is killed. SIGINT: the kernel is interrupted."""
        if signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            self._terms += 1
            if self._terms > 1:
                signum = signal.SIGKILL
        _kill_group(self._kernel.pid, signum)

    def _drain(self, poller: zmq.Poller) -> None:
        """Relay what is still arriving, until nothing has for a moment."""
        while True:
            try:
                ready = dict(poller.poll(_DRAIN_MS))
            except InterruptedError:
                continue
            sockets = [sock for sock in ready if isinstance(sock, zmq.Socket)]
            if not sockets:
                return
            for sock in sockets:
                self._pump(sock)

    def _pump(self, source: "zmq.Socket[bytes]") -> None:
        channel, destination = self._peer[source]
        from_service = source is self._service[channel]
        for _ in range(_BATCH):
            try:
                frames = source.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if from_service:
                if channel == "iopub":
                    continue  # a subscription: the kernel side subscribes to all already
                answered = channel == "control" and self._answer_interrupts
                if answered and self._answer_interrupt(source, frames):
                    continue
                if channel in ("shell", "control"):
                    self._routes.request(channel, frames)
            elif channel in ("shell", "control", "stdin"):
                addressed = self._routes.addressed(channel, frames)
                if addressed is None:
                    continue
                frames = addressed
            self._send(destination, frames)

    def _send(self, destination: "zmq.Socket[bytes]", frames: list[bytes]) -> None:
        try:
            destination.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # a DEALER's queue is full (the kernel is not reading): dropped
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, ...
                print(f"kernel_bridge: {self.dropped} messages dropped", file=sys.stderr)
        except zmq.ZMQError as exc:  # nothing a peer sends should end the bridge
            print(f"kernel_bridge: a message not relayed: {exc}", file=sys.stderr)

    def _answer_interrupt(self, control: "zmq.Socket[bytes]", frames: list[bytes]) -> bool:
        """An interrupt_request signed with the key, answered here: SIGINT to the kernel's
        group and an interrupt_reply; True when it was one. Anything else (malformed,
        unsigned, replayed, or another request) is the kernel's to accept or refuse."""
        try:
            start = frames.index(DELIMITER)
        except ValueError:
            return False
        signature, parts = frames[start + 1 : start + 2], frames[start + 2 : start + 6]
        if len(parts) < 4 or not signature:
            return False
        try:
            header = json.loads(parts[0])
        except (ValueError, RecursionError):
            return False
        if not isinstance(header, dict) or header.get("msg_type") != "interrupt_request":
            return False
        if not hmac.compare_digest(signature[0], self._sign(parts)):
            return False
        if signature[0] in self._answered:
            return False
        self._answered.append(signature[0])
        _kill_group(self._kernel.pid, signal.SIGINT)
        reply_header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "interrupt_reply",
            "username": "kernel",
            "session": self._session,
            "date": datetime.now(UTC).isoformat(),
            "version": PROTOCOL_VERSION,
        }
        # the request's header exactly as it came, as the reply's parent header
        reply = [json.dumps(reply_header).encode(), parts[0], b"{}", b'{"status": "ok"}']
        self._send(control, [*frames[:start], DELIMITER, self._sign(reply), *reply])
        return True

    def _sign(self, parts: list[bytes]) -> bytes:
        signer = self._hmac.copy()
        for part in parts:
            signer.update(part)
        return signer.hexdigest().encode()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
