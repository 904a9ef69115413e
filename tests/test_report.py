"""The comparison report: table, plots, final losses; clear errors for missing inputs."""

import json

import pytest

from trl_agent_distill.report import load_log_history, plot_loss_curves, write_report

EVALUATION = {
    "tasks": 3, "dataset": "toy/test.jsonl",
    "runs": [
        {"model": model, "setting": setting, "examples": 3, "correct": correct, "exact_match": correct, "f1": correct,
         "mean_steps": 2.0, "parse_errors_per_episode": 0.0, "tool_errors_per_episode": 0.5,
         "this_run": {"seconds_per_episode": 0.1}}
        for model, setting, correct in [("teacher", "agent-greedy", 1.0), ("sad", "agent-greedy", 2 / 3),
                                        ("sad", "agent-sc8", 1.0), ("cot", "cot", 0.0)]
    ],
}
HISTORIES = {
    "sad": [{"step": 1, "loss_reason": 3.0, "loss_act": 4.0}, {"step": 2, "loss_reason": 1.0, "loss_act": 0.5},
            {"train_runtime": 9.0, "step": 2}],
    "sft": [{"step": 1, "loss_ce": 2.0}, {"step": 2, "loss_ce": 1.5}],
}

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_has_the_table_the_plots_and_the_final_losses(tmp_path):
    report = write_report(tmp_path, EVALUATION, HISTORIES, notes="SAD beat token KD here.")
    markdown = (tmp_path / "report.md").read_text()
    assert "| sad | agent-sc8 | 3 | 100.0% |" in markdown and "| cot | cot | 3 | 0.0% |" in markdown
    assert "SAD beat token KD here." in markdown and "![loss curves](loss_curves.png)" in markdown
    for name in ("loss_curves.png", "success_rates.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert report["final_losses"] == {"sad": {"loss_reason": 1.0, "loss_act": 0.5}, "sft": {"loss_ce": 1.5}}
    assert json.loads((tmp_path / "report.json").read_text()) == report


def test_runs_without_span_losses_get_no_loss_plot(tmp_path):
    report = write_report(tmp_path, EVALUATION, {"base": [{"train_runtime": 1.0}]})
    assert report["plots"] == {"success_rates": "success_rates.png"} and not (tmp_path / "loss_curves.png").exists()
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_loss_curves({"base": []}, tmp_path / "x.png")


def test_log_history_is_read_from_a_training_run(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": HISTORIES["sad"]}))
    assert load_log_history(tmp_path) == HISTORIES["sad"]
    with pytest.raises(FileNotFoundError, match="trainer_state.json does not exist"):
        load_log_history(tmp_path / "missing")


def test_students_of_several_seeds_get_a_mean_and_a_95_percent_interval(tmp_path):
    values = {"sad-seed0": 0.5, "sad-seed1": 0.7, "sad-seed2": 0.6, "sft-seed0": 0.4}
    runs = [{"model": label, "setting": "agent-greedy", "examples": 10, "correct": value, "mean_steps": 3.0,
             "this_run": {"seconds_per_episode": 0.1}} for label, value in values.items()]
    methods = {label: label.split("-")[0] for label in values}
    report = write_report(tmp_path, {"tasks": 10, "dataset": "d", "runs": runs, "methods": methods}, {})
    sad, sft = report["over_seeds"]
    assert sad["seeds"] == 3 and sad["mean"] == pytest.approx(0.6) and sad["std"] == pytest.approx(0.1)
    # t(0.975, 2 degrees of freedom) = 4.3027: the half-width is 4.3027 * 0.1 / sqrt(3)
    assert sad["interval"] == pytest.approx([0.6 - 0.248418, 0.6 + 0.248418], abs=1e-5)
    assert sft["seeds"] == 1 and sft["interval"] is None  # one run is one run
    markdown = (tmp_path / "report.md").read_text()
    assert "| sad | agent-greedy | 3 | 60.0% | [35.2%, 84.8%] | 50.0%, 70.0%, 60.0% |" in markdown
    assert "| sft | agent-greedy | 1 | 40.0% | - | 40.0% |" in markdown


def test_a_run_of_one_seed_per_method_has_no_seed_table(tmp_path):
    write_report(tmp_path, {**EVALUATION, "methods": {"sad": "sad"}}, HISTORIES)
    assert "95% Student-t" not in (tmp_path / "report.md").read_text()
