"""The executor interface of the agent runtime and the structured result of one run.

An executor runs the code an agent writes, one snippet per step, keeping its variables between steps (as
smolagents' ``PythonExecutor``). :class:`~trl_agent_distill.agent.sandbox.PythonSandbox` is the isolated
implementation; another one (a container, a remote service) plugs in by implementing the three methods.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

# The text of an observation is the CodeAct format's; the sandbox keeps it ready for callers that want only text.
from ...formats.codeact import render_execution as render_observation


@dataclass(frozen=True)
class Observation:
    """What one ``run`` produced: the structured parts, and ``text``, their rendering in smolagents' format::

        Execution logs:
        {printed}
        Last output from code snippet:
        {value}

    or ``Error:\\n{error_message}`` (after the execution logs if something was printed).
    """

    text: str
    """The observation shown to the model, in smolagents' format."""
    error: bool
    """The code raised, was refused, timed out or crashed the worker."""
    final_answer: Any = None
    """The value passed to ``final_answer(x)`` as plain data (numpy values become Python numbers or lists;
    anything else that is not plain data becomes its ``repr``)."""
    has_final_answer: bool = False
    """``final_answer`` was called (distinguishes ``final_answer(None)`` from no call)."""
    printed: str = ""
    """Captured stdout, truncated like in ``text``."""
    timed_out: bool = False
    value: str | None = None
    """``str()`` of the last expression's value (or of the final answer); None after an error."""
    error_message: str | None = None
    """What went wrong (``Type: message`` and the line, or the sandbox's own message); None if nothing did."""

    @classmethod
    def from_parts(cls, *, printed: str = "", value: str | None = None, error_message: str | None = None,
                   final_answer: Any = None, has_final_answer: bool = False, timed_out: bool = False) -> Observation:
        return cls(text=render_observation(printed, value, error_message), error=error_message is not None,
                   final_answer=final_answer, has_final_answer=has_final_answer, printed=printed,
                   timed_out=timed_out, value=None if error_message is not None else value,
                   error_message=error_message)


class PythonExecutor(abc.ABC):
    """Runs an agent's code snippets in one persistent namespace.

    ``run`` never raises for what the code does (errors, timeouts, crashes are observations), only for misuse
    such as running after ``close``; ``fork`` gives an independent copy (same variables and files) for trying
    several candidate steps, and raises if no copy can be made.
    """

    @abc.abstractmethod
    def run(self, code: str) -> Observation:
        """Run one snippet and return what it produced."""

    @abc.abstractmethod
    def fork(self) -> PythonExecutor:
        """An independent copy of this executor's current state."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the executor's resources. Idempotent."""

    def __enter__(self) -> PythonExecutor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
