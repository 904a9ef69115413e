"""ALFWorld's expert as a policy for `PolicyBackend`: the engine's planner (or hand-coded expert) acting through the
real agent loop, with ReAct-style ``think:`` lines between its actions.

The policy reads only the conversation, as a model would. It finds the game by the opening text (the room and the
task) and checks it against every observation so far: games that open alike (the real data has trials of one task
in one room) are told apart by what the agent has seen, and the search goes on with the next game when an
observation differs. It keeps its own copy of the game, stepped with the episode's commands, and asks the expert
there for the next command, so the plan is always the one from the state the episode is in.

Its thoughts are the ones ReAct's ALFWorld prompts write: a plan at the start (what to find, what to do with it and
where to look first), a note when the object is in sight, and one after each step of the task is done.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...agent.backends import GenerationRequest
from ...formats import ALFWorldFormat, ParseError
from ...formats.alfworld import is_thought
from .engine import Engine, opening_text, task_sentence

_FORMAT = ALFWorldFormat()
_TASK_IN_GRAMMAR = re.compile(r"Your task is to: (.*?)\.\"")
# Task types that change the object before it is put down: the verb and the appliance.
_CHANGES = {
    "pick_clean_then_place_in_recep": ("clean", "sinkbasin"),
    "pick_heat_then_place_in_recep": ("heat", "microwave"),
    "pick_cool_then_place_in_recep": ("cool", "fridge"),
}
_TAKE = re.compile(r"take (?P<object>.+?) from (?P<receptacle>.+)")
_CHANGE = re.compile(r"(?P<verb>clean|heat|cool) (?P<object>.+?) with (?P<receptacle>.+)")
_MOVE = re.compile(r"move (?P<object>.+?) to (?P<receptacle>.+)")
_GO = re.compile(r"go to (?P<receptacle>.+)")
_MAX_SESSIONS = 256


@dataclass(frozen=True)
class _Goal:
    task_type: str
    target: str  # "apple"
    parent: str  # "diningtable" (empty for look_at_obj_in_light)
    toggle: str  # "desklamp" (look_at_obj_in_light only)


class _Session:
    """A copy of one game, stepped with an episode's commands; `observations` are what the engine answered."""

    def __init__(self, engine: Engine, game: Any, state: Any):
        self.engine = engine
        self.game = game
        self.state = state
        self.observations: list[str] = []

    def step(self, command: str) -> str:
        self.state = self.engine.step(self.game, command)
        observation = self.state["feedback"].strip()
        self.observations.append(observation)
        return observation


class ALFWorldExpert:
    """The policy (see the module docstring) over `games` (``game.tw-pddl`` paths), with ALFWorld's expert
    `expert_type` ("planner" or "handcoded")."""

    def __init__(self, engine: Engine, games: Iterable[Path], *, expert_type: str = "planner"):
        self.engine = engine
        self.expert_type = expert_type
        self._by_task: dict[str, list[Path]] = {}
        for game in games:
            self._by_task.setdefault(game_task(game), []).append(game)
        self._openings: dict[Path, str] = {}
        # (game, the (command, observation) steps up to the first one it answers otherwise): never tried again.
        self._rejected: set[tuple[Path, tuple[tuple[str, str], ...]]] = set()
        # (game, commands so far) -> the session in that state; the oldest are closed beyond _MAX_SESSIONS.
        self._sessions: OrderedDict[tuple[Path, tuple[str, ...]], _Session] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, request: GenerationRequest) -> str:
        with self._lock:
            return self._reply(request.messages)

    def close(self) -> None:
        with self._lock:
            while self._sessions:
                self._sessions.popitem()[1].game.close()

    # ------------------------------------------------------------------------------------------ the game
    def _reply(self, messages: list[dict[str, Any]]) -> str:
        opening = messages[1]["content"]
        actions, observations = _steps(messages)
        commands = [action for action in actions if not is_thought(action)]
        seen = [observation for action, observation in zip(actions, observations) if not is_thought(action)]
        for game in self._by_task.get(task_sentence(opening), []):
            if self._opening(game) != opening:
                continue
            session = self._session(game, commands, seen)
            if session is not None:
                return self._next(game, session, actions, observations, commands)
        raise ValueError(f"The ALFWorld expert knows no game that opens with {opening[:300]!r} and answers the "
                         "episode's commands as it did.")

    def _opening(self, game: Path) -> str:
        if game not in self._openings:
            session = self._start(game)
            self._openings[game] = opening_text(session.state["feedback"])
            self._keep((game, ()), session)
        return self._openings[game]

    def _start(self, game: Path) -> _Session:
        return _Session(self.engine, *self.engine.start(game, expert_type=self.expert_type))

    def _session(self, game: Path, commands: list[str], seen: list[str]) -> _Session | None:
        """The game after `commands`, or None when it does not answer them with `seen`."""
        key = (game, tuple(commands))
        session = self._sessions.pop(key, None)
        if session is not None:
            if session.observations == seen:
                return session
            self._keep(key, session)  # the state another episode of this game is in
            return None
        steps = tuple(zip(commands, seen))
        if any((game, steps[:length]) in self._rejected for length in range(1, len(steps) + 1)):
            return None
        session = self._start(game)
        for index, command in enumerate(commands):
            if session.step(command) != seen[index]:
                session.game.close()
                self._rejected.add((game, steps[: index + 1]))
                return None
        return session

    def _keep(self, key: tuple[Path, tuple[str, ...]], session: _Session) -> None:
        self._sessions[key] = session
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)[1].game.close()

    def _next(self, game: Path, session: _Session, actions: list[str], observations: list[str],
              commands: list[str]) -> str:
        plan = list(session.state["extra.expert_plan"])
        if not plan:
            session.game.close()
            raise ValueError(f"ALFWorld's {self.expert_type} expert has no next action in {game}")
        goal = _game_goal(game)
        if not actions:
            thought = _plan_thought(goal, plan)
        elif is_thought(actions[-1]):
            thought = None
        else:
            thought = _note(goal, actions[-1], observations[-1], plan, commands)
        if thought is not None:
            self._keep((game, tuple(commands)), session)
            return _FORMAT.write(thought, None)
        command = plan[0]
        session.step(command)  # ahead of the episode, so that the next request finds this state
        if session.state["won"]:
            session.game.close()
        else:
            self._keep((game, (*commands, command)), session)
        return _FORMAT.write(None, command)


# ---------------------------------------------------------------------------------------------- thoughts
def _plan_thought(goal: _Goal, plan: list[str]) -> str:
    target = goal.target
    change = _CHANGES.get(goal.task_type)
    if goal.task_type == "look_at_obj_in_light":
        steps = f"find and take a {target}, then find and use a {goal.toggle}"
    elif goal.task_type == "pick_two_obj_and_place":
        steps = f"find and take the first {target}, then put it in {goal.parent}, then find and take the second " \
                f"{target}, then put it in {goal.parent}"
    elif change is not None:
        steps = f"find and take a {target}, then {change[0]} it with {change[1]}, then put it in {goal.parent}"
    else:
        steps = f"find and take a {target}, then put it in {goal.parent}"
    places = [match.group("receptacle") for match in map(_TAKE.fullmatch, plan) if match]
    places += [match.group("receptacle") for match in map(_GO.fullmatch, plan) if match]
    first = f" I will look in {places[0]} first." if places else ""
    return f"To solve the task, I need to {steps}. First I need to find a {target}.{first}"


def _note(goal: _Goal, command: str, observation: str, plan: list[str], commands: list[str]) -> str | None:
    """The thought after `command` was answered with `observation`, when the task moved on; else None."""
    if observation == "Nothing happens.":
        return None
    change = _CHANGES.get(goal.task_type)
    take = _TAKE.fullmatch(plan[0])
    if take and command.endswith(take.group("receptacle")) and not _TAKE.fullmatch(command):
        return f"Now I find {take.group('object')}. Next, I need to take it."
    taken = _TAKE.fullmatch(command)
    if taken:
        if change is not None:
            return f"Now I take {taken.group('object')}. Next, I need to go to {change[1]} and {change[0]} it."
        if goal.task_type == "look_at_obj_in_light":
            return f"Now I take {taken.group('object')}. Next, I need to find a {goal.toggle} and use it."
        return f"Now I take {taken.group('object')}. Next, I need to put it in {goal.parent}."
    changed = _CHANGE.fullmatch(command)
    if changed:
        return f"Now I {changed.group('verb')} {changed.group('object')}. Next, I need to put it in {goal.parent}."
    moved = _MOVE.fullmatch(command)
    if moved and goal.task_type == "pick_two_obj_and_place" and sum(map(bool, map(_MOVE.fullmatch, commands))) == 1:
        return f"Now I put the first {goal.target} in {goal.parent}. Next, I need to find the second {goal.target}."
    return None


# ---------------------------------------------------------------------------------------------- reading
def _steps(messages: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """The episode's actions (parsed as the format reads them) and the observation each one got."""
    actions, observations = [], []
    for index in range(2, len(messages), 2):
        parsed = _FORMAT.parse(messages[index]["content"])
        if isinstance(parsed, ParseError):
            raise ValueError(f"The ALFWorld expert cannot continue an episode whose message {index} is not a step: "
                             f"{messages[index]['content']!r}")
        actions.append(parsed.action)
        if index + 1 < len(messages):
            observations.append(messages[index + 1]["content"])
    return actions, observations


def game_task(game: Path) -> str:
    """The task sentence of a game (its `Task.question`), from its grammar (where `add_task_to_grammar` put it)."""
    grammar = json.loads(Path(game).read_text(encoding="utf-8"))["grammar"]
    match = _TASK_IN_GRAMMAR.search(grammar)
    if match is None:
        raise ValueError(f"{game} holds no task sentence in its grammar ('Your task is to: ...')")
    return match.group(1)


def _game_goal(game: Path) -> _Goal:
    traj_data = json.loads((Path(game).parent / "traj_data.json").read_text(encoding="utf-8"))
    params = traj_data["pddl_params"]
    target, parent, toggle = (str(params.get(key) or "").lower()
                              for key in ("object_target", "parent_target", "toggle_target"))
    return _Goal(traj_data["task_type"], target, parent, toggle)


