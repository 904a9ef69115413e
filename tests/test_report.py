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
