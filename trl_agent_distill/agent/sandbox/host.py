"""Host side of the sandbox: :class:`PythonSandbox` starts, feeds and supervises worker processes.

The host trusts nothing a worker sends (see ``protocol``): frames are authenticated, decoded within bounds,
checked field by field, and any violation, timeout, crash or passed disk quota becomes an error observation
and a fresh interpreter. Workers, their sessions and directories are owned here: a sandbox and its forks
form a *lineage* sharing one temporary directory and one disk quota.
"""

from __future__ import annotations

import array
import atexit
import inspect
import itertools
import keyword
import math
import os
import secrets
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import protocol
from .executor import Observation, PythonExecutor

__all__ = ["DEFAULT_ALLOWED_IMPORTS", "PythonSandbox", "SandboxError"]

DEFAULT_ALLOWED_IMPORTS = ("math", "re", "json", "collections", "itertools", "functools", "statistics", "datetime",
                           "fractions", "decimal", "random", "numpy", "sympy")

_WORKER_SCRIPT = Path(__file__).with_name("worker.py")
_MAX_FILE_BYTES = 32 * 1024 * 1024  # RLIMIT_FSIZE: largest file the code may write
_MAX_OPEN_FILES = 256
_MAX_PROCESSES = 256  # RLIMIT_NPROC of a worker session (threads included), when started by root
_UID_RANGE = (1 << 30, (1 << 31) - 2)  # unprivileged uids for workers started by root, one per session
_STARTUP_TIMEOUT = 60.0  # generous: a loaded CI machine can take seconds to start an interpreter
_MAX_OUTPUT_CHARS = 10_000_000
_FORK_TIMEOUT = 10.0
_CLIP_NOTE_CHARS = 1000
_MAX_ENTRIES = 100_000  # files and directories per lineage, counted with the disk quota
_QUOTA_POLL = 0.25  # seconds between disk-usage checks while a run is going
_MAX_FORK_DEPTH = 15  # each fork adds a Landlock layer to its worker, and the kernel allows 16  # the note the worker puts where it cut a long text, with room to spare


class SandboxError(RuntimeError):
    """Misuse of a sandbox (e.g. running code after ``close``) or a sandbox that cannot start at all."""


class _Timeout(Exception):
    pass


class _QuotaExceeded(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------------
# Parent side of the channel
# ----------------------------------------------------------------------------------------------------------------
class _Channel:
    """Framed messages over the parent's end of the socket pair, with deadlines and SCM_RIGHTS support."""

    _FD_SPACE = socket.CMSG_SPACE(8 * array.array("i").itemsize)

    def __init__(self, sock: socket.socket, key: bytes = b""):
        self.sock = sock
        self.key = key
        self._sent = self._received = 0
        self._buffer = bytearray()
        self._fds: list[int] = []

    def close(self) -> None:
        self._close_fds()
        self.sock.close()

    def send(self, obj: Any, deadline: float) -> None:
        view = memoryview(protocol.frame(obj, self.key, self._sent))
        self._sent += 1
        while view:
            self.sock.settimeout(self._remaining(deadline))
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                raise _Timeout from None
            view = view[sent:]

    def recv(self, deadline: float, watch: Callable[[], None] | None = None) -> tuple[Any, list[int]]:
        """One message and the file descriptors that arrived with it (the caller owns them); while waiting,
        ``watch`` is called every ``_QUOTA_POLL`` seconds (it raises to stop waiting)."""
        (size,) = protocol.HEADER.unpack(self._read(protocol.HEADER.size, deadline, watch))
        protocol.check_size(size)
        body = self._read(size, deadline, watch)
        fds, self._fds = self._fds, []
        self._received += 1
        try:
            return protocol.open_frame(body, self.key, self._received - 1), fds
        except BaseException:
            _close_fds(fds)
            raise

    def _read(self, n: int, deadline: float, watch: Callable[[], None] | None = None) -> bytes:
        while len(self._buffer) < n:
            remaining = self._remaining(deadline)
            self.sock.settimeout(remaining if watch is None else min(remaining, _QUOTA_POLL))
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(max(65536, min(n - len(self._buffer), 1 << 22)),
                                                                 self._FD_SPACE, socket.MSG_CMSG_CLOEXEC)
            except TimeoutError:
                if watch is None or time.monotonic() >= deadline:
                    raise _Timeout from None
                watch()
                continue
            for level, kind, cdata in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(cdata[: len(cdata) - len(cdata) % fds.itemsize])
                    self._fds.extend(fds)
            if not data:
                raise EOFError("worker closed the channel")
            self._buffer += data
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        return remaining

    def _close_fds(self) -> None:
        _close_fds(self._fds)
        self._fds = []


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ----------------------------------------------------------------------------------------------------------------
# Worker processes, sessions and directories
# ----------------------------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live (non-zombie) process, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    try:
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[1]), int(fields[3])
    except (IndexError, ValueError):
        return None


class _Sessions:
    """Counts the live workers of each session; when a session has none left, kills any stray process in it.

    Each worker started by the parent leads a new session and the seccomp filter forbids leaving it, so the
    session is the lineage of one worker and its forks, including anything sandboxed code might have started.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[int, int] = {}

    def acquire(self, sid: int) -> None:
        with self._lock:
            self._refs[sid] = self._refs.get(sid, 0) + 1

    def release(self, sid: int) -> None:
        with self._lock:
            left = self._refs.get(sid, 0) - 1
            if left > 0:
                self._refs[sid] = left
                return
            self._refs.pop(sid, None)
        self._sweep(sid)

    @staticmethod
    def _sweep(sid: int) -> None:
        try:
            entries = os.listdir("/proc")
        except OSError:
            return
        me = os.getpid()
        for name in entries:
            if not name.isdigit() or int(name) == me:
                continue
            pid = int(name)
            info = _proc_stat(pid)
            if info is None or info[1] != sid:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except (OSError, AttributeError):
                continue
            try:  # re-check through the pidfd's process: the pid cannot be reused while we hold it
                info = _proc_stat(pid)
                if info is not None and info[1] == sid:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(pidfd)


_sessions = _Sessions()


class _Worker:
    """A live worker process: started by us (``popen``) or forked by another worker (``pidfd``)."""

    def __init__(self, chan: _Channel, pid: int, sid: int, *, popen: subprocess.Popen | None = None,
                 pidfd: int | None = None, protections: dict | None = None):
        self.chan, self.pid, self.sid, self.popen, self.pidfd = chan, pid, sid, popen, pidfd
        self.protections = protections or {}
        self._dead = False

    def alive(self) -> bool:
        if self._dead:
            return False
        if self.popen is not None:
            return self.popen.poll() is None
        if self.pidfd is not None:
            return not select.select([self.pidfd], [], [], 0)[0]
        info = _proc_stat(self.pid)  # no pidfd support: recognise the process by its session
        return info is not None and info[1] == self.sid

    def death_reason(self) -> str:
        """Best description of why the process ended (waits briefly for it to do so)."""
        code = None
        if self.popen is not None:
            try:
                code = self.popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                return "it stopped responding"
        elif self.pidfd is not None and not select.select([self.pidfd], [], [], 2)[0]:
            return "it stopped responding"
        if code is None:
            return "the process died, e.g. killed for exceeding its CPU-time or memory limit"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = {"SIGXCPU": ": CPU time limit exceeded", "SIGSEGV": ": segmentation fault",
                    "SIGKILL": ": killed", "SIGABRT": ": aborted", "SIGXFSZ": ": file size limit exceeded"}
            return f"{name}{hint.get(name, '')}"
        return f"exit status {code}"

    def kill(self) -> None:
        if self._dead:
            return
        self._dead = True
        try:
            self.chan.close()
        except OSError:
            pass
        try:
            if self.popen is not None:
                if self.popen.poll() is None:
                    self.popen.kill()
                try:
                    self.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            elif self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                select.select([self.pidfd], [], [], 5)  # until it has exited
            elif self.alive():
                os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        finally:
            if self.pidfd is not None:
                os.close(self.pidfd)
                self.pidfd = None
            _sessions.release(self.sid)


class _Lineage:
    """The temporary directory of a sandbox and its forks, and the disk quota they share.

    Each sandbox has a home directory holding its working directory (``work``) and the homes of its forks:
    a fork's home lies inside its original's because Landlock can only narrow what a forked process
    inherits. The worker may write only under its home (Landlock) and only in ``work`` (language layer).
    """

    def __init__(self, quota_bytes: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="tad-sandbox-"))
        self.quota_bytes = quota_bytes
        self._lock = threading.Lock()
        self._refs = 0
        self._counter = itertools.count()

    def new_home(self, parent: Path | None = None) -> Path:
        with self._lock:
            self._refs += 1
            home = (parent or self.root) / f"h{next(self._counter)}"
        home.mkdir(mode=0o700)
        (home / "work").mkdir(mode=0o700)
        return home

    def over_quota(self, adding: int = 0) -> bool:
        """Whether the lineage's files (plus ``adding`` bytes) exceed the quota."""
        used, entries = _disk_usage(self.root, self.quota_bytes)
        return used + adding > self.quota_bytes or entries > _MAX_ENTRIES

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs <= 0
        if last:
            shutil.rmtree(self.root, ignore_errors=True)


def _disk_usage(path: Path, stop_above: int) -> tuple[int, int]:
    """(bytes, entries) of the files under ``path``, counting stops once either passes its bound."""
    used = entries = 0
    pending = [str(path)]
    while pending and used <= stop_above and entries <= _MAX_ENTRIES:
        try:
            scan = os.scandir(pending.pop())
        except OSError:
            continue
        with scan:
            for entry in scan:
                entries += 1
                try:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                    else:
                        used += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    return used, entries


def _copy_tree(src: Path, dst: Path, budget: int) -> None:
    """Copy the regular files, directories and symlinks of ``src`` into ``dst``, at most ``budget`` bytes."""
    left = [budget]

    def copy_regular(source: str, target: str) -> None:
        # Only regular files (a FIFO or device must not block or leak the copy), read without following
        # symlinks, and never more than measured before: the worker might still be writing.
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        with open(fd, "rb") as reader:
            if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
                return
            with open(target, "wb") as writer:
                while chunk := reader.read(1 << 20):
                    left[0] -= len(chunk)
                    if left[0] < 0:
                        raise SandboxError("the working directory grew while it was being copied")
                    writer.write(chunk)
        shutil.copymode(source, target)

    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, copy_function=copy_regular)


def _clear_dir(path: Path) -> None:
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _worker_sys_path() -> list[str]:
    # The parent's import path, minus relative entries (the worker's cwd is the sandbox's directory,
    # where the code can write files; a writable directory on sys.path would let it shadow modules).
    seen = []
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.exists(entry) and entry not in seen:
            seen.append(entry)
    return seen


def _worker_env(workdir: Path) -> dict[str, str]:
    # Nothing from the parent's environment (API tokens, proxies...). One thread for numerical libraries:
    # their thread pools would count against the memory limit and the machine's cores.
    env = {"PATH": os.defpath, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8"}
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS"):
        env[var] = "1"
    return env


def _clean_text(text: str | None) -> str | None:
    # Lone surrogates (print('\\ud800')) would make the observation unencodable as UTF-8 downstream.
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "replace").decode("utf-8")


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        try:  # resolve string annotations (``from __future__ import annotations``) for a readable signature
            return inspect.signature(fn, eval_str=True)
        except Exception:  # noqa: BLE001 - an annotation that does not evaluate: show it as written
            return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


_live: weakref.WeakSet[PythonSandbox] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for sandbox in list(_live):
        try:
            sandbox.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


# ----------------------------------------------------------------------------------------------------------------
# The sandbox
# ----------------------------------------------------------------------------------------------------------------
class PythonSandbox(PythonExecutor):
    """A persistent, isolated Python interpreter for CodeAct steps (threat model: the package docstring).

    Args:
        tools: functions living in *this* process, callable from the sandbox under the same names. Arguments
            and results cross the process boundary as plain data (str, numbers, lists, dicts, sets, tuples,
            numpy values); a result that is not plain data reaches the code as its ``str()``. Tools run
            synchronously inside ``run``, count towards ``timeout``, and must not use this sandbox.
        timeout: wall-clock limit of one ``run``, in seconds.
        memory_limit_mb: address-space limit of the worker process (RLIMIT_AS).
        cpu_time_limit: CPU seconds one ``run`` may use (default: ``timeout`` rounded up, plus 1).
        allowed_imports: importable top-level modules; their public submodules are importable too.
        max_output_chars: printed output and values longer than this are cut in the middle, with a note.
        disk_quota_mb: total size of the files of this sandbox and its forks; a run that goes past it ends with
            an error observation (the sandbox restarts with an empty working directory), and a fork whose copy
            would go past it raises :class:`SandboxError`.
    """

    def __init__(self, tools: dict[str, Callable[..., Any]] | None = None, *, timeout: float = 10.0,
                 memory_limit_mb: int = 1024, cpu_time_limit: float | None = None,
                 allowed_imports: Iterable[str] = DEFAULT_ALLOWED_IMPORTS, max_output_chars: int = 20_000,
                 disk_quota_mb: int = 256):
        tools = dict(tools or {})
        for name, fn in tools.items():
            if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                raise ValueError(f"tool name {name!r} is not a valid Python identifier")
            if name.startswith("_") or name == "final_answer":
                raise ValueError(f"tool name {name!r} is reserved (no leading underscore; final_answer is built in)")
            if not callable(fn):
                raise TypeError(f"tool {name!r} is not callable")
        if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError("timeout must be a positive number of seconds")
        if not (isinstance(memory_limit_mb, int) and memory_limit_mb >= 32):
            raise ValueError("memory_limit_mb must be an int >= 32")
        if cpu_time_limit is None:
            cpu_time_limit = math.ceil(timeout) + 1
        if not (isinstance(cpu_time_limit, (int, float)) and math.isfinite(cpu_time_limit) and cpu_time_limit > 0):
            raise ValueError("cpu_time_limit must be a positive number of seconds")
        if not (isinstance(max_output_chars, int) and 1 <= max_output_chars <= _MAX_OUTPUT_CHARS):
            raise ValueError(f"max_output_chars must be an int between 1 and {_MAX_OUTPUT_CHARS}")
        if not (isinstance(disk_quota_mb, int) and disk_quota_mb >= 1):
            raise ValueError("disk_quota_mb must be an int >= 1")
        if isinstance(allowed_imports, str):
            raise TypeError("allowed_imports must be an iterable of module names, not a string")
        allowed = tuple(dict.fromkeys(allowed_imports))
        for name in allowed:
            if not (isinstance(name, str) and all(p.isidentifier() for p in name.split("."))):
                raise ValueError(f"invalid module name in allowed_imports: {name!r}")
        self._setup(tools, float(timeout), memory_limit_mb, int(math.ceil(cpu_time_limit)), allowed,
                    max_output_chars, _Lineage(disk_quota_mb * 1024 * 1024))
        try:
            self._worker = self._spawn_worker()
        except BaseException:
            self.close()
            raise

    def _setup(self, tools: dict, timeout: float, memory_limit_mb: int, cpu_time_limit: int,
               allowed: tuple[str, ...], max_output_chars: int, lineage: _Lineage,
               parent_home: Path | None = None, depth: int = 0) -> None:
        self._closed = True  # until fully set up, close() has nothing to undo
        self._tools = tools
        self._signatures: dict[str, inspect.Signature | None] = {}
        self._timeout = timeout
        self._memory_limit_mb = memory_limit_mb
        self._cpu_time_limit = cpu_time_limit
        self._allowed = allowed
        self._max_output_chars = max_output_chars
        self._lock = threading.RLock()
        self._worker: _Worker | None = None
        self._lineage = lineage
        self._owner = os.getpid()
        self._home = lineage.new_home(parent_home)
        self._depth = depth  # forks between this sandbox and the first of its lineage
        self.workdir: Path = self._home / "work"
        self._closed = False
        _live.add(self)

    # -- public API ------------------------------------------------------------------------------------------------
    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def protections(self) -> dict[str, Any]:
        """Which OS-level protections the current worker has (rlimits, seccomp, Landlock ABI, ...)."""
        worker = self._worker
        return dict(worker.protections) if worker is not None else {}

    def run(self, code: str) -> Observation:
        """Run one snippet in the persistent namespace and return its observation."""
        if not isinstance(code, str):
            raise SandboxError(f"code must be a str, not {type(code).__name__}")
        with self._lock:
            self._check_open()
            if self._worker is None or not self._worker.alive():
                self._discard_worker()
                try:
                    self._worker = self._spawn_worker()
                except SandboxError as exc:
                    return Observation.from_parts(error_message=f"The Python interpreter could not be started: {exc}")
            worker = self._worker
            finished = False
            try:
                deadline = time.monotonic() + self._timeout
                self._check_quota()  # also what a worker may have written between runs
                worker.chan.send(("run", code), deadline)
                while True:
                    message, fds = worker.chan.recv(deadline, watch=self._check_quota)
                    _close_fds(fds)
                    if isinstance(message, tuple) and len(message) == 4 and message[0] == "tool":
                        worker.chan.send(self._call_tool(*message[1:]), deadline)
                    elif isinstance(message, tuple) and len(message) == 2 and message[0] == "result":
                        observation, stray_threads = self._observation(message[1])
                        self._check_quota()
                        finished = True
                        if stray_threads:
                            self._discard_worker()
                        return observation
                    else:
                        raise protocol.ProtocolError("unexpected message")
            except _QuotaExceeded:
                finished = True
                self._discard_worker()
                _clear_dir(self.workdir)
                return Observation.from_parts(error_message=(
                    f"The files written exceed the disk quota ({self._lineage.quota_bytes // 2**20} MB or "
                    f"{_MAX_ENTRIES:,} files for this sandbox and its copies); the interpreter was restarted and "
                    "its variables and files are lost."))
            except _Timeout:
                finished = True
                self._discard_worker()
                return Observation.from_parts(error_message=(
                    f"Execution timed out after {self._timeout:g} s; the interpreter was restarted and its "
                    "variables are lost."), timed_out=True)
            except (EOFError, OSError, protocol.ProtocolError) as exc:
                finished = True
                if isinstance(exc, protocol.ProtocolError):
                    reason = f"it sent an invalid message: {str(exc)[:200]}"
                else:
                    reason = worker.death_reason()
                self._discard_worker()
                return Observation.from_parts(error_message=(
                    f"The interpreter crashed ({reason}) while running this code; it was restarted and its "
                    "variables are lost."))
            finally:
                if not finished:  # e.g. KeyboardInterrupt in the parent: the channel is out of step now
                    self._discard_worker()

    def fork(self) -> PythonSandbox:
        """An independent copy of this sandbox: same variables and imports, files copied, its own worker."""
        with self._lock:
            self._check_open()
            if self._depth >= _MAX_FORK_DEPTH and self.protections.get("landlock_abi"):
                raise SandboxError(f"cannot fork: forks of forks nest at most {_MAX_FORK_DEPTH} deep under Landlock")
            size, _entries = _disk_usage(self.workdir, self._lineage.quota_bytes)
            if self._lineage.over_quota(adding=size):
                raise SandboxError(f"cannot fork: copying the working directory ({size / 2**20:.1f} MB) would exceed "
                                   f"the disk quota of {self._lineage.quota_bytes // 2**20} MB")
            child = object.__new__(PythonSandbox)
            child._setup(self._tools, self._timeout, self._memory_limit_mb, self._cpu_time_limit, self._allowed,
                         self._max_output_chars, self._lineage, parent_home=self._home, depth=self._depth + 1)
            try:
                _copy_tree(self.workdir, child.workdir, budget=size)
                if self._worker is not None and self._worker.alive():
                    child._worker = self._fork_worker(child._home, child.workdir)
            except BaseException:
                child.close()
                raise
            return child

    def reset(self) -> None:
        """Fresh state: new interpreter, empty working directory."""
        with self._lock:
            self._check_open()
            self._discard_worker()
            _clear_dir(self.workdir)
            try:
                self._worker = self._spawn_worker()
            except SandboxError:
                self._worker = None  # the next run retries and reports the problem as an observation

    def close(self) -> None:
        """Kill the worker and remove the working directory. Idempotent."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if getattr(self, "_closed", True):
                return
            self._closed = True
            if self._owner != os.getpid():
                return  # a copy inherited by a forked process: the worker and files belong to the original
            self._discard_worker()
            shutil.rmtree(self.workdir, ignore_errors=True)
            try:
                self._home.rmdir()  # unless forks still live in it (the lineage's last close removes them)
            except OSError:
                pass
            self._lineage.release()
            _live.discard(self)

    def __enter__(self) -> PythonSandbox:
        return self

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"workdir={str(self.workdir)!r}"
        return f"<PythonSandbox {state} timeout={self._timeout:g}s>"

    # -- internals -----------------------------------------------------------------------------------------------
    def _check_quota(self) -> None:
        if self._lineage.over_quota():
            raise _QuotaExceeded

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxError("this sandbox is closed")
        if self._owner != os.getpid():
            raise SandboxError("this sandbox belongs to the process that created it, not to this forked copy")

    def _discard_worker(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()

    def _config(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir), "home": str(self._home), "sys_path": _worker_sys_path(),
            "allowed_imports": list(self._allowed), "memory_limit_mb": self._memory_limit_mb,
            "cpu_time_limit": self._cpu_time_limit, "max_output_chars": self._max_output_chars,
            "tools": sorted(self._tools), "max_file_bytes": min(_MAX_FILE_BYTES, self._lineage.quota_bytes), "max_open_files": _MAX_OPEN_FILES,
            "max_processes": _MAX_PROCESSES, "uid": secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0],
        }

    def _spawn_worker(self) -> _Worker:
        if not sys.executable:
            raise SandboxError("cannot locate the Python executable to start the worker")
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(_WORKER_SCRIPT), str(child_sock.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(child_sock.fileno(),), cwd=str(self.workdir), env=_worker_env(self.workdir),
                start_new_session=True)
        except OSError as exc:
            parent_sock.close()
            raise SandboxError(f"cannot start the worker process: {exc}") from exc
        finally:
            child_sock.close()
        _sessions.acquire(popen.pid)
        worker = _Worker(_Channel(parent_sock), popen.pid, popen.pid, popen=popen)
        try:
            deadline = time.monotonic() + max(_STARTUP_TIMEOUT, self._timeout)
            key = protocol.new_key()
            worker.chan.send(("config", {**self._config(), "key": key}), deadline)
            worker.chan.key = key
            message, fds = worker.chan.recv(deadline)
            _close_fds(fds)
            if isinstance(message, tuple) and len(message) == 2 and message[0] == "init_error":
                raise SandboxError(f"the worker failed to initialise:\n{message[1]}")
            if not (isinstance(message, tuple) and len(message) == 2 and message[0] == "ready"
                    and isinstance(message[1], dict)):
                raise SandboxError("the worker sent an unexpected first message")
            worker.protections = dict(message[1].get("protections") or {})
            return worker
        except (_Timeout, EOFError, OSError, protocol.ProtocolError) as exc:
            reason = worker.death_reason() if isinstance(exc, EOFError) else type(exc).__name__
            worker.kill()
            raise SandboxError(f"the worker did not start ({reason})") from None
        except BaseException:
            worker.kill()
            raise

    def _fork_worker(self, home: Path, workdir: Path) -> _Worker | None:
        """Ask our worker to fork a copy confined to ``home``, serving ``workdir``; None (and our worker
        restarted) on failure."""
        worker = self._worker
        assert worker is not None
        deadline = time.monotonic() + max(_FORK_TIMEOUT, self._timeout)
        fds: list[int] = []
        chan: _Channel | None = None
        try:
            worker.chan.send(("fork", (str(home), str(workdir))), deadline)
            message, fds = worker.chan.recv(deadline)
            if message != ("forked", {}) or len(fds) != 1:
                raise protocol.ProtocolError("bad fork reply")
            # the copy is a fork of our worker: it holds the same key, on a channel of its own
            chan = _Channel(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=fds.pop()), worker.chan.key)
            hello, extra = chan.recv(deadline)
            _close_fds(extra)
            if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "hello" and isinstance(hello[1], dict)
                    and type(hello[1].get("pid")) is int):
                raise protocol.ProtocolError("bad hello")
            pid = hello[1]["pid"]
            # The copy is our worker's child, in its session; check before trusting the pid it reports.
            if _proc_stat(pid) != (worker.pid, worker.sid):
                raise protocol.ProtocolError("forked worker is not who it claims to be")
            try:  # a pidfd keeps naming this process even after it exits (no pid-reuse race)
                pidfd: int | None = os.pidfd_open(pid)
            except (AttributeError, OSError):
                pidfd = None
            if _proc_stat(pid) != (worker.pid, worker.sid):
                if pidfd is not None:
                    os.close(pidfd)
                raise protocol.ProtocolError("forked worker exited")
            _sessions.acquire(worker.sid)
            return _Worker(chan, pid, worker.sid, pidfd=pidfd, protections=dict(hello[1].get("protections") or {}))
        except (_Timeout, EOFError, OSError, protocol.ProtocolError):
            # Our worker misbehaved (or a copy could not be made): restart ours, the copy starts fresh.
            _close_fds(fds)
            if chan is not None:
                chan.close()
            self._discard_worker()
            return None

    def _call_tool(self, name: Any, args: Any, kwargs: Any) -> tuple:
        if not (isinstance(name, str) and isinstance(args, tuple) and isinstance(kwargs, dict)
                and all(isinstance(k, str) for k in kwargs)):
            raise protocol.ProtocolError("malformed tool call")
        fn = self._tools.get(name)
        if fn is None:
            return ("tool_result", False, "NameError", f"There is no tool named {name!r}.")
        if name not in self._signatures:
            self._signatures[name] = _signature(fn)
        sig = self._signatures[name]
        if sig is not None:
            try:
                sig.bind(*args, **kwargs)
            except TypeError as exc:
                return ("tool_result", False, "TypeError", f"{name}() {exc}. Signature: {name}{sig}")
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a failing tool is the code's problem, not the parent's
            return ("tool_result", False, "RuntimeError", f"Tool '{name}' failed with {type(exc).__name__}: {exc}")
        try:
            reply = ("tool_result", True, protocol.to_plain(result))
            protocol.frame(reply, b"", 0)  # refuses what the worker could not read back
            return reply
        except protocol.NotPlainData:
            text = str(result)
            if len(text) > protocol.MAX_FRAME_BYTES // 8:
                text = text[: protocol.MAX_FRAME_BYTES // 8]
            return ("tool_result", True, text)

    def _observation(self, payload: Any) -> tuple[Observation, bool]:
        if not isinstance(payload, dict):
            raise protocol.ProtocolError("result is not a dict")
        printed, value, error = payload.get("printed"), payload.get("value"), payload.get("error")
        final, final_is_repr = payload.get("final"), payload.get("final_is_repr")
        stray_threads = payload.get("stray_threads")
        optional_str = (str, type(None))
        if not (isinstance(printed, str) and isinstance(value, optional_str) and isinstance(error, optional_str)
                and type(final) is bool and type(final_is_repr) is bool and type(stray_threads) is bool
                and (value is not None or error is not None)):
            raise protocol.ProtocolError("malformed result")
        final_value = payload.get("final_value") if final else None
        longest = self._max_output_chars + _CLIP_NOTE_CHARS  # what the worker's truncation can produce
        if any(isinstance(text, str) and len(text) > longest for text in (printed, value, error, final_value)):
            raise protocol.ProtocolError("result text longer than max_output_chars")
        printed, value, error = _clean_text(printed), _clean_text(value), _clean_text(error)
        if isinstance(final_value, str):
            final_value = _clean_text(final_value)
        if stray_threads:
            error = (f"{error}\n" if error is not None else "") + (
                "The code left threads running; the interpreter was restarted and its variables are lost.")
        return Observation.from_parts(printed=printed, value=value, error_message=error, final_answer=final_value,
                                      has_final_answer=final), stray_threads
