"""Worker process of :class:`~trl_agent_distill.agent.sandbox.PythonSandbox`.

Started by the parent as ``python -I -S -B _sandbox_worker.py <fd>`` where ``<fd>`` is its end of a Unix
socket pair; it must not import ``trl_agent_distill`` (whose ``__init__`` pulls in torch), so its helpers
are loaded as top-level modules from this directory.

Life of a worker: receive the configuration, apply the OS limits, build the sandboxed namespace and the
audit hook, report ``ready``, then serve requests one at a time:

* ``("run", code)`` -> runs the snippet, possibly calling back ``("tool", name, args, kwargs)`` and
  waiting for ``("tool_result", ...)``, and answers ``("result", {...})``;
* ``("fork", (home, workdir))`` -> ``os.fork()``; the child takes over a new socket pair whose other end is
  sent to the parent with SCM_RIGHTS, rebinds its inherited descriptors to its own copies of the files,
  narrows Landlock to ``home``, moves to ``workdir`` and says ``("hello", ...)``.

The parent kills the worker on timeout; the worker exits by itself when the parent's end closes.
"""

from __future__ import annotations

import _thread
import ast
import gc
import importlib.util
import io
import os
import signal
import socket
import sys
import sysconfig
import types
from typing import Any

_MAX_FINAL_BYTES = 16 * 1024 * 1024
# Kept allocated while snippets run and freed when one runs out of memory, so that the worker can still
# format and send its answer (the snippet's data usually stays referenced by its variables).
_RESERVE_BYTES = 4 * 1024 * 1024


class _FinalAnswer(BaseException):
    """Raised by final_answer() to stop the snippet; BaseException so that `except Exception` cannot eat it."""


class _Capture(io.TextIOBase):
    """stdout replacement that keeps the first and last characters only, so printing 100 MB is cheap."""

    def __init__(self, limit: int):
        self.limit = limit
        self.reset()

    def reset(self) -> None:
        self.head: list[str] = []
        self.head_len = 0
        self.tail: list[str] = []
        self.tail_len = 0
        self.total = 0

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: Any) -> int:
        if not issubclass(type(s), str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        s = str.__str__(s)
        n = len(s)
        self.total += n
        if self.head_len < self.limit:
            take = s[: self.limit - self.head_len]
            self.head.append(take)
            self.head_len += len(take)
        if self.total > self.limit:  # keep (at most) the last `limit` characters too
            piece = s[-self.limit:]
            self.tail.append(piece)
            self.tail_len += len(piece)
            if self.tail_len > 2 * self.limit:
                joined = "".join(self.tail)[-self.limit:]
                self.tail, self.tail_len = [joined], len(joined)
        return n

    def text(self) -> str:
        return _clip("".join(self.head), self.total, "".join(self.tail), self.limit, "output")


def _clip(head: str, total: int, tail: str, limit: int, what: str) -> str:
    """First half + note + last half of a text of ``total`` characters when it exceeds ``limit``."""
    if total <= limit:
        return head
    keep_tail = limit // 2
    keep_head = limit - keep_tail
    cut = total - keep_head - keep_tail
    end = tail[-keep_tail:] if keep_tail else ""
    return (f"{head[:keep_head]}\n[... {cut:,} characters of {what} cut here, to stay below {limit:,} "
            f"characters ...]\n{end}")


def _truncate(text: str, limit: int) -> str:
    return _clip(text, len(text), text, limit, "this value")


class _Channel:
    """The worker's end of its channel: authenticated frames (see ``_sandbox_protocol``), one counter each way."""

    def __init__(self, sock: socket.socket, protocol: Any, key: bytes = b""):
        self.sock = sock
        self.protocol = protocol
        self.key = key
        self.sent = self.received = 0

    def send(self, obj: Any, fds: tuple[int, ...] = ()) -> None:
        """Send one message; NotPlainData (nothing sent) if it is too large."""
        data = self.protocol.frame(obj, self.key, self.sent)
        self.sent += 1
        if fds:  # the descriptors travel with the first byte of the frame
            socket.send_fds(self.sock, [data[:1]], list(fds))
            data = data[1:]
        self.sock.sendall(data)

    def recv(self) -> Any:
        (size,) = self.protocol.HEADER.unpack(self._exact(self.protocol.HEADER.size))
        self.protocol.check_size(size)
        self.received += 1
        return self.protocol.open_frame(self._exact(size), self.key, self.received - 1)

    def _exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise EOFError
            got += k
        return bytes(buf)


def _read_roots(allowed: tuple[str, ...], sys_path: list[str]) -> tuple[list[str], list[str]]:
    """Directories and files sandboxed code (and the libraries it uses) may read, besides its workdir."""
    dirs: set[str] = set()
    for scheme_path in ("stdlib", "platstdlib", "purelib", "platlib"):
        for vars_ in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
            try:
                dirs.add(sysconfig.get_path(scheme_path, vars=vars_))
            except (KeyError, ValueError):
                pass
    dynload = os.path.join(sysconfig.get_path("platstdlib"), "lib-dynload")
    for entry in sys_path:
        base = os.path.basename(entry.rstrip(os.sep))
        if base in ("site-packages", "dist-packages", "lib-dynload") or entry == dynload:
            dirs.add(entry)
    for name in allowed:  # packages installed elsewhere (e.g. on PYTHONPATH): just their own directory
        try:
            spec = importlib.util.find_spec(name.partition(".")[0])
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            if spec.submodule_search_locations:
                dirs.update(spec.submodule_search_locations)
            elif spec.origin and os.path.isabs(spec.origin):
                dirs.add(spec.origin)
    # Shared libraries loaded lazily by extension modules, CPU topology (OpenBLAS), time zones.
    dirs.update(("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/usr/share/zoneinfo",
                 "/sys/devices/system/cpu"))
    files = ["/etc/ld.so.cache", "/etc/localtime", "/dev/null", "/dev/urandom", "/dev/zero"]
    dirs_out = sorted({os.path.realpath(d) for d in dirs if d and os.path.exists(d)})
    return dirs_out, [f for f in files if os.path.exists(f)]


def main() -> None:  # noqa: C901 - one linear setup, then the request loop
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    import _sandbox_os as oslayer  # noqa: PLC0415 - located at run time, see module docstring
    import _sandbox_policy as policy  # noqa: PLC0415
    import _sandbox_protocol as protocol  # noqa: PLC0415

    sys.path.remove(here)
    chan = _Channel(socket.socket(fileno=int(sys.argv[1])), protocol)
    try:
        kind, cfg = chan.recv()
        assert kind == "config"
        chan.key = cfg.pop("key")  # from now on every frame is authenticated; sandboxed code never sees the key
        # ------------------------------------------------------------------ environment & OS layer
        sys.path[:] = list(cfg["sys_path"])
        sys.dont_write_bytecode = True
        workdir = os.path.realpath(cfg["workdir"])
        home = os.path.realpath(cfg["home"])  # the workdir and the directories of future copies
        os.chdir(workdir)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past RLIMIT_FSIZE -> OSError, not death
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked copies are reaped automatically
        allowed = tuple(cfg["allowed_imports"])
        read_dirs, read_files = _read_roots(allowed, sys.path)
        limits = oslayer.apply_rlimits(memory_bytes=cfg["memory_limit_mb"] * 1024 * 1024,
                                       max_file_bytes=cfg["max_file_bytes"], max_open_files=cfg["max_open_files"])
        dropped_root = oslayer.drop_root(cfg["uid"], cfg["max_processes"])
        if dropped_root:
            limits.append("RLIMIT_NPROC")
        no_new_privs = oslayer.set_no_new_privs()
        oslayer.set_not_dumpable()  # after the uid change, which resets it
        landlock = oslayer.landlock_restrict([home], read_dirs + read_files)
        seccomp = oslayer.install_seccomp()
        protections = {"rlimits": limits, "uid": os.getuid(), "dropped_root": dropped_root,
                       "no_new_privs": no_new_privs, "landlock_abi": landlock, "seccomp": seccomp, "audit_hook": True}
        cpu_limit = int(cfg["cpu_time_limit"])
        max_chars = int(cfg["max_output_chars"])

        # ------------------------------------------------------------------ sandboxed namespace
        state = types.SimpleNamespace(workdir=workdir, final_called=False, final_value=None,
                                      reserve=bytearray(_RESERVE_BYTES))
        user_globals: dict[str, Any] = {}
        open_file = policy.make_open(lambda: state.workdir)

        def builtins_factory() -> dict:
            return policy.make_builtins(gate=gate, open_file=open_file, user_globals=user_globals)

        def on_import(module: Any) -> None:
            if getattr(module, "__name__", "").partition(".")[0] == "sympy":
                policy.patch_sympy(gate, builtins_factory)

        gate = policy.ModuleGate(allowed, on_import=on_import)

        def final_answer(answer: Any) -> None:
            state.final_called = True
            state.final_value = answer
            raise _FinalAnswer

        def make_tool(name: str) -> Any:
            def tool(*args: Any, **kwargs: Any) -> Any:
                try:
                    chan.send(("tool", name, protocol.to_plain(args), protocol.to_plain(kwargs)))
                except protocol.NotPlainData as exc:
                    raise TypeError(f"Arguments of tool '{name}' must be plain data (str, numbers, lists, dicts, "
                                    f"...): {exc}") from None
                reply = chan.recv()
                if not (isinstance(reply, tuple) and len(reply) >= 3 and reply[0] == "tool_result"):
                    os._exit(4)  # desynchronised channel: let the parent restart us
                if reply[1]:
                    return reply[2]
                error_type = {"TypeError": TypeError, "NameError": NameError}.get(reply[2], RuntimeError)
                raise error_type(reply[3])

            tool.__name__ = tool.__qualname__ = name
            return tool

        tools = {name: make_tool(name) for name in cfg["tools"]}
        capture = _Capture(max_chars)
        discard = _Capture(1)

        # ------------------------------------------------------------------ trusted operations
        # The audit hook lets these (and only these) code objects do privileged things. They are closures,
        # unreachable from sandboxed code, and never call back into it.
        def set_cpu_budget() -> None:
            try:
                oslayer.set_cpu_budget(cpu_limit)
            except (OSError, ValueError):
                pass

        def user_lineno(tb: Any) -> int | None:
            lineno = None
            while tb is not None:
                if tb.tb_frame.f_code.co_filename == "<code>":
                    lineno = tb.tb_lineno
                tb = tb.tb_next
            return lineno

        def fork(new_home: str, new_workdir: str) -> bool:
            """Fork this interpreter; returns True in the child, which then serves the new channel."""
            gc.disable()  # no finalizer of sandboxed objects may run while privileged calls are allowed
            try:
                parent_end, child_end = socket.socketpair()
                pid = os.fork()
                if pid == 0:
                    parent_end.close()
                    old, chan.sock = chan.sock, child_end
                    chan.sent = chan.received = 0  # a new channel: its frames are counted from zero
                    old.close()
                    # The copy may write only under its own home (inside ours, which is how Landlock can
                    # grant it): not our files, nor its siblings', not even through descriptors it inherited.
                    oslayer.rebind_descriptors(state.workdir, new_workdir, keep=(child_end.fileno(),),
                                               max_fd=int(cfg["max_open_files"]))
                    if protections["landlock_abi"]:
                        protections["landlock_abi"] = oslayer.landlock_restrict([new_home], read_dirs + read_files)
                        if not protections["landlock_abi"]:
                            os._exit(5)  # e.g. Landlock's 16 layers used up: no copy rather than a wider one
                    os.chdir(new_workdir)
                    state.workdir = os.path.realpath(new_workdir)
                    return True
                child_end.close()
                chan.send(("forked", {}), fds=(parent_end.fileno(),))
                parent_end.close()
                return False
            finally:
                gc.enable()

        trusted_refs = (set_cpu_budget, user_lineno, fork)
        trusted_ids = {id(f.__code__) for f in trusted_refs}
        sys.addaudithook(policy.make_audit_hook(get_workdir=lambda: state.workdir, read_roots=read_dirs,
                                                read_files=read_files, trusted_codes=trusted_ids))
    except BaseException:
        import traceback  # noqa: PLC0415

        chan.send(("init_error", traceback.format_exc()))
        os._exit(1)

    # ---------------------------------------------------------------------- running snippets
    # str() / repr() of the code's objects run code of its choosing: through the policy's isolated helper, so
    # that nothing it picks runs with this module's frame as its caller.
    def render(value: Any) -> str:
        try:
            text = policy.call_isolated(str, value)
        except BaseException as exc:  # noqa: BLE001 - any failure of user __str__ becomes a placeholder
            text = f"<unprintable {type(value).__name__} object: str() raised {type(exc).__name__}>"
        return _truncate(text, max_chars)

    def format_error(exc: BaseException, lines: list[str], lineno: int | None = None) -> str:
        """``Type: message`` (just the message for sandbox refusals) and the user's line where it happened."""
        try:
            message = policy.call_isolated(str, exc)
        except BaseException:  # noqa: BLE001
            message = "<exception message unavailable>"
        if type(exc) in (SyntaxError, IndentationError, TabError):  # the parser's (a subclass's fields run code)
            text = f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"
            if exc.text and len(exc.text.strip()) <= 200:
                caret = " " * max(0, (exc.offset or 1) - 1 - (len(exc.text) - len(exc.text.lstrip())))
                text += f"\n    {exc.text.strip()}\n    {caret}^"
            return text
        if getattr(type(exc), "sandbox_policy", False):
            text = message
        else:
            text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        if lineno is None:
            lineno = user_lineno(exc.__traceback__)
        if lineno and sum(1 for line in lines if line.strip()) > 1 and 1 <= lineno <= len(lines):
            text += f"\n  at line {lineno}: {lines[lineno - 1].strip()}"
        return text

    def run(code: str) -> dict:
        capture.reset()
        discard.reset()
        sys.stdout, sys.stderr = capture, discard
        state.final_called, state.final_value = False, None
        user_globals["__builtins__"] = builtins_factory()
        user_globals["__name__"] = "__main__"
        user_globals["final_answer"] = final_answer
        user_globals.update(tools)
        lines = code.splitlines()
        value_text = error = None
        set_cpu_budget()
        try:
            tree = policy.prepare(ast.parse(code, "<code>", "exec"))
        except policy.SandboxViolation as exc:  # refused before running: the violation knows its line
            return finish(_truncate(format_error(exc, lines, exc.lineno), max_chars), None)
        except BaseException as exc:  # noqa: BLE001 - SyntaxError, or ValueError for NUL bytes
            return finish(_truncate(format_error(exc, lines), max_chars), None)
        try:
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<code>", "exec"), user_globals)
            value = None
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), user_globals)
            value_text = render(value)
        except _FinalAnswer:
            pass
        except BaseException as exc:  # noqa: BLE001 - everything the snippet raises is an observation
            if isinstance(exc, MemoryError):
                state.reserve = None
            try:
                error = _truncate(format_error(exc, lines), max_chars)
            except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
                error = f"{type(exc).__name__} (details unavailable)"
        return finish(error, value_text)

    def finish(error: str | None, value_text: str | None) -> dict:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        result = {"printed": capture.text(), "value": value_text, "error": error, "final": state.final_called,
                  "final_value": None, "final_is_repr": False,
                  # a thread outliving its run could act in later runs: the host ends this interpreter
                  "stray_threads": _thread._count() > 0}
        if state.final_called:
            final = state.final_value
            state.final_value = None
            result["value"] = render(final)
            try:
                plain = protocol.to_plain(final)
                if len(protocol.dumps(plain)) > _MAX_FINAL_BYTES:
                    raise protocol.NotPlainData("too large")
                result["final_value"] = plain
            except Exception:  # noqa: BLE001 - not plain data (or broken): fall back to its repr
                try:
                    result["final_value"] = _truncate(policy.call_isolated(repr, final), max_chars)
                except BaseException:  # noqa: BLE001
                    result["final_value"] = result["value"]
                result["final_is_repr"] = True
        return result

    chan.send(("ready", {"pid": os.getpid(), "protections": protections}))
    while True:
        try:
            message = chan.recv()
        except (EOFError, OSError, protocol.ProtocolError):
            os._exit(0)
        if not isinstance(message, tuple) or not message:
            os._exit(3)
        if message[0] == "run" and isinstance(message[1], str):
            try:
                reply = ("result", run(message[1]))
            except MemoryError:
                state.reserve = None
                reply = ("result", {"printed": "", "value": None, "error": "MemoryError", "final": False,
                                    "final_value": None, "final_is_repr": False, "stray_threads": False})
            chan.send(reply)
            if state.reserve is None:
                try:
                    state.reserve = bytearray(_RESERVE_BYTES)
                except MemoryError:
                    pass
        elif message[0] == "fork" and isinstance(message[1], tuple) and len(message[1]) == 2:
            if fork(*message[1]):
                chan.send(("hello", {"pid": os.getpid(), "protections": protections}))
        else:
            os._exit(3)


if __name__ == "__main__":
    main()
