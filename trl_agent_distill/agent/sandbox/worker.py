"""Worker process of :class:`~trl_agent_distill.agent.sandbox.PythonSandbox`.

Started by the host as ``python -I -S -B worker.py <fd>`` where ``<fd>`` is its end of a Unix socket pair.
It must not import ``trl_agent_distill`` (whose ``__init__`` pulls in torch), so it loads its three helper
modules (``os_layer``, ``policy``, ``protocol``: standard library only) from their files under private names.

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
    """The worker's end of its channel: authenticated frames (see ``protocol``), one counter each way."""

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


def _load_helper(name: str) -> types.ModuleType:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_tad_sandbox_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Worker:
    """One sandboxed interpreter: set up once (:meth:`configure`), then serves the host (:meth:`serve`).

    The audit hook lets the code objects of :meth:`_set_cpu_budget`, :meth:`_user_lineno` and :meth:`_fork`
    (and only those) do privileged things; they never call back into sandboxed code, which holds no reference
    to this object (``final_answer`` and the tools are closures over what they need).
    """

    def __init__(self, chan: _Channel, os_layer: Any, policy: Any, protocol: Any):
        self.chan, self.os_layer, self.policy, self.protocol = chan, os_layer, policy, protocol
        self.user_globals: dict[str, Any] = {}
        self.final_called, self.final_value = False, None
        self.reserve: bytearray | None = bytearray(_RESERVE_BYTES)

    # -- set-up --------------------------------------------------------------------------------------------------
    def configure(self, cfg: dict) -> None:
        self.cfg = cfg
        self.cpu_limit = int(cfg["cpu_time_limit"])
        self.max_chars = int(cfg["max_output_chars"])
        self.workdir = os.path.realpath(cfg["workdir"])
        self._apply_os_layer(cfg)
        self._build_namespace(cfg)
        trusted = {id(f.__code__) for f in (_Worker._set_cpu_budget, _Worker._user_lineno, _Worker._fork)}
        sys.addaudithook(self.policy.make_audit_hook(get_workdir=lambda: self.workdir, read_roots=self.read_dirs,
                                                     read_files=self.read_files, trusted_codes=trusted))

    def _apply_os_layer(self, cfg: dict) -> None:
        os_layer = self.os_layer
        sys.path[:] = list(cfg["sys_path"])
        sys.dont_write_bytecode = True
        home = os.path.realpath(cfg["home"])  # the workdir and the directories of future copies
        os.chdir(self.workdir)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past RLIMIT_FSIZE -> OSError, not death
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked copies are reaped automatically
        self.read_dirs, self.read_files = _read_roots(tuple(cfg["allowed_imports"]), sys.path)
        limits = os_layer.apply_rlimits(memory_bytes=cfg["memory_limit_mb"] * 1024 * 1024,
                                        max_file_bytes=cfg["max_file_bytes"], max_open_files=cfg["max_open_files"])
        dropped_root = os_layer.drop_root(cfg["uid"], cfg["max_processes"])
        if dropped_root:
            limits.append("RLIMIT_NPROC")
        no_new_privs = os_layer.set_no_new_privs()
        os_layer.set_not_dumpable()  # after the uid change, which resets it
        landlock = os_layer.landlock_restrict([home], self.read_dirs + self.read_files)
        seccomp = os_layer.install_seccomp()
        self.protections = {"rlimits": limits, "uid": os.getuid(), "dropped_root": dropped_root,
                            "no_new_privs": no_new_privs, "landlock_abi": landlock, "seccomp": seccomp,
                            "audit_hook": True}

    def _build_namespace(self, cfg: dict) -> None:
        policy, protocol, chan, user_globals = self.policy, self.protocol, self.chan, self.user_globals
        open_file = policy.make_open(lambda: self.workdir)

        def builtins_factory() -> dict:
            return policy.make_builtins(gate=gate, open_file=open_file, user_globals=user_globals)

        def on_import(module: Any) -> None:
            if getattr(module, "__name__", "").partition(".")[0] == "sympy":
                policy.patch_sympy(gate, builtins_factory)

        gate = policy.ModuleGate(tuple(cfg["allowed_imports"]), on_import=on_import)
        answers = self

        def final_answer(answer: Any) -> None:
            answers.final_called, answers.final_value = True, answer
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
                    os._exit(4)  # desynchronised channel: let the host restart us
                if reply[1]:
                    return reply[2]
                error_type = {"TypeError": TypeError, "NameError": NameError}.get(reply[2], RuntimeError)
                raise error_type(reply[3])

            tool.__name__ = tool.__qualname__ = name
            return tool

        self.builtins_factory = builtins_factory
        self.fixed_names = {"final_answer": final_answer, **{name: make_tool(name) for name in cfg["tools"]}}
        self.capture, self.discard = _Capture(self.max_chars), _Capture(1)

    # -- trusted operations --------------------------------------------------------------------------------------
    def _set_cpu_budget(self) -> None:
        try:
            self.os_layer.set_cpu_budget(self.cpu_limit)
        except (OSError, ValueError):
            pass

    @staticmethod
    def _user_lineno(tb: Any) -> int | None:
        lineno = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == "<code>":
                lineno = tb.tb_lineno
            tb = tb.tb_next
        return lineno

    def _fork(self, new_home: str, new_workdir: str) -> bool:
        """Fork this interpreter; returns True in the child, which then serves the new channel."""
        chan = self.chan
        gc.disable()  # no finalizer of sandboxed objects may run while privileged calls are allowed
        try:
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                parent_end.close()
                old, chan.sock = chan.sock, child_end
                chan.sent = chan.received = 0  # a new channel: its frames are counted from zero
                old.close()
                # The copy may write only under its own home (inside ours, which is how Landlock can grant
                # it): not our files, nor its siblings', not even through descriptors it inherited.
                self.os_layer.rebind_descriptors(self.workdir, new_workdir, keep=(child_end.fileno(),),
                                                 max_fd=int(self.cfg["max_open_files"]))
                if self.protections["landlock_abi"]:
                    self.protections["landlock_abi"] = self.os_layer.landlock_restrict(
                        [new_home], self.read_dirs + self.read_files)
                    if not self.protections["landlock_abi"]:
                        os._exit(5)  # e.g. Landlock's 16 layers used up: no copy rather than a wider one
                os.chdir(new_workdir)
                self.workdir = os.path.realpath(new_workdir)
                return True
            child_end.close()
            chan.send(("forked", {}), fds=(parent_end.fileno(),))
            parent_end.close()
            return False
        finally:
            gc.enable()

    # -- running snippets ----------------------------------------------------------------------------------------
    # str() / repr() of the code's objects run code of its choosing: through the policy's isolated helper, so
    # that nothing it picks runs with this module's frame as its caller.
    def _render(self, value: Any) -> str:
        try:
            text = self.policy.call_isolated(str, value)
        except BaseException as exc:  # noqa: BLE001 - any failure of user __str__ becomes a placeholder
            text = f"<unprintable {type(value).__name__} object: str() raised {type(exc).__name__}>"
        return _truncate(text, self.max_chars)

    def _format_error(self, exc: BaseException, lines: list[str], lineno: int | None = None) -> str:
        """``Type: message`` (just the message for sandbox refusals) and the user's line where it happened."""
        try:
            message = self.policy.call_isolated(str, exc)
        except BaseException:  # noqa: BLE001
            message = "<exception message unavailable>"
        if type(exc) in (SyntaxError, IndentationError, TabError):  # the parser's (a subclass's fields run code)
            text = f"{type(exc).__name__}: {exc.msg} (line {exc.lineno})"
            if exc.text and len(exc.text.strip()) <= 200:
                caret = " " * max(0, (exc.offset or 1) - 1 - (len(exc.text) - len(exc.text.lstrip())))
                text += f"\n    {exc.text.strip()}\n    {caret}^"
            return _truncate(text, self.max_chars)
        if getattr(type(exc), "sandbox_policy", False):
            text = message
        else:
            text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
        if lineno is None:
            lineno = self._user_lineno(exc.__traceback__)
        if lineno and sum(1 for line in lines if line.strip()) > 1 and 1 <= lineno <= len(lines):
            text += f"\n  at line {lineno}: {lines[lineno - 1].strip()}"
        return _truncate(text, self.max_chars)

    def run(self, code: str) -> dict:
        policy, user_globals = self.policy, self.user_globals
        self.capture.reset()
        self.discard.reset()
        sys.stdout, sys.stderr = self.capture, self.discard
        self.final_called, self.final_value = False, None
        user_globals["__builtins__"] = self.builtins_factory()
        user_globals["__name__"] = "__main__"
        user_globals.update(self.fixed_names)
        lines = code.splitlines()
        value_text = error = None
        self._set_cpu_budget()
        try:
            tree = policy.prepare(ast.parse(code, "<code>", "exec"))
        except policy.SandboxViolation as exc:  # refused before running: the violation knows its line
            return self._finish(self._format_error(exc, lines, exc.lineno), None)
        except BaseException as exc:  # noqa: BLE001 - SyntaxError, or ValueError for NUL bytes
            return self._finish(self._format_error(exc, lines), None)
        try:
            last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
            exec(compile(tree, "<code>", "exec"), user_globals)  # noqa: S102 - the sandbox's purpose; the policy checked the tree
            value = None
            if last is not None:
                value = eval(compile(ast.Expression(last.value), "<code>", "eval"), user_globals)  # noqa: S307 - as above
            value_text = self._render(value)
        except _FinalAnswer:
            pass
        except BaseException as exc:  # noqa: BLE001 - everything the snippet raises is an observation
            if isinstance(exc, MemoryError):
                self.reserve = None
            try:
                error = self._format_error(exc, lines)
            except BaseException:  # noqa: BLE001 - e.g. MemoryError while formatting
                error = _truncate(f"{type(exc).__name__} (details unavailable)", self.max_chars)
        return self._finish(error, value_text)

    def _finish(self, error: str | None, value_text: str | None) -> dict:
        protocol = self.protocol
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
        result = {"printed": self.capture.text(), "value": value_text, "error": error, "final": self.final_called,
                  "final_value": None, "final_is_repr": False,
                  # a thread outliving its run could act in later runs: the host ends this interpreter
                  "stray_threads": _thread._count() > 0}
        if self.final_called:
            final, self.final_value = self.final_value, None
            result["value"] = self._render(final)
            try:
                plain = protocol.to_plain(final)
                if len(protocol.frame(plain, b"", 0)) > _MAX_FINAL_BYTES:  # frame() also refuses what the host would
                    raise protocol.NotPlainData("too large")
                result["final_value"] = plain
            except Exception:  # noqa: BLE001 - not plain data (or broken): fall back to its repr
                try:
                    result["final_value"] = _truncate(self.policy.call_isolated(repr, final), self.max_chars)
                except BaseException:  # noqa: BLE001
                    result["final_value"] = result["value"]
                result["final_is_repr"] = True
        return result

    # -- the request loop ----------------------------------------------------------------------------------------
    def serve(self) -> None:
        chan = self.chan
        chan.send(("ready", {"pid": os.getpid(), "protections": self.protections}))
        while True:
            try:
                message = chan.recv()
            except (EOFError, OSError, self.protocol.ProtocolError):
                os._exit(0)
            if not isinstance(message, tuple) or not message:
                os._exit(3)
            if message[0] == "run" and isinstance(message[1], str):
                chan.send(("result", self._run_reporting_memory_errors(message[1])))
            elif message[0] == "fork" and isinstance(message[1], tuple) and len(message[1]) == 2:
                if self._fork(*message[1]):
                    chan.send(("hello", {"pid": os.getpid(), "protections": self.protections}))
            else:
                os._exit(3)

    def _run_reporting_memory_errors(self, code: str) -> dict:
        try:
            result = self.run(code)
        except MemoryError:
            self.reserve = None
            result = {"printed": "", "value": None, "error": "MemoryError", "final": False, "final_value": None,
                      "final_is_repr": False, "stray_threads": False}
        if self.reserve is None:
            try:
                self.reserve = bytearray(_RESERVE_BYTES)
            except MemoryError:
                pass
        return result


def main() -> None:
    os_layer, policy, protocol = (_load_helper(name) for name in ("os_layer", "policy", "protocol"))
    chan = _Channel(socket.socket(fileno=int(sys.argv[1])), protocol)
    worker = _Worker(chan, os_layer, policy, protocol)
    try:
        kind, cfg = chan.recv()
        assert kind == "config"
        chan.key = cfg.pop("key")  # from now on every frame is authenticated; sandboxed code never sees the key
        worker.configure(cfg)
    except BaseException:  # noqa: BLE001 - any start-up failure is reported to the host, then the worker exits
        import traceback  # noqa: PLC0415

        chan.send(("init_error", traceback.format_exc()))
        os._exit(1)
    worker.serve()


if __name__ == "__main__":
    main()
