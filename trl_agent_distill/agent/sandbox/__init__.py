"""A Python executor for untrusted CodeAct steps, in the format of smolagents' observations.

``PythonSandbox`` runs the code a model writes (one ``run`` per agent step) in a separate worker
interpreter that keeps its variables between steps, and returns an :class:`Observation`: the printed output,
the value, the error and the final answer, and their rendering in smolagents' format::

    with PythonSandbox(tools={"web_search": retriever.search}, timeout=10) as sandbox:
        obs = sandbox.run("r = web_search(query='Velmora founding year')\\nprint(r)")
        candidates = [sandbox.fork() for _ in range(8)]   # independent copies for self-consistency

Other executors plug in by implementing :class:`PythonExecutor` (``run``, ``fork``, ``close``).

Threat model
------------
The code is assumed hostile, and the worker that runs it may end up fully compromised (native code
execution through a bug in CPython, numpy or sympy). What must hold then is the **host**: it never runs
or formats anything the worker chose beyond fixed bounds, and the OS layer keeps the worker in its box.

* **OS layer: the boundary** (``os_layer``; what the kernel offers is in ``PythonSandbox.protections``). A
  fresh process per sandbox with a minimal environment, its own session, stdio on /dev/null; rlimits
  (address space, CPU seconds per run, file size, open files, no core dumps); started by root, a fresh
  unprivileged uid and RLIMIT_NPROC; on x86-64 Linux a seccomp filter (no ``execve``, sockets, ptrace,
  signals to other processes, new sessions, namespaces or mounts); with Landlock (Linux >= 5.13) writes only
  under the sandbox's home directory, reads only there and in Python's installation and system libraries,
  no TCP. A fork narrows Landlock to its own home and has its inherited descriptors rebound to its own
  copies of the files, so it cannot write its original's or its siblings' files. The host adds a wall-clock
  limit per run (the worker is killed and replaced) and a disk quota per lineage (a sandbox and its forks).
* **Language layer: capability limits and friendly errors** (``policy``). An AST check (no dunder names or
  private attributes, no frame internals), reduced builtins, read-only views of allow-listed modules without
  their dangerous parts, an audit hook on what libraries do for the code (files outside the working
  directory, processes, sockets, unpickling). It turns what an agent should not do into a clear error
  observation, and closes the routes we know from Python to raw memory (guards judge what is built, e.g.
  object arrays over raw bytes, whatever class or alias builds it; policy code touches the code's objects
  only through isolated helpers; annotation strings must be type expressions). It is not the boundary.
* **The channel and the host** (``protocol``, ``host``). Frames are authenticated with a key the worker
  receives before any code runs, so code in the worker cannot forge or replay results; the host decodes
  only bounded plain data (no shared or cyclic structures, bounded depth, items, digits; no special values
  such as ``Decimal('sNaN')``), and any violation is an error observation and a fresh interpreter. A run
  that leaves threads behind ends its interpreter.

An escaped worker (native code in the worker process) **can**: use the CPU and memory its rlimits allow
until the run's timeout; read and write files under its own home (including the homes of forks made from
it later); read Python's installation and system libraries; send the host well-formed, bounded answers of
its choosing for its own runs (tool calls included: tools run in the host with plain-data arguments). It
**cannot** (where the kernel offers the layer): start programs, open sockets, signal or trace other
processes, write outside its home or read outside the allowed directories, write its original's or siblings'
files, keep more than the disk quota past the next check (every 0.25 s while a run waits, and before each run
and fork), or make the host run, print or decode unbounded data. Without Landlock (kernel before 5.13) an escaped worker can read and write whatever its uid
can; without root there is no uid switch or process cap; off x86-64 there is no seccomp filter.
"""

from .executor import Observation, PythonExecutor, render_observation
from .host import DEFAULT_ALLOWED_IMPORTS, PythonSandbox, SandboxError

__all__ = ["DEFAULT_ALLOWED_IMPORTS", "Observation", "PythonExecutor", "PythonSandbox", "SandboxError",
           "render_observation"]
