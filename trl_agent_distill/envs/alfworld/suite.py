"""The ALFWorld benchmark as an `EnvironmentSuite`: its games (downloaded or generated), ReAct's format, the
engine per episode and the engine's expert."""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ...agent.loop import Task
from ...formats import ALFWorldFormat
from ..base import EnvironmentSuite
from .engine import (
    DATA_DIR_NAME,
    EXPERT_TYPES,
    INSTALL_HINT,
    SPLIT_ALIASES,
    SPLITS,
    TASK_TYPE_IDS,
    ALFWorldEnvironment,
    load_engine,
)
from .expert import ALFWorldExpert, game_task
from .scenes import TASK_TYPES, generate_scenes

DOWNLOAD_HINT = ("get the games with `alfworld-download` (it writes them to $ALFWORLD_DATA, by default "
                 "~/.cache/alfworld) and set data_path to that folder, or leave data_path unset to play generated "
                 "scenes")


@dataclass
class ALFWorldOptions:
    """`environment_options` of `environment: alfworld`."""

    data_path: str | None = field(default=None, metadata={"help": (
        "ALFWorld's downloaded data ($ALFWORLD_DATA, the folder holding json_2.1.1): splits train, valid_seen "
        "(in distribution) and valid_unseen or test (the 134 out-of-distribution games). None plays generated "
        "scenes (splits train and test).")})
    scenes_dir: str | None = field(default=None, metadata={"help": (
        "Where generated scenes are cached (one folder per set of generator settings); None: a folder in the "
        "system's temporary directory.")})
    num_train: int = field(default=40, metadata={"help": "Generated train games."})
    num_test: int = field(default=20, metadata={"help": "Generated test games (rooms no train game has)."})
    seed: int = field(default=0, metadata={"help": "Seed of the scene generator."})
    task_types: list[str] | None = field(default=None, metadata={"help": (
        f"ALFWorld task types to play, of {list(TASK_TYPE_IDS)}; None: all (generated scenes: the five the "
        f"generator writes, {list(TASK_TYPES)}).")})
    max_steps: int = field(default=50, metadata={"help": "Steps per episode (thoughts included), as in ReAct."})
    expert_type: str = field(default="planner", metadata={"help": (
        "ALFWorld's expert behind `expert()`: 'planner' (fast-downward, from full knowledge of the game) or "
        "'handcoded' (ALFWorld's scripted explorer).")})

    def __post_init__(self) -> None:
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {list(EXPERT_TYPES)}, got {self.expert_type!r}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        known = TASK_TYPE_IDS if self.data_path is not None else TASK_TYPES
        if self.task_types is not None:
            unknown = [name for name in self.task_types if name not in known]
            if unknown or not self.task_types:
                raise ValueError(f"task_types must be a non-empty selection of {list(known)}, got {self.task_types}")


class ALFWorldSuite(EnvironmentSuite):
    """ALFWorld on its real engine (TextWorld + PDDL), in ReAct's format.

    With `data_path` the games are ALFWorld's downloaded ones; without, generated scenes (`generate_scenes`,
    written on first use and cached under `scenes_dir`). A missing `alfworld` package or data folder fails here,
    before any model loads.
    """

    name = "alfworld"
    options_class = ALFWorldOptions

    def __init__(self, options: ALFWorldOptions | None = None):
        self.options = options or ALFWorldOptions()
        self.max_steps = self.options.max_steps
        missing = [name for name in ("alfworld", "textworld", "fast_downward")
                   if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
        if self.options.data_path is not None:
            games = Path(self.options.data_path).expanduser() / DATA_DIR_NAME
            if not games.is_dir():
                raise FileNotFoundError(f"ALFWorld data_path {self.options.data_path!r} holds no {DATA_DIR_NAME} "
                                        f"folder: {DOWNLOAD_HINT}")
            self.task_types = list(self.options.task_types or TASK_TYPE_IDS)
        else:
            self.task_types = list(self.options.task_types or TASK_TYPES)
        self.engine = load_engine(self._data_dir)
        self._format = ALFWorldFormat()

    @property
    def format(self) -> ALFWorldFormat:
        return self._format

    @property
    def _data_dir(self) -> Path:
        """Where the data are (ALFWORLD_DATA): the downloaded folder, or the generated scenes' cache."""
        if self.options.data_path is not None:
            return Path(self.options.data_path).expanduser()
        if self.options.scenes_dir is not None:
            return Path(self.options.scenes_dir).expanduser()
        return Path(tempfile.gettempdir()) / f"trl_agent_distill-{os.getuid()}" / "alfworld-scenes"

    @functools.cached_property
    def data_root(self) -> Path:
        """The folder holding json_2.1.1 (generated on first use for generated scenes)."""
        if self.options.data_path is not None:
            return self._data_dir
        return generate_scenes(self._data_dir, num_train=self.options.num_train, num_test=self.options.num_test,
                               seed=self.options.seed, task_types=self.task_types)

    @property
    def splits(self) -> list[str]:
        """The splits this suite's data hold."""
        present = [split for split in SPLITS if (self.data_root / DATA_DIR_NAME / split).is_dir()]
        return present + [alias for alias, split in SPLIT_ALIASES.items() if split in present]

    def tasks(self, split: str) -> list[Task]:
        return [Task(_task_id(game, self.data_root), question=game_task(game), setup=str(game))
                for game in self.game_files(split)]

    @functools.cache  # noqa: B019 - one suite per run; its games do not change under it
    def game_files(self, split: str) -> list[Path]:
        """The games of `split`, as ALFWorld collects them."""
        if split not in self.splits:
            raise ValueError(f"Unknown ALFWorld split {split!r} in {self.data_root}; its splits are {self.splits}.")
        config = self.engine.config(self.data_root, self.task_types, expert_type=self.options.expert_type,
                                    max_steps=self.max_steps)
        games = self.engine.game_files(config, SPLIT_ALIASES.get(split, split))
        if not games:
            raise ValueError(f"ALFWorld split {split!r} in {self.data_root} holds no solvable game of the task types "
                             f"{self.task_types}")
        return games

    def make(self) -> ALFWorldEnvironment:
        return ALFWorldEnvironment(self.engine)

    def expert(self) -> ALFWorldExpert:
        """ALFWorld's expert over every game of this suite, as a policy for `PolicyBackend`."""
        splits = [split for split in self.splits if split not in SPLIT_ALIASES]
        games = [game for split in splits for game in self.game_files(split)]
        return ALFWorldExpert(self.engine, games, expert_type=self.options.expert_type)


def _task_id(game: Path, root: Path) -> str:
    """The game's folder under json_2.1.1: split / task folder / trial."""
    return game.parent.relative_to(root / DATA_DIR_NAME).as_posix()
