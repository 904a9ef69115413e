"""What every agent protocol provides: how to read a trajectory (`TrajectoryFormat`) and how to speak it
(`AgentFormat`).

A `TrajectoryFormat` only segments: it finds REASON / ACT / OBS / OTHER spans in text written in its protocol. An
`AgentFormat` is also what an agent loop talks to the model with: its
system prompt and task message (package data files under `prompts/`, as smolagents keeps its prompts), its stop
strings, `parse(reply)` into an action or a parse error, `render(observation)` into the text the model reads next,
and `write(thought, action)`, the reply a model that follows the format sends. Each format segments back exactly
what it writes and renders (tests/test_formats.py checks it on generated trajectories).
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, TypeVar

import yaml

from ..spans import Span

ActionT = TypeVar("ActionT")


@dataclass(frozen=True)
class ParsedReply(Generic[ActionT]):
    """A reply the format could read: `content` is what the trajectory keeps (the reply up to the end of its action,
    with the stop string written back), `action` what the environment should do."""

    content: str
    action: ActionT


@dataclass(frozen=True)
class ParseError:
    """A reply the format could not read: `content` is kept as written, `message` tells the model what was expected
    (it is rendered as the step's observation)."""

    content: str
    message: str


class TrajectoryFormat(ABC):
    """Reads one protocol's trajectories: which text looks like it, and its spans."""

    name: str
    """The segmentation style this format answers to (`segment_text(style=name)`)."""

    @abstractmethod
    def looks_like(self, text: str) -> bool:
        """Whether `text` holds this format's step markers (used by style detection, in a fixed order)."""

    @abstractmethod
    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """Contiguous spans covering a non-empty `text`: a whole transcript, or only what the agent wrote
        (`assistant=True`). It need not hold a step; the caller checks that."""

    @abstractmethod
    def no_step_reason(self, *, assistant: bool) -> str:
        """What a text without any step of this format should have held (the start of an error message)."""


class AgentFormat(TrajectoryFormat, Generic[ActionT]):
    """A protocol an agent loop speaks: prompts, stop strings, parsing, rendering, writing.

    `observation` is whatever the format's environment returns for an action (CodeAct: the sandbox's
    `Observation`; ReAct: a tool's text or a `ToolError`), or a `ParseError`.
    """

    stop: tuple[str, ...] = ()
    """Where generation stops: the model must not write the observation itself."""

    def __init__(self, tools: Mapping[str, Callable[..., Any]] | None = None):
        self.tools = dict(tools or {})
        self.prompts = load_prompts(self.name)

    @abstractmethod
    def system_prompt(self) -> str:
        """The default system prompt, listing the tools."""

    def task_message(self, question: str) -> str:
        """The user message that sets the task."""
        return self.prompts["task_message"].format(question=question)

    def question(self, task_message: str) -> str | None:
        """The question a `task_message` was made from, or None if it is not one (the inverse of `task_message`)."""
        prefix, _, suffix = self.prompts["task_message"].partition("{question}")
        fits = len(task_message) >= len(prefix) + len(suffix)
        if not (fits and task_message.startswith(prefix) and task_message.endswith(suffix)):
            return None
        return task_message[len(prefix) : len(task_message) - len(suffix)]

    @abstractmethod
    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[ActionT] | ParseError:
        """Read the action in a model's `reply`; `truncated` says the reply ran out of tokens (the error says so)."""

    @abstractmethod
    def write(self, thought: str, action: ActionT) -> str:
        """The reply, stop string included, of a model that thinks `thought` and takes `action` in this format."""

    @abstractmethod
    def observation_text(self, observation: Any) -> str:
        """The observation itself, without the marker that introduces it (what an episode's `errors` log)."""

    def observation_turn(self, text: str) -> str:
        """The user turn that shows an observation's `text` (from `observation_text`): the text with its marker."""
        return self.prompts["observation"].format(observation=text)

    def render(self, observation: Any) -> str:
        """The user turn the model reads after its action."""
        return self.observation_turn(self.observation_text(observation))


class EnvironmentFormat(AgentFormat[ActionT]):
    """An `AgentFormat` spoken in an interactive environment (`trl_agent_distill.envs`): the task message is the
    environment's first observation, each parsed action goes to the environment (or, for a thought, is answered by
    the format itself), and candidates of self-consistency vote on `action_key`.

    Formats whose turns are not plain text (native tool calls) override `assistant_message` and
    `observation_messages`.
    """

    def task_message(self, question: str) -> str:
        """The first user turn: the environment's opening observation (the task text is part of it)."""
        return self.prompts["task_message"].format(question=question)

    def reply_without_environment(self, action: ActionT) -> str | None:
        """The observation for an action the environment never sees (a `think:` line gets "OK."), else None."""
        return None

    @abstractmethod
    def action_key(self, action: ActionT) -> Any:
        """A hashable normal form of `action`: candidates with equal keys are the same action in a vote."""

    def assistant_message(self, parsed: ParsedReply[ActionT]) -> dict[str, Any]:
        """The message the episode stores for a reply."""
        return {"role": "assistant", "content": parsed.content}

    def observation_messages(self, observation: Any) -> list[dict[str, Any]]:
        """The messages that show the model an observation (from the environment, or a `ParseError`)."""
        return [{"role": "user", "content": self.render(observation)}]


@functools.cache
def load_prompts(name: str) -> dict[str, str]:
    """The prompt templates of format `name`, from the package data file `prompts/<name>.yaml`."""
    text = resources.files(__package__).joinpath("prompts", f"{name}.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def describe_tool(name: str, tool: Callable[..., Any]) -> str:
    """One line for the system prompt: the tool's own `description` when it has one, else signature + docstring."""
    description = getattr(tool, "description", None)
    if isinstance(description, str) and description:
        return description
    try:
        signature = str(inspect.signature(tool))
    except (TypeError, ValueError):
        signature = "(...)"
    return f"{name}{signature}: {tool_summary(tool)}"


def tool_summary(tool: Callable[..., Any]) -> str:
    """The first line of the tool's docstring."""
    doc = inspect.getdoc(tool)
    return doc.strip().splitlines()[0] if doc and doc.strip() else "no description"
