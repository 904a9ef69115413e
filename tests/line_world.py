"""A stand-in interactive environment for the tests of the environment plumbing (not a benchmark): the agent walks
on a number line from 0 to the task's target with `left` / `right`; `think: ...` lines are thoughts; anything else
is rejected ("Nothing happens."). `hang` blocks for ever and `crash` raises, to test bounded steps."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from trl_agent_distill.agent.loop import Task
from trl_agent_distill.envs.base import Environment, EnvironmentSuite, Transition
from trl_agent_distill.formats import EnvironmentFormat, ParsedReply, ParseError
from trl_agent_distill.spans import Span

STOP_FOREVER = threading.Event()


class LineFormat(EnvironmentFormat[str]):
    name = "line"
    stop = ("\n",)

    def __init__(self):
        self.tools = {}
        self.prompts = {"task_message": "{question}", "observation": "{observation}"}

    def system_prompt(self) -> str:
        return "Walk to the target with `left` or `right`, one per line; `think: ...` to think."

    def looks_like(self, text: str) -> bool:
        return True

    def no_step_reason(self, *, assistant: bool) -> str:
        return "no step (line)"

    def segment(self, text: str, *, assistant: bool) -> list[Span]:
        kind = "reason" if text.strip().startswith("think:") else "act"
        return [Span(0, len(text), kind)]

    def parse(self, reply: str, *, truncated: bool = False):
        line = reply.strip().splitlines()[0] if reply.strip() else ""
        if not line:
            return ParseError(reply, "Write one action on a line.")
        return ParsedReply(line + "\n", line)

    def write(self, thought: str, action: str) -> str:
        return f"{action}\n"

    def observation_text(self, observation) -> str:
        return observation.message if isinstance(observation, ParseError) else str(observation)

    def reply_without_environment(self, action: str) -> str | None:
        return "OK." if action.startswith("think:") else None

    def action_key(self, action: str):
        return None if action.startswith("think:") else action.strip().lower()


class LineEnvironment(Environment):
    def __init__(self, suite: LineSuite):
        self.suite = suite
        self.position = 0
        self.target = None
        self.closed = False

    def reset(self, task: Task) -> Transition:
        self.target = task.setup
        return Transition(f"You are at 0. {task.question}", info={"admissible_commands": ["left", "right"]})

    def step(self, action: str) -> Transition:
        action = action.strip().lower()
        if action == "hang":
            STOP_FOREVER.wait(30)
        if action == "crash":
            raise RuntimeError("the engine fell over")
        if action not in ("left", "right"):
            return Transition("Nothing happens.", valid=False)
        self.position += 1 if action == "right" else -1
        won = self.position == self.target
        return Transition(f"You are at {self.position}.", done=won, success=won, reward=float(won))

    def close(self) -> None:
        self.closed = True
        self.suite.closed += 1


@dataclass
class LineOptions:
    tasks: int = 4


class LineSuite(EnvironmentSuite):
    name = "line"
    options_class = LineOptions
    max_steps = 7

    def __init__(self, options: LineOptions | None = None):
        self.options = options or LineOptions()
        self.closed = 0
        self._format = LineFormat()

    @property
    def format(self) -> LineFormat:
        return self._format

    def tasks(self, split: str) -> list[Task]:
        if split not in ("train", "test"):
            raise ValueError(f"line world splits are train and test, got {split!r}")
        sign = 1 if split == "train" else -1
        return [Task(f"{split}-{i}", f"Walk to {sign * (i + 1)}.", setup=sign * (i + 1)) for i in range(self.options.tasks)]

    def make(self) -> LineEnvironment:
        return LineEnvironment(self)

    def expert(self):
        def policy(request):
            target = int(request.messages[1]["content"].rsplit(" ", 1)[1].rstrip("."))
            steps = sum(m["role"] == "assistant" for m in request.messages)
            if steps == 0:
                return f"think: I must walk {abs(target)} steps.\n"
            return ("right" if target > 0 else "left") + "\n"

        return policy
