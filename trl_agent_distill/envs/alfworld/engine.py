"""ALFWorld's real engine, one game per episode: TextWorld's `PddlEnv` wrapped as ALFWorld's `AlfredTWEnv` wraps it.

`load_engine(data_dir)` imports the `alfworld` package once (a missing install fails saying what to install) and
returns the `Engine`: it lists the games of a data split with ALFWorld's own `AlfredTWEnv.collect_game_files`
(from a config the library writes, no file from ALFWorld's repository), and starts a game on a fresh `PddlEnv`
wrapped by `AlfredDemangler`, `AlfredInfos` and, for the expert, `AlfredExpert`. `ALFWorldEnvironment` is one
episode on it: the opening text without TextWorld's welcome banner (as ReAct shows it), the engine's answer to each
command, success when the engine says the goal holds.

Two traps of the engine are handled here: importing `alfworld.info` creates the folder ``$ALFWORLD_DATA`` (by
default ``~/.cache/alfworld``), so it is imported with ``ALFWORLD_DATA`` pointing at the data in use and the
process environment is restored after; and loading a game runs fast-downward's PDDL translator, which overwrites
``sys.argv`` and captures ``sys.stdout`` (on load and again on reset), so ``sys.argv`` is put back after. Each game
has its own engine and its own copy of the planner library, but TextWorld's text grammar parser is shared by all,
so every call into the engine holds one lock (measured: steps of games in parallel threads fail without it).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..base import Environment, EnvironmentFailure, Transition

DATA_DIR_NAME = "json_2.1.1"  # ALFWorld's data release, under $ALFWORLD_DATA
# The papers' splits -> AlfredTWEnv's `train_eval` (valid_unseen: the 134 out-of-distribution games).
SPLITS = {"train": "train", "valid_seen": "eval_in_distribution", "valid_unseen": "eval_out_of_distribution"}
SPLIT_ALIASES = {"test": "valid_unseen"}
TASK_TYPE_IDS = {
    "pick_and_place_simple": 1, "look_at_obj_in_light": 2, "pick_clean_then_place_in_recep": 3,
    "pick_heat_then_place_in_recep": 4, "pick_cool_then_place_in_recep": 5, "pick_two_obj_and_place": 6,
}
EXPERT_TYPES = ("planner", "handcoded")
NOTHING_HAPPENS = "Nothing happens."
INSTALL_HINT = ("ALFWorld needs the `alfworld` package (TextWorld and the fast-downward planner come with it; "
                "fast-downward builds from source, about 2 minutes): pip install 'trl-agent-distill[alfworld]' "
                "or pip install alfworld==0.4.2")

# The PDDL translator's module globals (sys.argv, sys.stdout, its options) and the first import of the package.
_ENGINE_LOCK = threading.RLock()
_engine: Engine | None = None


class Engine:
    """The imported `alfworld` / TextWorld modules and what the library does with them (see the module docstring)."""

    def __init__(self, modules: SimpleNamespace):
        self.modules = modules

    def domain_and_grammar(self) -> tuple[str, str]:
        """The ALFRED PDDL domain and the text grammar that the wheel ships."""
        info = self.modules.info
        return Path(info.ALFRED_PDDL_PATH).read_text(), Path(info.ALFRED_TWL2_PATH).read_text()

    def config(self, data_root: Path, task_types: Sequence[str], *, expert_type: str, max_steps: int) -> dict:
        """The configuration `AlfredTWEnv` reads (what ALFWorld's base_config.yaml holds, for these data)."""
        info = self.modules.info
        games = Path(data_root) / DATA_DIR_NAME
        return {
            "dataset": {"data_path": str(games / "train"), "eval_id_data_path": str(games / "valid_seen"),
                        "eval_ood_data_path": str(games / "valid_unseen"), "num_train_games": -1,
                        "num_eval_games": -1},
            "logic": {"domain": info.ALFRED_PDDL_PATH, "grammar": info.ALFRED_TWL2_PATH},
            "env": {"type": "AlfredTWEnv", "task_types": [TASK_TYPE_IDS[name] for name in task_types],
                    "goal_desc_human_anns_prob": 0.0, "domain_randomization": False, "expert_type": expert_type},
            "general": {"training_method": "dagger"},
            "dagger": {"training": {"max_nb_steps_per_episode": max_steps}},
        }

    def game_files(self, config: dict, split: str) -> list[Path]:
        """The solvable games of `split` (a key of `SPLITS`) as ALFWorld collects them, in a stable order."""
        with _ENGINE_LOCK, _quiet():  # it prints and draws a progress bar
            environment = self.modules.AlfredTWEnv(config, train_eval=SPLITS[split])
        return sorted(Path(path) for path in environment.game_files)

    def start(self, game_file: str | Path, *, expert_type: str | None = None) -> tuple[Any, Any]:
        """A fresh engine playing `game_file`, and its opening state; with `expert_type`, its states hold
        ``extra.expert_plan``."""
        modules = self.modules
        extras = ["gamefile"] if expert_type is None else ["gamefile", "expert_plan"]
        infos = modules.textworld.EnvInfos(won=True, admissible_commands=True, extras=extras)
        game = modules.AlfredInfos(modules.AlfredDemangler(modules.PddlEnv(infos)))
        if expert_type is not None:
            game = modules.AlfredExpert(game, expert_type=expert_type)
        with _ENGINE_LOCK:  # both load and reset translate the PDDL problem
            argv = sys.argv
            try:
                game.load(str(game_file))
                state = game.reset()
            finally:
                sys.argv = argv
        return game, state

    def step(self, game: Any, command: str) -> Any:
        """`game`'s state after `command`."""
        with _ENGINE_LOCK:  # the text grammar's parser is shared by every game
            state, _, _ = game.step(command)
        return state


def load_engine(data_dir: str | Path | None = None) -> Engine:
    """The engine, imported on first use with ``ALFWORLD_DATA`` at `data_dir` unless the user set it (the package
    creates that folder on import); the environment variable is restored after."""
    global _engine
    with _ENGINE_LOCK:
        if _engine is None:
            with _alfworld_data(data_dir):
                _engine = Engine(_import_modules())
        return _engine


def _import_modules() -> SimpleNamespace:
    # Imported here, not at the top: the package must not be imported before ALFWORLD_DATA is set (see above).
    try:
        import alfworld.gen.constants as constants
        import alfworld.gen.goal_library as goal_library
        import alfworld.info as info
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (
            AlfredDemangler,
            AlfredExpert,
            AlfredInfos,
            AlfredTWEnv,
        )
        from alfworld.agents.utils.misc import add_task_to_grammar
        from textworld.envs import PddlEnv
    except ImportError as error:
        raise ImportError(f"{INSTALL_HINT} ({error})") from error
    return SimpleNamespace(info=info, textworld=textworld, PddlEnv=PddlEnv, AlfredDemangler=AlfredDemangler,
                           AlfredInfos=AlfredInfos, AlfredExpert=AlfredExpert, AlfredTWEnv=AlfredTWEnv,
                           constants=constants, goal_library=goal_library, add_task_to_grammar=add_task_to_grammar)


@contextlib.contextmanager
def _alfworld_data(data_dir: str | Path | None) -> Iterator[None]:
    previous = os.environ.get("ALFWORLD_DATA")
    if previous is None:
        if data_dir is None:
            raise ValueError("load_engine needs the data directory in use the first time (the alfworld package "
                             "creates $ALFWORLD_DATA, by default ~/.cache/alfworld, when it is imported)")
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        os.environ["ALFWORLD_DATA"] = str(data_dir)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ALFWORLD_DATA", None)
        else:
            os.environ["ALFWORLD_DATA"] = previous


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def opening_text(feedback: str) -> str:
    """The room and the task, without TextWorld's ``-= Welcome to TextWorld, ALFRED! =-`` banner."""
    text = feedback.strip()
    if text.startswith("-="):
        text = text.split("\n\n", 1)[1] if "\n\n" in text else ""
    return text.strip()


def task_sentence(opening: str) -> str:
    """The sentence after "Your task is to: " in an opening text, without its full stop."""
    _, marker, task = opening.rpartition("Your task is to: ")
    if not marker:
        raise EnvironmentFailure(f"the game's opening text holds no task: {opening[:200]!r}")
    return task.strip().removesuffix(".")


def play_walkthrough(engine: Engine, game_file: str | Path) -> tuple[bool, list[str]]:
    """Play the planner's plan from the start of `game_file`; whether it won, and the plan."""
    game, state = engine.start(game_file, expert_type="planner")
    try:
        plan = list(state["extra.expert_plan"])
        for command in plan:
            state = engine.step(game, command)
        return bool(state["won"]), plan
    finally:
        game.close()


class ALFWorldEnvironment(Environment):
    """One episode of one game (``task.setup``: its ``game.tw-pddl`` or the folder holding it) on a fresh engine.

    The opening observation is the room and the task; `info` holds the engine's ``admissible_commands``. A command
    the engine rejects is answered with "Nothing happens." and counted as invalid; the episode is done, with
    reward 1, when the goal holds.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._game: Any = None

    def reset(self, task: Any) -> Transition:
        self.close()
        self._game, state = self.engine.start(game_file(task.setup))
        return Transition(observation=opening_text(state["feedback"]), info=_info(state))

    def step(self, action: str) -> Transition:
        if self._game is None:
            raise EnvironmentFailure("step() before reset(): the episode has no game loaded")
        state = self.engine.step(self._game, action)
        feedback = state["feedback"].strip()
        won = bool(state["won"])
        return Transition(observation=feedback, done=won, success=won, reward=1.0 if won else 0.0,
                          valid=feedback != NOTHING_HAPPENS, info=_info(state))

    def close(self) -> None:
        if self._game is not None:
            game, self._game = self._game, None
            game.close()


def game_file(setup: Any) -> Path:
    """The ``game.tw-pddl`` a task's `setup` names (the file or its folder)."""
    if not isinstance(setup, (str, os.PathLike)):
        raise EnvironmentFailure(f"an ALFWorld task's setup must be the path of its game, got {setup!r}")
    path = Path(setup)
    path = path / "game.tw-pddl" if path.is_dir() else path
    if not path.is_file():
        raise EnvironmentFailure(f"the ALFWorld game {path} does not exist")
    return path


def _info(state: Any) -> dict[str, Any]:
    return {"admissible_commands": list(state["admissible_commands"]), "won": bool(state["won"])}
