"""The seccomp filter every sandboxed kernel runs under (defence in depth behind namespaces).

Built with libseccomp (through pyseccomp) and handed to bubblewrap as BPF. It denies what
a kernel never needs and an attacker would: new namespaces (a user namespace would undo
the privilege drop), mounts, ptrace, kernel keyrings, BPF, io_uring (sockets without
socket()), module loading, terminal injection, LDT and NUMA-policy calls, secret memory,
fanotify, landlock, obsolete calls, and every socket family but Unix, IP and
netlink — AF_VSOCK reaches the hypervisor even from an empty network namespace. IP stays
allowed: ipykernel binds a loopback pipe inside the (empty) network namespace.
"""

import errno
import os
import socket

import pyseccomp as sc

_DENIED_SYSCALLS = (
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot",
    "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "acct", "swapon", "swapoff", "reboot",
    "syslog", "iopl", "ioperm", "quotactl", "personality", "lookup_dcookie",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup",
    "nfsservctl", "uselib", "sethostname", "setdomainname",
    # nothing a kernel needs, each a piece of the host kernel to attack: x86 segment tables,
    # secret memory, filesystem-wide notification, NUMA placement (Docker allows it only
    # with CAP_SYS_NICE), self-sandboxing, obsolete calls
    "modify_ldt", "memfd_secret", "fanotify_init", "fanotify_mark",
    "set_mempolicy", "set_mempolicy_home_node", "mbind", "migrate_pages", "move_pages",
    "landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self",
    "_sysctl", "sysfs", "ustat", "vm86", "vm86old", "create_module", "get_kernel_syms",
    "query_module", "bdflush",
)  # fmt: skip
_NAMESPACE_FLAGS = (
    0x10000000,  # CLONE_NEWUSER
    0x00020000,  # CLONE_NEWNS
    0x20000000,  # CLONE_NEWPID
    0x40000000,  # CLONE_NEWNET
    0x08000000,  # CLONE_NEWIPC
    0x04000000,  # CLONE_NEWUTS
    0x02000000,  # CLONE_NEWCGROUP
    0x00000080,  # CLONE_NEWTIME
)
_ALLOWED_FAMILIES = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK}
_AF_MAX = 46
_TIOCSTI = 0x5412
_NETLINK_ROUTE = 0


def build_filter() -> bytes:
    """The BPF program, for bubblewrap's `--seccomp FD`."""
    sandbox = sc.SyscallFilter(sc.ALLOW)
    for name in _DENIED_SYSCALLS:
        try:
            sandbox.add_rule(sc.ERRNO(errno.EPERM), name)
        except (OSError, ValueError):  # a syscall this architecture does not have
            continue
    for flag in _NAMESPACE_FLAGS:
        sandbox.add_rule(sc.ERRNO(errno.EPERM), "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, out of a filter's reach: make libc fall back to clone.
    sandbox.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    sandbox.add_rule(sc.ERRNO(errno.EPERM), "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    for call in ("socket", "socketpair"):
        for family in range(_AF_MAX):
            if family not in _ALLOWED_FAMILIES:
                sandbox.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.EQ, family))
        sandbox.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), call, sc.Arg(0, sc.GE, _AF_MAX))
    # Of netlink, only routing (what libc's getaddrinfo and ifaddrs use): uevents would
    # show the host's devices coming and going.
    sandbox.add_rule(
        sc.ERRNO(errno.EPROTONOSUPPORT),
        "socket",
        sc.Arg(0, sc.EQ, socket.AF_NETLINK),
        sc.Arg(2, sc.NE, _NETLINK_ROUTE),
    )
    memfd = os.memfd_create("seccomp")
    try:
        with os.fdopen(os.dup(memfd), "rb+") as program:
            sandbox.export_bpf(program)
            program.flush()
            program.seek(0)
            return program.read()
    finally:
        os.close(memfd)
