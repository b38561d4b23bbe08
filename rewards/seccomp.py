"""The system-call filter of the code sandbox, built with libseccomp (``pyseccomp``, its ctypes
bindings) and handed to bubblewrap as BPF (``bwrap --seccomp FD``).

Default allow; the calls below fail with ``EPERM`` (not a kill, so a program gets a clear
``PermissionError`` and the run reports it as a runtime error). They are the doors kernel
privilege escalations and harness tampering go through, and no test program needs them:

- debugging other processes: ``ptrace``, ``process_vm_readv`` / ``process_vm_writev``,
  ``kcmp``, ``pidfd_getfd``;
- namespaces and mounts: ``unshare``, ``setns``, ``mount``, ``umount2``, ``pivot_root``,
  ``chroot``, ``open_tree``, ``move_mount``, ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``,
  ``mount_setattr``, and ``clone`` with any ``CLONE_NEW*`` flag (``clone3`` passes its flags in
  memory a filter cannot read, so it gets ``ENOSYS`` and glibc falls back to ``clone``);
- kernel attack surface: ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring_setup`` /
  ``_enter`` / ``_register``, ``keyctl`` / ``add_key`` / ``request_key``, ``open_by_handle_at``,
  ``name_to_handle_at``;
- the machine: ``kexec_load`` / ``kexec_file_load``, ``init_module`` / ``finit_module`` /
  ``delete_module``, ``reboot``, ``swapon`` / ``swapoff``, ``acct``, ``settimeofday`` /
  ``clock_settime`` / ``adjtimex`` / ``clock_adjtime``, ``quotactl``, ``syslog``, ``vhangup``;
- ``personality`` except the query ``personality(0xffffffff)`` (no ``ADDR_NO_RANDOMIZE`` and
  friends);
- sockets of any family but ``AF_UNIX`` (the sandbox has no network anyway; this also blocks raw
  and netlink sockets).

System calls of another architecture (``int 0x80`` i386 calls from an x86-64 process) are killed
(libseccomp's bad-arch default).
"""
from __future__ import annotations

import errno
import functools
import os

DENY = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
    "quotactl", "syslog", "vhangup",
)
CLONE_NEW_FLAGS = {
    "CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000, "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080,
}
AF_UNIX = 1
PERSONALITY_QUERY = 0xFFFFFFFF


def build_filter():
    """The ``pyseccomp.SyscallFilter`` described in the module docstring."""
    import pyseccomp as sc

    f = sc.SyscallFilter(defaction=sc.ALLOW)
    deny = sc.ERRNO(errno.EPERM)
    for name in DENY:
        try:
            f.add_rule(deny, name)
        except (RuntimeError, ValueError, OSError):  # a call this kernel/libseccomp does not know
            continue
    for flag in CLONE_NEW_FLAGS.values():
        f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    f.add_rule(deny, "personality", sc.Arg(0, sc.NE, PERSONALITY_QUERY))
    f.add_rule(deny, "socket", sc.Arg(0, sc.NE, AF_UNIX))
    return f


@functools.lru_cache(maxsize=1)
def filter_bpf() -> bytes:
    """The compiled BPF program (built once per process)."""
    import tempfile

    with tempfile.TemporaryFile() as tmp:
        build_filter().export_bpf(tmp)
        tmp.seek(0)
        return tmp.read()


def seccomp_available() -> tuple[bool, str]:
    """Whether the filter can be built here (pyseccomp installed, libseccomp loadable)."""
    try:
        return bool(filter_bpf()), "ok"
    except Exception as e:  # noqa: BLE001 - reported, the caller decides
        return False, f"{type(e).__name__}: {e}"


def filter_fd() -> int:
    """A readable fd holding the BPF program at offset 0 (a memfd; bwrap reads it to the end)."""
    fd = os.memfd_create("aha-seccomp", 0)
    os.write(fd, filter_bpf())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
