"""A comparison report: the evaluation table, per-span loss curves of each distillation run, success-rate bars.

`write_report(output_dir, evaluation, histories)` takes what `evaluate` returned and the trainers' log histories
(`trainer.state.log_history`, or the `trainer_state.json` that `train` saves) and writes `report.md`,
`report.json`, `loss_curves.png` and `success_rates.png`, so a run of the whole pipeline ends in one page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .evaluation import results_table

LOSS_KEYS = ("loss_reason", "loss_act", "loss_ce")


def load_log_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The log history `train` saved in `run_dir/trainer_state.json`."""
    path = Path(run_dir, "trainer_state.json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: was the run trained with `trl-agent-distill train`?")
    return json.loads(path.read_text())["log_history"]


def plot_loss_curves(histories: dict[str, list[dict[str, Any]]], path: str | Path) -> Path:
    """One panel per run, one line per logged span loss, against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(name, history) for name, history in histories.items() if _loss_entries(history)]
    if not runs:
        raise ValueError("No run logged loss_reason, loss_act or loss_ce; nothing to plot.")
    figure, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False, sharey=True)
    for axis, (name, history) in zip(axes[0], runs):
        entries = _loss_entries(history)
        for key in LOSS_KEYS:
            points = [(entry["step"], entry[key]) for entry in entries if key in entry]
            if points and any(value != 0 for _, value in points):
                axis.plot(*zip(*points), marker=".", label=key.removeprefix("loss_"))
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.legend()
    axes[0][0].set_ylabel("loss")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_success_rates(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Success rate of every model in every setting, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(row["model"] for row in rows))
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    width = 0.8 / len(settings)
    figure, axis = plt.subplots(figsize=(max(4.0, 1.4 * len(models) * len(settings) / 2 + 2), 3.4))
    for offset, setting in enumerate(settings):
        by_model = {row["model"]: row["correct"] for row in rows if row["setting"] == setting}
        shift = (offset - (len(settings) - 1) / 2) * width
        evaluated = [(index, model) for index, model in enumerate(models) if model in by_model]  # no bar, not 0%
        bars = axis.bar([index + shift for index, _ in evaluated], [100 * by_model[model] for _, model in evaluated],
                        width, label=setting)
        axis.bar_label(bars, fmt="%.0f", fontsize=7)  # so a 0% bar still reads as measured
    axis.set_xticks(range(len(models)), models)
    axis.set_ylabel("success (%)")
    axis.set_ylim(0, 105)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def over_seeds(runs: list[dict[str, Any]], methods: dict[str, str], metric: str = "correct") -> list[dict[str, Any]]:
    """Per method and setting, `metric` over the method's seeds: mean, sample standard deviation and the 95%
    Student-t interval of the mean (None with one seed: one run is one run), with the per-seed values."""
    from scipy import stats

    groups: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        if run["model"] in methods:
            groups.setdefault((methods[run["model"]], run["setting"]), []).append(float(run[metric]))
    rows = []
    for (method, setting), values in groups.items():
        n = len(values)
        mean = sum(values) / n
        std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
        half = stats.t.ppf(0.975, n - 1) * std / n**0.5 if std is not None else None
        rows.append({"method": method, "setting": setting, "seeds": n, "mean": mean, "std": std,
                     "interval": None if half is None else [mean - half, mean + half], "values": values})
    return rows


def seeds_table(rows: list[dict[str, Any]], metric_name: str = "success") -> str:
    """A markdown table of `over_seeds` rows."""
    lines = [f"| method | setting | seeds | mean {metric_name} | 95% interval | per seed |", "|" + " --- |" * 6]
    for row in rows:
        interval = "-" if row["interval"] is None else f"[{row['interval'][0]:.1%}, {row['interval'][1]:.1%}]"
        values = ", ".join(f"{value:.1%}" for value in row["values"])
        lines.append(f"| {row['method']} | {row['setting']} | {row['seeds']} | {row['mean']:.1%} | {interval} | "
                     f"{values} |")
    return "\n".join(lines)


def write_report(output_dir: str | Path, evaluation: dict[str, Any], histories: dict[str, list[dict[str, Any]]],
                 notes: str = "") -> dict[str, Any]:
    """Write `report.md`, `report.json` and the two plots into `output_dir`; return the JSON report."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    plots = {"success_rates": plot_success_rates(evaluation["runs"], root / "success_rates.png").name}
    if any(_loss_entries(history) for history in histories.values()):
        plots["loss_curves"] = plot_loss_curves(histories, root / "loss_curves.png").name
    final_losses = {
        name: {key: entries[-1][key] for key in LOSS_KEYS if key in entries[-1]}
        for name, history in histories.items() if (entries := _loss_entries(history))
    }
    seeds = over_seeds(evaluation["runs"], evaluation.get("methods", {}))
    report = {"evaluation": evaluation, "final_losses": final_losses, "plots": plots, "notes": notes}
    lines = ["# Report", "", f"{evaluation['tasks']} test tasks from {evaluation['dataset']}.", ""]
    if any(row["seeds"] > 1 for row in seeds):
        report["over_seeds"] = seeds
        lines += ["Success over the students' seeds (mean, 95% Student-t interval of the mean):", "",
                  seeds_table(seeds), "", "Every run:", ""]
    (root / "report.json").write_text(json.dumps(report, indent=2))
    lines += [results_table(evaluation["runs"]), ""]
    if notes:
        lines += [notes, ""]
    lines += [f"![{name.replace('_', ' ')}]({file})" for name, file in plots.items()]
    (root / "report.md").write_text("\n".join(lines) + "\n")
    return report


def _loss_entries(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in history if "step" in entry and any(key in entry for key in LOSS_KEYS)]
