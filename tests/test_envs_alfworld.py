"""ALFWorld on its real engine (the `alfworld` package: TextWorld + fast-downward) over generated scenes: the
planner solves every scene through the real agent loop, a random policy does not, the engine's traps are handled."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from trl_agent_distill.agent import EnvironmentAgent, PolicyBackend, Task
from trl_agent_distill.envs import load_environment
from trl_agent_distill.envs.alfworld import ALFWorldOptions, ALFWorldSuite, generate_scenes
from trl_agent_distill.envs.alfworld import engine as engine_module
from trl_agent_distill.envs.alfworld.scenes import TASK_TYPES
from trl_agent_distill.segmentation import segment_messages

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    scenes = tmp_path_factory.mktemp("alfworld-scenes")
    return ALFWorldSuite(ALFWorldOptions(scenes_dir=str(scenes), num_train=5, num_test=5, seed=7))


@pytest.fixture(scope="module")
def expert_episodes(suite):
    tasks = suite.tasks("train") + suite.tasks("test")
    agent = EnvironmentAgent(suite, max_steps=suite.max_steps)
    # Four episodes in flight, each on its own engine in its own thread (they fail if the engine lock is missing).
    return list(agent.run(PolicyBackend(suite.expert()), tasks, batch_size=4))


def scripted(replies):
    """A policy that answers every request with the next of `replies`."""
    replies = iter(replies)
    return lambda request: next(replies)


def test_generated_scenes_are_laid_out_like_alfworld_data(suite):
    root = suite.data_root
    assert suite.splits == ["train", "valid_unseen", "test"]
    for task in suite.tasks("train") + suite.tasks("test"):
        game_dir = Path(task.setup).parent
        assert game_dir.parent.parent.parent == root / "json_2.1.1"
        assert json.loads((game_dir / "game.tw-pddl").read_text())["solvable"] is True
        assert json.loads((game_dir / "traj_data.json").read_text())["task_type"] in TASK_TYPES
    # Every task type once per split (they take turns), and the tasks name what the engine says.
    assert sorted(task.task_id.split("/")[1].split("-")[0] for task in suite.tasks("test")) == sorted(TASK_TYPES)
    assert [task.task_id for task in suite.tasks("test")] == [task.task_id for task in suite.tasks("valid_unseen")]


def test_scenes_play_on_the_real_engine(suite):
    task = suite.tasks("train")[0]
    environment = suite.make()
    try:
        first = environment.reset(task)
        assert first.observation.startswith("You are in the middle of a room. Looking quickly around you, you see ")
        assert first.observation.endswith(f"Your task is to: {task.question}.")
        assert "Welcome to TextWorld" not in first.observation  # the banner is dropped, as ReAct does
        commands = first.info["admissible_commands"]
        assert "look" in commands and any(command.startswith("go to ") for command in commands)
        arrived = environment.step(next(command for command in commands if command.startswith("go to ")))
        assert arrived.observation.startswith("You arrive at ") and arrived.valid and not arrived.done
        rejected = environment.step("fly to the moon")
        assert rejected.observation == "Nothing happens." and not rejected.valid and rejected.reward == 0.0
    finally:
        environment.close()


def test_the_expert_solves_every_generated_scene_through_the_agent_loop(suite, expert_episodes):
    assert len(expert_episodes) == 10
    for episode in expert_episodes:
        assert episode.stop_reason == "done", episode.errors
        assert episode.success is True and episode.reward == 1.0
        assert episode.invalid_actions == 0 and episode.parse_errors == 0
        assert episode.steps <= suite.max_steps


def test_expert_episodes_think_like_react_and_segment_back(expert_episodes):
    for episode in expert_episodes:
        messages = episode.messages
        assistant = [message["content"] for message in messages if message["role"] == "assistant"]
        assert assistant[0].startswith("think: To solve the task, I need to find")  # the plan comes first
        assert any(line.startswith("think: Now I find ") for line in assistant)  # a note when the object is found
        assert all("\n" not in line for line in assistant)  # one line per reply
        spans = segment_messages(messages, style="alfworld")
        for message, message_spans in zip(messages, spans):
            if message["role"] != "assistant":
                continue
            kind = "reason" if message["content"].startswith("think:") else "act"
            assert [span.kind for span in message_spans] == [kind]
        thoughts = [index for index, message in enumerate(messages) if message["content"].startswith("think:")]
        assert all(messages[index + 1]["content"] == "OK." for index in thoughts)


def test_a_random_policy_over_admissible_commands_mostly_fails(suite):
    rng = random.Random(0)
    wins = 0
    tasks = suite.tasks("train") + suite.tasks("test")
    for task in tasks:
        environment = suite.make()
        try:
            transition = environment.reset(task)
            for _ in range(25):
                transition = environment.step(rng.choice(transition.info["admissible_commands"]))
                if transition.done:
                    break
            wins += transition.success
        finally:
            environment.close()
    assert wins <= len(tasks) // 5


def test_invalid_actions_are_counted_and_thoughts_never_reach_the_engine(suite, monkeypatch):
    steps = []
    engine_step = engine_module.Engine.step
    monkeypatch.setattr(engine_module.Engine, "step",
                        lambda self, game, command: steps.append(command) or engine_step(self, game, command))
    agent = EnvironmentAgent(suite, max_steps=4)
    replies = ["think: the fridge is a good place to start", "fly to the moon", "  THINK:  where next?", "look"]
    (episode,) = agent.run(PolicyBackend(scripted(replies)), suite.tasks("test")[:1])
    assert steps == ["fly to the moon", "look"]  # the engine saw only the actions
    assert [message["content"] for message in episode.messages[3::2]] == [
        "OK.", "Nothing happens.", "OK.", episode.messages[-1]["content"]]
    assert episode.messages[-1]["content"].startswith("You are in the middle of a room.")
    assert episode.invalid_actions == 1 and episode.stop_reason == "max_steps" and episode.success is False


def test_an_empty_reply_is_a_parse_error_fed_back(suite):
    agent = EnvironmentAgent(suite, max_steps=1)
    (episode,) = agent.run(PolicyBackend(scripted(["\n"])), suite.tasks("test")[:1])
    assert episode.parse_errors == 1 and episode.messages[-1]["content"].startswith("Error: the reply is empty.")


def test_train_and_test_scenes_differ_in_rooms_and_placements(suite):
    def room(task):
        environment = suite.make()
        try:
            return environment.reset(task).observation.split("\n\n")[0]  # the receptacles the room lists
        finally:
            environment.close()

    train_rooms = {room(task) for task in suite.tasks("train")}
    test_rooms = {room(task) for task in suite.tasks("test")}
    assert test_rooms and not train_rooms & test_rooms
    problems = [json.loads(Path(task.setup).read_text())["pddl_problem"]
                for task in suite.tasks("train") + suite.tasks("test")]
    placements = [{line.strip() for line in problem.splitlines() if line.strip().startswith("(inReceptacle")}
                  for problem in problems]
    assert all(a != b for i, a in enumerate(placements) for b in placements[i + 1:])


def test_the_generator_is_deterministic_and_cached(suite, tmp_path, monkeypatch):
    def files(root):
        return {path.relative_to(root).as_posix(): path.read_text() for path in sorted(root.rglob("*.*"))
                if path.name in ("game.tw-pddl", "traj_data.json")}

    first = generate_scenes(tmp_path / "a", num_train=2, num_test=1, seed=11, task_types=TASK_TYPES[:2])
    again = generate_scenes(tmp_path / "b", num_train=2, num_test=1, seed=11, task_types=TASK_TYPES[:2])
    assert files(first) and files(first) == files(again)
    from trl_agent_distill.envs.alfworld import scenes

    monkeypatch.setattr(scenes, "_write_game", lambda *args, **kwargs: pytest.fail("regenerated a cached scene"))
    assert generate_scenes(tmp_path / "a", num_train=2, num_test=1, seed=11, task_types=TASK_TYPES[:2]) == first
    other = scenes.plan_scenes(num_train=2, num_test=1, seed=12, task_types=TASK_TYPES[:2])
    assert other != scenes.plan_scenes(num_train=2, num_test=1, seed=11, task_types=TASK_TYPES[:2])


def test_an_unsolvable_scene_fails_loudly(tmp_path, monkeypatch):
    from trl_agent_distill.envs.alfworld import scenes

    monkeypatch.setattr(scenes, "play_walkthrough", lambda engine, game: (False, ["look"]))
    with pytest.raises(RuntimeError, match="is not solved by the planner"):
        generate_scenes(tmp_path, num_train=1, num_test=1, seed=0)
    assert not [path for path in tmp_path.iterdir() if not path.name.startswith(".")]  # nothing published


def test_downloaded_data_layout_is_read_with_the_papers_splits(suite):
    downloaded = ALFWorldSuite(ALFWorldOptions(data_path=str(suite.data_root), task_types=list(TASK_TYPES)))
    assert [task.task_id for task in downloaded.tasks("valid_unseen")] == [task.task_id for task in suite.tasks("test")]
    with pytest.raises(ValueError, match=r"Unknown ALFWorld split 'valid_seen'.*its splits are \['train', "):
        downloaded.tasks("valid_seen")


def test_a_missing_data_directory_or_package_fails_in_the_constructor(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"holds no json_2.1.1 folder: get the games with `alfworld-download`"):
        ALFWorldSuite(ALFWorldOptions(data_path=str(tmp_path)))
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "alfworld" else find_spec(name, *args))
    with pytest.raises(ImportError, match=r"pip install alfworld==0.4.2 \(missing: alfworld\)"):
        ALFWorldSuite(ALFWorldOptions(scenes_dir=str(tmp_path)))


def test_options_are_checked_by_load_environment(tmp_path):
    suite = load_environment("alfworld", {"scenes_dir": str(tmp_path), "max_steps": 12})
    assert isinstance(suite, ALFWorldSuite) and suite.max_steps == 12
    with pytest.raises(ValueError, match="unknown environment option 'num_trian'. Did you mean 'num_train'?"):
        load_environment("alfworld", {"num_trian": 3})
    with pytest.raises(ValueError, match="expert_type must be one of"):
        load_environment("alfworld", {"expert_type": "oracle"})


def test_the_engine_leaves_sys_argv_and_home_alone(tmp_path):
    """In a fresh process (the package is imported once per process): no ~/.cache/alfworld, argv restored,
    ALFWORLD_DATA as it was."""
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import os, sys\n"
        "from trl_agent_distill.envs.alfworld import ALFWorldOptions, ALFWorldSuite\n"
        "argv = list(sys.argv)\n"
        f"suite = ALFWorldSuite(ALFWorldOptions(scenes_dir={str(tmp_path / 'scenes')!r}, num_train=1, num_test=1))\n"
        "environment = suite.make()\n"
        "environment.reset(suite.tasks('test')[0])\n"
        "environment.step('look')\n"
        "assert sys.argv == argv, sys.argv\n"
        "assert 'ALFWORLD_DATA' not in os.environ\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "ALFWORLD_DATA"}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", script, "--flag"], env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(home.iterdir()) == []


def test_the_expert_tells_apart_games_that_open_alike(suite, tmp_path):
    """Two trials of one task in one room with the objects elsewhere (as in the real data): each episode follows
    the game its observations show, whichever the expert tried first."""
    from trl_agent_distill.envs.alfworld import scenes

    rng = random.Random(3)
    room = scenes._make_room(rng)
    first = next(scene for scene in iter(lambda: scenes._make_scene(rng, room, TASK_TYPES[0]), 0) if scene)
    second = next(scene for scene in iter(lambda: scenes._make_scene(rng, room, TASK_TYPES[0]), 0)
                  if scene and scene.sentence == first.sentence
                  and {r for _, _, r in scene.placements[:1]} != {r for _, _, r in first.placements[:1]})
    domain, grammar = suite.engine.domain_and_grammar()
    for trial, scene in (("trial_a", first), ("trial_b", second)):
        game_dir = tmp_path / "json_2.1.1" / "train" / scene.directory / trial
        scenes._write_game(game_dir, scene, domain=domain, grammar=grammar, engine=suite.engine)
    twins = ALFWorldSuite(ALFWorldOptions(data_path=str(tmp_path), task_types=list(TASK_TYPES)))
    tasks = twins.tasks("train")
    agent = EnvironmentAgent(twins, max_steps=twins.max_steps)
    episodes = list(agent.run(PolicyBackend(twins.expert()), tasks, batch_size=2))
    openings = {episode.messages[1]["content"] for episode in episodes}
    assert len(tasks) == 2 and len(openings) == 1
    assert [episode.success for episode in episodes] == [True, True], [episode.errors for episode in episodes]
    assert [episode.invalid_actions for episode in episodes] == [0, 0]  # never a command of the other game


def test_task_setup_must_name_a_game(suite):
    environment = suite.make()
    with pytest.raises(Exception, match="does not exist"):
        environment.reset(Task("x", "put a mug in cabinet", setup="/nonexistent/game.tw-pddl"))


def test_the_handcoded_expert_explores_and_solves_a_scene(suite):
    """ALFWorld's hand-coded expert knows only what it has seen: it looks around before it finds the object."""
    handcoded = ALFWorldSuite(ALFWorldOptions(data_path=str(suite.data_root), task_types=list(TASK_TYPES),
                                              expert_type="handcoded"))
    task = next(task for task in handcoded.tasks("test") if "pick_heat_then_place_in_recep" in task.task_id)
    (episode,) = EnvironmentAgent(handcoded, max_steps=50).run(PolicyBackend(handcoded.expert()), [task])
    assert episode.success is True and episode.invalid_actions == 0, episode.errors
    assert episode.messages[4]["content"] == "look"  # it starts by looking around, as ALFWorld's expert does


def test_expert_thoughts_follow_the_task_type():
    from trl_agent_distill.envs.alfworld.expert import _Goal, _note, _plan_thought

    look = _Goal("look_at_obj_in_light", "book", "", "desklamp")
    plan = ["go to desk 1", "take book 1 from desk 1", "go to sidetable 1", "use desklamp 1"]
    assert _plan_thought(look, plan) == ("To solve the task, I need to find and take a book, then find and use a "
                                         "desklamp. First I need to find a book. I will look in desk 1 first.")
    assert _note(look, "go to desk 1", "On the desk 1, you see a book 1.", plan[1:], ["go to desk 1"]) == (
        "Now I find book 1. Next, I need to take it.")
    assert _note(look, "take book 1 from desk 1", "You pick up the book 1 from the desk 1.", plan[2:], []) == (
        "Now I take book 1. Next, I need to find a desklamp and use it.")
    cool = _Goal("pick_cool_then_place_in_recep", "apple", "countertop", "")
    assert _note(cool, "cool apple 1 with fridge 1", "You cool the apple 1 using the fridge 1.", ["go to countertop 1"],
                 []) == "Now I cool apple 1. Next, I need to put it in countertop."
    assert _note(cool, "go to fridge 1", "Nothing happens.", ["take apple 1 from fridge 1"], []) is None
