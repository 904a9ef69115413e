"""On-policy agent distillation: the student plays whole episodes in its environment, the teacher grades its REASON
and ACT tokens, observations are never trained; empty and crashed rollouts are counted, not fatal."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.agent import PolicyBackend
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.envs import ToyWorld
from trl_agent_distill.quantization import linear_4bit_layers
from trl_agent_distill.rollout import AgentRollouts
from trl_agent_distill.segmentation import TrajectoryFormatError, segment_messages
from trl_agent_distill.tasks import AgentTaskConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def world():
    return ToyWorld.generate(seed=5, num_towns=30, train_tasks=12, test_tasks=4)


@pytest.fixture(scope="module")
def world_dir(world, tmp_path_factory):
    directory = tmp_path_factory.mktemp("world")
    world.save(directory)
    return directory


def rollout_args(tmp_path, world_dir, rollout=None, **overrides):
    """Training arguments whose rollouts act in the world saved in `world_dir` (`rollout` overrides its settings)."""
    settings = {**ToyWorld.task_settings(world_dir), "max_agent_steps": 2, "max_new_tokens": 24, **(rollout or {})}
    options = dict(
        output_dir=str(tmp_path / "run"), rollout=settings, lmbda=1.0, segmentation_style="codeact", max_steps=2,
        per_device_train_batch_size=2, logging_steps=1, learning_rate=1e-3, save_strategy="no", report_to="none",
        use_cpu=True, activation_checkpointing=False,
    )
    return AgentDistillConfig(**{**options, **overrides})


def test_a_reply_that_does_not_parse_is_one_act_span_only_when_asked():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "garbled ``` no format"}]
    with pytest.raises(TrajectoryFormatError):
        segment_messages(messages, "codeact")
    spans = segment_messages(messages, "codeact", unparsed_as="act")
    assert [(span.kind, span.start, span.end) for span in spans[1]] == [("act", 0, len(messages[1]["content"]))]


def test_rollouts_are_whole_episodes_with_observations_left_untrained(tmp_path, world, world_dir, tiny_tokenizer):
    config = rollout_args(tmp_path, world_dir).rollout_task_config()
    rollouts = AgentRollouts(config, tiny_tokenizer, seed=0)
    batch = rollouts.collect(None, 3, backend=PolicyBackend(world.oracle))
    assert batch.episodes == 3 and len(batch.rows) == 3 and batch.skipped_empty == 0 and not batch.errors
    collated = AgentTrajectoryCollator(tiny_tokenizer, style="codeact", on_malformed="act")(batch.rows)
    for row, ids, labels in zip(batch.rows, collated["input_ids"], collated["labels"]):
        observation = row["messages"][3]["content"]
        assert observation.startswith("Observation:") and "Document 1" in observation
        trained = tiny_tokenizer.decode(ids[labels != -100])
        assert "web_search(query=towns[0])" in trained and "final_answer(answer)" in trained
        assert "Document 1" not in trained and "New task" not in trained


def test_a_well_formed_rollout_is_collated_exactly_like_a_dataset_row(world, world_dir, tiny_tokenizer):
    rows = _rows(world, world_dir).to_list()
    rollout = AgentTrajectoryCollator(tiny_tokenizer, style="codeact", on_malformed="act")(rows)
    dataset = AgentTrajectoryCollator(tiny_tokenizer, style="codeact")(rows)
    assert rollout.keys() == dataset.keys()
    for key in dataset:
        assert (rollout[key] == dataset[key]).all(), key


def test_on_policy_batches_wait_for_on_policy_start_step(tmp_path, world, world_dir, tiny_model_dir):
    args = rollout_args(tmp_path, world_dir, max_steps=3, on_policy_start_step=2)
    trainer = AgentDistillTrainer(model=str(tiny_model_dir("student")), teacher_model=str(tiny_model_dir("teacher")),
                                  args=args, train_dataset=_rows(world, world_dir))
    trainer.train()
    logged = [entry["step"] for entry in trainer.state.log_history if "rollout_batches" in entry]
    assert logged == [3]  # steps 1 and 2 trained on the dataset, step 3 on the student's episodes


def test_empty_and_crashed_rollouts_are_counted_not_fatal(tmp_path, world_dir, tiny_tokenizer, monkeypatch):
    from trl_agent_distill.agent.sandbox import SandboxError

    config = rollout_args(tmp_path, world_dir).rollout_task_config()
    rollouts = AgentRollouts(config, tiny_tokenizer, seed=0)
    empty = rollouts.collect(None, 2, backend=PolicyBackend(lambda request: ""))
    assert empty.rows == [] and empty.skipped_empty == 2

    def crash(task):
        raise SandboxError("the worker died")

    monkeypatch.setattr(rollouts.agent, "open_environment", crash)
    crashed = rollouts.collect(None, 2, backend=PolicyBackend(lambda request: "Thought: x"))
    assert crashed.skipped_empty == 2 and len(crashed.errors) == 2 and "could not be started" in crashed.errors[0]


def test_on_policy_training_plays_episodes_and_logs_their_cost(tmp_path, world_dir, tiny_model_dir, toy_dataset):
    student, teacher = str(tiny_model_dir("student")), str(tiny_model_dir("teacher"))
    trainer = AgentDistillTrainer(model=student, teacher_model=teacher, args=rollout_args(tmp_path, world_dir),
                                  train_dataset=toy_dataset)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        seen.append(trainer.processing_class.decode(inputs["input_ids"][0]))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert len(seen) == 2 and all("variable `task`" in text for text in seen)  # rollouts, not the dataset
    logs = [entry for entry in trainer.state.log_history if "rollout_batches" in entry]
    assert len(logs) == 2 and all(entry["rollout_episodes"] == 2 and entry["rollout_seconds"] > 0 for entry in logs)
    assert all(entry["rollout_tokens_act"] > 0 for entry in logs)
    assert trainer.model.training


def test_the_rollout_setting_is_a_task_config(tmp_path, world_dir):
    config = rollout_args(tmp_path, world_dir, {"temperature": 0.7}).rollout_task_config()
    assert isinstance(config, AgentTaskConfig)
    assert (config.dataset_name, config.retrieval_top_k, config.task_variable) == (
        str(world_dir / "train.jsonl"), 1, "task")
    assert (config.max_agent_steps, config.max_new_tokens, config.temperature) == (2, 24, 0.7)
    assert not config.show_progress
    recipe = tmp_path / "rollout.yaml"
    recipe.write_text(yaml.safe_dump({"dataset_name": str(world_dir / "train.jsonl"), "agent": "react"}))
    from_file = AgentDistillConfig(output_dir=str(tmp_path), rollout=str(recipe), lmbda=0.5, use_cpu=True)
    assert from_file.rollout_task_config().agent == "react"
    assert from_file.rollout_task_config().temperature == 0.9  # rollouts sample unless told otherwise
    assert AgentDistillConfig(output_dir=str(tmp_path), use_cpu=True).rollout_task_config() is None


def test_a_world_brings_its_own_tasks_and_tools(tmp_path):
    args = AgentDistillConfig(output_dir=str(tmp_path), rollout="toy", lmbda=0.5, use_cpu=True)
    config = args.rollout_task_config()
    assert config.task_variable == "task" and config.retrieval_top_k == 1
    assert config.dataset_name == str(tmp_path / "toy_world" / "train.jsonl")
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("world: toy\nmax_agent_steps: 3\n")
    for rollout in ({"world": "toy", "max_agent_steps": 3}, str(recipe)):
        args = AgentDistillConfig(output_dir=str(tmp_path), rollout=rollout, use_cpu=True)
        assert args.rollout_world == "toy" and args.rollout_task_config().max_agent_steps == 3


@pytest.mark.parametrize(("rollout", "message"), [
    ({"dataset_nam": "tasks.jsonl"}, "rollout: unknown task option 'dataset_nam'. Did you mean 'dataset_name'?"),
    ({"retrieval_top_k": 2}, "rollout needs `dataset_name`"),
    ({"dataset_name": "t.jsonl", "max_agent_steps": 0}, "rollout: max_agent_steps must be >= 1"),
    ({"world": "webshop"}, "unknown world 'webshop'"),
    ("missing.yaml", "the task recipe missing.yaml does not exist"),
    ("minecraft", "neither a world"),
])
def test_bad_rollout_settings_fail_when_the_config_is_built(tmp_path, rollout, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        AgentDistillConfig(output_dir=str(tmp_path), rollout=rollout, lmbda=0.5, use_cpu=True)


def test_bad_tasks_fail_before_training(tmp_path, world_dir):
    bad = tmp_path / "tasks.jsonl"
    bad.write_text(json.dumps({"prompt": "no question field"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        AgentRollouts(rollout_args(tmp_path, world_dir, {"dataset_name": str(bad)}).rollout_task_config(), None)


def test_the_on_policy_recipe_trains_on_cpu(tmp_path, world, world_dir, tiny_model_dir):
    from trl_agent_distill.cli import run

    trajectories = tmp_path / "trajectories.jsonl"
    _rows(world, world_dir).to_json(trajectories)
    trainer = run([
        "train", "--config", str(Path(__file__).resolve().parents[1] / "recipes" / "toy_onpolicy_sad.yaml"),
        "--model_name_or_path", str(tiny_model_dir("student")), "--teacher_model_name_or_path",
        str(tiny_model_dir("teacher")), "--dataset_name", str(trajectories),
        "--rollout", json.dumps({**ToyWorld.task_settings(world_dir), "max_new_tokens": 16, "max_agent_steps": 2}),
        "--max_steps", "4",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--logging_steps", "2",
        "--output_dir", str(tmp_path / "run"),
    ])
    assert trainer.state.global_step == 4
    rollout_logs = [entry for entry in trainer.state.log_history if "rollout_batches" in entry]
    assert sum(entry["rollout_batches"] for entry in rollout_logs) >= 1  # lmbda 0.5 over 8 micro-batches
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_a_qlora_student_plays_its_episodes_through_its_adapters(
    bnb_cpu_repacking, nf4_config, tmp_path, world, world_dir, tiny_model_dir
):
    from bitsandbytes.nn import Linear4bit
    from peft import LoraConfig

    trainer = AgentDistillTrainer(
        model=str(tiny_model_dir("student", hidden_size=64)), teacher_model=str(tiny_model_dir("teacher")),
        args=rollout_args(tmp_path, world_dir, learning_rate=1e-2), train_dataset=_rows(world, world_dir),
        quantization_config=nf4_config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    assert isinstance(trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    assert sum(entry.get("rollout_batches", 0) for entry in trainer.state.log_history) == 2
    assert any(not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_" in n)


def test_training_after_rollouts_and_evaluation_equals_training_without_them(
    bnb_cpu_repacking, nf4_config, tmp_path, world, world_dir, tiny_model_dir
):
    from peft import LoraConfig

    rows = _rows(world, world_dir)
    trainer = AgentDistillTrainer(
        model=str(tiny_model_dir("student", hidden_size=64)), teacher_model=str(tiny_model_dir("teacher")),
        args=rollout_args(tmp_path, world_dir), train_dataset=rows, quantization_config=nf4_config,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model = trainer.model
    batch = trainer._prepare_inputs(trainer.data_collator(rows.to_list()[:2]))

    def training_step():
        model.train()
        model.zero_grad()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = training_step()
    assert trainer._rollout_inputs(model, 2) is not None  # the student generates its episodes in eval mode
    model.eval()
    with torch.no_grad():  # as Trainer.evaluate runs it
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss_after, grads_after = training_step()

    assert any("lora_B" in name for name in grads) and any(grad.abs().sum() > 0 for grad in grads.values())
    assert torch.equal(loss, loss_after)
    assert grads.keys() == grads_after.keys()
    for name in grads:
        assert torch.equal(grads[name], grads_after[name]), name
    layers = linear_4bit_layers(model)
    assert layers and not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for _, layer in layers)


def _rows(world, world_dir):
    """A few oracle trajectories of `world` (saved in `world_dir`), as the off-policy dataset."""
    import datasets

    config = AgentTaskConfig(**ToyWorld.task_settings(world_dir))
    batch = AgentRollouts(config, None).collect(None, 4, backend=PolicyBackend(world.oracle))
    return datasets.Dataset.from_list(batch.rows)
