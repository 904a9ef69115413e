"""Operating-system layer of the sandbox worker: resource limits, a seccomp filter and a Landlock ruleset.

Everything here runs inside the worker process, as trusted code, *before* any sandboxed code. Each
mechanism is applied when the kernel offers it and reported otherwise, so that the sandbox still works
(with the language layer alone) on kernels or architectures without it:

* rlimits: address space, file size, no core dumps, open files, and a per-run CPU budget.
* root: a worker started by root switches to a fresh unprivileged uid/gid (one per worker session) keeping
  only CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that files behave as before (Landlock confines
  them) while the other root powers go away and ``RLIMIT_NPROC``, which root ignores, bounds the
  number of processes of the session. A non-root worker keeps its user (and that user's NPROC, which
  counts all its processes, so it is not lowered).
* seccomp (x86-64 only): no ``execve``, no new sockets (so no network and no connecting to host
  Unix sockets), no ptrace / process_vm_*, no signals to other processes, no new sessions or process
  groups, no namespaces / mounts / kernel modules / device nodes / io_uring / bpf, and no raising of
  resource limits other than the CPU budget. Allowed syscalls keep working as usual.
* Landlock (Linux >= 5.13, used up to ABI 6): the file system becomes read-only except for the
  sandbox's directory, readable only where Python and its shared libraries live; TCP bind/connect is
  refused (ABI >= 4); signals and abstract Unix sockets cannot reach processes outside the sandbox
  (ABI >= 6). Each fork stacks one more layer, narrowed to its own directory, and first rebinds the
  descriptors it inherited (:func:`rebind_descriptors`), since Landlock checks paths when they are opened.

Only the standard library is used (ctypes for the syscalls and prctl calls Python does not wrap).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import stat
import struct
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2


# --------------------------------------------------------------------------------------------------------------
# rlimits
# --------------------------------------------------------------------------------------------------------------
def _set_limit(which: int, value: int) -> bool:
    try:
        resource.setrlimit(which, (value, value))
        return True
    except (ValueError, OSError):
        return False


def apply_rlimits(*, memory_bytes: int, max_file_bytes: int, max_open_files: int) -> list[str]:
    """Set the fixed limits; returns the names of those that could be set."""
    applied = []
    for name, which, value in (
        ("RLIMIT_AS", resource.RLIMIT_AS, memory_bytes),
        ("RLIMIT_FSIZE", resource.RLIMIT_FSIZE, max_file_bytes),
        ("RLIMIT_CORE", resource.RLIMIT_CORE, 0),
        ("RLIMIT_NOFILE", resource.RLIMIT_NOFILE, max_open_files),
    ):
        if _set_limit(which, value):
            applied.append(name)
    return applied


# --------------------------------------------------------------------------------------------------------------
# Leaving root
# --------------------------------------------------------------------------------------------------------------
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_root(uid: int, max_processes: int) -> bool:
    """If running as root: become ``uid``/gid ``uid`` with only the two file-access capabilities, and cap the
    processes of that uid at ``max_processes``. Returns whether it happened (False leaves root as is, except
    possibly the supplementary groups and gid, which grant nothing by themselves)."""
    if os.geteuid() != 0:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        if _prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
            return False
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from here on we are not root; KEEPCAPS kept the permitted set
    except (OSError, ValueError):  # e.g. a user namespace in which this uid is not mapped
        return False
    keep = (1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = keep
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), data) != 0:
        # Without the file capabilities the worker may be unable to read Python's own files; it is no
        # longer root either way, so report success and let a failing import show the problem.
        pass
    _prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)
    return True


def set_cpu_budget(seconds: int) -> None:
    """Allow ``seconds`` more CPU seconds from now (soft RLIMIT_CPU; SIGXCPU's default action kills).

    RLIMIT_CPU counts the whole life of the process, so the soft limit is moved forward before each run.
    The hard limit stays unlimited, otherwise a non-root worker could never move it forward again.
    """
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = int(usage.ru_utime + usage.ru_stime) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (used + max(1, seconds), resource.RLIM_INFINITY))


# --------------------------------------------------------------------------------------------------------------
# prctl helpers
# --------------------------------------------------------------------------------------------------------------
def set_no_new_privs() -> bool:
    return _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0


def set_not_dumpable() -> bool:
    # Non-dumpable: other processes of the same user cannot ptrace it or open its /proc/<pid>/mem.
    return _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0


# --------------------------------------------------------------------------------------------------------------
# seccomp
# --------------------------------------------------------------------------------------------------------------
_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_SECCOMP_RET_KILL_PROCESS = 0x80000000
_SECCOMP_RET_ERRNO = 0x00050000
_SECCOMP_RET_ALLOW = 0x7FFF0000

# x86-64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
_X86_64_DENIED = {
    "execve": 59, "execveat": 322, "socket": 41, "connect": 42, "accept": 43, "bind": 49, "listen": 50,
    "accept4": 288, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "process_madvise": 440,
    "pidfd_open": 434, "pidfd_getfd": 438, "pidfd_send_signal": 424, "kcmp": 312, "kill": 62, "tkill": 200,
    "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297, "setsid": 112, "setpgid": 109,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308,
    "mount_setattr": 442, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mknod": 133, "mknodat": 259, "reboot": 169, "kexec_load": 246, "kexec_file_load": 320,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "swapon": 167, "swapoff": 168, "acct": 163,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323, "keyctl": 250, "add_key": 248, "request_key": 249,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "iopl": 172, "ioperm": 173, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "setrlimit": 160, "shmget": 29, "semget": 64, "msgget": 68,
    "settimeofday": 164, "clock_settime": 227, "clock_adjtime": 305, "adjtimex": 159, "sethostname": 170,
    "setdomainname": 171, "quotactl": 179, "quotactl_fd": 443, "lookup_dcookie": 212, "syslog": 103,
    "vhangup": 153, "fanotify_init": 300, "personality": 135, "uselib": 134,
}
_NR_CLONE, _NR_CLONE3, _NR_PRLIMIT64 = 56, 435, 302
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
_CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                          | 0x00000080)

# struct seccomp_data offsets
_OFF_NR, _OFF_ARCH = 0, 4


def _arg_lo(i: int) -> int:
    return 16 + 8 * i


def _arg_hi(i: int) -> int:
    return 16 + 8 * i + 4


class _Bpf:
    """A tiny classic-BPF assembler with forward labels (jump offsets are relative and 8-bit)."""

    LD_W_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06

    def __init__(self) -> None:
        self.ins: list[tuple] = []
        self.labels: dict[str, int] = {}

    def ld(self, off: int) -> None:
        self.ins.append((self.LD_W_ABS, off, None, None))

    def jump(self, op: int, k: int, jt: str | None, jf: str | None) -> None:
        self.ins.append((op, k, jt, jf))

    def ret(self, k: int) -> None:
        self.ins.append((self.RET, k, None, None))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def assemble(self) -> bytes:
        out = []
        for pos, (code, k, jt, jf) in enumerate(self.ins):
            offsets = []
            for target in (jt, jf):
                if target is None:
                    offsets.append(0)
                else:
                    delta = self.labels[target] - pos - 1
                    if not 0 <= delta <= 255:
                        raise ValueError("BPF jump out of range")
                    offsets.append(delta)
            out.append(struct.pack("=HBBI", code, offsets[0], offsets[1], k & 0xFFFFFFFF))
        return b"".join(out)


def _x86_64_filter() -> bytes:
    eperm = _SECCOMP_RET_ERRNO | errno.EPERM
    b = _Bpf()
    b.ld(_OFF_ARCH)
    # Any other ABI (e.g. i386 via int 0x80, whose numbers differ) kills the process.
    b.jump(b.JEQ, _AUDIT_ARCH_X86_64, None, "kill")
    b.ld(_OFF_NR)
    b.jump(b.JGE, _X32_SYSCALL_BIT, "deny", None)
    for nr in sorted(set(_X86_64_DENIED.values())):
        b.jump(b.JEQ, nr, "deny", None)
    # clone3 takes its flags in memory that BPF cannot read: answer ENOSYS so glibc falls back to clone.
    b.jump(b.JEQ, _NR_CLONE3, "nosys", None)
    b.jump(b.JEQ, _NR_CLONE, "clone", None)
    b.jump(b.JEQ, _NR_PRLIMIT64, "prlimit", None)
    b.ret(_SECCOMP_RET_ALLOW)
    # clone: fork and threads are fine, new namespaces are not.
    b.label("clone")
    b.ld(_arg_lo(0))
    b.jump(b.JSET, _CLONE_NAMESPACE_FLAGS, "deny", None)
    b.ret(_SECCOMP_RET_ALLOW)
    # prlimit64(pid, resource, new, old): only for this process; reading is fine, writing only RLIMIT_CPU.
    b.label("prlimit")
    b.ld(_arg_lo(0))
    b.jump(b.JEQ, 0, None, "deny")
    b.ld(_arg_hi(0))
    b.jump(b.JEQ, 0, None, "deny")
    b.ld(_arg_lo(2))
    b.jump(b.JEQ, 0, None, "prlimit_res")
    b.ld(_arg_hi(2))
    b.jump(b.JEQ, 0, "allow", "prlimit_res")
    b.label("prlimit_res")
    b.ld(_arg_lo(1))
    b.jump(b.JEQ, resource.RLIMIT_CPU, "allow", "deny")
    b.label("allow")
    b.ret(_SECCOMP_RET_ALLOW)
    b.label("deny")
    b.ret(eperm)
    b.label("nosys")
    b.ret(_SECCOMP_RET_ERRNO | errno.ENOSYS)
    b.label("kill")
    b.ret(_SECCOMP_RET_KILL_PROCESS)
    return b.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp() -> bool:
    """Install the syscall filter on this process (inherited by its children). Returns False if unsupported."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    program = _x86_64_filter()
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if not set_no_new_privs():
        return False
    return _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) == 0


# --------------------------------------------------------------------------------------------------------------
# Landlock
# --------------------------------------------------------------------------------------------------------------
_NR_LANDLOCK_CREATE_RULESET, _NR_LANDLOCK_ADD_RULE, _NR_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers, 0 if none."""
    abi = _syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                   ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(abi))


def landlock_restrict(read_write: Iterable[str], read_only: Iterable[str]) -> int:
    """Confine this process (and future children) to the given paths. Returns the ABI used, 0 if unavailable.

    Directories under ``read_write`` may be read and modified (no device nodes, sockets or FIFOs);
    directories and files under ``read_only`` may only be read. Everything else is inaccessible.
    May be called again to narrow further (Landlock stacks up to 16 layers).
    """
    abi = min(landlock_abi(), 6)
    if abi < 1:
        return 0
    handled = (1 << 13) - 1
    if abi >= 2:
        handled |= FS_REFER
    if abi >= 3:
        handled |= FS_TRUNCATE
    if abi >= 5:
        handled |= FS_IOCTL_DEV
    attr = _RulesetAttr(handled, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _syscall(ctypes.c_long(_NR_LANDLOCK_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size),
                       ctypes.c_uint32(0))
    if ruleset < 0:
        return 0
    try:
        rw = (FS_READ_FILE | FS_READ_DIR | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR
              | FS_MAKE_REG | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE) & handled
        ro = (FS_READ_FILE | FS_READ_DIR) & handled
        for paths, rights, required in ((read_write, rw, True), (read_only, ro, False)):
            for path in paths:
                if not _add_path_rule(ruleset, path, rights) and required:
                    return 0
        if not set_no_new_privs():
            return 0
        if _syscall(ctypes.c_long(_NR_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
            return 0
        return abi
    finally:
        os.close(ruleset)


def _add_path_rule(ruleset: int, path: str, rights: int) -> bool:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not os.path.isdir(path):
            rights &= _FILE_RIGHTS  # directory rights on a file rule are EINVAL
        rule = _PathBeneathAttr(rights, fd)
        return _syscall(ctypes.c_long(_NR_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                        ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) == 0
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------------------
# Descriptors inherited by a forked copy
# --------------------------------------------------------------------------------------------------------------
def rebind_descriptors(old_dir: str, new_dir: str, keep: Iterable[int], max_fd: int) -> int:
    """In a forked copy, point inherited descriptors away from the original's files. Returns how many moved.

    Landlock checks a path when it is opened, not each write through a descriptor already open, so a copy
    must not keep the original's open files: a descriptor on a file under ``old_dir`` is reopened on the
    copied file under ``new_dir`` (same access mode and offset, same number, so open file objects keep
    working on the copy's own files); any other descriptor that can write (pipes, sockets, files elsewhere)
    is replaced by a read-only /dev/null. Descriptors in ``keep`` and read-only files outside ``old_dir``
    (the libraries' own files) stay as they are.
    """
    import fcntl  # noqa: PLC0415 - only forked copies need it

    copies: dict[tuple[int, int], str] = {}
    for dirpath, _dirnames, filenames in os.walk(old_dir):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                copies[(st.st_dev, st.st_ino)] = os.path.relpath(path, old_dir)
    keep = set(keep)
    moved = 0
    for fd in range(3, max_fd):
        if fd in keep:
            continue
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue  # not open
        if stat.S_ISDIR(st.st_mode):
            continue  # creating files through a directory descriptor is checked by Landlock like a path
        relative = copies.get((st.st_dev, st.st_ino)) if stat.S_ISREG(st.st_mode) else None
        read_only = flags & os.O_ACCMODE == os.O_RDONLY
        if relative is None and read_only and stat.S_ISREG(st.st_mode):
            continue
        try:
            if relative is None:
                raise FileNotFoundError(relative)
            replacement = os.open(os.path.join(new_dir, relative),
                                  (flags & (os.O_ACCMODE | os.O_APPEND)) | os.O_NOFOLLOW | os.O_CLOEXEC)
            os.lseek(replacement, os.lseek(fd, 0, os.SEEK_CUR), os.SEEK_SET)
        except OSError:
            replacement = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        os.dup2(replacement, fd, inheritable=False)
        os.close(replacement)
        moved += 1
    return moved
