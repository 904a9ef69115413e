"""ReAct (ReAct / SAD, HotPotQA, WebShop): ``Thought: ...`` then one ``Action: Tool[argument]`` line.

The model writes::

    Thought: I should look up Varnholt.
    Action: Search[Varnholt]

generation stops at the next ``Observation`` line, the tool's text comes back as ``Observation: ...``, and
``Finish[answer]`` (as an action or a bare line) ends the episode. Tools take one string and match
case-insensitively.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..spans import Span, spans_from_cuts
from .base import AgentFormat, ParsedReply, ParseError, tool_summary

FINISH = "Finish"
TOOL_NAME = re.compile(r"[A-Za-z_][\w-]*")

# What `parse` acts on: `Action: Tool[argument]`, or a bare `Finish[answer]` line.
_ACTION = re.compile(
    r"^[ \t]*(?:Action[ \t]*\d*[ \t]*:[ \t]*(?P<tool>[A-Za-z_][\w-]*)|(?P<finish>Finish))"
    r"[ \t]*\[(?P<argument>.*)\][ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
# What `segment` reads: `Thought 3:`, `Action:`, `Observation 2:` at a line start, step numbers optional. WebShop's
# `Action: think[...]` is reasoning written as an action; a bare `Finish[...]` line is the final answer.
_MARKER = re.compile(
    r"^[ \t]*(?:(?P<name>thought|action|observation)[ \t]*\d*[ \t]*:(?P<think>(?=[ \t]*think[ \t]*\[))?"
    r"|(?P<finish>finish[ \t]*\[))",
    re.IGNORECASE | re.MULTILINE,
)
_KINDS = {"thought": "reason", "action": "act", "observation": "obs"}
_HINT = re.compile(r"^[ \t]*(?:thought|action)[ \t]*\d*[ \t]*:", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class ToolCall:
    """`tool[argument]`; the tool `Finish` gives the final answer."""

    tool: str
    argument: str

    @property
    def is_final(self) -> bool:
        return self.tool == FINISH


@dataclass(frozen=True)
class ToolError:
    """A call that did not give a text: `error` is None for an unknown tool, else what the tool raised."""

    call: ToolCall
    error: str | None = None


class ReActFormat(AgentFormat[ToolCall]):
    """Thought / Action / Observation text cycles (see the module docstring).

    Args:
        tools: one-string tools by name, each a single word other than `Finish`; listed in the system prompt and in
            the errors that tell the model which actions exist.
    """

    name = "react"
    stop = ("\nObservation",)

    def __init__(self, tools: Mapping[str, Callable[[str], Any]] | None = None):
        for name in tools or {}:
            if not TOOL_NAME.fullmatch(name) or name.lower() == FINISH.lower():
                raise ValueError(f"ReAct tool name {name!r} must be a single word other than {FINISH}.")
        super().__init__(tools)

    # ------------------------------------------------------------------------------------------ speaking
    def system_prompt(self) -> str:
        actions = [f"{name}[argument]: {tool_summary(tool)}" for name, tool in self.tools.items()]
        actions.append(self.prompts["finish_action"])
        return self.prompts["system_prompt"].format(actions="\n".join(f"- {line}" for line in actions))

    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[ToolCall] | ParseError:
        action = _ACTION.search(reply)
        if action is None:
            cause = self.prompts["truncated" if truncated else "no_action"]
            return ParseError(content=reply.rstrip(),
                              message=self.prompts["parse_error"].format(cause=cause, actions=self._actions()))
        tool = action.group("tool") or action.group("finish")
        call = ToolCall(FINISH if tool.lower() == FINISH.lower() else tool, action.group("argument").strip())
        return ParsedReply(reply[: action.end()], call)  # what the model wrote after its action was never executed

    def write(self, thought: str, action: ToolCall) -> str:
        return f"Thought: {thought}\nAction: {action.tool}[{action.argument}]"

    def observation_text(self, observation: str | ToolError | ParseError) -> str:
        if isinstance(observation, ParseError):
            return observation.message
        if isinstance(observation, ToolError):
            call = observation.call
            if observation.error is None:
                return self.prompts["unknown_tool"].format(tool=call.tool, actions=self._actions())
            return self.prompts["tool_failed"].format(tool=call.tool, argument=call.argument, error=observation.error)
        return observation

    def _actions(self) -> str:
        return ", ".join([*self.tools, FINISH])

    # ------------------------------------------------------------------------------------------ reading
    def looks_like(self, text: str) -> bool:
        return _HINT.search(text) is not None

    def no_step_reason(self, *, assistant: bool) -> str:
        return "no recognisable step: expected a 'Thought:' or 'Action:' line (react)"

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """Each marker's span runs from its line start to the next marker's line start."""
        cuts = [(0, "other")] + [(marker.start(), _marker_kind(marker)) for marker in _MARKER.finditer(text)]
        return spans_from_cuts(cuts, len(text))


def _marker_kind(marker: re.Match[str]) -> str:
    if marker.group("finish") is not None:
        return "act"
    if marker.group("think") is not None:
        return "reason"  # WebShop's `Action: think[...]`
    return _KINDS[marker.group("name").lower()]
