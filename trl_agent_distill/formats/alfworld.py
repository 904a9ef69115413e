"""ALFWorld (ReAct's household tasks): one line per reply, ``think: ...`` for reasoning, anything else an action.

The agent writes one line per turn::

    think: To solve the task, I need to find a apple. I will check fridge 1 first.

which the format itself answers with ``OK.``, or a command for the engine::

    go to fridge 1

answered by the engine's text (``You arrive at fridge 1. The fridge 1 is closed.``). Generation stops at the end
of the line. In a flat transcript (ReAct's prompt) the agent's lines carry the ``>`` prompt and what the
environment prints is observation; in chat messages each line is an assistant turn and observations are user turns.
"""

from __future__ import annotations

import re

from ..spans import Span, spans_from_cuts
from .base import EnvironmentFormat, ParsedReply, ParseError

THOUGHT_PREFIX = "think:"
_THINK = re.compile(r"think[ \t]*:", re.IGNORECASE)
_HINT = re.compile(r"^[ \t]*(?:>|think[ \t]*:)", re.IGNORECASE | re.MULTILINE)
_FIRST_LINE = re.compile(r"[^\r\n]*\S[^\r\n]*")
_SPACES = re.compile(r"\s+")


class ALFWorldFormat(EnvironmentFormat[str]):
    """ReAct's ALFWorld protocol (see the module docstring). An action is the reply's line as the engine reads it
    (the ``>`` prompt and surrounding spaces removed); a thought is kept as ``think: ...``."""

    name = "alfworld"
    stop = ("\n",)

    # ------------------------------------------------------------------------------------------ speaking
    def system_prompt(self) -> str:
        return self.prompts["system_prompt"]

    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[str] | ParseError:
        line = _FIRST_LINE.search(reply)
        if line is None or truncated:
            cause = self.prompts["truncated" if truncated else "no_action"]
            return ParseError(content=reply.rstrip(), message=self.prompts["parse_error"].format(cause=cause))
        text = line.group(0).strip().removeprefix(">").strip()
        thought = _THINK.match(text)
        action = f"{THOUGHT_PREFIX} {text[thought.end():].strip()}" if thought else _SPACES.sub(" ", text)
        return ParsedReply(reply[: line.end()], action)  # one line per reply: what follows was never carried out

    def write(self, thought: str | None, action: str | None) -> str:
        """One line: ``think: <thought>`` when `action` is None, else the action (an ALFWorld reply holds one)."""
        if (thought is None) == (action is None):
            raise ValueError("An ALFWorld reply is one line: give a thought or an action, not both or neither.")
        return f"{THOUGHT_PREFIX} {thought}" if action is None else action

    def observation_text(self, observation: str | ParseError) -> str:
        if isinstance(observation, ParseError):
            return observation.message
        return observation

    def reply_without_environment(self, action: str) -> str | None:
        return self.prompts["thought_answer"] if is_thought(action) else None

    def action_key(self, action: str) -> str:
        """Thoughts vote together (the engine never sees them); commands by their lower-case words."""
        return THOUGHT_PREFIX if is_thought(action) else action.lower()

    # ------------------------------------------------------------------------------------------ reading
    def looks_like(self, text: str) -> bool:
        return _HINT.search(text) is not None

    def no_step_reason(self, *, assistant: bool) -> str:
        if assistant:
            return "no recognisable step: the assistant message is blank (alfworld)"
        return ("no recognisable step: expected '> ...' action lines (alfworld); for the agent's own output without "
                "'>' prompts pass role='assistant'")

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """One cut per line; a blank line takes the kind of the line before it (of the first line, if leading)."""
        kinds: list[str | None] = []
        # In a transcript, blank lines before the first `>` belong to the task description.
        previous: str | None = None if assistant else "other"
        after_prompt = False
        lines = text.splitlines(keepends=True)
        for line in lines:
            kind = _line_kind(line, assistant=assistant, after_prompt=after_prompt) or previous
            after_prompt = after_prompt or line.lstrip().startswith(">")
            kinds.append(kind)
            previous = kind
        first = next((kind for kind in kinds if kind is not None), "other")
        cuts, offset = [], 0
        for line, kind in zip(lines, kinds):
            cuts.append((offset, kind or first))
            offset += len(line)
        return spans_from_cuts(cuts, len(text))


def is_thought(action: str) -> bool:
    """Whether a parsed ALFWorld action is a ``think:`` line."""
    return action.startswith(THOUGHT_PREFIX)


def _line_kind(line: str, *, assistant: bool, after_prompt: bool) -> str | None:
    """Kind of one line, or None when it is blank."""
    body = line.strip()
    if not body:
        return None
    if body.startswith(">"):
        return "reason" if _THINK.match(body[1:].lstrip()) else "act"
    if assistant:  # the agent's own output has no observations, and its `>` prompt may be missing
        return "reason" if _THINK.match(body) else "act"
    return "obs" if after_prompt else "other"
