"""WebShop (ReAct's WebShop agent, SAD): one ``Action: name[argument]`` line per reply.

The model writes one action per reply, as in the ReAct paper's WebShop prompts::

    Action: search[3 ounce bright citrus deodorant sensitive skin]
    Action: think[B078GWRC1J is bright citrus and under 50 dollars. I can check it first.]
    Action: click[B078GWRC1J]

``search[...]`` and ``click[...]`` go to the shop; ``think[...]`` is the agent's reasoning, which never reaches the
shop and is answered "OK." by the format. The page comes back as ``Observation: ...``. A WebShop transcript is a
ReAct transcript whose ``Action: think[...]`` lines are reasoning, so segmentation follows ReAct's rules
(`segment_text(style="react")` reads these episodes the same way).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..spans import Span
from .base import EnvironmentFormat, ParsedReply, ParseError
from .react import ReActFormat

SEARCH, CLICK, THINK = "search", "click", "think"
ACTIONS = (SEARCH, CLICK, THINK)

# What `parse` acts on: the first `Action: name[argument]` line (step numbers optional, as ReAct's `_ACTION`).
_ACTION = re.compile(
    r"^[ \t]*Action[ \t]*\d*[ \t]*:[ \t]*(?P<name>[A-Za-z_]\w*)[ \t]*\[(?P<argument>.*)\][ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
_READER = ReActFormat()


@dataclass(frozen=True)
class WebAction:
    """`name[argument]` with `name` one of search, click, think (lower case)."""

    name: str
    argument: str

    def __post_init__(self) -> None:
        if self.name not in ACTIONS:
            raise ValueError(f"A WebShop action is one of {ACTIONS}, got {self.name!r}.")

    @property
    def text(self) -> str:
        """The action as WebShop's `step` takes it: ``click[Buy Now]``."""
        return f"{self.name}[{self.argument}]"


class WebShopFormat(EnvironmentFormat[WebAction]):
    """ReAct's WebShop protocol (see the module docstring): prompts in `prompts/webshop.yaml`."""

    name = "webshop"
    stop = ("\nObservation",)

    # ------------------------------------------------------------------------------------------ speaking
    def system_prompt(self) -> str:
        return self.prompts["system_prompt"]

    def parse(self, reply: str, *, truncated: bool = False) -> ParsedReply[WebAction] | ParseError:
        match = _ACTION.search(reply)
        if match is None:
            return self._error(reply, self.prompts["truncated" if truncated else "no_action"])
        name = match.group("name").lower()
        if name not in ACTIONS:
            return self._error(reply, self.prompts["unknown_action"].format(name=match.group("name")))
        # One action per reply: what the model wrote after it was never carried out, so the episode drops it.
        return ParsedReply(reply[: match.end()], WebAction(name, match.group("argument").strip()))

    def write(self, thought: str, action: WebAction) -> str:
        """The reply that takes `action`. A WebShop reply holds one action: a thought is its own reply,
        ``write("", WebAction("think", thought))``."""
        if thought:
            raise ValueError("A WebShop reply holds one action: write the thought as its own reply, "
                             "write('', WebAction('think', thought)).")
        return f"Action: {action.text}"

    def reply_without_environment(self, action: WebAction) -> str | None:
        return self.prompts["think_reply"] if action.name == THINK else None

    def action_key(self, action: WebAction) -> tuple[str, str]:
        """Name and argument, lower case with runs of whitespace as one space: WebShop lowercases both the
        button a click names and the keywords of a search, so these are the same action to the shop."""
        return action.name, " ".join(action.argument.lower().split())

    def observation_text(self, observation: str | ParseError) -> str:
        return observation.message if isinstance(observation, ParseError) else observation

    def _error(self, reply: str, cause: str) -> ParseError:
        return ParseError(content=reply.rstrip(), message=self.prompts["parse_error"].format(cause=cause))

    # ------------------------------------------------------------------------------------------ reading
    def looks_like(self, text: str) -> bool:
        return _READER.looks_like(text)

    def no_step_reason(self, *, assistant: bool) -> str:
        return "no recognisable step: expected an 'Action: search[...]', 'Action: click[...]' or 'Action: think[...]' line (webshop)"

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        """ReAct's spans: ``Action: think[...]`` is REASON, other actions ACT, ``Observation:`` OBS."""
        return _READER.segment(text, assistant=assistant)
