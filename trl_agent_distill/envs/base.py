"""What an interactive environment is to the agent loop: tasks, and a world that answers each action.

An `EnvironmentSuite` is one benchmark: its tasks (`tasks(split)`), the format its agents speak (`format`, an
`AgentFormat` that owns the prompt, the parsing of a reply into an action, the text of observations and the
segmentation), and `make()`, which opens a fresh `Environment` for one episode. An `Environment` is one episode's
world: `reset(task)` says where the agent is and what it must do, `step(action)` answers an action with a
`Transition` (observation, done, success, reward), `close()` releases it. `EnvironmentAgent` (in
`trl_agent_distill.agent.loop`) runs many of them in lockstep through the batched loop.

Suites are found by name (`load_environment("alfworld", options)`) and imported only when used, so a missing
optional engine fails with what to install, before any model loads.
"""

from __future__ import annotations

import difflib
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..agent.backends import GenerationRequest
    from ..agent.loop import Task
    from ..formats import AgentFormat

# name -> "module:class" of its suite (imported on first use: each brings an optional engine).
ENVIRONMENTS = {
    "alfworld": "trl_agent_distill.envs.alfworld:ALFWorldSuite",
    "bfcl": "trl_agent_distill.envs.bfcl:BFCLSuite",
    "webshop": "trl_agent_distill.envs.webshop:WebShopSuite",
}


@dataclass(frozen=True)
class Transition:
    """What the environment says after a reset or an action.

    `observation` is what the format renders for the model (usually text; a tool-calling environment returns one
    result per call). `valid` is False when the environment rejected the action (ALFWorld: "Nothing happens."),
    which the episode counts as an invalid action. `info` holds what else the environment reports (admissible
    actions, the goal); it is kept in the episode's record when JSON-ready.
    """

    observation: Any
    done: bool = False
    success: bool = False
    reward: float = 0.0
    valid: bool = True
    info: Mapping[str, Any] = field(default_factory=dict)


class EnvironmentFailure(RuntimeError):
    """An environment that could not start, crashed or hung during an episode (the episode is recorded as an error
    and the run goes on)."""


class Environment(ABC):
    """One episode's world (see the module docstring). Not shared between episodes or threads."""

    @abstractmethod
    def reset(self, task: Task) -> Transition:
        """Start `task`; the observation holds the task text the agent is shown first."""

    @abstractmethod
    def step(self, action: Any) -> Transition:
        """Carry out `action` (what the suite's format parsed from a reply)."""

    def close(self) -> None:
        """Release the engine's resources."""


class EnvironmentSuite(ABC):
    """A benchmark: its tasks, the format its agents speak and fresh environments (see the module docstring)."""

    name: str
    options_class: type | None = None
    """The dataclass of this suite's `environment_options` (checked by `load_environment`)."""
    max_steps: int = 30
    """The benchmark's step cap per episode, used when a run does not set `max_agent_steps`."""

    @property
    @abstractmethod
    def format(self) -> AgentFormat:
        """The protocol agents speak in this environment."""

    @abstractmethod
    def tasks(self, split: str) -> list[Task]:
        """The tasks of `split` (e.g. "train", "test"); an unknown split fails naming the known ones."""

    @abstractmethod
    def make(self) -> Environment:
        """A fresh environment for one episode (called from worker threads, one per episode)."""

    def expert(self) -> Callable[[GenerationRequest], str] | None:
        """A policy for `PolicyBackend` that solves the tasks (e.g. ALFWorld's planner), when the suite has one."""
        return None

    def tool_schemas(self, task: Task) -> list[dict[str, Any]] | None:
        """JSON schemas of the tools the chat template shows for `task` (tool-calling environments), else None."""
        return None


def load_environment(name: str, options: Mapping[str, Any] | None = None) -> EnvironmentSuite:
    """The suite called `name` with its `options`; an unknown name or option fails naming the closest one."""
    if name not in ENVIRONMENTS:
        close = difflib.get_close_matches(name, list(ENVIRONMENTS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown environment {name!r}.{hint} The environments are {sorted(ENVIRONMENTS)}.")
    module_name, _, class_name = ENVIRONMENTS[name].partition(":")
    suite_class = getattr(importlib.import_module(module_name), class_name)
    return suite_class(suite_options(suite_class, dict(options or {}), source=f"environment {name!r}"))


def suite_options(suite_class: type[EnvironmentSuite], options: dict[str, Any], *, source: str) -> Any:
    """`options` as the suite's options dataclass, an unknown key named with its closest option."""
    if suite_class.options_class is None:
        if options:
            raise ValueError(f"{source} takes no environment_options, got {sorted(options)}.")
        return None
    known = [f.name for f in fields(suite_class.options_class)]
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{source}: unknown environment option '{key}'.{hint} Its options are {known}.")
    try:
        return suite_class.options_class(**options)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None
