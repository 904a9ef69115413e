"""The recipes reproducing the Agent Distillation paper (recipes/agent-distillation/) parse as their commands read
them, and hold the paper's settings.They name their tasks with `task_set:` (the registry in `trl_agent_distill.task_sets`)."""

from pathlib import Path

import pytest
import yaml

from trl_agent_distill.cli import (
    check_recipe,
    make_eval_parser,
    make_generate_parser,
    make_train_parser,
    parse_eval_args,
    parse_generate_args,
    parse_train_args,
)
from trl_agent_distill.task_sets import PAPER_BENCHMARKS, PAPER_TRAINING_SETS, TASK_SETS

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes" / "agent-distillation").glob("*.yaml"))
TASK_RECIPES = [path for path in RECIPES if path.name.startswith(("generate", "eval"))]
TRAIN_RECIPES = [path for path in RECIPES if path not in TASK_RECIPES]


def parser_for(recipe: Path):
    if recipe.name.startswith("generate"):
        return make_generate_parser()
    if recipe.name.startswith("eval"):
        return make_eval_parser()
    return make_train_parser()


def settings(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def test_there_are_the_recipes_the_readme_walks_through():
    names = {path.name for path in RECIPES}
    assert names == {"generate.yaml", "train-sft.yaml", "train-sad.yaml", "eval.yaml"}
    readme = (RECIPES[0].parent / "README.md").read_text()
    assert all(f"recipes/agent-distillation/{name}" in readme for name in names)
    assert all(name in readme for name in PAPER_BENCHMARKS)  # the eval loop covers the eight sets


@pytest.mark.parametrize("recipe", TASK_RECIPES, ids=lambda path: path.name)
def test_task_recipes_name_a_registered_task_set(recipe):
    expected = PAPER_TRAINING_SETS if recipe.name.startswith("generate") else PAPER_BENCHMARKS
    assert settings(recipe)["task_set"] in expected and settings(recipe)["task_set"] in TASK_SETS


@pytest.mark.parametrize("recipe", TASK_RECIPES, ids=lambda path: path.name)
def test_task_recipes_pass_check_recipe(recipe):
    check_recipe(parser_for(recipe), str(recipe))


def test_the_generate_recipe_is_the_papers_teacher_run():
    config = parse_generate_args(["--config", str(RECIPES[0].parent / "generate.yaml")])
    assert config.model_name_or_path == "Qwen/Qwen2.5-32B-Instruct" and config.base_url
    assert config.first_thought_prefix and config.keep_only_correct and config.temperature == 0.0
    assert (config.agent, config.retrieval_top_k, config.max_agent_steps) == ("codeact", 3, 5)


def test_the_eval_recipe_runs_greedy_and_with_eight_candidates():
    config = parse_eval_args(["--config", str(RECIPES[0].parent / "eval.yaml")])
    assert config.self_consistency == [0, 8] and (config.sc_temperature, config.sc_top_p) == (0.4, 0.8)
    assert (config.agent, config.retrieval_top_k, config.max_agent_steps, config.max_new_tokens) == ("codeact", 3, 5, 1024)


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda path: path.name)
def test_train_recipes_pass_check_recipe_and_hold_the_papers_hyper_parameters(recipe):
    check_recipe(parser_for(recipe), str(recipe))
    script_args, training_args, model_args, dataset_args = parse_train_args(["--config", str(recipe)])
    assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and model_args.use_peft
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (64, 128, 0.05)
    assert training_args.learning_rate == 2e-4 and training_args.num_train_epochs == 2
    assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps == 8
    assert training_args.max_length == 10240 and training_args.segmentation_style == "codeact"
    (mixture,) = dataset_args.datasets
    assert [Path(path).parent.name for path in mixture.data_files] == ["teacher-hotpotqa", "teacher-math"]
    assert training_args.lmbda == 0.0  # off-policy, on the teacher's trajectories


def test_sft_trains_on_hard_labels_and_sad_on_the_cached_32b_teacher():
    _, sft, _, _ = parse_train_args(["--config", str(RECIPES[0].parent / "train-sft.yaml")])
    _, sad, _, _ = parse_train_args(["--config", str(RECIPES[0].parent / "train-sad.yaml")])
    assert not sft.needs_teacher and sft.lambda_ce == 1.0
    assert sad.uses_divergence and sad.teacher_cache and not sad.needs_teacher  # the cache stands in for it
    assert sad.teacher_model_name_or_path == "Qwen/Qwen2.5-32B-Instruct" and sad.span_normalization == "span"
