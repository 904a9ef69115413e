"""Evaluate students (and teachers) as agents: `trl-agent-distill eval --config recipe.yaml`.

Every model in `models` runs over the task dataset in every setting: `agent` mode (the CodeAct / ReAct loop with
its tools) greedy and with self-consistent action generation (`self_consistency: [0, 8]`), and `cot` mode (no
tools: the answer is read from `<answer>` tags or `\\boxed{}`), the CoT-distillation baseline. Each run writes
`predictions.jsonl` (trajectory, prediction, gold, scores) as episodes finish and resumes like `generate`; the
whole evaluation writes `summary.json` and `results.md`, one comparison table.

A model is a hub name, a local directory, a LoRA adapter directory (loaded on its base, 4-bit with
`load_in_4bit`), or `name@http://host:port/v1` for a model behind an OpenAI-compatible server; prefix `label=` to
name it in the table.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent.backends import GenerationBackend, GenerationRequest, OpenAIBackend, SamplingParams
from .agent.loop import Episode, SelfConsistency, Task
from .episode_metrics import cot_match_rate, reasoning_lengths
from .jsonl import ResumableJsonl, check_same_settings, read_jsonl
from .metrics import extract_boxed, score_answer
from .model_refs import resolve_model
from .storage import as_stored, lock_directory, model_files_identity, read_json, write_json
from .task_sets import get_task_set
from .tasks import AgentTaskConfig, build_agent, check_resumed_tasks, cot_messages, load_backend, load_tasks

MODES = ("agent", "cot")
PREDICTIONS_FILE, RUN_CONFIG_FILE, SUMMARY_FILE, TABLE_FILE = (
    "predictions.jsonl", "run_config.json", "summary.json", "results.md"
)
JUDGE_PROMPT = (
    "Question: {question}\nGold answer: {gold}\nPredicted answer: {prediction}\n"
    "Does the predicted answer mean the same as the gold answer? Reply with yes or no."
)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# Settings that may change between a run and its resumption without changing what an episode is.
_RESUMABLE_FIELDS = ("output_dir", "batch_size", "max_tasks", "show_progress", "request_timeout", "check_timeout",
                     "models", "modes", "self_consistency", "judge_model", "judge_base_url", "reference_episodes")


@dataclass
class EvalConfig(AgentTaskConfig):
    """Options of `trl-agent-distill eval`: which models, which settings, and the optional LLM judge."""

    models: list[str] = field(
        default_factory=list,
        metadata={"help": "Models to evaluate: hub name, local or LoRA adapter directory, or name@http://host/v1; "
                  "'label=' in front names a model in the table."},
    )
    modes: list[str] = field(
        default_factory=lambda: ["agent"],
        metadata={"help": "agent (tools) and/or cot (no tools, answer in <answer> tags or \\boxed{}).",
                  "choices": list(MODES)},
    )
    self_consistency: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "Agent settings: 0 is greedy, N >= 2 samples N candidate actions per step."},
    )
    sc_temperature: float = field(default=0.4, metadata={"help": "Temperature of self-consistency candidates."})
    sc_top_p: float = field(default=0.8, metadata={"help": "Top-p of self-consistency candidates."})
    cot_max_new_tokens: int = field(default=512, metadata={"help": "Tokens for a chain-of-thought answer."})
    judge_model: str | None = field(
        default=None, metadata={"help": "Optional LLM judge (served model name); off when unset."}
    )
    judge_base_url: str | None = field(default=None, metadata={"help": "OpenAI-compatible endpoint of the judge."})
    reference_episodes: str | None = field(
        default=None,
        metadata={"help": "Held-out teacher episodes (a `generate` output's episodes.jsonl or trajectories.jsonl on "
                  "the evaluated tasks' kind) for SAD's CoT match rate: teacher-forced, the share of the teacher's "
                  "turns whose action each model writes greedily. Unset: not measured."},
    )
    dataset_split: str = field(default="test", metadata={"help": "Split holding the tasks."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where predictions and tables go."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.models:
            raise ValueError("No models to evaluate: set `models` (hub names, directories or name@http://.../v1).")
        for mode in self.modes:
            if mode not in MODES:
                raise ValueError(f"modes must be among {MODES}, got {mode!r}")
        for n in self.self_consistency:
            if n == 1 or n < 0:
                raise ValueError(f"self_consistency entries are 0 (greedy) or N >= 2 candidates, got {n}")
        if bool(self.judge_model) != bool(self.judge_base_url):
            raise ValueError("The LLM judge needs both judge_model and judge_base_url (or neither).")


@dataclass(frozen=True)
class ModelRef:
    """One entry of `models`: a label for the table, the model, and the endpoint serving it if any."""

    label: str
    model: str
    base_url: str | None = None

    @classmethod
    def parse(cls, entry: str) -> ModelRef:
        label, _, target = entry.partition("=") if "=" in entry.split("@", 1)[0] else ("", "", entry)
        model, _, url = target.partition("@") if "@http" in target else (target, "", "")
        if not model:
            raise ValueError(f"models entry {entry!r} names no model.")
        return cls(label=label or Path(model.rstrip("/")).name or model, model=model, base_url=url or None)


@dataclass(frozen=True)
class Setting:
    """One column group of the table: a mode and, for agents, the number of self-consistency candidates."""

    mode: str
    candidates: int = 0

    @property
    def name(self) -> str:
        if self.mode == "cot":
            return "cot"
        return f"agent-sc{self.candidates}" if self.candidates else "agent-greedy"


def settings_of(config: EvalConfig) -> list[Setting]:
    settings = []
    for mode in config.modes:
        counts = config.self_consistency if mode == "agent" else [0]
        settings += [Setting(mode, n) for n in dict.fromkeys(counts)]
    return settings


# ---------------------------------------------------------------------------------------------- one run
def extract_cot_answer(text: str) -> str | None:
    """The answer of a chain-of-thought reply: the last `<answer>` tag, else the last `\\boxed{}`, else None."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        return tags[-1].strip()
    return extract_boxed(text)


def cot_episodes(backend: GenerationBackend, tasks: list[Task], config: EvalConfig) -> Iterator[Episode]:
    """No tools: one chain-of-thought reply per task, in batches; a reply without an answer is a parse error."""
    sampling = SamplingParams(max_new_tokens=config.cot_max_new_tokens)
    for start in range(0, len(tasks), config.batch_size):
        batch = tasks[start : start + config.batch_size]
        conversations = [cot_messages(task.question) for task in batch]
        replies = backend.generate([GenerationRequest(messages, sampling) for messages in conversations])
        for task, messages, (completion,) in zip(batch, conversations, replies):
            answer = extract_cot_answer(completion.text)
            yield Episode(
                task=task, messages=[*messages, {"role": "assistant", "content": completion.text}], steps=1,
                parse_errors=int(answer is None), final_answer=answer,
                stop_reason="final_answer" if answer is not None else "max_steps",
                errors=[] if answer is not None else ["no <answer> tags or \\boxed{} in the reply"],
            )


def _episodes(backend: GenerationBackend, tasks: list[Task], setting: Setting, config: EvalConfig) -> Iterator[Episode]:
    if setting.mode == "cot":
        yield from cot_episodes(backend, tasks, config)
        return
    self_consistency = (
        SelfConsistency(n=setting.candidates, temperature=config.sc_temperature, top_p=config.sc_top_p)
        if setting.candidates else None
    )
    yield from build_agent(config, self_consistency).run(backend, tasks, batch_size=config.batch_size)


def _record(episode: Episode, config: EvalConfig) -> dict[str, Any]:
    record = episode.to_record()
    prediction, gold = record.pop("final_answer"), record.pop("answer")
    if episode.success is not None or config.environment is not None:  # the environment's verdict
        scores = {"correct": float(bool(episode.success)), "reward": float(episode.reward or 0.0)}
    else:
        scores = answer_scores(prediction, episode.task, config)
    return {**record, "prediction": prediction, "gold": gold, "scores": scores}


def answer_scores(prediction: Any, task: Task, config: EvalConfig) -> dict[str, float]:
    """Every score of a predicted answer, each the best over the gold answer and its aliases. A task set is scored
    as the paper scores it: `correct` is exact match for factual sets, math-verify (or numeric) equality for math
    ones; other tasks count any of the scores."""
    per_gold = [score_answer(prediction, gold, rel_tol=config.numeric_tolerance) for gold in (task.answer, *task.aliases)]
    scores = {name: max(scores[name] for scores in per_gold) for name in per_gold[0]}
    scoring = get_task_set(config.task_set).scoring if config.task_set else None
    if scoring == "factual":
        scores["correct"] = scores["exact_match"]
    elif scoring == "math":
        scores["correct"] = max(scores["symbolic"], scores["numeric"])
    return scores


def _judge(judge: OpenAIBackend, records: list[dict[str, Any]]) -> None:
    """Add `scores["judge"]` (1.0 when the judge says yes) to each record, in one concurrent batch."""
    requests = [
        GenerationRequest(
            [{"role": "user", "content": JUDGE_PROMPT.format(question=r["question"], gold=r["gold"],
                                                             prediction=r["prediction"])}],
            SamplingParams(max_new_tokens=4),
        )
        for r in records
    ]
    for record, (verdict,) in zip(records, judge.generate(requests)):
        answered = record["prediction"] is not None
        record["scores"]["judge"] = float(answered and verdict.text.strip().lower().startswith("yes"))


def evaluate_run(backend: GenerationBackend, tasks: list[Task], setting: Setting, config: EvalConfig,
                 run_dir: Path, settings: dict[str, Any], judge: OpenAIBackend | None = None) -> dict[str, Any]:
    """Evaluate one model in one setting, resuming from `run_dir`; return its summary."""
    from tqdm.auto import tqdm

    check_same_settings(run_dir / RUN_CONFIG_FILE, settings)
    started = time.monotonic()
    with ResumableJsonl(run_dir / PREDICTIONS_FILE) as predictions:
        check_resumed_tasks(predictions.records, tasks, predictions.path, answer_key="gold")
        done = {record["task_id"] for record in predictions.records}
        todo = [task for task in tasks if task.task_id not in done]
        correct = sum(record["scores"]["correct"] for record in predictions.records)
        finished = len(done)
        pending: list[dict[str, Any]] = []
        desc = f"{run_dir.parent.name} {run_dir.name}"  # the model's label and the setting
        with tqdm(total=len(tasks), initial=finished, desc=desc, disable=not config.show_progress) as bar:
            for episode in _episodes(backend, todo, setting, config) if todo else ():
                pending.append(_record(episode, config))
                # The judge is asked in batches; without one every episode is written as soon as it ends.
                if judge is not None and len(pending) < config.batch_size and finished + len(pending) < len(tasks):
                    continue
                if judge is not None:
                    _judge(judge, pending)
                for record in pending:
                    predictions.append(record)
                    correct += record["scores"]["correct"]
                finished += len(pending)
                bar.update(len(pending))
                bar.set_postfix(score=f"{correct / finished:.1%}")
                pending = []
        summary = summarize_run(predictions.records, seconds=time.monotonic() - started, new=len(todo))
    if setting.mode == "agent":
        length = reasoning_lengths(predictions.records, getattr(backend, "tokenizer", None),
                                   style=segmentation_style_of(config))
        summary.update(reasoning_length=length.mean, reasoning_length_unit=length.unit)
    write_json(run_dir / SUMMARY_FILE, summary)
    return summary


def segmentation_style_of(config: AgentTaskConfig) -> str:
    """The segmentation style that reads the agents' turns: the environment's format or the configured agent's
    (without building the agent: its search tool would load the corpus again), `auto` for a format segmentation
    does not name."""
    from .segmentation import STYLES

    suite = config.suite()
    name = suite.format.name if suite is not None else config.agent
    return name if name in STYLES else "auto"


def measure_cot_match(backend: GenerationBackend, config: EvalConfig, model_dir: Path,
                      settings: dict[str, Any]) -> dict[str, Any]:
    """SAD's CoT match rate of one model on `reference_episodes` (see `episode_metrics.cot_match_rate`), kept in
    `model_dir/cot_match.json` and measured again only when the settings or the reference file changed."""
    reference = Path(config.reference_episodes)
    if not reference.is_file():
        raise FileNotFoundError(f"reference_episodes: {reference} does not exist (a `generate` output's "
                                "episodes.jsonl or trajectories.jsonl).")
    stat = reference.stat()
    settings = {**settings, "reference": {"path": str(reference.resolve()), "size": stat.st_size,
                                          "mtime_ns": stat.st_mtime_ns}}
    path = model_dir / "cot_match.json"
    previous = read_json(path, remedy="delete it to measure the CoT match rate again.")
    if previous is not None and previous.get("settings") == as_stored(settings):
        return previous["result"]
    records = read_jsonl(reference)
    if config.max_tasks is not None:
        records = records[: config.max_tasks]
    result = cot_match_rate(backend, build_agent(config).format, records, batch_size=config.batch_size,
                            max_new_tokens=config.max_new_tokens).to_dict()
    write_json(path, {"settings": settings, "result": result})
    return result


def summarize_run(records: list[dict[str, Any]], *, seconds: float, new: int) -> dict[str, Any]:
    """Mean scores and episode statistics of one run (earlier, resumed episodes included)."""
    count = len(records)

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values) if values else 0.0

    score_names = sorted({name for record in records for name in record["scores"]})
    return {
        "examples": count,
        **{name: mean(record["scores"][name] for record in records) for name in score_names},
        "mean_steps": mean(record["steps"] for record in records),
        "parse_errors_per_episode": mean(record["parse_errors"] for record in records),
        "tool_errors_per_episode": mean(record["tool_errors"] for record in records),
        "invalid_actions_per_episode": mean(record.get("invalid_actions", 0) for record in records),
        "stop_reasons": dict(sorted(Counter(record["stop_reason"] for record in records).items())),
        "this_run": {"episodes": new, "seconds": round(seconds, 3),
                     "seconds_per_episode": round(seconds / new, 4) if new else 0.0},
    }


# ---------------------------------------------------------------------------------------------- the whole grid
def evaluate(config: EvalConfig, backends: dict[str, GenerationBackend] | None = None) -> dict[str, Any]:
    """Run every model in every setting; write and return the comparison (`summary.json`, `results.md`).

    `backends` maps labels to ready backends (models already in memory, oracle policies); other models are loaded
    one at a time and released before the next. A second evaluation on the same `output_dir` while this one
    runs is refused (`storage.DirectoryInUseError`).
    """
    tasks = load_tasks(config)  # bad fields fail here, before any model loads
    models = [ModelRef.parse(entry) for entry in config.models]
    labels = [model.label for model in models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Two models share a label in {labels}; name them with 'label=model'.")
    root = Path(config.output_dir)
    shared = config.recorded_settings(exclude=_RESUMABLE_FIELDS)
    with lock_directory(root, "eval"):
        judge = None
        if config.judge_model:
            judge = OpenAIBackend(config.judge_base_url, config.judge_model, api_key=os.environ.get(config.api_key_env),
                                  request_timeout=config.request_timeout, check_timeout=config.check_timeout)
            judge.check()
        rows = []
        try:
            for model in models:
                given = (backends or {}).get(model.label)
                backend = given or load_backend(model.model, config, base_url=model.base_url)
                # A model retrained at the same path is another model: its files' identity is part of the settings.
                files = None if model.base_url else model_files_identity(resolve_model(model.model))
                try:
                    model_rows = []
                    for setting in settings_of(config):
                        run_dir = root / _safe(model.label) / setting.name
                        settings = {**shared, "model": asdict(model), "model_files": files, "setting": asdict(setting),
                                    "judge": config.judge_model}
                        summary = evaluate_run(backend, tasks, setting, config, run_dir, settings, judge)
                        model_rows.append({"model": model.label, "setting": setting.name, **summary})
                    if config.reference_episodes and "agent" in config.modes:
                        match = measure_cot_match(backend, config, root / _safe(model.label),
                                                  {**shared, "model": asdict(model), "model_files": files})
                        for row in model_rows:  # a property of the model, shown beside each of its agent settings
                            if row["setting"] != "cot":
                                row.update(cot_match_rate=match["cot_match_rate"], cot_match=match)
                    rows += model_rows
                finally:
                    if given is None:
                        backend.close()
        finally:
            if judge is not None:
                judge.close()
        report = {"tasks": len(tasks), "dataset": config.dataset_name, "runs": rows}
        write_json(root / SUMMARY_FILE, report)
        (root / TABLE_FILE).write_text(results_table(rows) + "\n")
    return report


# (header, row key, format): a column is shown when some row has its key.
_COLUMNS = [
    ("success", "correct", "{:.1%}"),
    ("exact match", "exact_match", "{:.1%}"),
    ("F1", "f1", "{:.3f}"),
    ("reward", "reward", "{:.3f}"),
    ("steps", "mean_steps", "{:.2f}"),
    ("parse errors / ep", "parse_errors_per_episode", "{:.2f}"),
    ("tool errors / ep", "tool_errors_per_episode", "{:.2f}"),
    ("invalid actions / ep", "invalid_actions_per_episode", "{:.2f}"),
    ("reasoning tokens / span", "reasoning_length", "{:.1f}"),
    ("CoT match", "cot_match_rate", "{:.1%}"),
    ("judge", "judge", "{:.1%}"),
]


def results_table(rows: list[dict[str, Any]]) -> str:
    """A markdown comparison table, one row per model and setting, with the columns some row has."""
    environment = any("reward" in row for row in rows)
    shown = [column for column in _COLUMNS if any(column[1] in row for row in rows)
             and not (environment and column[1] == "tool_errors_per_episode")]
    header = ["model", "setting", "examples"] + [title for title, _, _ in shown] + ["s / episode"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["model"], row["setting"], str(row["examples"])]
        cells += [fmt.format(row[key]) if row.get(key) is not None else "-" for _, key, fmt in shown]
        cells.append(f"{row['this_run']['seconds_per_episode']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _safe(label: str) -> str:
    return re.sub(r"[^\w.-]+", "_", label)
