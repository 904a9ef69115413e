"""BFCL multi-turn (Berkeley Function Calling Leaderboard v4): real tool-use tasks on in-process stateful back-ends.

The tasks come from the `bfcl-eval` wheel (`pip install --no-deps bfcl-eval`: its declared dependencies are heavy and
the multi-turn tasks need none of them): `data/BFCL_v4_multi_turn_<category>.json` with the ground-truth call
sequences of `data/possible_answer/` and the tool docs of `data/multi_turn_func_doc/`, converted to OpenAI tool
schemas (`BFCLSuite.tool_schemas`). Each episode gets fresh instances of the task's back-end classes (file system,
messaging, Twitter, tickets, trading, travel, vehicle control, math) loaded with the task's `initial_config`.

An episode follows BFCL's multi-turn protocol in native tool calling (`ToolCallingFormat`): the user's turns come one
by one; within a turn each reply with calls is executed and the results come back as `tool` messages; a reply
without calls ends the turn and the next user turn follows; after the last one the episode is done. A turn of more
than BFCL's 20 call steps (`MAXIMUM_STEP_LIMIT`) ends the episode as a failure, as BFCL's runner force-quits it.

Calls run as method calls with keyword arguments checked against the tool's schema (names: BFCL does not check
types, and its own ground truth does not always keep them) and the method's signature;
nothing the model wrote is evaluated (BFCL's own runner `eval`s the model's text). A call to an unknown tool or with
arguments that do not fit is not run: its result says why (an invalid action). A call that raises gives BFCL's
"Error during execution: ..." result.

Success is BFCL's own check (`multi_turn_checker` semantics), run at the end of each user turn with the checker's
`state_checker` and `response_checker`: the ground truth of the turn is replayed on a second set of fresh instances
(parsed with `ast`, as the model's calls are), and, for every turn whose ground truth calls something, the model must
have called something, the public state of every instance must equal the replayed one, and the results of the
model's calls so far must contain every result of the turn's ground truth. BFCL re-executes the model's calls on
fresh instances at evaluation; these back-ends are deterministic (seeded), so checking the live instances is the
same check. Unlike BFCL's runner, a reply whose call markup does not parse is fed back as an error (the turn goes
on) instead of ending the turn.

Categories: `base`, `miss_param` (a turn lacks a value: the model should ask, and the next turn gives it) and
`long_context` (large states and results). `miss_func` is not supported: its tasks add tools in the middle of an
episode, and an episode shows the model one tool list.

`expert()` replays the ground truth: each turn's calls in one reply, then a reply without calls.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..agent.backends import GenerationRequest
from ..agent.loop import Task
from ..formats.tool_calling import (
    FunctionCall,
    ToolCallingFormat,
    ToolCallSyntaxError,
    ToolResult,
    python_calls,
)
from .base import Environment, EnvironmentSuite, Transition

CATEGORIES = ("base", "miss_param", "long_context")
UNSUPPORTED_CATEGORIES = {
    "miss_func": "its tasks add tools in the middle of an episode, and an episode shows the model one tool list",
}
SPLITS = ("train", "test", "all")
INSTALL_HINT = "pip install --no-deps bfcl-eval"
# What the expert says when a turn is done, and when a turn asks for what it cannot do (its ground truth is empty).
TURN_DONE = "The request is done."
CANNOT_DO = "I cannot do this with the tools and the information I have. Could you give me what is missing?"
# BFCL's parameter types as JSON-schema types.
_JSON_TYPES = {"dict": "object", "float": "number", "tuple": "array"}


@dataclass(frozen=True)
class BFCLOptions:
    """`environment_options` of `environment: bfcl`."""

    categories: tuple[str, ...] = field(default=CATEGORIES, metadata={
        "help": f"BFCL multi-turn categories to take tasks from: {', '.join(CATEGORIES)}."})
    test_fraction: float = field(default=0.25, metadata={
        "help": "Share of BFCL's scenarios in the test split. A scenario's variants (base_7, miss_param_7, "
                "long_context_7) stay in one split."})
    seed: int = field(default=0, metadata={"help": "Seed of the train / test partition of the scenarios."})
    ids: tuple[str, ...] | None = field(default=None, metadata={
        "help": "Only these task ids (e.g. multi_turn_base_0), within the split asked for ('all' for exactly them)."})
    max_tasks: int | None = field(default=None, metadata={"help": "At most this many tasks per split, in id order."})
    parser: str = field(default="hermes", metadata={
        "help": "How the model writes tool calls: 'hermes' (<tool_call>{json}</tool_call>) or 'pythonic' "
                "([func(a=1)])."})

    def __post_init__(self) -> None:
        categories = (self.categories,) if isinstance(self.categories, str) else tuple(self.categories)
        object.__setattr__(self, "categories", categories)
        if self.ids is not None:
            object.__setattr__(self, "ids", (self.ids,) if isinstance(self.ids, str) else tuple(self.ids))
        if not categories:
            raise ValueError(f"categories is empty; choose from {list(CATEGORIES)}")
        for category in categories:
            if category in UNSUPPORTED_CATEGORIES:
                raise ValueError(f"BFCL category {category!r} is not supported: {UNSUPPORTED_CATEGORIES[category]}. "
                                 f"Use {list(CATEGORIES)}.")
            if category not in CATEGORIES:
                raise ValueError(f"Unknown BFCL category {category!r}; the categories are {list(CATEGORIES)}.")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks}")


@dataclass(frozen=True)
class BFCLEntry:
    """One BFCL multi-turn task (`Task.setup`): its user turns, back-ends, ground truth and tools."""

    id: str
    category: str
    turns: tuple[str, ...]
    involved_classes: tuple[str, ...]
    initial_config: Mapping[str, Any]
    ground_truth: tuple[tuple[str, ...], ...]
    tools: tuple[Mapping[str, Any], ...]

    @property
    def scenario(self) -> int:
        return int(self.id.rsplit("_", 1)[1])


def import_bfcl() -> Any:
    """The `bfcl_eval` package, or an ImportError that says how to install it."""
    try:
        return importlib.import_module("bfcl_eval")
    except ImportError as error:
        raise ImportError(f"The BFCL environment needs the bfcl-eval package: {INSTALL_HINT} (its declared "
                          "dependencies are heavy and the multi-turn tasks need none of them).") from error


class BFCLSuite(EnvironmentSuite):
    """BFCL's multi-turn tasks (see the module docstring)."""

    name = "bfcl"
    options_class = BFCLOptions
    # BFCL caps each user turn at 20 call steps (enforced by the environment); this bounds a whole episode.
    max_steps = 100

    def __init__(self, options: BFCLOptions | None = None):
        self.options = options or BFCLOptions()
        bfcl = import_bfcl()
        self._data = Path(bfcl.__file__).parent / "data"
        self._format = ToolCallingFormat(parser=self.options.parser)
        self._entries = {entry.id: entry for category in self.options.categories for entry in self._load(category)}
        if self.options.ids is not None:
            for task_id in self.options.ids:
                if task_id not in self._entries:
                    close = difflib.get_close_matches(task_id, list(self._entries), n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(f"BFCL has no task {task_id!r} in the categories {list(self.options.categories)}."
                                     f"{hint}")

    @property
    def format(self) -> ToolCallingFormat:
        return self._format

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLITS:
            raise ValueError(f"Unknown BFCL split {split!r}; the splits are {list(SPLITS)}.")
        scenarios = sorted({entry.scenario for entry in self._entries.values()})
        test = set(random.Random(self.options.seed).sample(scenarios, round(len(scenarios) * self.options.test_fraction)))
        entries = [
            entry for entry in self._entries.values()
            if split == "all" or (entry.scenario in test) == (split == "test")
        ]
        if self.options.ids is not None:
            wanted = set(self.options.ids)
            entries = [entry for entry in entries if entry.id in wanted]
        entries.sort(key=lambda entry: (CATEGORIES.index(entry.category), entry.scenario))
        if self.options.max_tasks is not None:
            entries = entries[: self.options.max_tasks]
        return [Task(task_id=entry.id, question=entry.turns[0], setup=entry) for entry in entries]

    def make(self) -> BFCLEnvironment:
        return BFCLEnvironment()

    def tool_schemas(self, task: Task) -> list[dict[str, Any]]:
        return [dict(schema) for schema in _entry(task).tools]

    def expert(self) -> Callable[[GenerationRequest], str]:
        """Replays the ground truth: a turn's calls in one reply (positional arguments named from the back-end's
        signatures), then a reply without calls; a turn without ground-truth calls gets `CANNOT_DO`."""

        def policy(request: GenerationRequest) -> str:
            entry = self._entries.get(request.task_id or "")
            if entry is None:
                raise ValueError(f"The BFCL expert does not know the task {request.task_id!r}; it replays the tasks "
                                 "of its own suite, run through EnvironmentAgent.")
            turn, start = self._current_turn(entry, request.messages)
            expected = entry.ground_truth[turn]
            if not expected:
                return CANNOT_DO
            if any(message["role"] == "tool" for message in request.messages[start:]):
                return TURN_DONE
            classes = _classes(entry)
            return self.format.write("", tuple(_keyword_call(classes, source) for source in expected))

        return policy

    def _current_turn(self, entry: BFCLEntry, messages: list[dict[str, Any]]) -> tuple[int, int]:
        """The user turn `messages` are in and the index of its message (other user messages are parse errors)."""
        turn, start = -1, -1
        for index, message in enumerate(messages):
            upcoming = turn + 1
            if message["role"] != "user" or upcoming == len(entry.turns):
                continue
            shown = self.format.task_message if upcoming == 0 else self.format.render
            if message["content"] == shown(entry.turns[upcoming]):
                turn, start = upcoming, index
        if turn < 0:
            raise ValueError(f"The BFCL expert finds no user turn of {entry.id} in the conversation.")
        return turn, start

    # ------------------------------------------------------------------------------------------ data
    def _load(self, category: str) -> list[BFCLEntry]:
        from bfcl_eval.constants.executable_backend_config import MULTI_TURN_FUNC_DOC_FILE_MAPPING

        questions = _read_jsonl(self._data / f"BFCL_v4_multi_turn_{category}.json")
        answers = {row["id"]: row["ground_truth"] for row in _read_jsonl(
            self._data / "possible_answer" / f"BFCL_v4_multi_turn_{category}.json")}
        docs: dict[str, list[dict[str, Any]]] = {}
        entries = []
        for row in questions:
            for name in row["involved_classes"]:
                if name not in docs:
                    path = self._data / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[name]
                    docs[name] = [openai_tool(doc) for doc in _read_jsonl(path)]
            entries.append(BFCLEntry(
                id=row["id"], category=category,
                turns=tuple("\n\n".join(message["content"] for message in turn) for turn in row["question"]),
                involved_classes=tuple(row["involved_classes"]), initial_config=row["initial_config"],
                ground_truth=tuple(tuple(turn) for turn in answers[row["id"]]),
                tools=tuple(tool for name in row["involved_classes"] for tool in docs[name]),
            ))
        return entries


class BFCLEnvironment(Environment):
    """One BFCL episode: live back-ends for the model, ground-truth back-ends replayed turn by turn."""

    def reset(self, task: Task) -> Transition:
        from bfcl_eval.constants.default_prompts import MAXIMUM_STEP_LIMIT

        self.entry = _entry(task)
        self.step_limit = MAXIMUM_STEP_LIMIT
        self.instances = _instances(self.entry)
        self.expected = _instances(self.entry)
        self.schemas = {tool["function"]["name"]: tool for tool in self.entry.tools}
        self.methods = _methods(self.instances, self.schemas)
        self.expected_methods = _methods(self.expected, self.schemas)
        self.turn = 0
        self.turn_steps = 0
        self.results: list[str] = []  # every result of the model's calls, all turns (BFCL's response check)
        self.failure: dict[str, Any] | None = None
        return Transition(observation=self.entry.turns[0], info=self._info())

    def step(self, action: tuple[FunctionCall, ...]) -> Transition:
        if not action:
            return self._end_turn()
        self.turn_steps += 1
        results = tuple(self._execute(call) for call in action)
        if self.turn_steps > self.step_limit:
            self._fail("multi_turn:force_terminated", f"more than {self.step_limit} call steps in turn {self.turn}")
            return Transition(observation=results, done=True, valid=not any(r.error for r in results),
                              info=self._info())
        return Transition(observation=results, valid=not any(result.error for result in results), info=self._info())

    # ------------------------------------------------------------------------------------------ calls
    def _execute(self, call: FunctionCall) -> ToolResult:
        # Names only: BFCL passes values to the back-ends as written, and its own ground truth breaks the declared
        # types in places (multi_turn_base_173 closes ticket 'ticket_001', an "integer").
        problem = ToolCallingFormat.check_call(call, self.schemas, types=False)
        if problem is None and call.name not in self.methods:
            problem = f"the tool {call.name!r} has no back-end here"
        if problem is None:
            try:
                inspect.signature(self.methods[call.name]).bind(**call.arguments)
            except TypeError as error:
                problem = f"{call.name}: {error}"
        if problem is not None:
            result = ToolResult(call, f"Error: {problem}", error=True)
        else:
            content, raised = _run(self.methods[call.name], (), dict(call.arguments))
            result = ToolResult(call, content, error=raised)
        self.results.append(result.content)
        return result

    def _end_turn(self) -> Transition:
        from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import response_checker, state_checker

        expected_calls = self.entry.ground_truth[self.turn]
        expected_results = [_run_source(self.expected_methods, source) for source in expected_calls]
        if self.failure is None and expected_calls:
            if self.turn_steps == 0:
                self._fail("multi_turn:empty_turn_model_response", f"no call in turn {self.turn}")
            else:
                check = state_checker(self.instances, self.expected)
                if check["valid"]:
                    check = response_checker(self.results, expected_results, self.turn)
                if not check["valid"]:
                    self._fail(check["error_type"], check["error_message"])
        self.turn += 1
        self.turn_steps = 0
        if self.turn == len(self.entry.turns):
            success = self.failure is None
            return Transition(observation="", done=True, success=success, reward=float(success), info=self._info())
        return Transition(observation=self.entry.turns[self.turn], info=self._info())

    def _fail(self, error_type: str, message: str) -> None:
        if self.failure is None:
            self.failure = {"turn": self.turn, "error_type": error_type, "error_message": message}

    def _info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"turn": self.turn, "turns": len(self.entry.turns)}
        if self.failure is not None:
            info["failure"] = dict(self.failure)
        return info


# ---------------------------------------------------------------------------------------------- helpers
def openai_tool(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A BFCL function doc as an OpenAI tool schema: BFCL's types ("dict", "float", "tuple") as JSON-schema types,
    its `response` description left out (the model sees results, not their schema)."""
    return {"type": "function", "function": {
        "name": doc["name"], "description": doc.get("description", ""), "parameters": _json_schema(doc["parameters"]),
    }}


def _json_schema(node: Any) -> Any:
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {}
    for key, value in node.items():
        if key == "type" and isinstance(value, str):
            if value != "any":
                converted[key] = _JSON_TYPES.get(value, value)
        elif key == "properties" and isinstance(value, dict):
            converted[key] = {name: _json_schema(schema) for name, schema in value.items()}
        else:
            converted[key] = _json_schema(value)
    return converted


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _entry(task: Task) -> BFCLEntry:
    if not isinstance(task.setup, BFCLEntry):
        raise TypeError(f"task {task.task_id!r} is not a BFCL task (its setup is {type(task.setup).__name__}); take "
                        "tasks from BFCLSuite.tasks")
    return task.setup


def _classes(entry: BFCLEntry) -> dict[str, type]:
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING

    return {name: getattr(importlib.import_module(CLASS_FILE_PATH_MAPPING[name]), name)
            for name in entry.involved_classes}


def _instances(entry: BFCLEntry) -> dict[str, Any]:
    """Fresh back-ends of `entry`, loaded with its initial state (a copy: the back-ends change what they load)."""
    from bfcl_eval.constants.executable_backend_config import STATELESS_CLASSES

    instances = {}
    for name, class_ in _classes(entry).items():
        instance = class_()
        if name not in STATELESS_CLASSES:
            instance._load_scenario(copy.deepcopy(dict(entry.initial_config).get(name, {})),
                                    long_context=entry.category == "long_context")
        instances[name] = instance
    return instances


def _methods(instances: Mapping[str, Any], schemas: Mapping[str, Any]) -> dict[str, Callable[..., Any]]:
    """Each tool's bound method (as BFCL maps them: a later class wins a shared name); only the tools' names."""
    methods = {}
    for instance in instances.values():
        for name in schemas:
            method = getattr(type(instance), name, None)
            if callable(method) and not name.startswith("_"):
                methods[name] = getattr(instance, name)
    return methods


def _run(method: Callable[..., Any], positional: tuple, keywords: dict[str, Any]) -> tuple[str, bool]:
    """The result text of one call as BFCL writes it (a dict as JSON, anything else as str), and whether it raised."""
    try:
        value = method(*positional, **keywords)
    except Exception as error:  # noqa: BLE001 - a back-end's failure is the call's result, as in BFCL
        return f"Error during execution: {error}", True
    if isinstance(value, str):
        return value, False
    if isinstance(value, dict):
        try:
            return json.dumps(value), False
        except (TypeError, ValueError):
            return str(value), False
    return str(value), False


def _run_source(methods: Mapping[str, Callable[..., Any]], source: str) -> str:
    """Run one ground-truth call (`cd(folder='docs')`, read with `ast`) on the ground-truth back-ends."""
    try:
        ((name, positional, keywords),) = python_calls(source)
    except (ToolCallSyntaxError, ValueError) as error:
        raise ValueError(f"BFCL's ground-truth call {source!r} does not parse: {error}") from None
    if name not in methods:
        raise ValueError(f"BFCL's ground-truth call {source!r} names no tool of its task")
    return _run(methods[name], tuple(positional), keywords)[0]


def _keyword_call(classes: Mapping[str, type], source: str) -> FunctionCall:
    """A ground-truth call with its positional arguments named, as a model calls tools."""
    ((name, positional, keywords),) = python_calls(source)
    owner = next((class_ for class_ in reversed(list(classes.values())) if callable(getattr(class_, name, None))), None)
    if owner is None:
        raise ValueError(f"BFCL's ground-truth call {source!r} names no method of {list(classes)}")
    bound = inspect.signature(getattr(owner, name)).bind(None, *positional, **keywords)
    arguments = dict(list(bound.arguments.items())[1:])  # without self
    return FunctionCall(name, arguments)
