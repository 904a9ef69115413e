"""Agents in interactive environments: `EnvironmentAgent` in the batched loop, and `generate` / `eval` /
rollouts over an environment named in the task options (on the `line_world` stand-in, see tests/line_world.py)."""

import json
import time

import pytest
from line_world import LineSuite

from trl_agent_distill.agent import EnvironmentAgent, PolicyBackend, SamplingParams
from trl_agent_distill.envs import base as envs_base
from trl_agent_distill.evaluation import EvalConfig, evaluate
from trl_agent_distill.generation import GenerateConfig, generate_trajectories
from trl_agent_distill.rollout import AgentRollouts
from trl_agent_distill.segmentation import segment_messages
from trl_agent_distill.tasks import AgentTaskConfig, build_agent, load_tasks


@pytest.fixture
def line_environment(monkeypatch):
    monkeypatch.setitem(envs_base.ENVIRONMENTS, "line", "line_world:LineSuite")


def scripted(*replies):
    """A policy replying `replies[k]` at step k (the last one for ever after)."""

    def policy(request):
        step = sum(m["role"] == "assistant" for m in request.messages)
        return replies[min(step, len(replies) - 1)]

    return policy


def test_the_expert_walks_every_task_to_its_end():
    suite = LineSuite()
    agent = EnvironmentAgent(suite, max_steps=10)
    episodes = sorted(agent.run(PolicyBackend(suite.expert()), suite.tasks("train"), batch_size=3),
                      key=lambda e: e.task.task_id)
    assert [e.stop_reason for e in episodes] == ["done"] * 4
    assert all(e.success and e.reward == 1.0 and e.invalid_actions == 0 for e in episodes)
    assert [e.steps for e in episodes] == [2, 3, 4, 5]  # a thought, then one step per unit of distance
    first = episodes[0].messages
    assert first[1] == {"role": "user", "content": "You are at 0. Walk to 1."}  # the environment's opening text
    assert first[2] == {"role": "assistant", "content": "think: I must walk 1 steps.\n"}
    assert first[3] == {"role": "user", "content": "OK."}  # the format answers thoughts, not the environment
    assert suite.closed == 4
    # The stand-in writes ALFWorld's lines: thoughts segment as REASON, actions ACT; observations come back as user
    # turns, untrained like the prompt.
    kinds = [[span.kind for span in spans] for spans in segment_messages(first, style="alfworld")]
    assert kinds == [["other"], ["other"], ["reason"], ["other"], ["act"]]


def test_rejected_actions_are_observations_counted_as_invalid_and_the_suite_caps_the_steps():
    suite = LineSuite()
    agent = build_agent_for(suite)
    (episode,) = agent.run(PolicyBackend(scripted("jump\n")), suite.tasks("test")[:1])
    assert episode.stop_reason == "max_steps" and episode.steps == suite.max_steps
    assert episode.invalid_actions == suite.max_steps and episode.success is False
    assert episode.messages[3] == {"role": "user", "content": "Nothing happens."}


def build_agent_for(suite, **kwargs):
    return EnvironmentAgent(suite, max_steps=suite.max_steps, **kwargs)


@pytest.mark.parametrize("action, reason", [("hang", "did not return within 0.3 s"), ("crash", "the engine fell over")])
def test_a_hung_or_crashing_environment_ends_that_episode_only(action, reason):
    suite = LineSuite()
    agent = EnvironmentAgent(suite, max_steps=5, step_timeout=0.3)

    def policy(request):
        return f"{action}\n" if "Walk to 1." in request.messages[1]["content"] else "right\n"

    started = time.monotonic()
    episodes = {e.task.task_id: e for e in agent.run(PolicyBackend(policy), suite.tasks("train"), batch_size=4)}
    assert time.monotonic() - started < 10
    assert episodes["train-0"].stop_reason == "error" and reason in episodes["train-0"].errors[0]
    assert all(episodes[f"train-{i}"].success for i in (1, 2, 3))


def test_self_consistent_candidates_vote_on_the_normalised_action():
    suite = LineSuite()
    agent = EnvironmentAgent(suite, max_steps=3, self_consistency={"n": 3})
    backend = PolicyBackend(lambda request: ["left\n", " RIGHT \n", "right\n"])
    (episode,) = agent.run(backend, suite.tasks("train")[:1])
    assert episode.success and episode.votes[0]["group_sizes"] == [2, 1] and episode.votes[0]["chosen"] == 1


def test_environment_options_are_checked_before_anything_runs(line_environment):
    with pytest.raises(ValueError, match="brings its own tasks and tools: unset \\['dataset_name'\\]"):
        AgentTaskConfig(environment="line", dataset_name="tasks.jsonl")
    with pytest.raises(ValueError, match="Unknown environment 'alfwrld'. Did you mean 'alfworld'"):
        AgentTaskConfig(environment="alfwrld")
    with pytest.raises(ValueError, match="unknown environment option 'taks'. Did you mean 'tasks'"):
        load_tasks(AgentTaskConfig(environment="line", environment_options={"taks": 2}))
    with pytest.raises(ValueError, match="no environment is"):
        AgentTaskConfig(environment_options={"tasks": 2})
    with pytest.raises(ValueError, match="unset first_thought_prefix"):
        GenerateConfig(environment="line", first_thought_prefix=True, model_name_or_path="m")
    config = AgentTaskConfig(environment="line", environment_options={"tasks": 2}, dataset_split="test")
    assert [t.task_id for t in load_tasks(config)] == ["test-0", "test-1"]
    assert build_agent(config).max_steps == LineSuite.max_steps  # the suite's cap when max_agent_steps is unset


def test_generate_keeps_the_episodes_the_environment_calls_won(line_environment, tmp_path):
    config = GenerateConfig(environment="line", environment_options={"tasks": 4}, max_agent_steps=3,
                            model_name_or_path="expert", output_dir=str(tmp_path), show_progress=False)
    summary = generate_trajectories(config, backend=PolicyBackend(LineSuite().expert()))
    # Targets 1..4 need 2..5 steps; with 3 steps only the first two are won.
    assert summary["correct"] == 2 and summary["kept"] == 2 and summary["stop_reasons"] == {"done": 2, "max_steps": 2}
    kept = [json.loads(line) for line in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(row["task_id"] for row in kept) == ["train-0", "train-1"]
    again = generate_trajectories(config, backend=PolicyBackend(LineSuite().expert()))  # resumes: nothing new
    assert again["this_run"]["episodes"] == 0


def test_eval_reports_success_steps_and_invalid_actions(line_environment, tmp_path):
    config = EvalConfig(environment="line", environment_options={"tasks": 2}, models=["expert", "lost"],
                        self_consistency=[0, 2], output_dir=str(tmp_path), show_progress=False)
    backends = {"expert": PolicyBackend(LineSuite().expert()), "lost": PolicyBackend(scripted("jump\n"))}
    report = evaluate(config, backends=backends)
    rows = {(row["model"], row["setting"]): row for row in report["runs"]}
    assert rows[("expert", "agent-greedy")]["correct"] == 1.0 and rows[("expert", "agent-sc2")]["correct"] == 1.0
    assert rows[("lost", "agent-greedy")]["correct"] == 0.0
    assert rows[("lost", "agent-greedy")]["invalid_actions_per_episode"] == LineSuite.max_steps
    table = (tmp_path / "results.md").read_text()
    assert "invalid actions / ep" in table and "reward" in table and "exact match" not in table


def test_rollouts_act_in_the_environment(line_environment):
    config = AgentTaskConfig(environment="line", environment_options={"tasks": 3}, max_agent_steps=2)
    rollouts = AgentRollouts(config, tokenizer=None, seed=0)
    batch = rollouts.collect(None, 4, backend=PolicyBackend(scripted("think: go\n", "right\n")))
    assert batch.episodes == 4 and len(batch.rows) == 4
    assert batch.rows[0]["messages"][3] == {"role": "user", "content": "OK."}


def test_sampling_is_the_configured_one():
    agent = EnvironmentAgent(LineSuite(), sampling=SamplingParams(temperature=0.7))
    assert agent.sampling.temperature == 0.7 and agent.stop == ("\n",)


@pytest.mark.slow
def test_on_policy_training_plays_the_environment(line_environment, tmp_path, tiny_model_dir, toy_dataset):
    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer

    args = AgentDistillConfig(
        output_dir=str(tmp_path / "run"), rollout={"environment": "line", "max_agent_steps": 2, "max_new_tokens": 8},
        lmbda=1.0, segmentation_style="alfworld", max_steps=1, per_device_train_batch_size=2, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, activation_checkpointing=False,
    )
    trainer = AgentDistillTrainer(model=str(tiny_model_dir("student")), teacher_model=str(tiny_model_dir("teacher")),
                                  args=args, train_dataset=toy_dataset)
    seen = []
    original = trainer.compute_loss

    def spy(model, inputs, *rest, **kwargs):
        seen.append(trainer.processing_class.decode(inputs["input_ids"][0]))
        return original(model, inputs, *rest, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert len(seen) == 1 and "You are at 0. Walk to" in seen[0]  # an episode of the environment, not the dataset
    (log,) = [entry for entry in trainer.state.log_history if "rollout_batches" in entry]
    assert log["rollout_episodes"] == 2


def test_eval_measures_sad_reasoning_length_and_cot_match_rate(line_environment, tmp_path):
    reference = tmp_path / "reference"
    generate_trajectories(GenerateConfig(environment="line", environment_options={"tasks": 2}, dataset_split="test",
                                         model_name_or_path="expert", output_dir=str(reference), show_progress=False),
                          backend=PolicyBackend(LineSuite().expert()))
    config = EvalConfig(environment="line", environment_options={"tasks": 2}, models=["expert", "lost"],
                        reference_episodes=str(reference / "episodes.jsonl"), output_dir=str(tmp_path / "eval"),
                        show_progress=False)
    backends = {"expert": PolicyBackend(LineSuite().expert()), "lost": PolicyBackend(scripted("jump\n"))}
    rows = {row["model"]: row for row in evaluate(config, backends=backends)["runs"]}
    # The expert's episodes: a thought ("think: I must walk N steps.", 6 words with its marker), then 1 and 2 steps
    # right: 2 + 3 teacher turns, all matched.
    assert rows["expert"]["cot_match_rate"] == 1.0 and rows["expert"]["cot_match"]["turns"] == 5
    assert rows["expert"]["cot_match"]["thought_turns"] == 2
    assert rows["lost"]["cot_match_rate"] == 0.0
    assert rows["expert"]["reasoning_length"] == 6.0 and rows["expert"]["reasoning_length_unit"] == "words"
    assert rows["lost"]["reasoning_length"] is None  # it never thought
    assert "CoT match" in (tmp_path / "eval" / "results.md").read_text()
    cached = json.loads((tmp_path / "eval" / "expert" / "cot_match.json").read_text())
    assert cached["result"]["cot_match_rate"] == 1.0


def test_rollouts_play_alfworld_on_its_real_engine(tmp_path, tiny_tokenizer):
    """The on-policy path over a real environment: generated scenes, the engine's answers, ALFWorld's segmentation."""
    config = AgentTaskConfig(environment="alfworld", max_agent_steps=3,
                             environment_options={"num_train": 1, "num_test": 1, "scenes_dir": str(tmp_path)})
    rollouts = AgentRollouts(config, tokenizer=tiny_tokenizer, seed=0)
    batch = rollouts.collect(None, 2, backend=PolicyBackend(scripted("think: where is it?\n", "look\n", "jump\n")))
    assert batch.episodes == 2 and len(batch.rows) == 2 and not batch.errors
    messages = batch.rows[0]["messages"]
    assert "Your task is to:" in messages[1]["content"] and messages[3]["content"] == "OK."
    assert messages[7]["content"] == "Nothing happens."  # the engine's answer to a command it cannot carry out
    kinds = [[span.kind for span in spans] for spans in segment_messages(messages, style="alfworld")]
    assert kinds[2] == ["reason"] and kinds[4] == ["act"]
