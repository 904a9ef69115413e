"""Tests of trl_agent_distill.agent.sandbox: behaviour, observation format, forks, and escape attempts.

Every escape test checks that the attempt gives an error observation within the time limit, that a marker
file outside the working directory was not created, that the host process is fine, and that a second
sandbox running at the same time is unaffected.
"""

from __future__ import annotations

import os
import pickle
import platform
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from trl_agent_distill.agent.sandbox import (
    DEFAULT_ALLOWED_IMPORTS,
    Observation,
    PythonExecutor,
    PythonSandbox,
    SandboxError,
    protocol,
    render_observation,
)

TIMEOUT = 2.0
MARGIN = 3.0  # process start-up and teardown on a loaded 2-core machine
HOST_PID = os.getpid()
ALLOWED_MSG = "Allowed: " + ", ".join(DEFAULT_ALLOWED_IMPORTS)


@pytest.fixture
def sandbox():
    with PythonSandbox(timeout=TIMEOUT) as sb:
        yield sb


@pytest.fixture(scope="module")
def bystander():
    """A second sandbox whose state must survive everything the others go through."""
    with PythonSandbox(timeout=30) as sb:
        assert not sb.run("secret = 42").error
        yield sb


@pytest.fixture(scope="module")
def scientific():
    """A sandbox with numpy and sympy already imported (imports take ~1 s, so share it)."""
    with PythonSandbox(timeout=30) as sb:
        assert not sb.run("import numpy as np\nimport sympy as sp").error
        yield sb


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "pwned"
    assert not path.exists()
    return path


def _session_processes(sid: int) -> list[int]:
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                data = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            fields = data[data.rfind(b")") + 2:].split()
            if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
                pids.append(int(name))
    return pids


def assert_contained(sb: PythonSandbox, code: str, marker: Path, bystander: PythonSandbox,
                     fragment: str | None = None) -> Observation:
    """Run an attack while the bystander computes; check that nothing escaped."""
    other: dict[str, Observation] = {}
    thread = threading.Thread(target=lambda: other.setdefault("obs", bystander.run("sum(range(10**6)) + secret")))
    thread.start()
    start = time.monotonic()
    obs = sb.run(code)
    elapsed = time.monotonic() - start
    thread.join(60)
    assert obs.error, obs.text
    assert obs.text.startswith(("Error:\n", "Execution logs:\n")), obs.text
    if fragment is not None:
        assert fragment in obs.text, obs.text
    assert elapsed < sb.timeout + MARGIN
    assert not marker.exists()
    assert os.getpid() == HOST_PID
    assert other["obs"].text == "Execution logs:\nLast output from code snippet:\n499999500042"
    assert not sb.run("1 + 1").error  # the attacked sandbox still works
    return obs


# ----------------------------------------------------------------------------------------------------------------
# Basic behaviour and observation format
# ----------------------------------------------------------------------------------------------------------------
def test_the_sandbox_is_an_executor_with_structured_results(sandbox):
    assert isinstance(sandbox, PythonExecutor)
    obs = sandbox.run("print('hi')\n6 * 7")
    assert (obs.printed, obs.value, obs.error_message, obs.error) == ("hi\n", "42", None, False)
    assert obs.text == render_observation(obs.printed, obs.value, obs.error_message)
    failed = sandbox.run("print('a')\n1 / 0")
    assert failed.error and failed.value is None and failed.error_message.startswith("ZeroDivisionError")
    assert failed.text == render_observation("a\n", None, failed.error_message)
    final = sandbox.run("final_answer([1, 2])")
    assert final.has_final_answer and final.final_answer == [1, 2] and final.value == "[1, 2]"
    timed_out = PythonSandbox(timeout=0.5)
    try:
        obs = timed_out.run("while True:\n    pass")
        assert obs.timed_out and obs.error_message.startswith("Execution timed out") and obs.text.startswith("Error:")
    finally:
        timed_out.close()


def test_final_answers_the_host_would_refuse_come_back_as_their_repr(sandbox):
    items = protocol.MAX_ITEMS + 1  # just more items than a frame may hold: the worker's repr of them must fit TIMEOUT
    for code, start in [(f"final_answer(list(range({items})))", "[0, 1, 2"),
                        ("import decimal\nfinal_answer(decimal.Decimal('sNaN'))", "Decimal('sNaN')"),
                        ("final_answer(2 ** 20_000)", "<unprintable int")]:
        obs = sandbox.run(code)
        assert not obs.error and obs.has_final_answer, obs.text
        assert isinstance(obs.final_answer, str) and obs.final_answer.startswith(start)
    assert sandbox.run("final_answer([1.5, (2, 'x')])").final_answer == [1.5, (2, "x")]


def test_state_is_kept_between_runs(sandbox):
    assert not sandbox.run("x = 20\ndef double(v):\n    return 2 * v").error
    assert sandbox.run("double(x) + 2").text == "Execution logs:\nLast output from code snippet:\n42"


def test_observation_format_matches_smolagents(sandbox):
    obs = sandbox.run("print('hello')\nprint(1, 2)\n'value'")
    assert obs.text == "Execution logs:\nhello\n1 2\nLast output from code snippet:\nvalue"
    assert obs.printed == "hello\n1 2\n" and not obs.error and not obs.has_final_answer
    # ends with a statement: the value is None, as in smolagents
    assert sandbox.run("y = 3").text == "Execution logs:\nLast output from code snippet:\nNone"
    assert sandbox.run("print('no newline', end='')").text == \
        "Execution logs:\nno newline\nLast output from code snippet:\nNone"


def test_error_observation_keeps_logs_and_names_line(sandbox):
    obs = sandbox.run("print('before')\na = 1\nb = a / 0\nprint('after')")
    assert obs.error
    assert obs.text == ("Execution logs:\nbefore\nError:\nZeroDivisionError: division by zero\n"
                        "  at line 3: b = a / 0")
    assert sandbox.run("a").text.endswith("\n1")  # statements before the error ran
    assert sandbox.run("undefined_name").text == "Error:\nNameError: name 'undefined_name' is not defined"


def test_syntax_error(sandbox):
    obs = sandbox.run("x = = 1")
    assert obs.error and obs.text.startswith("Error:\nSyntaxError: invalid syntax (line 1)")


def test_final_answer(sandbox):
    obs = sandbox.run("print('working')\nfinal_answer(6 * 7)\nprint('never printed')\nleft_over = 1")
    assert obs.has_final_answer and obs.final_answer == 42 and not obs.error
    assert obs.text == "Execution logs:\nworking\nLast output from code snippet:\n42"
    assert "NameError" in sandbox.run("left_over").text  # execution stopped at final_answer

    none = sandbox.run("final_answer(None)")
    assert none.has_final_answer and none.final_answer is None
    assert not sandbox.run("None").has_final_answer

    # `except Exception` cannot swallow it
    obs = sandbox.run("try:\n    final_answer('x')\nexcept Exception:\n    print('caught')")
    assert obs.final_answer == "x" and "caught" not in obs.text

    # plain data crosses as is; numpy values become Python values; anything else its repr
    assert sandbox.run("final_answer({'a': [1, 2.5, (3, 'b')], 'c': {4}})").final_answer == \
        {"a": [1, 2.5, (3, "b")], "c": {4}}
    obs = sandbox.run("import numpy as np\nfinal_answer(np.float64(0.25))")
    assert obs.final_answer == 0.25 and type(obs.final_answer) is float
    assert sandbox.run("final_answer(np.arange(3))").final_answer == [0, 1, 2]
    obs = sandbox.run("class Box:\n    def __repr__(self):\n        return 'Box()'\nfinal_answer(Box())")
    assert obs.final_answer == "Box()" and obs.text.endswith("\nBox()")


def test_last_value_and_output_truncation(sandbox):
    start = time.monotonic()
    obs = sandbox.run("print('a' * 10**8)\nprint('tail')")  # 100 MB of output
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert not obs.error
    assert "characters of output cut here" in obs.printed and obs.printed.endswith("tail\n")
    assert len(obs.text) < 21_000
    obs = sandbox.run("list(range(10**6))")
    assert "characters of this value cut here" in obs.text and len(obs.text) < 21_000

    with PythonSandbox(timeout=TIMEOUT, max_output_chars=100) as small:
        obs = small.run("for i in range(1000):\n    print(i)")
        assert obs.printed.startswith("0\n1\n2\n") and obs.printed.endswith("998\n999\n")
        assert "3,790 characters of output cut here" in obs.printed


def test_allowed_imports_work(scientific):
    code = textwrap.dedent("""\
        import math, re, json, collections, itertools, functools, statistics, datetime, fractions, decimal, random
        from collections import Counter
        import numpy.linalg as la
        x = sp.Symbol('x')
        print(math.factorial(5), json.dumps([1]), Counter('aab').most_common(1), la.norm([3, 4]))
        print(sp.solve(x**2 - 4, x), sp.sympify('(x**2 - 1)/(x - 1)').simplify(), sp.lambdify(x, x**2)(3))
        np.linalg.det(np.array([[1.0, 2.0], [3.0, 4.0]])).round(6)
        """)
    obs = scientific.run(code)
    assert obs.text == ("Execution logs:\n120 [1] [('a', 2)] 5.0\n[-2, 2] x + 1 9\n"
                        "Last output from code snippet:\n-2.0")


def test_import_allow_list_is_configurable():
    with PythonSandbox(timeout=TIMEOUT, allowed_imports=("math",)) as sb:
        assert sb.run("import math\nmath.sqrt(4)").text.endswith("\n2.0")
        assert sb.run("import json").text == "Error:\nImport of 'json' is not allowed. Allowed: math"
        # a refused import is an ImportError, so fallback code works
        obs = sb.run("try:\n    import numpy\nexcept ImportError:\n    print('fallback')")
        assert obs.text == "Execution logs:\nfallback\nLast output from code snippet:\nNone"


def test_files_inside_workdir(sandbox):
    obs = sandbox.run("with open('notes.txt', 'w') as f:\n    f.write('hi')\nopen('notes.txt').read()")
    assert obs.text.endswith("\nhi")
    assert (sandbox.workdir / "notes.txt").read_text() == "hi"


def test_exec_and_eval_are_checked(sandbox):
    assert sandbox.run("eval('1 + 2')").text.endswith("\n3")
    assert sandbox.run("exec('z = 5')\nz").text.endswith("\n5")
    assert "'__import__'" in sandbox.run("exec('__imp' + 'ort__(\"os\")')").text


# ----------------------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------------------
def test_tools_round_trip_and_errors(marker):
    calls = []

    def web_search(query: str, k: int = 2) -> dict:
        calls.append((query, k))
        return {"query": query, "hits": [f"doc{i}" for i in range(k)], "pid": os.getpid()}

    def broken(x):
        raise ValueError("index not loaded")

    def opaque():
        return object()

    with PythonSandbox({"web_search": web_search, "broken": broken, "opaque": opaque}, timeout=TIMEOUT) as sb:
        obs = sb.run("r = web_search('velmora', k=3)\nprint(r['hits'])\nr['pid']")
        assert obs.text == f"Execution logs:\n['doc0', 'doc1', 'doc2']\nLast output from code snippet:\n{os.getpid()}"
        assert calls == [("velmora", 3)]  # ran in the parent

        for bad_call in ("web_search(q='x')", "web_search()", "web_search('a', 1, 2)", "web_search('a', kk=1)"):
            obs = sb.run(bad_call)
            assert obs.error and obs.text.startswith("Error:\nTypeError: web_search() "), obs.text
            assert obs.text.endswith("Signature: web_search(query: str, k: int = 2) -> dict"), obs.text
        assert calls == [("velmora", 3)]

        obs = sb.run("try:\n    broken(1)\nexcept RuntimeError as e:\n    print('caught:', e)")
        assert "caught: Tool 'broken' failed with ValueError: index not loaded" in obs.text

        assert sb.run("opaque()").text.startswith("Execution logs:\nLast output from code snippet:\n<object object")
        assert "must be plain data" in sb.run("web_search(lambda: 1)").text
        # numpy arguments are converted to Python values
        assert sb.run("import numpy as np\nweb_search('q', k=np.int64(1))['hits']").text.endswith("['doc0']")
        assert not marker.exists()


def test_invalid_tools_are_rejected():
    with pytest.raises(ValueError):
        PythonSandbox({"final_answer": print})
    with pytest.raises(ValueError):
        PythonSandbox({"_hidden": print})
    with pytest.raises(ValueError):
        PythonSandbox({"not valid": print})


# ----------------------------------------------------------------------------------------------------------------
# Escape attempts (language layer, audit hook, OS layer)
# ----------------------------------------------------------------------------------------------------------------
M = "{marker}"
ATTACKS = {
    # processes
    "os_system": ("import os; os.system('touch " + M + "')", "Import of 'os' is not allowed. " + ALLOWED_MSG),
    "os_fork": ("import os; os.fork()", "Import of 'os' is not allowed"),
    "multiprocessing": ("import multiprocessing\nmultiprocessing.Process(target=print).start()", "multiprocessing"),
    "subprocess": ("import subprocess\nsubprocess.run(['touch', '" + M + "'])", "subprocess"),
    "pty": ("import pty", "pty"),
    # network
    "socket": ("import socket\nsocket.create_connection(('example.com', 80))", "Import of 'socket' is not allowed"),
    "urllib": ("import urllib.request", "urllib.request"),
    "http": ("import http.client", "http.client"),
    "requests": ("import requests", "requests"),
    # getting at the real builtins / modules
    "dunder_import": ("__import__('os').system('touch " + M + "')", "'__import__'"),
    "getattr_builtins": ("getattr(__builtins__, '__import__')('os')", "'__builtins__'"),
    "globals_builtins": ("globals()['__builtins__']['__import__']('os')", "KeyError: '__builtins__'"),
    "exec_globals_builtins": ("g = {}\nexec('x = 1', g)\ng['__builtins__']", "KeyError: '__builtins__'"),
    "exec_self_reference": ("g = {}\ng['g'] = g\nexec(\"g['__builtins__']['open']('" + M + "', 'w')\", g)",
                            "KeyError: '__builtins__'"),
    "subclasses_walk": ("[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close']"
                        "[0].__init__.__globals__['system']('touch " + M + "')", "'__base__'"),
    "subclasses_popen": ("object.__subclasses__()", "'__subclasses__'"),
    "getattr_strings": ("getattr(getattr((), '__class__'), '__ba' + 'se__')", "'__base__'"),
    "reduce_getattr": ("import functools\nfunctools.reduce(getattr, ['__class__', '__base__'], ())", "'__base__'"),
    "str_subclass_name": ("class S(str):\n    def startswith(self, *a):\n        return False\n"
                          "getattr(1, S('__globals__'))", "'__globals__'"),
    "importlib": ("import importlib\nimportlib.import_module('os')", "importlib"),
    "sys_modules": ("import sys\nsys.modules['os'].system('touch " + M + "')", "Import of 'sys' is not allowed"),
    "builtins_module": ("import builtins", "builtins"),
    "ctypes": ("import ctypes", "Import of 'ctypes' is not allowed"),
    "pickle": ("import pickle", "Import of 'pickle' is not allowed"),
    "marshal": ("import marshal", "Import of 'marshal' is not allowed"),
    "gc_objects": ("import gc\ngc.get_objects()", "Import of 'gc' is not allowed"),
    "random_private_os": ("import random\nrandom._os.system('touch " + M + "')", "'_os'"),
    "module_attribute_to_other_module": ("import json\njson.codecs", "module 'codecs' is not allowed"),
    "relative_import": ("from . import x", "Relative imports"),
    # metaclasses build classes with any special attribute (e.g. numpy's __array_interface__ = raw pointer)
    "metaclass_via_type": ("type(int)('B', (), {'__array_interface__': {'data': (8, False)}})", "metaclass"),
    "metaclass_via_class_attr": ("(1).__class__.__class__('B', (), {})", "metaclass"),
    "metaclass_via_getattr": ("getattr(int, '__class__')", "metaclass"),
    "metaclass_from_library": ("import sympy\nsympy.FunctionClass('B', (), {})",
                               "'sympy.FunctionClass' is not available"),
    "metaclass_by_match": ("match int:\n    case type(__class__=meta):\n        meta", "'__class__'"),
    "mro_real_classes": ("import numpy as np\nnp.ma.MaskedArray.mro()", "'mro'"),
    "getattr_hook_array_interface": ("import numpy as np\nclass A:\n    def __getattr__(self, name):\n"
                                     "        return {'data': (8, False), 'shape': (1,), 'typestr': '|u1'}\n"
                                     "np.asarray(A())", "Defining '__getattr__'"),
    "sympy_class_namespace": ("import sympy as sp\nsp.Function('F', (sp.Dummy,), {'__array_interface__': {}})",
                              "'__array_interface__' is not allowed"),
    "kwargs_dunder": ("import sympy as sp\nsp.Function('G', **{'__array_interface__': {}})",
                      "keyword argument '__array_interface__'"),
    "update_wrapper_dunder": ("import functools, numpy as np\np = functools.partial(print)\n"
                              "functools.update_wrapper(p, np.zeros(1), assigned=('__array_interface__',))",
                              "cannot copy the attribute '__array_interface__'"),
    # frames and globals
    "function_globals": ("def f():\n    pass\nf.__globals__", "'__globals__'"),
    "generator_frame": ("def g():\n    yield 1\ngen = g()\nnext(gen)\ngen.gi_frame.f_back.f_globals", "'gi_frame'"),
    "getattr_gi_frame": ("def g():\n    yield 1\ngetattr(g(), 'gi_frame')", "'gi_frame'"),
    "traceback_frame": ("try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    e.__traceback__.tb_frame.f_back",
                        "'__traceback__'"),
    "coroutine_frame": ("async def c():\n    pass\nc().cr_frame", "'cr_frame'"),
    "code_object": ("(lambda: 0).__code__", "'__code__'"),
    "closure": ("final_answer.__closure__", "'__closure__'"),
    "vars_no_private": ("class A:\n    pass\nvars(A)['__dict__']", "KeyError"),
    "locals_in_class_body": ("class A:\n    locals()['__array_interface__'] = {}", "locals() is not available"),
    "type_three_args": ("type('A', (), {'__array_interface__': {'data': (0, False)}})", "three arguments"),
    "class_array_interface": ("class A:\n    __array_interface__ = {}", "'__array_interface__'"),
    "class_del": ("class A:\n    def __del__(self):\n        pass", "Defining '__del__'"),
    "setattr_dunder": ("class A:\n    pass\nsetattr(A, '__reduce__', print)", "'__reduce__'"),
    "match_private_attr": ("match 1:\n    case int(_secret=x):\n        pass", "'_secret'"),
    "breakpoint": ("breakpoint()", "breakpoint() is not available"),
    "exec_string": ("exec('import os')", "Import of 'os' is not allowed"),
    "eval_string_built": ("eval('__imp' + 'ort__(\"os\")')", "'__import__'"),
    "exec_with_own_builtins": ("exec('open(\"" + M + "\", \"w\")', {'__builtins__': {'open': print}})",
                               "only files inside the working directory"),
    "compile": ("compile('1', 'f', 'eval')", "compile() is not available"),
    "input": ("input()", "input() is not available"),
    # files
    "open_passwd": ("open('/etc/passwd').read()", "Access to '/etc/passwd' is not allowed"),
    "open_parent_dir": ("open('../x', 'w').write('x')", "Access to '../x' is not allowed"),
    "open_absolute": ("open('" + M + "', 'w').write('x')", "only files inside the working directory"),
    "open_fd": ("open(1, 'w')", "only accepts file paths"),
    "open_opener": ("open('a', 'w', opener=lambda path, flags: 1)", "custom opener"),
    "open_proc_mem": ("open('/proc/self/mem', 'wb')", "not allowed"),
    # numpy
    "numpy_ctypeslib": ("import numpy as np\nnp.ctypeslib.as_array", "'numpy.ctypeslib' is not available"),
    "numpy_import_ctypeslib": ("import numpy.ctypeslib", "Import of 'numpy.ctypeslib' is not allowed"),
    "numpy_f2py": ("import numpy.f2py", "numpy.f2py"),
    "numpy_distutils": ("from numpy import distutils", "numpy.distutils"),
    "numpy_lib_format": ("import numpy as np\nnp.lib.format.read_array", "'numpy.lib.format' is not available"),
    "numpy_testing": ("import numpy as np\nnp.testing", "numpy.testing"),
    "numpy_as_strided": ("import numpy as np\nnp.lib.stride_tricks.as_strided(np.zeros(1), shape=(10**6,))",
                         "as_strided' is not available"),
    "numpy_array_ctypes": ("import numpy as np\nnp.zeros(3).ctypes.data_as", "'ctypes'"),
    "numpy_bitgen_ctypes": ("import numpy as np\ngetattr(np.random.default_rng().bit_generator, 'ctypes')",
                            "'ctypes'"),
    "numpy_private_core": ("import numpy as np\nnp._core", "'_core'"),
    "numpy_save_outside": ("import numpy as np\nnp.save('" + M + "', np.zeros(2))", "is not allowed"),
    "numpy_tofile_outside": ("import numpy as np\nnp.zeros(2).tofile('" + M + "')", "is not allowed"),
    "numpy_loadtxt_passwd": ("import numpy as np\nnp.loadtxt('/etc/passwd', dtype=str, delimiter=':')",
                             "'/etc/passwd' is not allowed"),
    "numpy_memmap": ("import numpy as np\nnp.memmap('m', mode='w+', shape=(2,))", "numpy.memmap"),
    "numpy_object_array_over_bytes": ("import numpy as np\nnp.ndarray((1,), dtype=object, buffer=bytearray(8))",
                                      "object items over a raw buffer"),
    "numpy_object_array_via_type": ("import numpy as np\ntype(np.zeros(1))((1,), dtype=object, "
                                    "buffer=bytearray(b'\\x08' * 8))", "object items over a raw buffer"),
    "numpy_recarray_over_bytes": ("import numpy as np\nnp.recarray((1,), dtype=[('a', 'O')], buf=bytearray(8))",
                                  "'numpy.recarray' is not available"),
    "numpy_rec_fromstring": ("import numpy as np\nnp.rec.fromstring(b'\\x08' * 8, dtype=[('a', 'O')])",
                             "'numpy.rec' is not available"),
    "numpy_resize_refcheck": ("import numpy as np\na = np.zeros(4)\nb = a[:]\na.resize((10**6,), refcheck=False)",
                              "keyword argument 'refcheck'"),
    "numpy_resize_refcheck_kwargs": ("import numpy as np\na = np.zeros(4)\nb = a[:]\n"
                                     "a.resize((10**6,), **{'refcheck': False})", "keyword argument 'refcheck'"),
    # sympy string evaluation
    "sympify": ("import sympy\nsympy.sympify(\"__import__('os').system('touch " + M + "')\")", "'__import__'"),
    "sympify_open": ("import sympy\nsympy.sympify(\"open('" + M + "', 'w')\")", "only files inside"),
    "sympy_S": ("import sympy\nsympy.S(\"open('/etc/passwd').read()\")", "'/etc/passwd' is not allowed"),
    "parse_expr_unevaluated": ("from sympy.parsing.sympy_parser import parse_expr\n"
                               "parse_expr(\"__import__('os')\", evaluate=False)", "'__import__'"),
    "subs_string": ("import sympy as sp\nx = sp.Symbol('x')\n(x + 1).subs(x, \"__import__('os')\")", "'__import__'"),
    "lambdify_injection": ("import sympy as sp\nx = sp.Symbol('x')\n"
                           "f = sp.lambdify(x, sp.Function(\"open('" + M + "', 'w').write\")(x))\nf(1)",
                           "only files inside"),
    "lambdify_builtins": ("import sympy as sp\nx = sp.Symbol('x')\n"
                          "sp.lambdify(x, sp.Function('builtins.exec')(x))('import os')",
                          "Import of 'os' is not allowed"),
    "sympy_preview": ("import sympy\nsympy.preview('x', output='png')", "'sympy.preview' is not available"),
    "sympy_import_module": ("from sympy.external import import_module", "sympy.external"),
    "sympy_get_class": ("from sympy.utilities.source import get_class", "sympy.utilities.source"),
    "sympy_autowrap": ("from sympy.utilities.autowrap import autowrap", "sympy.utilities.autowrap"),
    "sympy_init_session": ("import sympy\nsympy.init_session()", "init_session"),
    # A library function that assigns into its caller's globals (sympy.var), called by the policy on the code's
    # behalf (keys() of a **mapping, a property read by getattr), would replace the policy's check_attribute.
    "policy_frame_via_mapping_keys": (
        "import functools, sympy\nclass E(sympy.Symbol):\n    def __call__(self, name, store=False):\n"
        "        return name\nclass M:\n    keys = functools.partial(sympy.var, 'check_attribute', cls=E)\n"
        "try:\n    dict(**M())\nexcept Exception:\n    pass\ngetattr(type, '__glo' + 'bals__')['os']",
        "'__globals__' is not allowed"),
    "policy_frame_via_property": (
        "import functools, sympy\nclass E(sympy.Symbol):\n    def __call__(self, name, store=False):\n"
        "        return name\nclass N(str):\n    x = property(functools.partial(sympy.var, cls=E))\n"
        "try:\n    getattr(N('check_attribute'), 'x')\nexcept Exception:\n    pass\n"
        "getattr(type, '__glo' + 'bals__')['os']", "'__globals__' is not allowed"),
    # string annotations evaluated by the standard library (functools.singledispatch -> typing.get_type_hints)
    "annotation_string": (
        "import functools\n@functools.singledispatch\ndef f(x):\n    return 0\n"
        "s = \"[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
        ".__init__.__globals__['getcwd']()\"\n@f.register\ndef _(x: s):\n    return 1",
        "string annotations must be type expressions"),
    "annotation_string_in_generic_alias": (
        "import functools\n@functools.singledispatch\ndef f(x):\n    return 0\n"
        "s = '().__class__.__base__'\n@f.register\ndef _(x: list[s]):\n    return 1",
        "'__base__' is not allowed"),
    # a generic alias of a guarded class, and the class of a library result: guarded by what they build
    "numpy_generic_alias": ("import numpy.typing as npt\nnpt.NDArray(1, dtype=object, buffer=bytes(8))",
                            "object items over a raw buffer"),
    "numpy_type_of_library_result": (
        "import numpy as np\nfrom numpy.lib import recfunctions as rfn\n"
        "r = rfn.rec_append_fields(np.zeros(1, dtype=[('a', int)]), 'b', np.zeros(1))\n"
        "type(r)((1,), dtype=[('p', object)], buf=bytes(8))", "object items over a raw buffer"),
}


@pytest.fixture(scope="module")
def target():
    """One sandbox takes all the attacks in turn (it must keep working after each)."""
    with PythonSandbox(timeout=TIMEOUT) as sb:
        yield sb


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_escape_attempt_is_contained(name, target, bystander, marker):
    code, fragment = ATTACKS[name]
    assert_contained(target, code.replace(M, str(marker)), marker, bystander, fragment)


def test_infinite_loop_times_out_and_restarts(sandbox, bystander, marker):
    sandbox.run("state = 1")
    start = time.monotonic()
    obs = sandbox.run("while True:\n    try:\n        pass\n    except BaseException:\n        pass")
    assert time.monotonic() - start < TIMEOUT + MARGIN
    assert obs.timed_out and obs.error
    assert obs.text == ("Error:\nExecution timed out after 2 s; the interpreter was restarted and its variables "
                        "are lost.")
    assert "NameError" in sandbox.run("state").text  # fresh interpreter
    assert_contained(sandbox, "while True:\n    pass", marker, bystander)


def test_memory_bombs(bystander, marker):
    with PythonSandbox(timeout=TIMEOUT, memory_limit_mb=256) as sb:
        obs = assert_contained(sb, "x = 'a' * 10**10", marker, bystander)
        assert obs.text == "Error:\nMemoryError"
        obs = assert_contained(sb, "chunks = []\nwhile True:\n    chunks.append(bytearray(2**20))", marker, bystander)
        assert "MemoryError" in obs.text
        assert sb.run("chunks = None\nsum(range(10))").text.endswith("\n45")  # state was kept, memory usable


def test_cpu_limit_crash_restarts_worker(bystander, marker):
    with PythonSandbox(timeout=20, cpu_time_limit=1) as sb:
        sb.run("kept = 1")
        start = time.monotonic()
        obs = sb.run("while True:\n    pass")
        assert time.monotonic() - start < 10
        assert obs.error and not obs.timed_out
        assert obs.text == ("Error:\nThe interpreter crashed (SIGXCPU: CPU time limit exceeded) while running this "
                            "code; it was restarted and its variables are lost.")
        assert "NameError" in sb.run("kept").text
        assert sb.run("2 + 2").text.endswith("\n4")
        assert not marker.exists()


def test_file_size_limit(sandbox):
    obs = sandbox.run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (40 * 2**20))")
    assert obs.error and "OSError" in obs.text
    assert (sandbox.workdir / "big.bin").stat().st_size <= 32 * 2**20


def test_symlink_out_of_workdir_is_refused(sandbox, bystander, tmp_path, marker):
    outside = tmp_path / "outside"
    outside.mkdir()
    (sandbox.workdir / "link").symlink_to(outside)
    (sandbox.workdir / "passwd").symlink_to("/etc/passwd")
    assert_contained(sandbox, "open('link/pwned', 'w').write('x')", marker, bystander, "not allowed")
    assert_contained(sandbox, "open('passwd').read()", marker, bystander, "not allowed")
    assert_contained(sandbox, "import numpy as np\nnp.save('link/pwned.npy', np.zeros(1))", marker, bystander,
                     "not allowed")
    assert list(outside.iterdir()) == []


def test_pickled_numpy_file_cannot_run_code(sandbox, bystander, marker):
    # A crafted .npy whose object payload calls os.system when unpickled.
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps([Evil()], protocol=2)
    header = "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    (sandbox.workdir / "evil.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little")
                                               + header.encode() + payload)
    assert_contained(sandbox, "import numpy as np\nnp.load('evil.npy', allow_pickle=True)", marker, bystander,
                     "pickle.find_class")


def test_no_process_escapes_the_session(sandbox):
    sid = sandbox._worker.sid
    for code in ("import os\nos.fork()", "import multiprocessing", "import subprocess"):
        assert sandbox.run(code).error
    assert _session_processes(sid) == [sandbox._worker.pid]
    sandbox.close()
    assert _session_processes(sid) == []


# ----------------------------------------------------------------------------------------------------------------
# The OS layer on its own (as if the language layer had been bypassed)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="seccomp filter is x86-64 only")
def test_os_layer_alone_blocks_exec_network_signals_files_and_fork_bombs(tmp_path):
    agent_dir = Path(__file__).resolve().parents[1] / "trl_agent_distill" / "agent" / "sandbox"
    work = tmp_path / "box"
    work.mkdir()
    marker = tmp_path / "pwned"
    script = textwrap.dedent(f"""
        import os, socket, sys, time
        sys.path.insert(0, {str(agent_dir)!r})
        import os_layer as o
        results = {{"dropped_root": o.drop_root(1_234_567_890, 12)}}
        results["landlock"] = o.landlock_restrict([{str(work)!r}], [sys.prefix, sys.base_prefix, "/usr/lib", "/lib"])
        assert o.install_seccomp()
        results["system"] = os.system("touch {marker}")  # the shell cannot be executed
        for name, attempt in [
            ("exec", lambda: os.execv("/bin/true", ["true"])),
            ("socket", lambda: socket.socket()),
            ("kill_parent", lambda: os.kill(os.getppid(), 0)),
            ("setsid", lambda: os.setsid()),
            ("write_outside", lambda: open({str(marker)!r}, "w")),
        ]:
            try:
                attempt()
                results[name] = "allowed"
            except OSError as e:
                results[name] = type(e).__name__
        open({str(work / "inside.txt")!r}, "w").write("ok")
        forks = 0
        try:
            for _ in range(50):  # a fork bomb after an escape: bounded by RLIMIT_NPROC once root is dropped
                if os.fork() == 0:
                    time.sleep(1)
                    os._exit(0)
                forks += 1
        except OSError:
            pass
        results["forks"] = forks
        print(results)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    results = eval(out.stdout)  # noqa: S307 - our own subprocess's repr of a dict of str/int/bool
    assert results["system"] != 0 and results["exec"] == "PermissionError" and results["socket"] == "PermissionError"
    assert results["kill_parent"] == "PermissionError" and results["setsid"] == "PermissionError"
    if results["landlock"]:
        assert results["write_outside"] == "PermissionError"
    if results["dropped_root"]:
        assert results["forks"] < 12
    assert not marker.exists() and (work / "inside.txt").read_text() == "ok"


def test_protections_are_reported(sandbox):
    protections = sandbox.protections
    assert protections["audit_hook"] is True and "RLIMIT_AS" in protections["rlimits"]


def test_parent_refuses_pickled_globals():
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with pytest.raises(protocol.ProtocolError):
        protocol.loads(pickle.dumps(Evil()))
    assert protocol.loads(protocol.dumps({"a": (1, 2.5, 1j, b"x", {3})})) == {"a": (1, 2.5, 1j, b"x", {3})}


# ----------------------------------------------------------------------------------------------------------------
# fork / reset / close
# ----------------------------------------------------------------------------------------------------------------
def test_fork_isolation_both_ways(sandbox):
    sandbox.run("x = 1\nitems = [1]\nwith open('shared.txt', 'w') as f:\n    f.write('parent')")
    child = sandbox.fork()
    try:
        assert child.workdir != sandbox.workdir
        assert child.run("x").text.endswith("\n1") and child.run("open('shared.txt').read()").text.endswith("\nparent")
        child.run("x = 2\nitems.append(2)\nonly_in_child = True\nopen('child.txt', 'w').write('c')")
        assert sandbox.run("x, items").text.endswith("\n(1, [1])")
        assert "NameError" in sandbox.run("only_in_child").text
        assert not (sandbox.workdir / "child.txt").exists()
        sandbox.run("x = 3\nonly_in_parent = True")
        assert child.run("x, items").text.endswith("\n(2, [1, 2])")
        assert "NameError" in child.run("only_in_parent").text
        # a fork of a fork, and the fork outliving its original
        grandchild = child.fork()
        sandbox.close()
        assert grandchild.run("x").text.endswith("\n2") and child.run("x").text.endswith("\n2")
        grandchild.close()
    finally:
        child.close()


def test_fork_cannot_write_the_originals_files_through_inherited_descriptors(sandbox):
    sandbox.run("log = open('log.txt', 'w')\nlog.write('parent;')\nlog.flush()\nreader = open('log.txt')")
    child, sibling = sandbox.fork(), sandbox.fork()
    try:
        assert not child.run("log.write('child;')\nlog.flush()").error
        assert not sibling.run("log.write('sibling;')\nlog.flush()").error
        # each copy wrote into its own copy of the file, at the offset the original had reached
        assert (sandbox.workdir / "log.txt").read_text() == "parent;"
        assert (child.workdir / "log.txt").read_text() == "parent;child;"
        assert (sibling.workdir / "log.txt").read_text() == "parent;sibling;"
        assert child.run("reader.read()").text.endswith("\nparent;child;")
        assert not sandbox.run("log.write('more;')\nlog.flush()").error
        assert (child.workdir / "log.txt").read_text() == "parent;child;"
        # homes nest (Landlock can only narrow what a fork inherits) but no copy's directory holds another's
        for a, b in [(sandbox, child), (child, sibling), (sandbox, sibling)]:
            assert not a.workdir.is_relative_to(b.workdir) and not b.workdir.is_relative_to(a.workdir)
    finally:
        child.close()
        sibling.close()


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux", reason="seccomp filter is x86-64 only")
def test_os_layer_alone_confines_a_fork_to_its_own_home(tmp_path):
    """A compromised copy (language layer bypassed) cannot write its original's or its siblings' files."""
    agent_dir = Path(__file__).resolve().parents[1] / "trl_agent_distill" / "agent" / "sandbox"
    home = tmp_path / "h0"
    for path in (home / "work", home / "h1" / "work", home / "h2" / "work"):
        path.mkdir(parents=True)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(agent_dir)!r})
        import os_layer as o
        home = {str(home)!r}
        reads = [sys.prefix, sys.base_prefix, "/usr/lib", "/lib", "/dev/null"]
        assert o.landlock_restrict([home], reads), "no Landlock"
        o.install_seccomp()
        log = open(home + "/work/log.txt", "w")
        log.write("parent;")
        log.flush()
        open(home + "/h2/work/sibling.txt", "w").write("sibling;")
        # what the host does before forking: copy the working directory into the copy's home
        open(home + "/h1/work/log.txt", "w").write("parent;")
        pid = os.fork()
        if pid == 0:
            results = {{"moved": o.rebind_descriptors(home + "/work", home + "/h1/work", keep=(), max_fd=256)}}
            results["landlock"] = o.landlock_restrict([home + "/h1"], reads)
            log.write("child;")
            log.flush()
            for name, path in [("parent", home + "/work/log.txt"), ("sibling", home + "/h2/work/sibling.txt"),
                               ("new_in_parent", home + "/work/new.txt"), ("own", home + "/h1/work/own.txt")]:
                try:
                    open(path, "a").write("x")
                    results[name] = "allowed"
                except OSError as e:
                    results[name] = type(e).__name__
            print(results, flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    if "no Landlock" in out.stderr:
        pytest.skip("Landlock is not available")
    assert out.returncode == 0, out.stderr
    results = eval(out.stdout)  # noqa: S307 - our own subprocess's repr of a dict of str/int
    assert results["landlock"] and results["moved"] >= 1
    assert results["parent"] == results["sibling"] == results["new_in_parent"] == "PermissionError"
    assert results["own"] == "allowed"
    assert (home / "work" / "log.txt").read_text() == "parent;"
    assert (home / "h1" / "work" / "log.txt").read_text() == "parent;child;"
    assert (home / "h2" / "work" / "sibling.txt").read_text() == "sibling;"


def test_forks_nest_as_deep_as_landlock_allows_and_then_refuse_cleanly():
    sandboxes = [PythonSandbox(timeout=30)]
    try:
        sandboxes[0].run("x = 0")
        if not sandboxes[0].protections.get("landlock_abi"):
            pytest.skip("Landlock is not available")
        for depth in range(1, 16):  # each copy stacks one more Landlock layer (the kernel allows 16)
            sandboxes.append(sandboxes[-1].fork())
            assert sandboxes[-1].run("x += 1\nx").text.endswith(f"\n{depth}")
        with pytest.raises(SandboxError, match="nest at most 15"):
            sandboxes[-1].fork()
        assert sandboxes[-1].run("x").text.endswith("\n15")  # the refused fork left the deepest copy intact
    finally:
        for sb in reversed(sandboxes):
            sb.close()


def test_disk_quota_ends_the_run_and_bounds_forks():
    with PythonSandbox(timeout=20, disk_quota_mb=2) as sb:
        sb.run("x = 1")
        start = time.monotonic()
        obs = sb.run("for i in range(8):\n    open(f'f{i}', 'wb').write(bytes(512 * 1024))\nwhile True:\n    pass")
        assert obs.error and not obs.timed_out and "disk quota (2 MB" in obs.text
        assert time.monotonic() - start < 10  # ended when the quota was passed, not at the timeout
        assert list(sb.workdir.iterdir()) == []  # the run's files are gone, the next run starts clean
        assert "NameError" in sb.run("x").text
        # a run that stays below the quota is fine, but its copy would not fit
        assert not sb.run("open('big', 'wb').write(bytes(1536 * 1024))\nx = 2").error
        with pytest.raises(SandboxError, match="disk quota"):
            sb.fork()
        assert sb.run("x").text.endswith("\n2")
        # one file may not be larger than the quota either
        assert sb.run("open('huge', 'wb').write(bytes(3 * 1024 * 1024))").error
    with pytest.raises(ValueError, match="disk_quota_mb"):
        PythonSandbox(disk_quota_mb=0)


def test_language_layer_keeps_ordinary_annotations_and_arrays_working(sandbox):
    obs = sandbox.run(
        "import functools\nimport numpy as np\n@functools.singledispatch\ndef f(x):\n    return 'any'\n"
        "@f.register\ndef _(x: 'int'):\n    return 'int'\n@f.register\ndef _(x: list):\n    return 'list'\n"
        "class Node:\n    parent: 'Node | None' = None\n    children: list['Node'] = []\n"
        "a = np.ndarray((2,), dtype=np.int64, buffer=np.arange(2))\no = np.array([None, 1], dtype=object)\n"
        "v = type(o)((2,), dtype=object, buffer=None)\n"
        "f(1), f([1]), f('x'), a.tolist(), isinstance(a, np.ndarray), type(a) is np.ndarray, v.shape")
    assert obs.text.endswith("\n('int', 'list', 'any', [0, 1], True, True, (2,))"), obs.text


def test_fork_timeout_and_close_leave_the_other_intact():
    with PythonSandbox(timeout=TIMEOUT) as original:
        original.run("v = 'kept'")
        copy = original.fork()
        assert copy.run("while True:\n    pass").timed_out
        assert original.run("v").text.endswith("\nkept")
        assert "NameError" in copy.run("v").text
        second = original.fork()
        second.close()
        copy.close()
        assert original.run("v").text.endswith("\nkept")


def test_fork_is_fast(scientific, record_property):
    scientific.run("data = np.arange(10**6)\nexpr = sp.Symbol('x')**2")
    durations, forks = [], []
    try:
        for _ in range(8):
            start = time.perf_counter()
            forks.append(scientific.fork())
            durations.append(time.perf_counter() - start)
        for i, fork in enumerate(forks):
            assert fork.run(f"int(data.sum()) + {i}").text.endswith(f"\n{499999500000 + i}")
    finally:
        for fork in forks:
            fork.close()
    mean = statistics.mean(durations)
    record_property("fork_mean_seconds", mean)
    print(f"\nfork: mean {mean * 1000:.1f} ms, max {max(durations) * 1000:.1f} ms over 8 forks")
    assert max(durations) < 1.0


def test_reset(sandbox):
    sandbox.run("x = 1\nopen('f.txt', 'w').write('x')")
    sandbox.reset()
    assert "NameError" in sandbox.run("x").text
    assert list(sandbox.workdir.iterdir()) == []


def test_close_is_idempotent_and_cleans_up():
    sb = PythonSandbox(timeout=TIMEOUT)
    sb.run("open('f.txt', 'w').write('x')")
    workdir, worker = sb.workdir, sb._worker
    sb.close()
    sb.close()
    assert not workdir.exists() and not worker.alive()
    with pytest.raises(SandboxError):
        sb.run("1")
    with pytest.raises(SandboxError):
        sb.fork()
    with PythonSandbox(timeout=TIMEOUT) as other:
        with pytest.raises(SandboxError):
            other.run(b"1")  # type: ignore[arg-type]


def test_fork_of_fork_and_tools_in_forks():
    with PythonSandbox({"twice": lambda v: 2 * v}, timeout=TIMEOUT) as original:
        original.run("base = twice(1)")
        child = original.fork()
        grandchild = child.fork()
        try:
            for sb in (child, grandchild):
                obs = sb.run("open('mine.txt', 'w').write('ok')\ntwice(base)")
                assert obs.text.endswith("\n4"), obs.text
                assert (sb.workdir / "mine.txt").read_text() == "ok"
            assert not (original.workdir / "mine.txt").exists()
        finally:
            grandchild.close()
            child.close()


def test_odd_output_is_made_safe(sandbox):
    obs = sandbox.run("print('\\ud800 lone surrogate')")
    assert obs.text.encode("utf-8") and "lone surrogate" in obs.printed
    obs = sandbox.run("raise ValueError('x' * 10**6)")
    assert obs.error and len(obs.text) < 21_000 and "characters of this value cut here" in obs.text


def test_slow_tool_counts_towards_timeout():
    with PythonSandbox({"slow": lambda: time.sleep(TIMEOUT + 0.5)}, timeout=TIMEOUT) as sb:
        obs = sb.run("slow()")
        assert obs.timed_out
        assert sb.run("1").text.endswith("\n1")


# ----------------------------------------------------------------------------------------------------------------
# A compromised worker cannot harm the parent
# ----------------------------------------------------------------------------------------------------------------
_FAKE_WORKER = """
import os, pickle, socket, struct, sys
sys.path.insert(0, {agent_dir!r})
import protocol
sock = socket.socket(fileno=int(sys.argv[1]))
key, sent, received = b"", 0, 0

def recv():
    global received
    size = struct.unpack("!I", sock.recv(4, socket.MSG_WAITALL))[0]
    received += 1
    return protocol.open_frame(sock.recv(size, socket.MSG_WAITALL), key, received - 1)

def sealed(payload, seq, key=None):
    tag = protocol.mac(key if key is not None else globals()["key"], seq, payload)
    return struct.pack("!I", protocol.MAC_BYTES + len(payload)) + tag + payload

def send_raw(payload):  # the worker is compromised: it authenticates whatever payload it likes
    global sent
    sock.sendall(sealed(payload, sent))
    sent += 1

def result(**fields):
    plain = dict(printed="", value="1", error=None, final=False, final_value=None, final_is_repr=False,
                 stray_threads=False)
    plain.update(fields)
    return plain

key = recv()[1]["key"]
send_raw(pickle.dumps(("ready", {{"pid": os.getpid(), "protections": {{}}}})))
while True:
    message = recv()
    {behaviour}
"""

# What a worker can send in place of an answer; the host must answer each with an error observation.
_EVIL = {
    # a pickle that would run a command when loaded with the ordinary unpickler
    "evil_pickle": "send_raw(pickle.dumps(('result', os.system)))",
    "evil_reduce": ("class E:\n        def __reduce__(self):\n            return (os.system, ('touch {marker}',))\n"
                    "    send_raw(pickle.dumps(('result', E())))"),
    "oversized": "sock.sendall(struct.pack('!I', 2**31))",
    "undersized": "sock.sendall(struct.pack('!I', 3) + b'abc')",
    "garbage": "send_raw(b'not a pickle at all')",
    "truncated_pickle": "send_raw(pickle.dumps(('result', result()))[:-5])",
    "fd_spam": ("fds = [os.open('/dev/null', os.O_RDONLY) for _ in range(8)]\n"
                "    socket.send_fds(sock, [struct.pack('!I', 3)], fds)\n    sock.sendall(b'xyz')"),
    "fake_fork": ("data = pickle.dumps(('forked', {{}}))\n    a, b = socket.socketpair()\n"
                  "    socket.send_fds(sock, [sealed(data, sent)], [a.fileno()])\n"
                  "    data = pickle.dumps(('hello', {{'pid': {victim}, 'protections': {{}}}}))\n"
                  "    b.sendall(sealed(data, 0))"),
    "silent": "pass",
    # frames that code in the worker can write without the key: forged, or a stale frame replayed
    "forged_result": "sock.sendall(sealed(pickle.dumps(('result', result(value='FORGED-VALUE'))), sent, key=b''))",
    "replayed_frame": "sock.sendall(sealed(pickle.dumps(('result', result(value='STALE-VALUE'))), sent - 1))",
    # pathological plain data: shared, deep, huge numbers, values whose comparison raises
    "shared_list": "send_raw(pickle.dumps(('result', result(final=True, final_value=[[0] * 1000] * 1000))))",
    "deep_nesting": "send_raw(b'\\x80\\x05' + b']' * 200000 + b'a' * 199999 + b'.')",
    "cyclic_list": "x = []\n    x.append(x)\n    send_raw(pickle.dumps(('result', result(final=True, final_value=x))))",
    "huge_int": "send_raw(pickle.dumps(('result', result(final=True, final_value=10 ** 100000))))",
    "signalling_nan": ("from decimal import Decimal\n"
                       "    send_raw(pickle.dumps(('result', result(final=True, final_value=Decimal('sNaN')))))"),
    "huge_exponent": ("from decimal import Decimal\n"
                      "    send_raw(pickle.dumps(('result', result(final=True, final_value=Decimal('1e999999999')))))"),
    "many_items": "send_raw(pickle.dumps(('result', result(final=True, final_value=list(range(2 * 10**6))))))",
    "huge_text": "send_raw(pickle.dumps(('result', result(printed='x' * 30_000_000))))",
    "unhashable_key": "send_raw(b'\\x80\\x05}}]\\x88s.')",
    "malformed_result": "send_raw(pickle.dumps(('result', {{'printed': 1}})))",
    "wrong_kind": "send_raw(pickle.dumps(('hello', {{}})))",
    # a run that leaves a thread behind: the interpreter ends with the run
    "stray_threads": "send_raw(pickle.dumps(('result', result(stray_threads=True))))",
}


@pytest.mark.parametrize("behaviour", sorted(_EVIL))
def test_compromised_worker_cannot_harm_parent(behaviour, tmp_path, marker, monkeypatch):
    from trl_agent_distill.agent.sandbox import host as sandbox_module

    victim = subprocess.Popen(["sleep", "60"])  # an unrelated process the fake worker claims to be its fork
    try:
        script = tmp_path / "fake_worker.py"
        script.write_text(_FAKE_WORKER.format(agent_dir=str(Path(sandbox_module.__file__).parent),
                                              behaviour=_EVIL[behaviour].format(marker=marker, victim=victim.pid)))
        monkeypatch.setattr(sandbox_module, "_WORKER_SCRIPT", script)
        fds_before = len(os.listdir("/proc/self/fd"))
        with PythonSandbox(timeout=TIMEOUT) as sb:
            if behaviour == "fake_fork":
                copy = sb.fork()  # the claimed pid is not our worker's child: refused, the copy starts fresh
                assert copy._worker is None
                copy.close()
            else:
                start = time.monotonic()
                obs = sb.run("1")
                assert obs.error and time.monotonic() - start < TIMEOUT + MARGIN
                assert obs.timed_out == (behaviour == "silent")
                assert "FORGED-VALUE" not in obs.text and "STALE-VALUE" not in obs.text and len(obs.text) < 1000
                str(obs), repr(obs), pickle.dumps(obs)  # everything the host holds is bounded plain data
                assert sb._worker is None  # never trusted again
                if behaviour == "stray_threads":
                    assert "left threads running" in obs.text
        assert not marker.exists()
        assert victim.poll() is None  # never signalled
        assert len(os.listdir("/proc/self/fd")) <= fds_before
    finally:
        victim.kill()
        victim.wait()
