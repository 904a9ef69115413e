"""Two CPU processes (gloo, through `accelerate launch`) give the same run as one process with the same data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trl_agent_distill.cli import run

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "trl_agent_distill",
]


@pytest.fixture(scope="module")
def recipe_args(tmp_path_factory):
    toy = tmp_path_factory.mktemp("toy")
    run(["init-tiny", "--output_dir", str(toy), "--teacher_sft_steps", "0"])
    return [
        "--config", str(ROOT / "recipes/toy_cpu.yaml"),
        "--model_name_or_path", str(toy / "student"), "--teacher_model_name_or_path", str(toy / "teacher"),
        "--dataset_name", str(ROOT / "trl_agent_distill/resources/toy_trajectories.jsonl"),
        "--max_steps", "3", "--logging_steps", "1", "--disable_tqdm", "true", "--learning_rate", "1e-3",
    ]


def launch(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(LAUNCH + args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(output_dir: Path) -> list[float]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_two_processes_match_one_process(tmp_path, recipe_args):
    run(["train", *recipe_args, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "one")])
    launch(["train", *recipe_args, "--per_device_train_batch_size", "1", "--output_dir", str(tmp_path / "two")])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert two == pytest.approx(one, rel=1e-4)
    single, distributed = load_file(tmp_path / "one/model.safetensors"), load_file(tmp_path / "two/model.safetensors")
    for name, weight in single.items():
        torch.testing.assert_close(distributed[name], weight, atol=1e-5, rtol=1e-4)


def test_the_teacher_cache_is_built_by_both_processes(tmp_path, recipe_args):
    cache = ["--teacher_cache", str(tmp_path / "cache"), "--teacher_cache_topk", "8", "--teacher_cache_shard_rows", "4"]
    launch(["cache-teacher", *recipe_args, *cache])
    assert len(list((tmp_path / "cache").glob("shard-*.sha256"))) == 4  # 14 rows: shards 0, 2 and 1, 3
    trainer = run(["train", *recipe_args, *cache, "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    assert trainer.teacher_model is None


def test_two_processes_each_play_their_own_episodes(tmp_path, recipe_args):
    from trl_agent_distill.agent import PolicyBackend
    from trl_agent_distill.envs import ToyWorld
    from trl_agent_distill.jsonl import write_jsonl
    from trl_agent_distill.rollout import AgentRollouts
    from trl_agent_distill.tasks import AgentTaskConfig

    world = ToyWorld.generate(seed=5, num_towns=30, train_tasks=12, test_tasks=4)
    world.save(tmp_path / "world")
    config = AgentTaskConfig(**ToyWorld.task_settings(tmp_path / "world"))
    rows = AgentRollouts(config, None).collect(None, 4, backend=PolicyBackend(world.oracle)).rows
    write_jsonl(tmp_path / "trajectories.jsonl", rows)
    models = dict(zip(recipe_args[::2], recipe_args[1::2]))
    launch([
        "train", "--config", str(ROOT / "recipes/toy_onpolicy_sad.yaml"),
        "--model_name_or_path", models["--model_name_or_path"],
        "--teacher_model_name_or_path", models["--teacher_model_name_or_path"],
        "--dataset_name", str(tmp_path / "trajectories.jsonl"), "--lmbda", "1.0",
        "--rollout", json.dumps({**ToyWorld.task_settings(tmp_path / "world"), "max_new_tokens": 16,
                                 "max_agent_steps": 2}),
        "--max_steps", "2", "--per_device_train_batch_size", "1", "--logging_steps", "1",
        "--disable_tqdm", "true", "--output_dir", str(tmp_path / "out"),
    ])
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [entry["rollout_batches"] for entry in history if "rollout_batches" in entry] == [1, 1]
    assert (tmp_path / "out" / "model.safetensors").is_file()
