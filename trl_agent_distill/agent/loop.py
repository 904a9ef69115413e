"""Agent loops: a model acting with tools until it answers, many episodes in lockstep.

Each agent speaks one format of `trl_agent_distill.formats`, which owns what the model is told and what it writes
(prompts, stop strings, parsing, rendering of observations), so the trajectories are chat messages that
`segment_messages` labels by the same rules (assistant turns are REASON / ACT, observations come back as user
turns and are never trained):

* `CodeActAgent` (`CodeActFormat`): the code runs in the episode's own `PythonSandbox`, where the tools are
  Python functions and ``final_answer(x)`` ends the episode; the observation is the sandbox's structured result.
* `ReActAgent` (`ReActFormat`): ``Action: Tool[argument]`` calls a one-string tool; ``Finish[answer]`` ends it.

A reply that cannot be parsed gets an error observation telling the model what was expected, as the papers do,
and the episode goes on until `max_steps`. `run` keeps up to `batch_size` episodes in flight: each round sends
every pending step to the backend in one call, runs the actions in parallel, and refills finished slots with the
next tasks, yielding episodes as they end.
"""

from __future__ import annotations

import keyword
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from ..envs.base import Environment, EnvironmentFailure, EnvironmentSuite, Transition
from ..formats import (
    AgentFormat,
    CodeActFormat,
    CodeAction,
    ParsedReply,
    ParseError,
    ReActFormat,
    ToolCall,
    ToolError,
)
from ..metrics import normalize_answer
from .backends import Completion, GenerationBackend, GenerationRequest, SamplingParams
from .sandbox import Observation, PythonSandbox, SandboxError

STOP_REASONS = ("final_answer", "done", "max_steps", "error")


@dataclass(frozen=True)
class Task:
    """A question for the agent; `answer` is the gold answer when known (it is never shown to the model).

    In an interactive environment `question` is the task text and `setup` what the environment needs to set the
    task up (a game file, a benchmark entry); it is never shown to the model either.
    """

    task_id: str
    question: str
    answer: Any = None
    setup: Any = None
    aliases: tuple[str, ...] = ()  # other accepted answers (MuSiQue's), scored like `answer`


@dataclass(frozen=True)
class SelfConsistency:
    """Self-consistent action generation (Agent Distillation paper): sample `n` candidate actions per step in one
    batched call, drop those that fail to parse or to run, and take the majority by execution result."""

    n: int = 8
    temperature: float = 0.4
    top_p: float = 0.8

    def __post_init__(self) -> None:
        if self.n < 2:
            raise ValueError(f"self-consistency needs n >= 2 candidates, got {self.n}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p)  # same checks as any sampling


@dataclass
class Episode:
    """One task's trajectory as chat `messages`, with what happened along the way.

    `stop_reason` is `"final_answer"` (the agent answered), `"done"` (an interactive environment ended the
    episode), `"max_steps"` (it ran out of steps) or `"error"` (its environment failed, e.g. the sandbox could not
    start or an environment step hung; the reason is in `errors`). In an interactive environment `success` and
    `reward` are the environment's (None elsewhere) and `invalid_actions` counts the actions it rejected. With self-consistency,
    `votes` records per step how many candidates there were, how many were valid, the sizes of the groups of equal
    results (largest first) and the index of the chosen candidate.
    """

    task: Task
    messages: list[dict[str, str]]
    steps: int = 0
    parse_errors: int = 0
    tool_errors: int = 0
    final_answer: str | None = None
    stop_reason: str | None = None
    errors: list[str] = field(default_factory=list)
    # One entry per self-consistent step: {"step", "candidates", "valid", "group_sizes", "chosen"}.
    votes: list[dict[str, Any]] = field(default_factory=list)
    success: bool | None = None
    reward: float | None = None
    invalid_actions: int = 0
    tools: list[dict[str, Any]] | None = None  # the tool schemas the model was shown (native tool calling)

    @property
    def answered(self) -> bool:
        return self.stop_reason == "final_answer"

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready row with the same fields and types for every episode (so `datasets` can load a file)."""
        record = asdict(self)
        task = record.pop("task")
        if record["tools"] is None:
            del record["tools"]  # only tool-calling episodes have them
        return {
            "task_id": task["task_id"],
            "question": task["question"],
            "answer": None if task["answer"] is None else str(task["answer"]),
            **record,
        }


@dataclass
class _Step:
    """What acting on one reply produced: the message to store, the observation to show (as the format renders it,
    without its marker), and how it ended."""

    content: str
    observation: str | None = None
    final_answer: Any = None
    done: bool = False
    parse_error: bool = False
    tool_error: bool = False
    # Interactive environments: the stored messages when not plain text, what the environment said, and why the
    # episode must stop when the environment failed.
    message: dict[str, Any] | None = None
    observation_messages: list[dict[str, Any]] | None = None
    transition: Transition | None = None
    failure: str | None = None


@dataclass
class _Choice:
    """The candidate self-consistency picked: its step, the environment to go on in, and the vote."""

    step: _Step
    environment: Any
    vote: dict[str, Any]


def majority(keys: list[Any]) -> tuple[int, list[int]]:
    """Index of the first member of the largest group of equal non-None keys, and the group sizes (largest first).

    Ties go to the group seen first, so when every group has one member the first valid candidate wins; when no key
    is valid the first candidate is taken.
    """
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(index)
    if not groups:
        return 0, []
    winner = max(groups.values(), key=lambda members: (len(members), -members[0]))
    return winner[0], sorted((len(members) for members in groups.values()), reverse=True)


class _Running:
    """An episode in flight: its record, its environment being opened (a sandbox for CodeAct), its forced prefix."""

    def __init__(self, episode: Episode, environment: Future, prefix: str):
        self.episode = episode
        self.environment = environment
        self.prefix = prefix

    def replace_environment(self, environment: Any) -> None:
        self.environment = Future()
        self.environment.set_result(environment)


class Agent(ABC):
    """The loop shared by every format: the format says how to prompt, where to stop, how to read a reply and how to
    show an observation; subclasses say how to act on what the format parsed."""

    def __init__(self, agent_format: AgentFormat, *, max_steps: int, sampling: SamplingParams | None,
                 system_prompt: str | None, self_consistency: SelfConsistency | Mapping[str, Any] | None):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.format = agent_format
        self.tools = agent_format.tools
        self.max_steps = max_steps
        self.sampling = sampling or SamplingParams()
        if self.sampling.n != 1:
            raise ValueError("An agent takes one reply per step: set SamplingParams.n to 1 (use self_consistency "
                             "to sample several candidates).")
        if isinstance(self_consistency, Mapping):
            self_consistency = SelfConsistency(**self_consistency)
        self.self_consistency = self_consistency
        if self_consistency is not None:
            self.sampling = SamplingParams(temperature=self_consistency.temperature, top_p=self_consistency.top_p,
                                           max_new_tokens=self.sampling.max_new_tokens, n=self_consistency.n)
        self.system_prompt = system_prompt if system_prompt is not None else agent_format.system_prompt()

    @property
    def stop(self) -> tuple[str, ...]:
        return self.format.stop

    @abstractmethod
    def act(self, environment: Any, reply: str, completion: Completion) -> _Step: ...

    @abstractmethod
    def choose(self, environment: Any, replies: list[str], completions: list[Completion]) -> _Choice:
        """Pick one of several candidate replies (self-consistency) and act on it."""

    def open_environment(self, task: Task) -> Any:
        """Per-episode state for the tools (CodeAct: a sandbox); None when the tools are stateless."""
        return None

    def close_environment(self, environment: Any) -> None:
        """Release what `open_environment` made."""

    def run(self, backend: GenerationBackend, tasks: Iterable[Task], *, batch_size: int = 16,
            prefixes: Mapping[str, str] | None = None) -> Iterator[Episode]:
        """Run `tasks` with up to `batch_size` in flight; yield each episode when it ends (not in task order).

        `prefixes` maps task ids to text forced at the start of the first reply (the first-thought prefix).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending = iter(tasks)
        active: list[_Running] = []
        with ThreadPoolExecutor(max_workers=batch_size, thread_name_prefix="agent-step") as pool:
            try:
                while True:
                    # Environments open in the background while the backend writes the first replies.
                    active += [self._start(task, prefixes, pool) for task in _take(pending, batch_size - len(active))]
                    if not active:
                        return
                    replies = backend.generate([self._request(running) for running in active])
                    list(pool.map(self._advance, active, replies))
                    still_running = []
                    for running in active:
                        if running.episode.stop_reason is None:
                            still_running.append(running)
                        else:
                            self._close(running)
                            yield running.episode
                    active = still_running
            finally:
                for running in active:
                    self._close(running)

    def _start(self, task: Task, prefixes: Mapping[str, str] | None, pool: ThreadPoolExecutor) -> _Running:
        prefix = (prefixes or {}).get(task.task_id, "")
        episode = Episode(task=task, messages=[{"role": "system", "content": self.system_prompt}],
                          tools=self.tool_schemas(task))
        running = _Running(episode, pool.submit(self.open_environment, task), prefix)
        episode.messages.append({"role": "user", "content": self.task_turn(running)})
        return running

    def tool_schemas(self, task: Task) -> list[dict[str, Any]] | None:
        """The tools the chat template shows for `task` (native tool calling), else None."""
        return None

    def task_turn(self, running: _Running) -> str:
        """The user message that sets the task (the question; an interactive environment's first observation)."""
        return self.format.task_message(running.episode.task.question)

    def _close(self, running: _Running) -> None:
        try:
            environment = running.environment.result()
        except (SandboxError, EnvironmentFailure):
            return  # it never opened
        self.close_environment(environment)

    def _request(self, running: _Running) -> GenerationRequest:
        return GenerationRequest(
            messages=running.episode.messages, sampling=self.sampling, stop=self.stop, prefix=running.prefix,
            tools=running.episode.tools, task_id=running.episode.task.task_id,
        )

    def _advance(self, running: _Running, completions: list[Completion]) -> None:
        episode = running.episode
        try:
            environment = running.environment.result()
        except (SandboxError, EnvironmentFailure) as error:
            episode.stop_reason = "error"
            episode.errors.append(f"the environment could not be started: {error}")
            return
        replies = [running.prefix + completion.text for completion in completions]
        if len(completions) == 1:
            step = self.act(environment, replies[0], completions[0])
        else:
            choice = self.choose(environment, replies, completions)
            step = choice.step
            if choice.environment is not environment:
                running.replace_environment(choice.environment)
            episode.votes.append({"step": episode.steps + 1, **choice.vote})
        running.prefix = ""  # only the first reply is forced
        episode.steps += 1
        episode.messages.append(step.message or {"role": "assistant", "content": step.content})
        episode.parse_errors += step.parse_error
        episode.tool_errors += step.tool_error
        if step.failure is not None:
            episode.stop_reason = "error"
            episode.errors.append(f"step {episode.steps}: {step.failure}")
            return
        if step.transition is not None:
            episode.success = step.transition.success
            episode.reward = (episode.reward or 0.0) + step.transition.reward
            episode.invalid_actions += not step.transition.valid
            if step.transition.done:
                episode.stop_reason = "done"
                return
        if step.done:
            episode.final_answer = None if step.final_answer is None else str(step.final_answer)
            episode.stop_reason = "final_answer"
            return
        if step.observation is not None:
            if step.parse_error or step.tool_error:
                episode.errors.append(f"step {episode.steps}: {step.observation}")
            turns = step.observation_messages or [
                {"role": "user", "content": self.format.observation_turn(step.observation)}
            ]
            episode.messages.extend(turns)
        if episode.steps >= self.max_steps:
            episode.stop_reason = "max_steps"


def _take(iterator: Iterator[Task], count: int) -> list[Task]:
    taken = []
    for _ in range(count):
        task = next(iterator, None)
        if task is None:
            break
        taken.append(task)
    return taken


# ---------------------------------------------------------------------------------------------- CodeAct
class CodeActAgent(Agent):
    """Thought / Code / Observation cycles; the code runs in a persistent per-episode `PythonSandbox`.

    Args:
        tools: Python functions callable from the agent's code under these names (e.g. a `RetrievalTool` as
            `web_search`); `final_answer` is built in.
        max_steps: replies before the episode ends unanswered.
        sampling: how the backend samples each reply.
        system_prompt: replaces the format's default prompt (which lists the tools with `describe_tool`).
        sandbox_options: keyword arguments for `PythonSandbox` (`timeout`, `memory_limit_mb`, `allowed_imports`,
            `max_output_chars` ...).
        self_consistency: sample this many candidates per step and keep the majority (see `SelfConsistency`):
            each candidate runs in its own fork of the episode's sandbox, candidates that fail to parse or raise are
            dropped, the rest are grouped by (printed output, final answer), and the chosen candidate's fork becomes
            the episode's sandbox, so rejected candidates leave nothing behind.
        task_variable: also put the task text in the sandbox under this name (like smolagents' `additional_args`),
            so code can parse the question instead of retyping names and numbers from it; the default system prompt
            says so.
    """

    def __init__(self, tools: Mapping[str, Callable[..., Any]], *, max_steps: int = 5,
                 sampling: SamplingParams | None = None, system_prompt: str | None = None,
                 sandbox_options: Mapping[str, Any] | None = None,
                 self_consistency: SelfConsistency | Mapping[str, Any] | None = None,
                 task_variable: str | None = None):
        if task_variable is not None and not (task_variable.isidentifier() and not keyword.iskeyword(task_variable)):
            raise ValueError(f"task_variable must be a Python identifier, got {task_variable!r}")
        if task_variable in tools:
            raise ValueError(f"task_variable {task_variable!r} is also the name of a tool; pick another name")
        self.sandbox_options = dict(sandbox_options or {})
        self.task_variable = task_variable
        super().__init__(CodeActFormat(tools, task_variable=task_variable), max_steps=max_steps, sampling=sampling,
                         system_prompt=system_prompt, self_consistency=self_consistency)

    def open_environment(self, task: Task) -> PythonSandbox:
        sandbox = PythonSandbox(tools=self.tools, **self.sandbox_options)
        if self.task_variable is not None:
            observation = sandbox.run(f"{self.task_variable} = {task.question!r}")
            if observation.error:
                sandbox.close()
                raise SandboxError(f"could not set the task variable {self.task_variable!r}: {observation.text}")
        return sandbox

    def close_environment(self, environment: PythonSandbox | None) -> None:
        if environment is not None:
            environment.close()

    def act(self, environment: PythonSandbox, reply: str, completion: Completion) -> _Step:
        parsed = self._parse(reply, completion)
        if isinstance(parsed, _Step):
            return parsed
        return self._step(parsed.content, environment.run(parsed.action.code))

    def choose(self, environment: PythonSandbox, replies: list[str], completions: list[Completion]) -> _Choice:
        parsed = [self._parse(reply, completion) for reply, completion in zip(replies, completions)]
        forks: dict[int, PythonSandbox] = {}
        observations: dict[int, Observation] = {}
        try:
            for index, candidate in enumerate(parsed):
                if not isinstance(candidate, _Step):
                    try:
                        forks[index] = environment.fork()
                    except SandboxError:  # no copy to try it in: the candidate cannot vote
                        continue
            runnable = list(forks)
            with ThreadPoolExecutor(max_workers=max(1, len(runnable)), thread_name_prefix="candidate") as pool:
                runs = pool.map(lambda index: forks[index].run(parsed[index].action.code), runnable)
                observations.update(zip(runnable, runs))
        except BaseException:
            for fork in forks.values():
                fork.close()
            raise
        keys = [
            (observations[i].printed, repr(observations[i].final_answer) if observations[i].has_final_answer else None)
            if i in observations and not observations[i].error else None
            for i in range(len(replies))
        ]
        chosen, group_sizes = majority(keys)
        for index, fork in forks.items():
            if index != chosen:
                fork.close()
        vote = {"candidates": len(replies), "valid": sum(key is not None for key in keys), "group_sizes": group_sizes,
                "chosen": chosen}
        if chosen not in forks:  # no valid candidate and the first one never ran: act on it in the sandbox itself
            return _Choice(self.act(environment, replies[chosen], completions[chosen]), environment, vote)
        environment.close()
        return _Choice(self._step(parsed[chosen].content, observations[chosen]), forks[chosen], vote)

    def _parse(self, reply: str, completion: Completion) -> ParsedReply[CodeAction] | _Step:
        """The reply read by the format, or the parse-error step."""
        parsed = self.format.parse(reply, truncated=completion.finish_reason == "length")
        if isinstance(parsed, ParseError):
            return _Step(content=parsed.content, observation=self.format.observation_text(parsed), parse_error=True)
        return parsed

    def _step(self, content: str, observation: Observation) -> _Step:
        if observation.has_final_answer:
            return _Step(content=content, final_answer=observation.final_answer, done=True)
        text = self.format.observation_text(observation)
        return _Step(content=content, observation=text, tool_error=observation.error)


# ---------------------------------------------------------------------------------------------- ReAct
class ReActAgent(Agent):
    """Thought / Action / Observation text cycles; `Action: Tool[argument]` calls `tools[Tool](argument)`.

    Tools take one string and return the observation text (a `RetrievalTool` fits as `Search`); `Finish[answer]`
    ends the episode. Tool names match case-insensitively. With `self_consistency`, candidates vote on their
    normalised (tool, argument) pair; unparseable ones and unknown tools do not vote.
    """

    def __init__(self, tools: Mapping[str, Callable[[str], Any]], *, max_steps: int = 7,
                 sampling: SamplingParams | None = None, system_prompt: str | None = None,
                 self_consistency: SelfConsistency | Mapping[str, Any] | None = None):
        super().__init__(ReActFormat(tools), max_steps=max_steps, sampling=sampling, system_prompt=system_prompt,
                         self_consistency=self_consistency)
        self._by_lower_name = {name.lower(): name for name in self.tools}

    def act(self, environment: None, reply: str, completion: Completion) -> _Step:
        parsed = self.format.parse(reply, truncated=completion.finish_reason == "length")
        if isinstance(parsed, ParseError):
            return _Step(content=parsed.content, observation=self.format.observation_text(parsed), parse_error=True)
        call = parsed.action
        if call.is_final:
            return _Step(content=parsed.content, final_answer=call.argument, done=True)
        name = self._by_lower_name.get(call.tool.lower())
        if name is None:
            return _Step(content=parsed.content, observation=self.format.observation_text(ToolError(call)),
                         tool_error=True)
        try:
            output = str(self.tools[name](call.argument))
        except Exception as error:  # noqa: BLE001 - a tool's failure is something the agent must see and recover from
            failure = ToolError(ToolCall(name, call.argument), str(error))
            return _Step(content=parsed.content, observation=self.format.observation_text(failure), tool_error=True)
        return _Step(content=parsed.content, observation=self.format.observation_text(output))

    def choose(self, environment: None, replies: list[str], completions: list[Completion]) -> _Choice:
        keys = []
        for reply in replies:
            parsed = self.format.parse(reply)
            call = None if isinstance(parsed, ParseError) else parsed.action
            known = call is not None and (call.is_final or call.tool.lower() in self._by_lower_name)
            keys.append((call.tool.lower(), normalize_answer(call.argument)) if known else None)
        chosen, group_sizes = majority(keys)
        vote = {"candidates": len(replies), "valid": sum(key is not None for key in keys), "group_sizes": group_sizes,
                "chosen": chosen}
        return _Choice(self.act(environment, replies[chosen], completions[chosen]), environment, vote)


# ---------------------------------------------------------------------------------------------- environments
class EnvironmentAgent(Agent):
    """An agent in an interactive environment (`trl_agent_distill.envs`): each episode opens its own
    `Environment` from `suite`, the first user turn is the environment's opening observation, and each parsed
    action is answered by the environment (a thought by the format: "OK."). The episode ends when the
    environment says done (`stop_reason="done"`, with its `success` and `reward`) or after `max_steps`.

    An environment step that raises or runs longer than `step_timeout` seconds ends that episode as an error (the
    hung environment is abandoned in its thread) and the run goes on. With `self_consistency`, candidates that parse
    vote on the format's normalised action (`action_key`); the chosen one is carried out once.
    """

    def __init__(self, suite: EnvironmentSuite, *, max_steps: int = 50, sampling: SamplingParams | None = None,
                 system_prompt: str | None = None, step_timeout: float = 60.0,
                 self_consistency: SelfConsistency | Mapping[str, Any] | None = None):
        if step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {step_timeout}")
        self.suite = suite
        self.step_timeout = step_timeout
        super().__init__(suite.format, max_steps=max_steps, sampling=sampling, system_prompt=system_prompt,
                         self_consistency=self_consistency)

    def tool_schemas(self, task: Task) -> list[dict[str, Any]] | None:
        return self.suite.tool_schemas(task)

    def open_environment(self, task: Task) -> _OpenedEnvironment:
        try:
            environment = self.suite.make()
        except EnvironmentFailure:
            raise
        except Exception as error:  # noqa: BLE001 - any engine failure is this episode's error, not the run's
            raise EnvironmentFailure(f"{self.suite.name} could not start: {type(error).__name__}: {error}") from error
        opened = _OpenedEnvironment(environment)
        opened.first = opened.call(environment.reset, task, timeout=self.step_timeout, what="reset")
        return opened

    def close_environment(self, environment: _OpenedEnvironment) -> None:
        environment.close(timeout=self.step_timeout)

    def task_turn(self, running: _Running) -> str:
        try:
            opened = running.environment.result()
        except EnvironmentFailure:
            return self.format.task_message(running.episode.task.question)  # `_advance` records the failure
        return self.format.task_message(self.format.observation_text(opened.first.observation))

    def act(self, environment: _OpenedEnvironment, reply: str, completion: Completion) -> _Step:
        parsed = self.format.parse(reply, truncated=completion.finish_reason == "length")
        if isinstance(parsed, ParseError):
            return _Step(content=parsed.content, observation=self.format.observation_text(parsed), parse_error=True,
                         observation_messages=self.format.observation_messages(parsed))
        message = self.format.assistant_message(parsed)
        answer = self.format.reply_without_environment(parsed.action)
        if answer is not None:
            return _Step(content=parsed.content, observation=answer, message=message,
                         observation_messages=self.format.observation_messages(answer))
        try:
            transition = environment.call(environment.environment.step, parsed.action, timeout=self.step_timeout,
                                          what="step")
        except EnvironmentFailure as error:
            return _Step(content=parsed.content, message=message, failure=str(error))
        return _Step(content=parsed.content, observation=self.format.observation_text(transition.observation),
                     message=message, observation_messages=self.format.observation_messages(transition.observation),
                     transition=transition)

    def choose(self, environment: _OpenedEnvironment, replies: list[str], completions: list[Completion]) -> _Choice:
        keys = []
        for reply in replies:
            parsed = self.format.parse(reply)
            keys.append(None if isinstance(parsed, ParseError) else self.format.action_key(parsed.action))
        chosen, group_sizes = majority(keys)
        vote = {"candidates": len(replies), "valid": sum(key is not None for key in keys), "group_sizes": group_sizes,
                "chosen": chosen}
        return _Choice(self.act(environment, replies[chosen], completions[chosen]), environment, vote)


class _OpenedEnvironment:
    """An episode's environment and its opening transition; calls into it are bounded in time."""

    def __init__(self, environment: Environment):
        self.environment = environment
        self.first: Transition | None = None
        self.abandoned = False

    def call(self, method: Callable[..., Transition], argument: Any, *, timeout: float, what: str) -> Transition:
        """`method(argument)` in a daemon thread: an exception or a hang becomes an `EnvironmentFailure`."""
        outcome: dict[str, Any] = {}

        def target() -> None:
            try:
                outcome["value"] = method(argument)
            except BaseException as error:  # noqa: BLE001 - reported to the caller below
                outcome["error"] = error

        thread = threading.Thread(target=target, name=f"environment-{what}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            self.abandoned = True  # its thread may never return: never touch this environment again
            raise EnvironmentFailure(f"the environment's {what} did not return within {timeout:g} s")
        if "error" in outcome:
            error = outcome["error"]
            raise EnvironmentFailure(f"the environment's {what} failed: {type(error).__name__}: {error}") from error
        if not isinstance(outcome["value"], Transition):
            raise EnvironmentFailure(f"the environment's {what} returned {type(outcome['value']).__name__}, not a "
                                     "Transition")
        return outcome["value"]

    def close(self, *, timeout: float) -> None:
        if self.abandoned:
            return
        thread = threading.Thread(target=self.environment.close, name="environment-close", daemon=True)
        thread.start()
        thread.join(timeout)
