"""ALFWorld transcripts: the agent's lines carry the ``>`` prompt, ``think:`` lines are its reasoning, and what the
environment prints (``OK.``, ``You arrive at ...``) is observation. Segmentation only until the ALFWorld
environment exists (it will add prompts, parsing and rendering as an `AgentFormat`)."""

from __future__ import annotations

import re

from ..spans import Span, spans_from_cuts
from .base import TrajectoryFormat

_THINK = re.compile(r"think[ \t]*:", re.IGNORECASE)
_HINT = re.compile(r"^[ \t]*(?:>|think[ \t]*:)", re.IGNORECASE | re.MULTILINE)


class ALFWorldFormat(TrajectoryFormat):
    name = "alfworld"

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
