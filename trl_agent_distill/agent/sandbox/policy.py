"""Language layer of the sandbox worker: what sandboxed Python code may name, import, and do.

Three mechanisms, all inside the worker process:

1. :func:`prepare` checks the AST before anything runs: no dunder names (``__import__``,
   ``__builtins__`` ...), no private/dunder attributes except a few harmless ones (``__name__``,
   ``__init__`` ...), no frame/code/generator internals (``gi_frame``, ``tb_frame``, ``f_globals`` ...),
   no ``ctypes``/``cffi``/``mro`` attributes, and in class bodies only ordinary special methods (no
   ``__getattr__``, ``__del__``, ``__reduce__``, ``__array_interface__`` ...). It then adds three runtime
   guards: ``f(**d)`` checks the keys of ``d`` like written keywords, ``x.__class__`` becomes the
   sandbox's ``type(x)``, which never returns a metaclass (metaclasses build classes with arbitrary
   special attributes, e.g. an ``__array_interface__`` pointing anywhere in memory), and strings in
   annotations must be type expressions (the standard library evaluates them itself).
2. :func:`make_builtins` gives the code a reduced ``__builtins__``: ``__import__`` honours the import
   allow-list and hands out read-only *module views* (:class:`ModuleGate`) that hide private names,
   non-allowed modules, metaclasses and known-dangerous functions of allowed packages, and replace a few
   objects by checked stand-ins (``functools.update_wrapper``/``wraps``, and every ``numpy.ndarray``
   subclass however it is reached, judged by the arrays it builds);
   ``getattr``/``setattr``/``delattr``/``hasattr``/``vars``/``dir`` refuse names starting with ``_``;
   ``open`` only opens files inside the working directory; ``exec``/``eval`` validate their string like
   the snippet itself; ``globals()`` is a copy without dunder entries (no builtins dict, which holds the
   guards, is ever reachable); ``compile``, ``breakpoint``, ``input``, ``help``, ``locals`` are refused.
3. :func:`make_audit_hook` (PEP 578) watches what *allowed libraries* do on the code's behalf: file
   access outside the working directory (e.g. ``numpy.save('/tmp/x')``), processes, sockets,
   unpickling of classes (``numpy.load(..., allow_pickle=True)``), frame access and ctypes calls from
   sandboxed code, thread creation, rlimit changes.
   Audit hooks cannot be removed; the few privileged operations of the worker itself (forking a copy,
   setting the CPU budget) are recognised by the identity of the calling code object.

sympy evaluates strings in several places (``sympify``, ``parse_expr``, ``lambdify``); those entry points
are patched to validate the string and evaluate it with the sandbox's builtins, and its class factory
``Function(name, bases, namespace)`` refuses special attributes in the namespace.

Whenever policy code touches the code's objects (reading, hashing, iterating them), it does so through the
isolated helpers below (``call_isolated``), never as the direct caller of what the code chose.

This module only uses the standard library; the worker loads it from its file, outside the package.
"""

from __future__ import annotations

import ast
import builtins as _builtins
import importlib
import os
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Errors. Exceptions with ``sandbox_policy = True`` are shown to the model without their type name.
# --------------------------------------------------------------------------------------------------------------


class SandboxViolation(Exception):
    """The snippet was refused before running."""

    sandbox_policy = True

    def __init__(self, message: str, lineno: int | None = None):
        super().__init__(message)
        self.lineno = lineno


class ImportBlocked(ImportError):
    sandbox_policy = True


class AccessBlocked(AttributeError):
    sandbox_policy = True


class FileAccessBlocked(PermissionError):
    sandbox_policy = True


class OperationBlocked(PermissionError):
    sandbox_policy = True


class FeatureBlocked(RuntimeError):
    sandbox_policy = True


# --------------------------------------------------------------------------------------------------------------
# Name rules
# --------------------------------------------------------------------------------------------------------------

# Dunder attributes that may be read: strings, the object's class, and methods one calls explicitly
# (``super().__init__()``). None of them leads to globals, builtins, code, frames or subclasses.
# ``obj.__class__`` is rewritten into the sandbox's type(), which never returns a metaclass (a metaclass
# builds classes with arbitrary special attributes, see make_builtins).
SAFE_DUNDER_ATTRS = frozenset({
    "__name__", "__qualname__", "__doc__", "__module__", "__class__", "__init__", "__str__", "__repr__",
    "__len__", "__iter__", "__next__", "__getitem__", "__setitem__", "__contains__", "__eq__", "__lt__",
    "__add__", "__enter__", "__exit__", "__call__",
})

# namedtuple's public API starts with an underscore (to avoid clashing with field names).
SAFE_PRIVATE_ATTRS = frozenset({"_asdict", "_replace", "_fields", "_make", "_field_defaults"})

# Special methods a class body may define. Left out on purpose: ``__array*__``/``__dlpack__`` and
# ``__getattr__``/``__getattribute__`` (numpy looks ``__array_interface__`` up through them and would then
# trust a user-supplied memory address), ``__del__`` (would run at an arbitrary later time),
# ``__reduce*__``/``__getstate__``/``__setstate__`` (pickling), ``__fspath__``/``__bytes__`` (paths
# handed to libraries), ``__init_subclass__``, ``__set_name__``, ``__prepare__``, ``__instancecheck__``,
# ``__subclasscheck__``.
CLASS_DUNDER_DEFS = frozenset(
    {"__init__", "__new__", "__repr__", "__str__", "__format__", "__hash__", "__bool__", "__len__", "__iter__",
     "__next__", "__reversed__", "__contains__", "__getitem__", "__setitem__", "__delitem__", "__missing__",
     "__call__", "__enter__", "__exit__", "__eq__", "__ne__", "__lt__", "__le__", "__gt__",
     "__ge__", "__neg__", "__pos__", "__abs__", "__invert__", "__int__", "__float__", "__complex__", "__index__",
     "__round__", "__trunc__", "__floor__", "__ceil__", "__post_init__"}
    | {f"__{p}{op}__" for op in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "divmod", "pow",
                                 "lshift", "rshift", "and", "or", "xor") for p in ("", "r", "i")}
)

# Non-underscore attributes that expose interpreter internals or raw memory.
DENIED_ATTRS = frozenset({
    "gi_frame", "gi_code", "gi_yieldfrom", "gi_running", "gi_suspended", "cr_frame", "cr_code", "cr_await",
    "cr_origin", "cr_running", "ag_frame", "ag_code", "ag_await", "ag_running", "tb_frame", "tb_next",
    "tb_lasti", "f_globals", "f_locals", "f_builtins", "f_back", "f_code", "f_trace", "f_lasti",
    "func_globals", "func_code", "co_code", "co_consts", "co_names", "ctypes", "cffi",
    "mro",  # a class's mro() lists the real classes behind guarded ones (see GUARDED_BASES)
})

# Keyword arguments refused in any call: numpy's ``ndarray.resize(refcheck=False)`` frees memory that other
# arrays may still point to.
DENIED_KEYWORDS = frozenset({"refcheck"})

# Module names an allowed package may not give access to (they and their submodules).
DENIED_MODULES = (
    "numpy.ctypeslib", "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy.lib.format",
    # record arrays can be built over raw bytes with object fields (pointers from user data)
    "numpy.rec", "numpy.core.records", "numpy._core.records", "numpy.ma.mrecords",
    "sympy.utilities.autowrap", "sympy.utilities.codegen", "sympy.utilities.runtests", "sympy.utilities.source",
    "sympy.utilities.matchpy_connector", "sympy.utilities.benchmarking", "sympy.utilities.timeutils",
    "sympy.utilities.tmpfiles", "sympy.utilities.pkgdata", "sympy.testing", "sympy.external",
    "sympy.interactive", "sympy.plotting", "sympy.printing.preview", "sympy.printing.gtk", "sympy.benchmarks",
    "sympy.parsing.ast_parser", "sympy.parsing.mathematica", "sympy.parsing.maxima", "sympy.parsing.latex",
    "sympy.parsing.autolev", "sympy.parsing.c", "sympy.parsing.fortran", "sympy.parsing.sym_expr",
)

# Individual objects refused wherever they are re-exported ("module:attribute", resolved lazily).
DENIED_OBJECTS = (
    "numpy.lib.stride_tricks:as_strided",  # arbitrary strides over a buffer = out-of-bounds memory access
    "numpy:memmap",  # maps files; the audit hook refuses mmap anyway, this gives the clearer message
    "numpy:recarray",  # see numpy.rec above
)


# --------------------------------------------------------------------------------------------------------------
# Calling into sandboxed code from the policy
# --------------------------------------------------------------------------------------------------------------
# Whatever the policy does with an object of sandboxed code can run a callable of that code's choosing: dict()
# calls ``keys()``, getattr() runs properties, hashing runs ``__hash__``, and a class attribute or a decorated
# special method can be any *library* function. Some library functions act on their caller's frame (e.g.
# ``sympy.var`` assigns into its caller's globals): called straight from a policy function, they would write
# into this module's globals (and could replace ``check_attribute``). So every such operation goes through
# these helpers, whose globals are an empty throwaway dict and whose builtins are empty: a library function
# that reaches its caller's frame finds nothing there, and the helpers only use their own locals.
_ISOLATED_SOURCE = """
def call(fn, /, *args, **kwargs):
    return fn(*args, **kwargs)

def public_items(mapping, prefix, *, _dict=dict, _type=type, _issubclass=issubclass, _str=str):
    return {key: value for key, value in _dict(mapping).items()
            if not (_issubclass(_type(key), _str) and _str.startswith(key, prefix))}

def merge(target, source, drop):
    target.update(source)
    target.pop(drop, None)
"""


def _isolated_helpers() -> types.SimpleNamespace:
    namespace: dict[str, Any] = {"__builtins__": {"dict": dict, "type": type, "issubclass": issubclass, "str": str}}
    exec(compile(_ISOLATED_SOURCE, "<sandbox-call>", "exec"), namespace)  # noqa: S102 - fixed source
    helpers = types.SimpleNamespace(call=namespace["call"], public_items=namespace["public_items"],
                                    merge=namespace["merge"])
    namespace.clear()
    namespace["__builtins__"] = {}
    return helpers


isolated = _isolated_helpers()
call_isolated = isolated.call


def _guarded_class(real: type, check: Callable[[Any], None]) -> type:
    """A stand-in for ``real`` whose instances *are* ``real`` instances (isinstance/issubclass work) but whose
    construction hands the new object to ``check`` (which raises to refuse it) before the caller sees it.
    Attributes are read from ``real``."""

    def __call__(cls: type, *args: Any, **kwargs: Any) -> Any:
        made = call_isolated(real, *args, **kwargs)
        check(made)
        return made

    meta = type("guarded_class", (type,), {
        "__call__": __call__,
        "__instancecheck__": lambda cls, obj: issubclass(type(obj), real),
        "__subclasscheck__": lambda cls, sub: issubclass(type(sub), type) and issubclass(sub, real),
        "__getattr__": lambda cls, name: getattr(real, check_attribute(name)),
        "__repr__": lambda cls: repr(real),
    })
    return meta(real.__name__, (), {"__module__": real.__module__, "__qualname__": real.__qualname__,
                                     "__doc__": real.__doc__})


def _check_array(made: Any) -> None:
    """Refuse an array with object items over memory it was handed (``ndarray(..., dtype=object, buffer=b)``,
    ``recarray(..., buf=b)`` ...): its items would be raw bytes used as object pointers. Looked at after
    construction, whatever class, subclass or alias built it; items are never read, and an array that does
    not own its memory frees nothing, so dropping it is safe."""
    import numpy  # noqa: PLC0415 - only called once numpy is loaded

    if not issubclass(type(made), numpy.ndarray) or not made.dtype.hasobject:
        return
    base = made
    while issubclass(type(base), numpy.ndarray) and not base.flags.owndata:
        base = base.base
    if not (issubclass(type(base), numpy.ndarray) and base.dtype.hasobject):
        raise FeatureBlocked("An array with object items over a raw buffer is not allowed in this sandbox (the "
                             "buffer's bytes would be used as object pointers).")


def _guard_update_wrapper(real: Callable[..., Any]) -> Callable[..., Any]:
    import functools  # noqa: PLC0415

    def names(values: Any, defaults: tuple[str, ...]) -> tuple[str, ...]:
        checked = tuple(_exact_str(v, "attribute name") for v in call_isolated(tuple, values))
        for name in checked:
            if name.startswith("_") and name not in defaults:
                raise AccessBlocked(f"functools.update_wrapper cannot copy the attribute '{name}' in this sandbox.")
        return checked

    def update_wrapper(wrapper: Any, wrapped: Any, assigned: Any = functools.WRAPPER_ASSIGNMENTS,
                       updated: Any = functools.WRAPPER_UPDATES) -> Any:
        return call_isolated(real, wrapper, wrapped, names(assigned, functools.WRAPPER_ASSIGNMENTS),
                             names(updated, functools.WRAPPER_UPDATES))

    update_wrapper.__doc__ = real.__doc__
    return update_wrapper


def _guard_wraps(real: Callable[..., Any]) -> Callable[..., Any]:
    import functools  # noqa: PLC0415

    safe_update_wrapper = _guard_update_wrapper(functools.update_wrapper)

    def wraps(wrapped: Any, assigned: Any = functools.WRAPPER_ASSIGNMENTS,
              updated: Any = functools.WRAPPER_UPDATES) -> Any:
        return functools.partial(safe_update_wrapper, wrapped=wrapped, assigned=assigned, updated=updated)

    wraps.__doc__ = real.__doc__
    return wraps


# Objects handed to sandboxed code as a checked stand-in ("module:attribute" -> factory(real object)).
REPLACEMENTS: dict[str, Callable[[Any], Any]] = {
    # copying attributes by caller-chosen names would set e.g. __array_interface__ on an object
    "functools:update_wrapper": _guard_update_wrapper,
    "functools:wraps": _guard_wraps,
}
# Classes whose every subclass is handed out as a checked stand-in ("module:class" -> check of new instances),
# wherever sandboxed code gets the class from: a module, type(), __class__, or a generic alias's origin.
GUARDED_BASES: dict[str, Callable[[Any], None]] = {
    "numpy:ndarray": _check_array,
}

# Functions of these modules give processes, files, frames or native code; allowed packages that
# re-export such a function do not pass it on.
DANGEROUS_ROOTS = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "_posixsubprocess", "ctypes", "_ctypes", "cffi", "pickle", "_pickle",
    "marshal", "importlib", "_imp", "shutil", "socket", "_socket", "io", "_io", "tempfile", "inspect", "gc", "mmap",
    "multiprocessing", "_multiprocessing", "threading", "_thread", "pty", "runpy", "code", "codeop", "pdb", "bdb",
    "signal", "_signal", "resource", "fcntl", "select", "selectors", "asyncio", "concurrent", "ssl", "_ssl",
    "urllib", "http", "ftplib", "smtplib", "webbrowser", "zipimport", "sqlite3", "types", "weakref", "_weakref",
    "copyreg", "atexit", "sysconfig", "platform", "faulthandler", "tracemalloc", "linecache", "pydoc",
})

_DANGEROUS_BUILTIN_NAMES = ("eval", "exec", "compile", "open", "__import__", "input", "breakpoint", "getattr",
                            "setattr", "delattr", "vars", "dir", "globals", "locals", "help", "exit", "quit")
_DANGEROUS_BUILTINS = {id(getattr(_builtins, n)) for n in _DANGEROUS_BUILTIN_NAMES if hasattr(_builtins, n)}


def _exact_str(value: Any, what: str = "name") -> str:
    """An exact ``str`` copy of ``value`` (a ``str`` subclass could lie through overridden methods)."""
    if not issubclass(type(value), str):
        raise TypeError(f"{what} must be a string, not {type(value).__name__}")
    return str.__str__(value)


def attribute_refusal(name: str, store: bool = False) -> str | None:
    """Why reading (or, with ``store``, writing) attribute ``name`` is refused, or None if it is fine."""
    if name in DENIED_ATTRS:
        return f"Access to the attribute '{name}' is not allowed in this sandbox."
    if name.startswith("_"):
        if not store and (name in SAFE_DUNDER_ATTRS or name in SAFE_PRIVATE_ATTRS):
            return None
        return (f"Access to the attribute '{name}' is not allowed in this sandbox "
                "(attributes starting with '_' are private).")
    return None


def check_attribute(name: Any, store: bool = False) -> str:
    name = _exact_str(name, "attribute name")
    reason = attribute_refusal(name, store)
    if reason:
        raise AccessBlocked(reason)
    return name


# --------------------------------------------------------------------------------------------------------------
# 1. AST validation
# --------------------------------------------------------------------------------------------------------------
def validate(tree: ast.AST) -> None:
    """Raise :class:`SandboxViolation` if the parsed snippet uses a forbidden name or attribute."""
    try:
        _Validator().visit(tree)
    except RecursionError:
        raise SandboxViolation("The code is nested too deeply to be checked.") from None


class _Validator(ast.NodeVisitor):
    def _fail(self, node: ast.AST, message: str) -> None:
        raise SandboxViolation(message, getattr(node, "lineno", None))

    def _check_binding(self, node: ast.AST, name: str | None) -> None:
        if name and name.startswith("__"):
            self._fail(node, f"Use of the name '{name}' is not allowed in this sandbox "
                             "(names starting with '__' are reserved).")

    def visit_Name(self, node: ast.Name) -> None:
        if not (node.id == "__name__" and isinstance(node.ctx, ast.Load)):
            self._check_binding(node, node.id)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)  # inner attributes first: report the first one in reading order
        reason = attribute_refusal(node.attr, store=not isinstance(node.ctx, ast.Load))
        if reason:
            self._fail(node, reason)

    def visit_MatchClass(self, node: ast.MatchClass) -> None:
        for attr in node.kwd_attrs:  # `case C(attr=...)` reads attributes by name, with the real getattr
            reason = attribute_refusal(attr) or (attribute_refusal(attr, store=True) if attr == "__class__" else None)
            if reason:
                self._fail(node, reason)
        self.generic_visit(node)

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef, in_class: bool) -> None:
        name = node.name
        if name.startswith("__") and not (in_class and name in CLASS_DUNDER_DEFS):
            self._fail(node, f"Defining '{name}' is not allowed in this sandbox.")
        self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node, in_class=False)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._check_binding(node, node.name)
        for child in (*node.bases, *node.keywords, *node.decorator_list):
            self.visit(child)
        for stmt in node.body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self._visit_function(stmt, in_class=True)
            else:
                self.visit(stmt)

    def visit_arg(self, node: ast.arg) -> None:
        self._check_binding(node, node.arg)
        self.generic_visit(node)

    def visit_keyword(self, node: ast.keyword) -> None:
        self._check_binding(node, node.arg)
        if node.arg in DENIED_KEYWORDS:
            self._fail(node, f"The keyword argument '{node.arg}' is not allowed in this sandbox.")
        self.generic_visit(node)

    def visit_alias(self, node: ast.alias) -> None:
        self._check_binding(node, node.asname)
        if node.name != "*":
            for part in node.name.split("."):
                self._check_binding(node, part)

    def _visit_names(self, node: ast.Global | ast.Nonlocal) -> None:
        for name in node.names:
            self._check_binding(node, name)

    visit_Global = visit_Nonlocal = _visit_names

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        self._check_binding(node, node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        self._check_binding(node, node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        self._check_binding(node, node.rest)
        self.generic_visit(node)


# Names of the runtime guards in the sandbox's builtins (dunder names: sandboxed code cannot refer to them,
# and no builtins dict is ever reachable from it, so they cannot be replaced).
KWARGS_GUARD = "__sandbox_kwargs__"
TYPE_GUARD = "__sandbox_type__"
ANNOTATION_GUARD = "__sandbox_annotation__"


def _call(name: str, arg: ast.expr) -> ast.Call:
    return ast.copy_location(ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=[arg], keywords=[]), arg)


class _Guards(ast.NodeTransformer):
    """``f(**d)`` -> ``f(**__sandbox_kwargs__(d))``: keyword names from a dict are checked like written ones
    (dunder names would let library class factories build classes with arbitrary special attributes).
    ``x.__class__`` -> ``__sandbox_type__(x)``: the sandbox's type(), never a metaclass.
    Annotations ``a: T`` -> ``a: __sandbox_annotation__(T)``: strings in them must be type expressions (the
    standard library evaluates annotation strings itself, e.g. ``typing.get_type_hints``, outside any
    check; with ``from __future__ import annotations`` the stored string holds the guard call)."""

    def _guard_kwargs(self, node: ast.Call | ast.ClassDef) -> ast.AST:
        self.generic_visit(node)
        for kw in node.keywords:
            if kw.arg is None:
                kw.value = _call(KWARGS_GUARD, kw.value)
        return node

    visit_Call = _guard_kwargs

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        return self._guard_kwargs(node)

    def _guard_annotations(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.AST:
        self.generic_visit(node)
        params = node.args
        for arg in (*params.posonlyargs, *params.args, *params.kwonlyargs, params.vararg, params.kwarg):
            if arg is not None and arg.annotation is not None:
                arg.annotation = _call(ANNOTATION_GUARD, arg.annotation)
        if node.returns is not None:
            node.returns = _call(ANNOTATION_GUARD, node.returns)
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = _guard_annotations

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        self.generic_visit(node)
        node.annotation = _call(ANNOTATION_GUARD, node.annotation)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        self.generic_visit(node)
        if node.attr == "__class__" and isinstance(node.ctx, ast.Load):
            return ast.copy_location(_call(TYPE_GUARD, node.value), node)
        return node


def check_kwargs(mapping: Any) -> dict:
    """The runtime half of :class:`_GuardKwargs` (takes a snapshot, so the checked keys are the used ones)."""
    plain = call_isolated(dict, mapping)
    for key in plain:
        if issubclass(type(key), str):
            name = str.__str__(key)
            if name.startswith("__") or name in DENIED_KEYWORDS:
                raise SandboxViolation(f"The keyword argument '{name}' is not allowed in this sandbox.")
    return plain


# What a string in an annotation may contain: a type expression, e.g. 'int', 'np.ndarray', 'list[Node] | None'.
_TYPE_EXPRESSION_NODES = (ast.Expression, ast.Name, ast.Attribute, ast.Subscript, ast.Tuple, ast.List, ast.Constant,
                          ast.BinOp, ast.BitOr, ast.Load, ast.Slice)


def check_annotation(value: Any) -> Any:
    """The runtime half of the annotation guard: refuses strings (also inside generic aliases such as
    ``list['...']``) that are not plain type expressions. Returns ``value``."""
    pending, seen = [value], 0
    while pending:
        item = pending.pop()
        seen += 1
        if seen > 1000:
            raise SandboxViolation("This annotation is too large for this sandbox.")
        kind = type(item)
        if issubclass(kind, str):
            _check_type_expression(str.__str__(item))
        elif kind is types.GenericAlias or kind is types.UnionType:
            pending.extend(item.__args__)
        elif kind in (tuple, list):
            pending.extend(item)
    return value


def _check_type_expression(text: str) -> None:
    refused = SandboxViolation(f"The annotation {text[:100]!r} is not allowed in this sandbox: string annotations "
                               "must be type expressions (names, attributes, subscripts, '|').")
    try:
        tree = ast.parse(text.strip(), "<annotation>", "eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        raise refused from None
    for node in ast.walk(tree):
        if not isinstance(node, _TYPE_EXPRESSION_NODES) or (isinstance(node, ast.BinOp) and
                                                             not isinstance(node.op, ast.BitOr)):
            raise refused
    validate(tree)


def prepare(tree: ast.Module | ast.Expression) -> ast.AST:
    """Validate a parsed snippet and add the runtime guards; returns the tree to compile."""
    validate(tree)
    return ast.fix_missing_locations(_Guards().visit(tree))


def check_code_object(code: types.CodeType) -> None:
    """Validation for code objects compiled by libraries from sandbox-controlled strings (sympy).

    Their AST is gone, so check the names they use: no ``__`` names, no denied attributes.
    """
    for name in (*code.co_names, *code.co_varnames, *code.co_freevars, *code.co_cellvars):
        if name.startswith("__") or name in DENIED_ATTRS:
            raise SandboxViolation(f"Use of the name '{name}' is not allowed in this sandbox.")
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            check_code_object(const)


def compile_checked(source: Any, filename: str, mode: str) -> types.CodeType:
    """Parse, validate and compile a string the sandboxed code wants to run."""
    if issubclass(type(source), (bytes, bytearray)):
        source = bytes.decode(bytes(memoryview(source)), "utf-8")
    source = _exact_str(source, "source")
    return compile(prepare(ast.parse(source, filename, mode)), filename, mode)


# --------------------------------------------------------------------------------------------------------------
# 2. Modules: allow-list and read-only views
# --------------------------------------------------------------------------------------------------------------
class ModuleView(types.ModuleType):
    """Read-only view of an allowed module, as seen by sandboxed code."""

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (sandboxed)>"


class ModuleGate:
    """Decides which modules and module attributes sandboxed code can reach."""

    def __init__(self, allowed: Iterable[str], on_import: Callable[[types.ModuleType], None] | None = None):
        self.allowed = tuple(dict.fromkeys(allowed))
        self._roots = frozenset(self.allowed)
        self._views: dict[int, ModuleView] = {}
        self._on_import = on_import
        self._denied_ids: set[int] = set()
        self._replacements: dict[int, Any] = {}
        self._guarded_bases: list[tuple[type, Callable[[Any], None]]] = []
        self._stand_ins: dict[int, type] = {}
        self._keep: list[Any] = []  # keeps resolved objects alive, so their ids stay theirs
        self._resolved: set[str] = set()
        self._modules_seen = -1

    # -- names ------------------------------------------------------------------------------------------------
    def _not_allowed(self, name: str) -> ImportBlocked:
        return ImportBlocked(f"Import of '{name}' is not allowed. Allowed: {', '.join(self.allowed)}")

    def module_refusal(self, name: str) -> str | None:
        parts = name.split(".")
        if parts[0] not in self._roots:
            return str(self._not_allowed(name))
        if any(p.startswith("_") for p in parts[1:]):
            return f"Import of '{name}' is not allowed (private module)."
        if any(name == d or name.startswith(d + ".") for d in DENIED_MODULES):
            return f"Import of '{name}' is not allowed in this sandbox."
        return None

    def import_(self, name: Any, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        """The sandbox's ``__import__``."""
        name = _exact_str(name, "module name")
        if type(fromlist) is list and not fromlist and not level:
            # PyImport_Import: C code of a module in use importing a dependency (numpy's lazy
            # ``numpy._core._methods``, ``_datetime``'s ``_strptime`` ...) while sandboxed code is the
            # current frame. The caller takes the module from sys.modules and ignores the return value,
            # so nothing is handed back; the audit hook still vets the import.
            _builtins.__import__(name, None, None, (), 0)
            return None
        if level:
            raise ImportBlocked("Relative imports are not allowed in this sandbox.")
        if type(fromlist) not in (tuple, list, type(None)):  # the interpreter's own: never the code's iterable
            raise TypeError("fromlist must be a tuple or list of names")
        root = name.partition(".")[0]
        if root not in self._roots:
            raise self._not_allowed(name)
        reason = self.module_refusal(name)
        if reason:
            raise ImportBlocked(reason)
        items = []
        for item in fromlist or ():
            item = _exact_str(item, "imported name")
            if item == "*":  # applied by the interpreter to the view, through its __all__
                continue
            if item.startswith("_"):
                raise ImportBlocked(f"Import of '{name}.{item}' is not allowed (private name).")
            reason = self.module_refusal(f"{name}.{item}")
            if reason:
                raise ImportBlocked(reason)
            items.append(item)
        module = _builtins.__import__(name, None, None, tuple(items), 0)
        if self._on_import is not None:
            self._on_import(module)
        return self.view(module)

    # -- views ------------------------------------------------------------------------------------------------
    def view(self, module: types.ModuleType) -> ModuleView:
        cached = self._views.get(id(module))
        if cached is not None:
            return cached
        mod_name = getattr(module, "__name__", "")
        reason = self.module_refusal(mod_name) if isinstance(mod_name, str) else "unnamed module"
        if reason:
            raise ImportBlocked(reason)
        gate = self

        def __getattr__(self: ModuleView, name: str) -> Any:  # only called when the snapshot misses
            return gate._resolve(module, self, name)

        cls = type("module", (ModuleView,), {"__getattr__": __getattr__, "__slots__": ()})
        doc = getattr(module, "__doc__", None)
        view = cls(mod_name, doc if isinstance(doc, str) else None)
        self._views[id(module)] = view
        # Snapshot the public namespace (submodules are added lazily by __getattr__), so that attribute
        # lookups on views run at native speed.
        namespace = view.__dict__
        for key, value in list(vars(module).items()):
            if not isinstance(key, str) or key.startswith("_") or isinstance(value, types.ModuleType):
                continue
            try:
                namespace[key] = self.admit(f"{mod_name}.{key}", value)
            except AccessBlocked:
                pass
        public = getattr(module, "__all__", None)
        if isinstance(public, (list, tuple)):
            namespace["__all__"] = [k for k in public if isinstance(k, str) and k in namespace]
        else:
            namespace["__all__"] = [k for k in namespace if not k.startswith("_")]
        return view

    def _resolve(self, module: types.ModuleType, view: ModuleView, name: str) -> Any:
        name = check_attribute(name)
        qualified = f"{module.__name__}.{name}"
        if any(qualified == d or qualified.startswith(d + ".") for d in DENIED_MODULES):
            raise AccessBlocked(f"'{qualified}' is not available in this sandbox.")
        value = getattr(module, name)
        if isinstance(value, types.ModuleType):
            target = getattr(value, "__name__", "?")
            if self.module_refusal(target) is not None:
                raise AccessBlocked(f"'{qualified}' is not available in this sandbox (module '{target}' is not "
                                    f"allowed; allowed: {', '.join(self.allowed)}).")
            value = self.view(value)
        else:
            value = self.admit(qualified, value)
        view.__dict__[name] = value
        return value

    def admit(self, qualified: str, value: Any) -> Any:
        """``value`` as sandboxed code may see it (possibly a checked stand-in), or AccessBlocked."""
        self._refresh()
        key = id(value)
        if key in self._replacements:
            return self._replacements[key]
        refused = AccessBlocked(f"'{qualified}' is not available in this sandbox.")
        if key in self._denied_ids or key in _DANGEROUS_BUILTINS:
            raise refused
        if issubclass(type(value), type):
            if issubclass(value, type):
                raise refused  # a metaclass builds classes with arbitrary special attributes
            return self._stand_in(value) or value
        if type(value) is types.GenericAlias:  # e.g. numpy.typing.NDArray: calling it calls its origin
            origin = value.__origin__
            stand_in = self._stand_in(origin) if issubclass(type(origin), type) else None
            if stand_in is not None:
                return types.GenericAlias(stand_in, value.__args__)
        if callable(value):
            try:
                origin = call_isolated(getattr, value, "__module__", None)
            except Exception:  # noqa: BLE001 - an object that cannot even say where it comes from
                raise refused from None
            if issubclass(type(origin), str) and (origin.partition(".")[0] in DANGEROUS_ROOTS or any(
                    origin == d or origin.startswith(d + ".") for d in DENIED_MODULES)):
                raise refused
            if self._stand_in(call_isolated(getattr, value, "__origin__", None)) is not None:
                raise refused  # another kind of alias of a guarded class
        return value

    def class_of(self, obj: Any) -> type:
        """``type(obj)`` for sandboxed code: never a metaclass, and guarded stand-ins for guarded classes."""
        cls = type(obj)
        if issubclass(cls, type):
            raise FeatureBlocked("The type of a class (a metaclass) is not available in this sandbox.")
        self._refresh()
        return self._replacements.get(id(cls)) or self._stand_in(cls) or cls

    def _stand_in(self, cls: Any) -> type | None:
        """The checked stand-in of a class derived from a GUARDED_BASES class (by behaviour: any subclass)."""
        if not issubclass(type(cls), type):
            return None
        self._refresh()
        for base, check in self._guarded_bases:
            if issubclass(cls, base):
                stand_in = self._stand_ins.get(id(cls))
                if stand_in is None:
                    self._keep.append(cls)
                    stand_in = self._stand_ins[id(cls)] = _guarded_class(cls, check)
                return stand_in
        return None

    def _refresh(self) -> None:
        """Resolve DENIED_OBJECTS, REPLACEMENTS and GUARDED_BASES whose modules have been imported since the
        last call."""
        if len(sys.modules) == self._modules_seen:
            return
        self._modules_seen = len(sys.modules)
        for spec in (*DENIED_OBJECTS, *REPLACEMENTS, *GUARDED_BASES):
            if spec in self._resolved:
                continue
            mod_name, _, attr = spec.partition(":")
            module = sys.modules.get(mod_name)
            if module is None or not hasattr(module, attr):
                continue
            real = getattr(module, attr)
            self._keep.append(real)
            if spec in REPLACEMENTS:
                self._replacements[id(real)] = REPLACEMENTS[spec](real)
            elif spec in GUARDED_BASES:
                self._guarded_bases.append((real, GUARDED_BASES[spec]))
            else:
                self._denied_ids.add(id(real))
            self._resolved.add(spec)


# --------------------------------------------------------------------------------------------------------------
# Builtins
# --------------------------------------------------------------------------------------------------------------
_PLAIN_BUILTINS = (
    "abs", "aiter", "all", "anext", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "divmod", "enumerate", "filter", "float", "format", "frozenset", "hash",
    "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list", "map", "max", "memoryview", "min",
    "next", "object", "oct", "ord", "pow", "print", "property", "range", "repr", "reversed", "round", "set",
    "slice", "sorted", "staticmethod", "str", "sum", "super", "tuple", "zip",
    "True", "False", "None", "Ellipsis", "NotImplemented",
)
_REFUSED_BUILTINS = {
    "compile": "compile() is not available in this sandbox; use exec() or eval() on a string instead.",
    "breakpoint": "breakpoint() is not available in this sandbox.",
    "input": "input() is not available in this sandbox: there is no user to type an answer.",
    "help": "help() is not available in this sandbox.",
    "locals": "locals() is not available in this sandbox; use globals() for module-level variables.",
    "exit": "exit() is not available in this sandbox.",
    "quit": "quit() is not available in this sandbox.",
}


def make_builtins(*, gate: ModuleGate, open_file: Callable[..., Any], user_globals: dict) -> dict:
    """The ``__builtins__`` of sandboxed code (a fresh dict each call; mutating it only affects its owner)."""
    env: dict[str, Any] = {name: getattr(_builtins, name) for name in _PLAIN_BUILTINS}
    for name, value in vars(_builtins).items():  # every exception and warning class
        if isinstance(value, type) and issubclass(value, BaseException):
            env[name] = value

    def _refuser(name: str, message: str) -> Callable[..., Any]:
        def refused(*args: Any, **kwargs: Any) -> Any:
            raise FeatureBlocked(message)
        refused.__name__ = refused.__qualname__ = name
        return refused

    for name, message in _REFUSED_BUILTINS.items():
        env[name] = _refuser(name, message)

    # Everything below that touches the code's objects does so through the isolated helpers (see
    # _ISOLATED_SOURCE): the code chooses what runs when its objects are read, hashed or iterated.
    def getattr_(obj: Any, name: Any, *default: Any) -> Any:
        name = check_attribute(name)
        if name == "__class__":
            return gate.class_of(obj)
        return call_isolated(getattr, obj, name, *default)

    def hasattr_(obj: Any, name: Any) -> bool:
        return call_isolated(hasattr, obj, check_attribute(name))

    def setattr_(obj: Any, name: Any, value: Any) -> None:
        call_isolated(setattr, obj, check_attribute(name, store=True), value)

    def delattr_(obj: Any, name: Any) -> None:
        call_isolated(delattr, obj, check_attribute(name, store=True))

    def dir_(*args: Any) -> list[str]:
        names = call_isolated(dir, *args) if args else list(user_globals)
        return sorted(str.__str__(n) for n in names if issubclass(type(n), str) and not str.startswith(n, "_"))

    def vars_(*args: Any) -> dict:
        if not args:
            raise FeatureBlocked("vars() without an argument is not available in this sandbox; use globals().")
        return isolated.public_items(call_isolated(vars, *args), "_")

    def type_(*args: Any, **kwargs: Any) -> type:
        if len(args) != 1 or kwargs:
            raise FeatureBlocked("type() with three arguments is not available in this sandbox; "
                                 "use a class statement.")
        return gate.class_of(args[0])

    def globals_() -> dict:
        # A copy without the dunder entries: no sandboxed code may hold a builtins dict (it holds the
        # runtime guards), and assigning into the copy does not create variables.
        return isolated.public_items(user_globals, "__")

    def run_in(code: types.CodeType, run: Callable[..., Any], g: Any, locals: Any) -> Any:
        if g is None:
            return run(code, user_globals, locals)
        if type(g) is not dict:
            raise TypeError("globals must be a dict")
        # The caller's dict is copied in and out rather than used directly, so that the builtins
        # installed for the code never become reachable through it.
        namespace: dict[str, Any] = {}
        isolated.merge(namespace, g, "__builtins__")
        namespace["__builtins__"] = make_builtins(gate=gate, open_file=open_file, user_globals=user_globals)
        try:
            return run(code, namespace, locals)
        finally:
            namespace.pop("__builtins__", None)  # an exact str key: found by identity, no comparison runs
            isolated.merge(g, namespace, "__builtins__")

    def exec_(source: Any, globals: Any = None, locals: Any = None) -> None:
        run_in(compile_checked(source, "<string>", "exec"), exec, globals, locals)

    def eval_(source: Any, globals: Any = None, locals: Any = None) -> Any:
        if issubclass(type(source), str):
            source = str.strip(source, " \t")
        return run_in(compile_checked(source, "<string>", "eval"), eval, globals, locals)

    for name, fn in (("getattr", getattr_), ("hasattr", hasattr_), ("setattr", setattr_), ("delattr", delattr_),
                     ("dir", dir_), ("vars", vars_), ("type", type_), ("globals", globals_), ("exec", exec_),
                     ("eval", eval_)):
        fn.__name__ = fn.__qualname__ = name
        env[name] = fn
    env["open"] = open_file
    env["__import__"] = gate.import_
    env["__build_class__"] = _builtins.__build_class__
    env[KWARGS_GUARD] = check_kwargs
    env[TYPE_GUARD] = gate.class_of
    env[ANNOTATION_GUARD] = check_annotation
    return env


def make_open(get_workdir: Callable[[], str]) -> Callable[..., Any]:
    """``open`` restricted to files inside the working directory (after resolving symlinks)."""
    real_open = _builtins.open

    def open(file: Any, mode: Any = "r", buffering: int = -1, encoding: Any = None, errors: Any = None,
             newline: Any = None, closefd: bool = True, opener: Any = None) -> Any:
        if opener is not None:
            raise FileAccessBlocked("open() with a custom opener is not allowed in this sandbox.")
        if issubclass(type(file), (bytes, bytearray)):
            file = bytes.decode(bytes(memoryview(file)), "utf-8", "surrogateescape")
        if not issubclass(type(file), str):
            raise FileAccessBlocked("open() only accepts file paths (str) in this sandbox.")
        file = str.__str__(file)
        resolved = inside_dir(file, get_workdir())
        if resolved is None:
            raise FileAccessBlocked(f"Access to '{file}' is not allowed: "
                                    "only files inside the working directory can be opened.")
        return call_isolated(real_open, resolved, str.__str__(mode) if issubclass(type(mode), str) else mode,
                             buffering, encoding, errors, newline)

    return open


def inside_dir(path: str, directory: str) -> str | None:
    """The resolved absolute form of ``path`` (relative to ``directory``) if it lies inside it, else None."""
    resolved = os.path.realpath(os.path.join(directory, path))
    if resolved == directory or resolved.startswith(directory + os.sep):
        return resolved
    return None


# --------------------------------------------------------------------------------------------------------------
# sympy: evaluate strings under the sandbox's rules
# --------------------------------------------------------------------------------------------------------------
def patch_sympy(gate: ModuleGate, builtins_factory: Callable[[], dict]) -> None:
    """Make sympy's string-evaluating entry points (sympify/parse_expr/lambdify) safe. Idempotent."""
    # import_module returns the module: as an attribute, `sympy.utilities.lambdify` is the function.
    sympy_parser = importlib.import_module("sympy.parsing.sympy_parser")
    lambdify_mod = importlib.import_module("sympy.utilities.lambdify")
    if getattr(sympy_parser, "sandboxed", False):
        return

    def safe_namespace(namespace: dict) -> dict:
        clean = {}
        for key, value in isolated.public_items(namespace, "__").items():
            if not issubclass(type(key), str):
                continue
            key = str.__str__(key)
            if value is _builtins:  # lambdify prints e.g. `builtins.sum(...)`: give it the sandbox's builtins
                value = types.SimpleNamespace(**{k: v for k, v in builtins_factory().items() if not k.startswith("_")})
            elif issubclass(type(value), types.ModuleType):
                name = call_isolated(getattr, value, "__name__", "")
                if not issubclass(type(name), str) or gate.module_refusal(str.__str__(name)) is not None:
                    continue
                value = gate.view(value)
            else:
                try:
                    value = gate.admit(key, value)
                except AccessBlocked:
                    continue
            clean[key] = value
        clean["__builtins__"] = builtins_factory()
        return clean

    def _checked(code: Any, mode: str, filename: str) -> types.CodeType:
        if type(code) is types.CodeType:
            check_code_object(code)
            return code
        return compile_checked(code, filename, mode)

    def eval_expr(code: Any, local_dict: dict, global_dict: dict) -> Any:
        return eval(_checked(code, "eval", "<sympify>"), safe_namespace(global_dict), local_dict)  # noqa: S307 - checked code, sandbox namespace

    def lambdify_exec(code: Any, globals: dict | None = None, locals: dict | None = None) -> None:
        # lambdify runs fixed import lines and the source it generated from the expression (which embeds
        # names chosen by the caller, e.g. Function("...") names): both go through the sandbox's rules.
        # ``globals`` is lambdify's namespace dict, filled in place, so it is cleaned in place.
        target = {} if globals is None else globals
        cleaned = safe_namespace(target)
        target.clear()
        target.update(cleaned)
        exec(_checked(code, "exec", "<lambdify>"), target, locals)  # noqa: S102 - checked code, sandbox namespace

    def lambdify_eval(code: Any, *args: Any) -> Any:
        raise ImportBlocked("lambdify can only use the math, numpy and sympy modules in this sandbox.")

    # Function("f", bases, namespace) builds a class from a caller-given namespace: no special attributes.
    undefined_function = importlib.import_module("sympy.core.function").UndefinedFunction
    real_new = undefined_function.__new__

    def guarded_new(mcl: type, name: Any, *args: Any, **kwargs: Any) -> Any:
        args = list(args)
        namespace = args[1] if len(args) > 1 else kwargs.get("__dict__")
        if namespace is not None:
            if not issubclass(type(namespace), dict):
                raise TypeError("the namespace of a Function class must be a dict")
            namespace = call_isolated(dict, dict.items(namespace))  # the real entries, whatever a subclass claims
            if len(args) > 1:
                args[1] = namespace
            else:
                kwargs["__dict__"] = namespace
        for key in (*(namespace or {}), *(k for k in kwargs if k != "__dict__")):
            if issubclass(type(key), str) and str.startswith(key, "__"):
                raise SandboxViolation(f"The class attribute '{str.__str__(key)}' is not allowed in this sandbox.")
        return real_new(mcl, name, *args, **kwargs)

    undefined_function.__new__ = staticmethod(guarded_new)
    sympy_parser.eval_expr = eval_expr
    lambdify_mod.exec = lambdify_exec  # module globals shadow the builtins
    lambdify_mod.eval = lambdify_eval
    sympy_parser.sandboxed = True


# --------------------------------------------------------------------------------------------------------------
# 3. Audit hook
# --------------------------------------------------------------------------------------------------------------
# Events refused unless the worker's own trusted code asked for them.
_PRIVILEGED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
    "os.startfile", "os.chdir", "os.fchdir", "os.add_dll_directory", "subprocess.Popen", "pty.spawn",
    "sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile", "sys.addaudithook",
    "sys.setrecursionlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "gc.freeze",
    "code.__new__", "pickle.find_class", "resource.setrlimit", "resource.prlimit", "_thread.start_new_thread",
    "signal.pthread_kill", "mmap.__new__", "sqlite3.connect", "sqlite3.connect/handle", "urllib.Request",
    "http.client.connect", "http.client.send", "ftplib.connect", "smtplib.connect", "poplib.connect",
    "imaplib.open", "nntplib.connect", "telnetlib.Telnet.open", "webbrowser.open", "fcntl.ioctl",
    "syslog.openlog", "syslog.syslog", "cpython.run_command", "cpython.run_file", "cpython.run_module",
    "cpython.run_startup", "cpython.run_interactivehook",
})
_PRIVILEGED_PREFIXES = ("socket.", "winreg.", "msvcrt.", "_winapi.", "ssl.")
# Events that only library code (a file on disk) may raise, never code compiled at run time. Libraries
# need them while sandboxed code runs (the import system unmarshals .pyc files, namedtuple and typing
# look at their caller's frame, sympy loads ctypes to size a C long); sandboxed code itself cannot reach
# ctypes or sys (module views) but a library could hand it over, so such calls are refused too.
_LIBRARY_ONLY_EVENTS = frozenset({"sys._getframe", "marshal.loads", "marshal.load", "os.putenv", "os.unsetenv"})
_LIBRARY_ONLY_PREFIXES = ("ctypes.",)
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_globals", "f_locals"})
# Modules whose mere presence offers memory-unsafe primitives. Everything else a library imports is
# allowed: what the modules *do* (processes, sockets, files) is checked by the other events.
_DENIED_IMPORTS = frozenset({"cffi", "_cffi_backend", "_testcapi", "_testinternalcapi", "_testmultiphase",
                             "_testbuffer", "_ctypes_test", "_xxsubinterpreters", "_xxinterpchannels"})
# (event, indices of path arguments that get the read rule, indices that get the write rule)
_PATH_EVENTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "os.listdir": ((0,), ()), "os.scandir": ((0,), ()), "os.listxattr": ((0,), ()), "os.getxattr": ((0,), ()),
    "glob.glob": ((0,), ()), "os.walk": ((0,), ()), "os.fwalk": ((0,), ()),
    "os.remove": ((), (0,)), "os.rmdir": ((), (0,)), "os.mkdir": ((), (0,)), "os.rename": ((), (0, 1)),
    "os.link": ((), (0, 1)), "os.symlink": ((), (1,)), "os.chmod": ((), (0,)), "os.chown": ((), (0,)),
    "os.truncate": ((), (0,)), "os.utime": ((), (0,)), "os.chflags": ((), (0,)), "os.lchflags": ((), (0,)),
    "os.setxattr": ((), (0,)), "os.removexattr": ((), (0,)), "os.mkfifo": ((), (0,)), "os.mknod": ((), (0,)),
    "shutil.copyfile": ((0,), (1,)), "shutil.copymode": ((0,), (1,)), "shutil.copystat": ((0,), (1,)),
    "shutil.copytree": ((0,), (1,)), "shutil.rmtree": ((), (0,)), "shutil.move": ((), (0, 1)),
    "shutil.chown": ((), (0,)), "shutil.make_archive": ((1,), (0,)), "shutil.unpack_archive": ((0,), (1,)),
    "tempfile.mkstemp": ((), (0,)), "tempfile.mkdtemp": ((), (0,)),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def make_audit_hook(*, get_workdir: Callable[[], str], read_roots: Iterable[str], read_files: Iterable[str],
                    trusted_codes: set) -> Callable[[str, tuple], None]:
    """Build the worker's audit hook (see the module docstring). ``trusted_codes`` may be filled later."""
    roots = tuple(sorted({os.path.realpath(r) for r in read_roots}, key=len, reverse=True))
    files = frozenset(os.path.realpath(f) for f in read_files)
    busy = [False]
    getframe = sys._getframe

    def caller_kind(depth: int) -> str:
        """'trusted' (the worker's privileged closures), 'user' (code compiled at run time) or 'library' (a
        module file) for the frame ``depth`` levels up: 0 this, 1 check(), 2 hook, 3 the caller."""
        frame = getframe(depth)
        code = frame.f_code
        if id(code) in trusted_codes:
            return "trusted"
        return "user" if _runtime_compiled(code.co_filename) else "library"

    def trusted_on_stack() -> bool:
        """Whether the nearest non-library frame above the event is trusted (library frames in between,
        such as socket.py called by the fork closure, do not count; any user frame ends the search)."""
        frame = getframe(3)  # 0 this, 1 check(), 2 hook, 3 the caller
        while frame is not None:
            code = frame.f_code
            if id(code) in trusted_codes:
                return True
            if _runtime_compiled(code.co_filename):
                return False
            frame = frame.f_back
        return False

    def path_ok(raw: Any, write: bool) -> bool:
        path = _path_arg(raw)
        if path is None:
            return False
        workdir = get_workdir()
        if inside_dir(path, workdir) is not None:
            return True
        if write:
            return False
        resolved = os.path.realpath(os.path.join(workdir, path))
        return resolved in files or any(resolved == r or resolved.startswith(r + os.sep) for r in roots)

    def check(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            write = (issubclass(type(mode), str) and any(c in str.__str__(mode) for c in "wax+")) or (
                issubclass(type(flags), int) and bool(int.__int__(flags) & _WRITE_FLAGS))
            if not path_ok(path, write) and not trusted_on_stack():
                shown = _path_arg(path) or (int.__int__(path) if issubclass(type(path), int) else "a file")
                raise FileAccessBlocked(f"Access to {shown!r} is not allowed: only files inside the working "
                                        "directory can be written, and only those and Python's own files read.")
            return
        if event == "import":
            name = str.__str__(args[0]) if args and issubclass(type(args[0]), str) else ""
            if name.partition(".")[0] in _DENIED_IMPORTS and not trusted_on_stack():
                raise ImportBlocked(f"Import of '{name}' is not allowed in this sandbox.")
            return
        if event == "object.__getattr__":
            name = str.__str__(args[1]) if len(args) > 1 and issubclass(type(args[1]), str) else ""
            if name in _FRAME_ATTRS and caller_kind(3) == "user":
                raise AccessBlocked(f"Access to the attribute '{args[1]}' is not allowed in this sandbox.")
            return
        if event in _LIBRARY_ONLY_EVENTS or event.startswith(_LIBRARY_ONLY_PREFIXES):
            if caller_kind(3) == "user":
                if event == "sys._getframe":  # AttributeError keeps namedtuple & co. working
                    raise AccessBlocked("Frame objects are not accessible in this sandbox.")
                raise OperationBlocked(f"'{event}' is not allowed in this sandbox.")
            return
        if event in _PATH_EVENTS:
            read_idx, write_idx = _PATH_EVENTS[event]
            for indices, write in ((read_idx, False), (write_idx, True)):
                for i in indices:
                    if i < len(args) and not path_ok(args[i], write) and not trusted_on_stack():
                        raise FileAccessBlocked(f"'{event}' on {_path_arg(args[i])!r} is not allowed: only the "
                                                "working directory may be modified.")
            return
        if event in _PRIVILEGED_EVENTS or event.startswith(_PRIVILEGED_PREFIXES):
            if not trusted_on_stack():
                raise OperationBlocked(f"'{event}' is not allowed in this sandbox.")

    def hook(event: str, args: tuple) -> None:
        if busy[0]:
            # Events raised by the hook's own frame inspection; anything else is checked as usual.
            if event in ("sys._getframe", "object.__getattr__"):
                return
            check(event, args)
            return
        busy[0] = True
        try:
            check(event, args)
        finally:
            busy[0] = False

    return hook


def _runtime_compiled(filename: str) -> bool:
    """Code compiled from a string at run time (``<code>``, ``<string>``...), as opposed to a module file."""
    return not filename or (filename.startswith("<") and not filename.startswith("<frozen "))


def _path_arg(raw: Any) -> str | None:
    """An exact str path from an audit-event argument, or None (file descriptors, odd types)."""
    if issubclass(type(raw), str):
        return str.__str__(raw)
    if issubclass(type(raw), (bytes, bytearray)):
        return os.fsdecode(bytes(memoryview(raw)))
    if raw is None:
        return "."
    return None
