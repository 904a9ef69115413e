"""Generated ALFWorld games: kitchens written as ALFRED-PDDL problems that the real engine plays.

`generate_scenes(directory, num_train=..., num_test=..., seed=...)` writes, deterministically per seed, games laid
out like ALFWorld's downloaded data (``json_2.1.1/<split>/<task dir>/<trial>/{game.tw-pddl,traj_data.json}``), so
the suite reads them with the code that reads the real data. Each game holds the domain and text grammar that the
`alfworld` wheel ships (the task sentence added by ALFWorld's own `add_task_to_grammar`), a PDDL problem with the
room's receptacles, the objects in them and the goal formula of its task type from ALFWorld's goal library, and
``"solvable": true``, which the planner has confirmed: every game is played to a win before the folder is published.

Train games are in ``train``, test games in ``valid_unseen`` (out of distribution, as in the papers): every test
room has a set of receptacles (which kinds, how many of each) that no train room has, and objects are placed anew
in every game. Within one generation no two games open with the same text (room and task), so the opening
observation tells which game is being played.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...storage import as_stored, publish_folder, read_fingerprint, write_json
from .engine import DATA_DIR_NAME, load_engine, play_walkthrough

GENERATOR_VERSION = 1
TASK_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLIT_DIRS = {"train": "train", "test": "valid_unseen"}

# The receptacles of a kitchen: kind -> (fewest, most). Every kitchen has a fridge, a microwave and a sink, so every
# task type can be set in any room.
_KITCHEN = {
    "Cabinet": (1, 6), "Drawer": (1, 4), "CounterTop": (1, 2), "Shelf": (0, 2), "DiningTable": (0, 1),
    "SideTable": (0, 1), "StoveBurner": (1, 4), "Fridge": (1, 1), "Microwave": (1, 1), "SinkBasin": (1, 1),
    "GarbageCan": (1, 1), "CoffeeMachine": (0, 1), "Toaster": (0, 1),
}
# Objects a kitchen task is about (ALFRED names; the engine prints them in lower case).
_OBJECTS = (
    "Apple", "Bowl", "Bread", "ButterKnife", "Cup", "DishSponge", "Egg", "Fork", "Kettle", "Knife", "Ladle", "Lettuce",
    "Mug", "Pan", "PepperShaker", "Plate", "Pot", "Potato", "SaltShaker", "SoapBottle", "Spatula", "Spoon", "Tomato",
    "WineBottle",
)
# Task types that change the object first: the property it needs and the appliance that changes it.
_CHANGES = {
    "pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
    "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
    "pick_cool_then_place_in_recep": ("Coolable", "Fridge"),
}
# Where a task never asks to put things (ALFWorld's tasks do not either).
_NOT_A_TARGET = {"GarbageCan", "StoveBurner", "CoffeeMachine", "Toaster"}
_MAX_ATTEMPTS = 200
# Types the ALFRED domain's actions name (cleaning needs a sink basin, slicing a knife ...): every problem has them.
_DOMAIN_RECEPTACLES = ("SinkBasin", "Microwave", "Fridge")
_DOMAIN_OBJECTS = ("Knife", "ButterKnife")


@dataclass(frozen=True)
class _Receptacle:
    kind: str
    id: str  # ALFRED's mangled id, e.g. "Fridge_bar__minus_00_dot_53_bar_..."
    location: str


@dataclass(frozen=True)
class _Room:
    receptacles: tuple[_Receptacle, ...]
    start: str  # where the agent stands

    @property
    def signature(self) -> tuple[tuple[str, int], ...]:
        """Which receptacles the room has, how many of each: what its opening text lists."""
        return tuple(sorted(Counter(receptacle.kind for receptacle in self.receptacles).items()))


@dataclass(frozen=True)
class _Scene:
    room: _Room
    task_type: str
    target: str  # object kind
    parent: str  # receptacle kind
    sentence: str  # "put a clean knife in countertop"
    placements: tuple[tuple[str, str, _Receptacle], ...]  # (object kind, object id, receptacle)

    @property
    def directory(self) -> str:
        return f"{self.task_type}-{self.target}-None-{self.parent}"


def generate_scenes(directory: str | Path, *, num_train: int, num_test: int, seed: int = 0,
                    task_types: Sequence[str] = TASK_TYPES) -> Path:
    """Write (once per set of parameters) the generated games under `directory` and return their data root, the
    folder to use as ``ALFWORLD_DATA`` (it holds ``json_2.1.1/train`` and ``json_2.1.1/valid_unseen``).

    Task types take turns, so every type appears once there are as many games as types. A folder with the same
    fingerprint (these parameters, the generator's version and the wheel's domain and grammar) is reused as it is.
    Raises `RuntimeError` naming the game when the planner does not solve one (no folder is published then).
    """
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train} and {num_test}")
    unknown = [task_type for task_type in task_types if task_type not in TASK_TYPES]
    if unknown or not task_types:
        raise ValueError(f"task_types must be a non-empty selection of {list(TASK_TYPES)}, got {list(task_types)}")
    engine = load_engine()
    domain, grammar = engine.domain_and_grammar()
    fingerprint = {
        "generator_version": GENERATOR_VERSION, "num_train": num_train, "num_test": num_test, "seed": seed,
        "task_types": list(task_types),
        "logic": hashlib.sha256((domain + "\0" + grammar).encode()).hexdigest(),
    }
    name = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    target = Path(directory) / f"alfworld-scenes-{name}"
    if read_fingerprint(target) == as_stored(fingerprint):
        return target

    def write(root: Path) -> None:
        scenes = plan_scenes(num_train=num_train, num_test=num_test, seed=seed, task_types=task_types)
        for split, split_scenes in scenes.items():
            for index, scene in enumerate(split_scenes):
                trial = f"trial_s{seed}_{split}_{index:05d}"
                game_dir = root / DATA_DIR_NAME / SPLIT_DIRS[split] / scene.directory / trial
                _write_game(game_dir, scene, domain=domain, grammar=grammar, engine=engine)

    return publish_folder(target, write, fingerprint)


def plan_scenes(*, num_train: int, num_test: int, seed: int, task_types: Sequence[str]) -> dict[str, list[_Scene]]:
    """The scenes of each split, before anything is written (see the module docstring)."""
    rng = random.Random(f"alfworld-scenes-{seed}")
    openings: set[tuple[Any, str]] = set()
    train_rooms: set[tuple[tuple[str, int], ...]] = set()
    scenes: dict[str, list[_Scene]] = {"train": [], "test": []}
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            task_type = task_types[index % len(task_types)]
            for _ in range(_MAX_ATTEMPTS):
                room = _make_room(rng)
                if split == "test" and room.signature in train_rooms:
                    continue  # a test room is one the train split never shows
                scene = _make_scene(rng, room, task_type)
                if scene is None or (room.signature, scene.sentence) in openings:
                    continue
                break
            else:
                raise RuntimeError(f"could not make {count} distinct {split} scenes of {task_type!r} in "
                                   f"{_MAX_ATTEMPTS} attempts; ask for fewer scenes")
            openings.add((room.signature, scene.sentence))
            if split == "train":
                train_rooms.add(room.signature)
            scenes[split].append(scene)
    return scenes


# ---------------------------------------------------------------------------------------------- rooms and scenes
def _make_room(rng: random.Random) -> _Room:
    points: set[str] = set()
    ids: set[str] = set()
    receptacles = []
    for kind, (fewest, most) in _KITCHEN.items():
        for _ in range(rng.randint(fewest, most)):
            # ALFRED names a sink's basin after the sink.
            mangled = _new_id(rng, ids, "Sink", "|SinkBasin") if kind == "SinkBasin" else _new_id(rng, ids, kind)
            receptacles.append(_Receptacle(kind, mangled, _location(rng, points)))
    return _Room(tuple(receptacles), _location(rng, points))


def _make_scene(rng: random.Random, room: _Room, task_type: str) -> _Scene | None:
    """A task in `room` with its objects placed, or None when the room cannot hold one of that type."""
    constants, goals = _alfred()
    holds = constants.VAL_RECEPTACLE_OBJECTS
    kinds = {receptacle.kind for receptacle in room.receptacles}
    change = _CHANGES.get(task_type)
    targets = [kind for kind in _OBJECTS if change is None or kind in constants.VAL_ACTION_OBJECTS[change[0]]]
    target = rng.choice(targets)
    parents = sorted(
        kind for kind in kinds
        if target in holds.get(kind, ()) and kind not in _NOT_A_TARGET and (change is None or kind != change[1])
    )
    # The objects start anywhere they fit except in a receptacle of the goal's kind (the task would be done).
    sources = None
    if parents:
        parent = rng.choice(parents)
        sources = [r for r in room.receptacles if r.kind != parent and target in holds.get(r.kind, ())]
    if not parents or not sources:
        return None
    copies = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
    placements = [(target, rng.choice(sources)) for _ in range(copies)]
    for kind in rng.sample([kind for kind in _OBJECTS if kind != target], rng.randint(2, 6)):
        fitting = [r for r in room.receptacles if kind in holds.get(r.kind, ())]
        if fitting:
            placements.append((kind, rng.choice(fitting)))
    template = rng.choice(goals.gdict[task_type]["templates"])
    sentence = template.format(obj=target.lower(), recep=parent.lower())
    ids: set[str] = set()
    placed = tuple((kind, _new_id(rng, ids, kind), receptacle) for kind, receptacle in placements)
    return _Scene(room, task_type, target, parent, sentence, placed)


def _new_id(rng: random.Random, taken: set[str], kind: str, suffix: str = "") -> str:
    """A fresh ALFRED id: the kind and where it stands (x, y, z in metres), e.g. ``Apple|+01.00|+00.90|-01.25``."""
    while True:
        mangled = _mangle(f"{kind}|" + "|".join(f"{rng.uniform(-3, 3):+06.2f}" for _ in range(3)) + suffix)
        if mangled not in taken:
            taken.add(mangled)
            return mangled


def _location(rng: random.Random, taken: set[str]) -> str:
    while True:
        x, z = rng.randint(-12, 12), rng.randint(-12, 12)
        point = f"loc|{x}|{z}|{rng.randint(0, 3)}|{rng.choice((-30, 0, 30, 45, 60))}"  # ALFRED: x, z, turn, look
        if point not in taken:
            taken.add(point)
            return _mangle(point)


def _mangle(name: str) -> str:
    """ALFRED's PDDL spelling of an id (what the engine's demangler reads back as "fridge 1")."""
    for character, word in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(character, word)
    return name


# ---------------------------------------------------------------------------------------------- files
def _problem(scene: _Scene, name: str) -> str:
    """The scene as a PDDL problem in ALFWorld's ALFRED domain."""
    constants, goals = _alfred()
    room = scene.room
    # Only the kinds in the room, and those the domain names in its actions: the planner grounds every pair.
    receptacle_kinds = sorted({receptacle.kind for receptacle in room.receptacles} | set(_DOMAIN_RECEPTACLES))
    object_kinds = sorted({kind for kind, _, _ in scene.placements} | set(_DOMAIN_OBJECTS))
    present = sorted({receptacle.kind for receptacle in room.receptacles})
    objects = [f"{kind}Type - otype" for kind in object_kinds] + [f"{kind}Type - rtype" for kind in receptacle_kinds]
    objects += [f"{object_id} - object" for _, object_id, _ in scene.placements]
    objects += [f"{receptacle.id} - receptacle" for receptacle in room.receptacles]
    objects += [f"{receptacle.location} - location" for receptacle in room.receptacles] + [f"{room.start} - location"]
    facts = [f"(atLocation agent1 {room.start})"]
    facts += [f"(receptacleType {r.id} {r.kind}Type)" for r in room.receptacles]
    facts += [f"(receptacleAtLocation {r.id} {r.location})" for r in room.receptacles]
    facts += [f"(openable {r.id})" for r in room.receptacles if r.kind in constants.OPENABLE_CLASS_LIST]
    facts += [f"(canContain {kind}Type {held}Type)" for kind in present
              for held in sorted(constants.VAL_RECEPTACLE_OBJECTS.get(kind, ())) if held in object_kinds]
    for kind, object_id, receptacle in scene.placements:
        facts += [f"(objectType {object_id} {kind}Type)", f"(pickupable {object_id})",
                  f"(inReceptacle {object_id} {receptacle.id})",
                  f"(objectAtLocation {object_id} {receptacle.location})"]
        facts += [f"({verb} {object_id})" for verb, group in (("cleanable", "Cleanable"), ("heatable", "Heatable"),
                                                             ("coolable", "Coolable"))
                  if kind in constants.VAL_ACTION_OBJECTS[group]]
        if kind in constants.MOVABLE_RECEPTACLES:
            facts.append(f"(isReceptacleObject {object_id})")
    goal = goals.gdict[scene.task_type]["pddl"].format(obj=scene.target, recep=scene.parent).replace("#", "-")
    lines = [f"(define (problem plan_{name})", "(:domain alfred)", "(:objects", "agent1 - agent"]
    lines += [f"        {line}" for line in objects] + ["        )", "(:init"] + [f"        {fact}" for fact in facts]
    return "\n".join(lines + ["        )", goal])


def _alfred() -> tuple[Any, Any]:
    """ALFRED's constants (receptacles, what each holds, which objects can be heated ...) and ALFWorld's goals."""
    modules = load_engine().modules
    return modules.constants, modules.goal_library


def _write_game(game_dir: Path, scene: _Scene, *, domain: str, grammar: str, engine: Any) -> None:
    # ALFRED's traj_data: the task's parameters and its sentence (as a human annotation, which is how
    # `add_task_to_grammar` takes a given sentence instead of drawing a template with the global random state).
    traj_data = {
        "task_type": scene.task_type,
        "task_id": game_dir.name,
        "pddl_params": {"object_target": scene.target, "parent_target": scene.parent, "toggle_target": "",
                        "mrecep_target": "", "object_sliced": False},
        "turk_annotations": {"anns": [{"task_desc": scene.sentence}]},
        "scene": {"generator": "trl_agent_distill", "receptacles": dict(scene.room.signature)},
    }
    game = {
        "pddl_domain": domain,
        "grammar": engine.modules.add_task_to_grammar(grammar, traj_data, goal_desc_human_anns_prob=1.0,
                                                      rng=random.Random(0)),
        "pddl_problem": _problem(scene, game_dir.name),
        "solvable": True,
    }
    write_json(game_dir / "traj_data.json", traj_data)
    write_json(game_dir / "game.tw-pddl", game)
    won, walkthrough = play_walkthrough(engine, game_dir / "game.tw-pddl")
    if not won:
        raise RuntimeError(f"the generated game {game_dir.name} ({scene.sentence!r}) is not solved by the planner "
                           f"(plan: {walkthrough}); this is a bug in the scene generator")
