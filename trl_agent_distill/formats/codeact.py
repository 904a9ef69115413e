"""CodeAct (smolagents / the Agent Distillation paper): ``Thought:`` then ``Code:`` and a Python block.

The model writes::

    Thought: I need the population of Varnholt.
    Code:
    ```py
    print(web_search("population of Varnholt"))
    ```<end_code>

generation stops at ``<end_code>`` (written back by `parse`), the code runs in the episode's sandbox, and the
sandbox's structured result comes back as ``Observation:`` with smolagents' execution log. ``final_answer(x)`` in
the code ends the episode.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..spans import Span, TrajectoryFormatError, spans_from_cuts
from .base import AgentFormat, ParsedReply, ParseError, describe_tool

if TYPE_CHECKING:
    from ..agent.sandbox import Observation

END_CODE = "<end_code>"

# What `parse` runs: the first fenced (any language tag or none) or <code>-tagged block of the reply.
_CODE_BLOCK = re.compile(r"```(?:py|python)?[ \t]*\n(?P<code>.*?)```|<code>(?P<tagged>.*?)</code>", re.DOTALL)
_CODE_OPEN = re.compile(r"```(?:py|python)?[ \t]*\n|<code>")

# What `segment` reads. Markers are case-sensitive because smolagents writes them verbatim, and a lowercase `code:`
# is common in printed tool output. A line-start ```py fence or <code> tag opens an action even without a `Code:`
# line (the newer smolagents prompts drop it).
_MARKER = re.compile(
    r"^[ \t]*(?:(?P<reason>Thought[ \t]*:)"
    r"|(?P<code>Code[ \t]*:)"
    r"|(?P<block>```(?:python|py)\b|<code>)"
    r"|(?P<obs>Observation[ \t]*:|Execution logs[ \t]*:)"
    r"|(?P<other>Calling tools[ \t]*:)"
    r"|(?P<final>final_answer[ \t]*\())",
    re.MULTILINE,
)
_HINT = re.compile(
    r"^[ \t]*(?:Code[ \t]*:|Execution logs[ \t]*:|<code>|```(?:python|py)\b|final_answer[ \t]*\()|<end_code>",
    re.MULTILINE,
)
_BLOCK_OPEN = re.compile(r"\s*(?:(?P<fence>```[\w+.-]*)|(?P<tag><code>))")
_FENCE_CLOSE = re.compile(r"```|<end_code>")
_TAG_CLOSE = re.compile(r"</code>|<end_code>")
_END_CODE = re.compile(r"\s*<end_code>")
_WHITESPACE = re.compile(r"\s*")
_REST_OF_LINE = re.compile(r"[^\n]*\n?")


@dataclass(frozen=True)
class CodeAction:
    """Python to run in the episode's sandbox."""

    code: str


def render_execution(printed: str, value: str | None, error_message: str | None) -> str:
    """smolagents' execution log of a run's parts: ``Execution logs:\\n{printed}Last output from code snippet:\\n
    {value}``, or ``Error:\\n{error_message}`` (after the execution logs if something was printed)."""
    logs = f"Execution logs:\n{printed}" + ("" if not printed or printed.endswith("\n") else "\n")
    if error_message is not None:
        return (logs if printed else "") + f"Error:\n{error_message}"
    return f"{logs}Last output from code snippet:\n{value}"


class CodeActFormat(AgentFormat[CodeAction]):
    """Thought / Code / Observation cycles (see the module docstring).

    Args:
        tools: the Python functions the code can call, listed in the system prompt with `describe_tool`;
            `final_answer` is built in.
        task_variable: the name of the sandbox variable holding the task text, mentioned in the system prompt.
    """

    name = "codeact"
    stop = (END_CODE, "Observation:")

    def __init__(self, tools: Mapping[str, Callable[..., Any]] | None = None, *, task_variable: str | None = None):
        super().__init__(tools)
        self.task_variable = task_variable

    # ------------------------------------------------------------------------------------------ speaking
    def system_prompt(self) -> str:
        tools = [describe_tool(name, tool) for name, tool in self.tools.items()] + [self.prompts["final_answer_tool"]]
        prompt = self.prompts["system_prompt"].format(tools="\n".join(f"- {line}" for line in tools))
        if self.task_variable is not None:
            prompt += "\n\n" + self.prompts["task_variable"].format(name=self.task_variable)
        return prompt

    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[CodeAction] | ParseError:
        block = _CODE_BLOCK.search(reply)
        if block is None:
            if _CODE_OPEN.search(reply):
                cause = self.prompts["unclosed_code_block"] + (self.prompts["truncated"] if truncated else "")
            else:
                cause = self.prompts["no_code_block"]
            return ParseError(content=reply.rstrip(), message=self.prompts["parse_error"].format(cause=cause))
        # Keep the reply up to its code block: anything after it was never executed. The stop string is not in the
        # reply, so it is written back (the student must learn to emit it).
        content = reply[: block.end()]
        if block.group("code") is not None:
            return ParsedReply(content + END_CODE, CodeAction(block.group("code")))
        return ParsedReply(content, CodeAction(block.group("tagged")))

    def write(self, thought: str, action: CodeAction) -> str:
        code = action.code if action.code.endswith("\n") else action.code + "\n"
        return f"Thought: {thought}\nCode:\n```py\n{code}```{END_CODE}"

    def observation_text(self, observation: Observation | ParseError) -> str:
        if isinstance(observation, ParseError):
            return observation.message
        return render_execution(observation.printed, observation.value, observation.error_message)

    # ------------------------------------------------------------------------------------------ reading
    def looks_like(self, text: str) -> bool:
        return _HINT.search(text) is not None

    def no_step_reason(self, *, assistant: bool) -> str:
        return "no recognisable step: expected 'Thought:', 'Code:' or a final_answer(...) line (codeact)"

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """Scan marker by marker, jumping over code blocks so that markers inside code are ignored."""
        cuts = [(0, "other")]
        position = 0
        while (marker := _MARKER.search(text, position)) is not None:
            name = marker.lastgroup
            if name in ("code", "block"):
                cuts.append((marker.start(), "act"))
                end = _code_block_end(text, marker)
                if end is None:  # `Code:` with unfenced code: it runs to the next marker
                    end = marker.end()
                else:
                    cuts.append((end, "other"))  # e.g. smolagents' `Calling tools:` dump
            elif name == "final":
                cuts.append((marker.start(), "act"))
                end = _REST_OF_LINE.match(text, marker.end()).end()
                cuts.append((end, "other"))
            else:
                cuts.append((marker.start(), name))
                end = marker.end()
            position = end
        return spans_from_cuts(cuts, len(text))


def _code_block_end(text: str, marker: re.Match[str]) -> int | None:
    """Where the action opened by `marker` ends: after its closer, any `<end_code>` and trailing whitespace.

    Returns None for a `Code:` line followed by no fence at all.
    """
    after_code_marker = marker.lastgroup == "code"
    if after_code_marker:
        opener = _BLOCK_OPEN.match(text, marker.end())
        if opener is None:
            return None
        is_tag = opener.group("tag") is not None
        opener_text, opener_end = opener.group().strip(), opener.end()
    else:
        opener_text, opener_end = marker.group().strip(), marker.end()
        is_tag = opener_text == "<code>"
    closer = (_TAG_CLOSE if is_tag else _FENCE_CLOSE).search(text, opener_end)
    if closer is None:
        line = text.count("\n", 0, opener_end) + 1
        raise TrajectoryFormatError(_unclosed_reason(opener_text, is_tag, after_code_marker, line))
    end = closer.end()
    if closer.group() != END_CODE:
        end_code = _END_CODE.match(text, end)
        if end_code is not None:
            end = end_code.end()
    return _after_trailing_whitespace(text, end)


def _after_trailing_whitespace(text: str, end: int) -> int:
    """Extend `end` over whitespace, but leave the indentation of a following line to that line's span."""
    stop = _WHITESPACE.match(text, end).end()
    if stop == len(text):
        return stop
    newline = text.rfind("\n", end, stop)
    return newline + 1 if newline >= 0 else stop


def _unclosed_reason(opener: str, is_tag: bool, after_code_marker: bool, line: int) -> str:
    where = "after 'Code:'" if after_code_marker else repr(opener)
    if is_tag:
        return f"unclosed <code> block {where} (add the closing </code>); it opens on line {line}"
    return f"unclosed code fence {where} (add the closing ``` or <end_code>); it opens on line {line}"
