"""The fork-server ("zygote"): imports the kernel and the data stack once, then forks a
kernel per request. Run by the service as `python -I zygote.py FD PRELOAD`, never by hand.

It speaks to the service over a SOCK_SEQPACKET socket (fd FD): each request is one JSON
message with file descriptors attached (the kernel's output pipe, and for a sandboxed
kernel its seccomp program); the answers are `{"id", "pid"}` or `{"id", "error"}`, and
`{"exited": pid, "status": code}` when a kernel process ends.

Only the standard library is imported here besides what is preloaded, and no thread is
started, so a fork is a clean copy. A sandboxed request carries the sandbox's description
(kernel/sandbox_spec.py, as JSON), the one bubblewrap's arguments are made from: the child
enters its namespaces, applies its mount operations in order (`MOUNTS` knows each by its
name), sets its hostname, rlimits, uid, environment and working directory, drops every
capability and loads the seccomp filter; keeping the zygote's memory pages shared.

Process tree of a sandboxed kernel: the forked child (host side; it waits and passes on the
exit status as bwrap does, 128 + N for a signal N) → pid 1 of a new PID namespace (reaps
orphans) → the kernel (pid 2). Each dies with its parent but the first: the zygote dies with
the service, the kernels it forked do not (a later service adopts them).
"""

import contextlib
import ctypes
import errno
import gc
import importlib
import json
import os
import random
import resource
import selectors
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
# the namespaces a sandbox may name, besides the mount namespace that every sandbox has
CLONE_FLAGS = {
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "pid": 0x20000000,
    "net": 0x40000000,
}
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and aarch64
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_SECCOMP = 1, 38, 24, 22
PR_SET_NAME, PR_SET_DUMPABLE = 15, 4
# Process names (what `ps -o comm` and psutil's name() show): the forked processes share
# the zygote's command line, the name tells them apart.
KERNEL_NAME = "ks-kernel"
SECCOMP_MODE_FILTER = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
CAP_LAST = 63
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
MAX_MESSAGE = 1 << 20


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _prctl(option: int, arg: int | Any = 0) -> None:
    _check(_libc.prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _set_name(name: str) -> None:
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()))


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def _set_attributes(path: str, attributes: int, remount_flags: int) -> None:
    """Mount attributes on `path` and every mount below it (mount_setattr, Linux 5.12+); on
    older kernels, on `path` alone (a remount)."""
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", attributes, 0, 0, 0), 32)
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        path.encode(),
        ctypes.c_uint(AT_RECURSIVE),
        attr,
        ctypes.c_size_t(32),
    )
    if result == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(result, f"mount_setattr {path}")
    _mount(None, path, None, MS_BIND | MS_REMOUNT | remount_flags)


# ---------------------------------------------------------------- the server


class Zygote:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.children: dict[int, str] = {}  # pid → request id
        self.wakeup_r, self.wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_w, False)
        signal.set_wakeup_fd(self.wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector = selectors.DefaultSelector()
        self.selector.register(channel, selectors.EVENT_READ)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.fileobj is self.channel:
                    if not self._handle_request():
                        return
                else:
                    os.read(self.wakeup_r, 4096)
                    self._reap()

    def _handle_request(self) -> bool:
        message, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, 4)
        if not message:  # the service closed its end: it is gone
            return False
        request = json.loads(message)
        try:
            pid = os.fork()
        except OSError as exc:
            self._send({"id": request["id"], "error": str(exc)})
            for fd in fds:
                os.close(fd)
            return True
        if pid == 0:
            self._become_child(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        self.children[pid] = request["id"]
        self._send({"id": request["id"], "pid": pid})
        return True

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.pop(pid, None)
            self._send({"exited": pid, "status": os.waitstatus_to_exitcode(status)})

    def _send(self, message: dict[str, Any]) -> None:
        self.channel.send(json.dumps(message).encode())

    def _become_child(self, request: dict[str, Any], fds: list[int]) -> None:
        """In the forked child: drop the zygote's state, then become the kernel."""
        code = 1
        try:
            # no death signal: the kernel outlives the zygote and the service (launcher.py)
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # the zygote's -1000 is not for kernels
            with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as oom:
                oom.write("0")
            self.selector.close()
            self.channel.close()
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)
            os.setsid()
            _set_name("ks-sandbox")
            output, seccomp = fds[0], (fds[1] if len(fds) > 1 else None)
            if request.get("sandbox"):
                code = _sandboxed(request, output, seccomp)
            else:
                _become_kernel(request, output, seccomp)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)


# ---------------------------------------------------------------- the sandbox


def _sandboxed(request: dict[str, Any], output: int, seccomp: int | None) -> int:
    """Join the cgroup, enter new namespaces, and wait for the namespace's init; its status."""
    os.dup2(output, 2)  # errors of the set-up reach the service's output tail
    for path in request["cgroup_procs"]:
        with open(path, "w") as procs:
            procs.write(str(os.getpid()))
    flags = CLONE_NEWNS
    for namespace in request["sandbox"]["namespaces"]:
        flags |= CLONE_FLAGS[namespace]
    _check(_libc.unshare(flags), "unshare")
    init = os.fork()  # pid 1 of the new PID namespace
    if init == 0:
        _init(request, output, seccomp)
    os.close(output)
    if seccomp is not None:
        os.close(seccomp)
    _, status = os.waitpid(init, 0)
    return _wrapper_status(status)


def _wrapper_status(status: int) -> int:
    """A child's wait status as a wrapper passes it on: its exit code, or 128 + signal."""
    return 128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _init(request: dict[str, Any], output: int, seccomp: int | None) -> None:
    """Pid 1: build the filesystem, start the kernel as pid 2, reap until it ends."""
    code = 1
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _set_name("ks-init")
        sandbox = request["sandbox"]
        _build_root(sandbox["mounts"], request["root"])
        hostname = sandbox["hostname"].encode()
        _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
        _loopback_up()
        kernel = os.fork()
        if kernel == 0:
            _become_kernel(request, output, seccomp)
        _hide_command_line()
        os.close(output)
        if seccomp is not None:
            os.close(seccomp)
        while True:
            pid, status = os.wait()
            if pid == kernel:
                code = _wrapper_status(status)
                break
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _build_root(mounts: list[dict[str, Any]], root: str) -> None:
    """The kernel's filesystem: `mounts` applied in order on an empty tmpfs at `root`, which
    then becomes the root."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for mount in mounts:
        MOUNTS[mount["op"]](_Root(root), **{k: v for k, v in mount.items() if k != "op"})
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")


class _Root:
    """The root being built, at a path of the host."""

    def __init__(self, path: str) -> None:
        self.path = path

    def at(self, path: str) -> str:
        return self.path + path

    def make_dir(self, path: str, mode: int = 0o755) -> None:
        """`path` and its missing parents, each made with `mode`."""
        parts = path.strip("/").split("/")
        for index in range(1, len(parts) + 1):
            directory = self.at("/" + "/".join(parts[:index]))
            if not os.path.isdir(directory):
                os.mkdir(directory)
                os.chmod(directory, mode)

    def bind(self, source: str, target: str, read_only: bool, device: bool = False) -> None:
        """`source` at `target`, with every mount below it: read-only or not, never suid,
        and no device files but for a device's own bind."""
        if os.path.isdir(source):
            self.make_dir(target)
        elif not os.path.exists(self.at(target)):
            self.make_dir(os.path.dirname(target))
            open(self.at(target), "a").close()
        _mount(source, self.at(target), None, MS_BIND | MS_REC)
        attributes, flags = MOUNT_ATTR_NOSUID, MS_NOSUID
        if not device:
            attributes, flags = attributes | MOUNT_ATTR_NODEV, flags | MS_NODEV
        if read_only:
            attributes, flags = attributes | MOUNT_ATTR_RDONLY, flags | MS_RDONLY
        _set_attributes(self.at(target), attributes, flags)


# The mount operations of a sandbox's description, by name (see kernel/sandbox_spec.py).


def _dir(root: _Root, path: str, mode: int) -> None:
    root.make_dir(path, mode)


def _symlink(root: _Root, target: str, path: str) -> None:
    os.symlink(target, root.at(path))


def _bind(root: _Root, source: str, path: str, read_only: bool, optional: bool) -> None:
    if optional and not os.path.exists(source):
        return
    root.bind(os.path.realpath(source), path, read_only)


def _proc(root: _Root, path: str) -> None:
    root.make_dir(path)
    _mount("proc", root.at(path), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _dev(root: _Root, path: str) -> None:
    root.make_dir(path)
    _mount("tmpfs", root.at(path), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for device in DEVICES:
        if os.path.exists(f"/dev/{device}"):
            root.bind(f"/dev/{device}", f"{path}/{device}", False, device=True)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):  # fmt: skip
        os.symlink(target, root.at(f"{path}/{name}"))
    root.make_dir(f"{path}/shm")
    root.make_dir(f"{path}/pts")
    _mount("devpts", root.at(f"{path}/pts"), "devpts", MS_NOSUID | MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=620")  # fmt: skip


def _tmpfs(root: _Root, path: str, mode: int, size: int | None, read_only: bool) -> None:
    root.make_dir(path)
    flags = MS_NOSUID | MS_NODEV | (MS_RDONLY if read_only else 0)
    options = f"mode={mode:04o}" + (f",size={size}" if size is not None else "")
    _mount("tmpfs", root.at(path), "tmpfs", flags, options)


def _read_only(root: _Root, path: str) -> None:
    if os.path.exists(root.at(path)):
        root.bind(root.at(path), path, True)


def _mask(root: _Root, path: str) -> None:
    inside = root.at(path)  # what this sandbox's own procfs has, whatever the host's shows
    if os.path.isdir(inside):
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        _mount("tmpfs", inside, "tmpfs", flags, "mode=0555")
    elif os.path.exists(inside):
        root.bind("/dev/null", path, True)


def _remount_read_only(root: _Root, path: str) -> None:
    _mount(None, root.at(path), None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


MOUNTS: dict[str, Callable[..., None]] = {
    "dir": _dir,
    "symlink": _symlink,
    "bind": _bind,
    "proc": _proc,
    "dev": _dev,
    "tmpfs": _tmpfs,
    "read_only": _read_only,
    "mask": _mask,
    "remount_read_only": _remount_read_only,
}


def _hide_command_line() -> None:
    """Pid 1's command line (the zygote's, with host paths) becomes its name alone: the
    kernel reads it as /proc/1/cmdline. Its argument strings are overwritten in place, the
    last byte not NUL: Linux then reads them as a title set by the process, up to a NUL."""
    with open("/proc/self/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end (fields 48, 49)
    name = b"ks-init"
    if end - start < len(name) + 2:
        return
    ctypes.memset(start, 0, end - start)
    ctypes.memmove(start, name, len(name))
    ctypes.memset(end - 1, ord(" "), 1)


def _loopback_up() -> None:
    """ipykernel binds a loopback pipe: `lo` must be up in the empty network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", _ioctl(sock, SIOCGIFFLAGS, request))[1]
        _ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def _ioctl(sock: socket.socket, request: int, argument: bytes) -> bytes:
    import fcntl

    return fcntl.ioctl(sock.fileno(), request, argument)


def _drop_privileges(sandbox: dict[str, Any]) -> None:
    for name, value in sandbox["rlimits"].items():
        resource.setrlimit(getattr(resource, f"RLIMIT_{name.upper()}"), (value, value))
    for capability in range(CAP_LAST + 1):
        dropped = _libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) == 0
        if not dropped and ctypes.get_errno() == errno.EINVAL:
            break  # past the last capability this kernel knows
    uid, gid = sandbox["uid"], sandbox["gid"]
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to a plain uid: every capability is gone
    # A uid change clears "dumpable" (an exec would set it again): without it /proc/self
    # is root's and the kernel cannot read its own environ or limits.
    _prctl(PR_SET_DUMPABLE, 1)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _read_program(program_fd: int) -> bytes:
    program = b""
    while chunk := os.read(program_fd, 65536):
        program += chunk
    os.close(program_fd)
    return program


def _load_seccomp(program: bytes) -> None:
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    buffer = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.cast(buffer, ctypes.c_char_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp")


# ---------------------------------------------------------------- the kernel


def _become_kernel(request: dict[str, Any], output: int, seccomp: int | None) -> None:
    sandbox = request.get("sandbox")
    _set_name(KERNEL_NAME)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(output)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    program = _read_program(seccomp) if seccomp is not None else None
    # nothing the zygote had open (its stderr is the service's) goes on into user code
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    if sandbox:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()
        os.chdir(sandbox["cwd"])
        _drop_privileges(sandbox)
        if program is not None:
            _load_seccomp(program)
    else:
        os.chdir(request["work_dir"])
    os.environ.clear()
    os.environ.update(sandbox["env"] if sandbox else request["env"])
    matplotlib = sys.modules.get("matplotlib")
    for name in ("get_configdir", "get_cachedir"):  # found at import, under the zygote's env
        getattr(getattr(matplotlib, name, None), "cache_clear", lambda: None)()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _reseed()
    sys.argv = ["ipykernel_launcher", *request["argv"]]
    from ipykernel import kernelapp

    kernelapp.launch_new_instance()
    os._exit(0)


def _reseed() -> None:
    """Every child starts from the zygote's generator state: give each its own."""
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def main() -> None:
    channel_fd, preload = int(sys.argv[1]), sys.argv[2]  # argv[3]: the connection dir, for ps
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the service
    _set_name("ks-zygote")
    # Killing it stops new kernels from starting: out of memory, pick a kernel.
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as oom:
        oom.write("-1000")
    channel = socket.socket(fileno=channel_fd)
    # what every kernel imports at start, so each child has it in shared pages
    # (the kernel app's own start-up imports included: the debugger alone is ~100 modules)
    kernel_modules = [
        "ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.debugger",
        "IPython.core.debugger", "IPython.core.completerlib", "IPython.core.oinspect",
        "IPython.core.logger", "IPython.extensions.storemagic", "tornado.platform.asyncio",
        "pdb", "faulthandler", "mimetypes", "http.server", "xmlrpc.client",
    ]  # fmt: skip
    # (not matplotlib's inline backend: it hooks into the shell that imports it first)
    for name in [*kernel_modules, *preload.split(",")]:
        if not name:
            continue
        try:
            importlib.import_module(name)
        except Exception as exc:
            print(f"zygote: could not preload {name}: {exc}", file=sys.stderr)
    # Every object so far is shared with the children: a collection in a child must not
    # walk them (it writes to each one's header, copying its page).
    gc.collect()
    gc.freeze()
    channel.send(json.dumps({"ready": os.getpid()}).encode())
    Zygote(channel).serve()


if __name__ == "__main__":
    main()
