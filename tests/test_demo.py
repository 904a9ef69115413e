"""The toy-world pipeline end to end at a tiny size: every stage runs for real, each stage can be re-run alone, and
the report holds every model and setting."""

import json
from pathlib import Path

import pytest

from trl_agent_distill.demo import STAGES, DemoConfig, run_demo
from trl_agent_distill.jsonl import read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_demo_settings):
    config = DemoConfig(output_dir=str(tmp_path_factory.mktemp("demo")), **tiny_demo_settings)
    return config, run_demo(config)


def test_every_stage_ran_and_recorded_its_facts(demo):
    config, record = demo
    assert list(record) == list(STAGES)
    assert record["world"]["facts"]["oracle_solved"] == 48  # the oracle solves every training task
    sizes = record["teacher"]["facts"]
    assert sizes["student_parameters"] < sizes["teacher_parameters"] / 2
    assert record["generate"]["facts"]["kept"] >= 1
    assert set(record["distill"]["facts"]["seconds"]) == {"sft", "token_kd", "sad", "cot"}
    assert json.loads((config.root / "demo_stages.json").read_text()) == record


def test_students_learn_from_the_teachers_correct_trajectories(demo):
    config, _ = demo
    kept = read_jsonl(config.path("trajectories") / "trajectories.jsonl")
    episodes = read_jsonl(config.path("trajectories") / "episodes.jsonl")
    assert len(episodes) == 8 and len(kept) == sum(episode["kept"] for episode in episodes)
    # First-thought prefix: each kept trajectory starts with the first paragraph of the teacher's CoT answer.
    for episode in episodes:
        if episode["first_thought"]:
            assert episode["messages"][2]["content"].startswith(f"Thought: {episode['first_thought']}")
    for name in ("sft", "token_kd", "sad", "cot"):
        history = json.loads((config.path("students") / name / "trainer_state.json").read_text())["log_history"]
        assert history[-1]["step"] == 3
    sad = json.loads((config.path("students") / "sad" / "trainer_state.json").read_text())["log_history"]
    assert any(entry.get("loss_reason", 0) > 0 and entry.get("loss_act", 0) > 0 for entry in sad)


def test_the_report_compares_every_model_in_every_setting(demo):
    config, _ = demo
    report = json.loads((config.root / "report.json").read_text())
    settings = {(run["model"], run["setting"]) for run in report["evaluation"]["runs"]}
    agents = ("teacher", "sft", "token_kd", "sad")
    assert settings == {(model, setting) for model in agents for setting in ("agent-greedy", "agent-sc2")} | {
        ("teacher", "cot"), ("cot", "cot")}
    assert all(run["examples"] == 4 for run in report["evaluation"]["runs"])
    assert (config.root / "loss_curves.png").stat().st_size > 0 and (config.root / "success_rates.png").is_file()
    table = (config.root / "report.md").read_text()
    assert "token_kd" in table and "Stage times:" in table


def test_a_stage_reruns_alone_from_what_the_others_wrote(demo, tiny_demo_settings):
    config, record = demo
    def results():
        runs = json.loads((config.path("eval") / "evaluation.json").read_text())["runs"]
        return [(run["model"], run["setting"], run["correct"], run["mean_steps"]) for run in runs]

    before = results()
    again = run_demo(DemoConfig(output_dir=config.output_dir, **{**tiny_demo_settings, "stages": ["eval", "report"]}))
    assert results() == before  # seeded sampling, same models: the same results
    assert again["world"] == record["world"] and again["eval"]["seconds"] > 0


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="stages: unknown stage 'train'"):
        DemoConfig(stages=["train"])
    with pytest.raises(ValueError, match="students: unknown method 'dpo'"):
        DemoConfig(students=["dpo"])
    with pytest.raises(ValueError, match="self_consistency"):
        DemoConfig(self_consistency=1)


def test_a_stage_without_its_inputs_says_which_stage_to_run(tmp_path, tiny_demo_settings):
    with pytest.raises(FileNotFoundError, match="run the 'world' stage first"):
        run_demo(DemoConfig(output_dir=str(tmp_path), **{**tiny_demo_settings, "stages": ["teacher"]}))


def test_the_alfworld_recipe_runs_the_pipeline_on_the_real_engine(tmp_path):
    """recipes/alfworld_demo.yaml at a tiny size: scenes -> expert -> teacher -> its episodes -> students -> eval."""
    import yaml

    settings = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "alfworld_demo.yaml").read_text())
    settings.update(
        output_dir=str(tmp_path / "demo"), show_progress=False, vocab_size=512,
        environment_options={"num_train": 3, "num_test": 1, "seed": 0, "scenes_dir": str(tmp_path / "scenes")},
        teacher_steps=100, student_steps=2, generate_tasks=3, max_agent_steps=20, max_new_tokens=48,
        self_consistency=2, batch_size=3,
    )
    config = DemoConfig(**settings)
    record = run_demo(config)
    assert record["world"]["facts"] == {"expert_solved_train": "3/3", "expert_solved_test": "1/1"}
    assert record["generate"]["facts"]["kept"] >= 1  # the teacher memorised some of its three kitchens
    evaluation = json.loads((config.path("eval") / "evaluation.json").read_text())
    assert {(run["model"], run["setting"]) for run in evaluation["runs"]} == {
        (model, setting) for model in ("teacher", "sft", "token_kd", "sad") for setting in ("agent-greedy", "agent-sc2")
    }
    assert all("cot_match_rate" in run and "invalid_actions_per_episode" in run for run in evaluation["runs"])
    report = (config.root / "report.md").read_text()
    assert "alfworld's test split" in report and "CoT match" in report
    with pytest.raises(ValueError, match="chain-of-thought answers"):
        DemoConfig(**{**settings, "students": ["sft", "cot"]})
