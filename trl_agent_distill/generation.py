"""Teacher trajectory generation: a teacher model solves tasks as an agent; its correct trajectories become data.

`generate_trajectories(GenerateConfig(...))`, or `trl-agent-distill generate --config recipe.yaml`, follows the
Agent Distillation paper (Kang et al., arXiv 2505.17612):

1. tasks (question, answer) come from a dataset; the teacher runs the CodeAct (or ReAct) loop with a retrieval
   tool and Python;
2. with `first_thought_prefix`, the teacher first answers with plain chain-of-thought, and the first paragraph of
   that answer is forced as the start of its first agent step (`Thought: ...`) and kept in the trajectory;
3. only solved tasks are kept: the final answer must match the gold answer (exact match after normalisation,
   numeric tolerance, or sympy equality for `\\boxed{}` math), and trajectories with parse errors or that ran out
   of steps are dropped.

Output in `output_dir`: `episodes.jsonl` (every finished episode, kept or not, with its metadata),
`trajectories.jsonl` (the kept ones, ready for `trl-agent-distill train`), and `summary.json`. Both JSONL files
are written as episodes finish; a re-run with the same settings resumes and skips finished task ids.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .agent.backends import GenerationBackend, GenerationRequest, SamplingParams
from .agent.loop import Agent, Episode, Task
from .jsonl import ResumableJsonl, check_same_settings
from .metrics import answers_match
from .storage import lock_directory, write_json
from .tasks import AgentTaskConfig, build_agent, check_resumed_tasks, cot_messages, load_backend, load_tasks

logger = logging.getLogger(__name__)

EPISODES_FILE, TRAJECTORIES_FILE, SUMMARY_FILE, CONFIG_FILE = (
    "episodes.jsonl", "trajectories.jsonl", "summary.json", "generate_config.json"
)
# Settings that may change between a run and its resumption without changing what an episode is.
_RESUMABLE_FIELDS = ("output_dir", "batch_size", "max_tasks", "show_progress", "request_timeout", "check_timeout")


@dataclass
class GenerateConfig(AgentTaskConfig):
    """Options of `trl-agent-distill generate`: the teacher, the first-thought prefix and the filter (tasks, agent
    and model loading options are `AgentTaskConfig`'s)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Teacher: a hub name or local directory (run here with transformers), or the model name "
                  "served at `base_url`."},
    )
    base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible endpoint serving the teacher (e.g. vLLM: http://localhost:8000/v1). "
                  "Unset: load `model_name_or_path` locally."},
    )
    first_thought_prefix: bool = field(
        default=False,
        metadata={"help": "Ask for a chain-of-thought answer first and force its first paragraph as the start of "
                  "the first agent step."},
    )
    cot_max_new_tokens: int = field(default=256, metadata={"help": "Tokens for the chain-of-thought answer."})
    keep_only_correct: bool = field(
        default=True,
        metadata={"help": "Keep solved tasks only (also dropping parse errors and max-step episodes), as the paper."},
    )
    output_dir: str = field(default="outputs/trajectories", metadata={"help": "Where the JSONL files go."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cot_max_new_tokens < 1:
            raise ValueError(f"cot_max_new_tokens must be >= 1, got {self.cot_max_new_tokens}")
        if self.first_thought_prefix and self.environment is not None:
            raise ValueError("first_thought_prefix asks for a chain-of-thought answer to a question; an environment's "
                             "task is played, not answered: unset first_thought_prefix.")


# ---------------------------------------------------------------------------------------------- building blocks
def build_backend(config: GenerateConfig) -> GenerationBackend:
    """The teacher: an HTTP endpoint when `base_url` is set, else a local transformers model."""
    if not config.model_name_or_path:
        raise ValueError("No teacher: set `model_name_or_path` (local/hub model, or the model served at base_url).")
    return load_backend(config.model_name_or_path, config, base_url=config.base_url)


def first_paragraph(text: str) -> str:
    """The first non-empty paragraph of a chain-of-thought answer, without a leading `Thought:`."""
    for paragraph in text.strip().split("\n\n"):
        paragraph = paragraph.strip().removeprefix("Thought:").strip()
        if paragraph:
            return paragraph
    return ""


def first_thoughts(backend: GenerationBackend, tasks: list[Task], config: GenerateConfig) -> dict[str, str]:
    """Task id -> the first paragraph of the teacher's chain-of-thought answer (empty ones are left out)."""
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=config.cot_max_new_tokens)
    requests = [GenerationRequest(messages=cot_messages(task.question), sampling=sampling) for task in tasks]
    thoughts = {task.task_id: first_paragraph(replies[0].text) for task, replies in zip(tasks, backend.generate(requests))}
    return {task_id: thought for task_id, thought in thoughts.items() if thought}


def judge(episode: Episode, config: GenerateConfig) -> dict[str, Any]:
    """Whether the episode solved its task (an environment's own verdict, else the answer against the gold one) and
    whether it is kept as training data."""
    if episode.success is not None:
        correct = episode.success
        finished = episode.stop_reason == "done"
    else:
        finished = episode.answered
        correct = finished and answers_match(episode.final_answer, episode.task.answer, rel_tol=config.numeric_tolerance)
    clean = finished and episode.parse_errors == 0
    return {"correct": bool(correct), "kept": bool(clean and correct) if config.keep_only_correct else finished}


# ---------------------------------------------------------------------------------------------- the run
class _Outputs:
    """`episodes.jsonl` is the journal; `trajectories.jsonl` holds the kept ones and is re-synced from it."""

    def __init__(self, config: GenerateConfig, tasks: list[Task]):
        self.root = Path(config.output_dir)
        check_same_settings(self.root / CONFIG_FILE, _settings(config))
        self.episodes = ResumableJsonl(self.root / EPISODES_FILE)
        check_resumed_tasks(self.episodes.records, tasks, self.episodes.path)
        self.trajectories = ResumableJsonl(self.root / TRAJECTORIES_FILE)
        written = {record["task_id"] for record in self.trajectories.records}
        for record in self.episodes.records:  # kept episodes journaled just before a kill
            if record["kept"] and record["task_id"] not in written:
                self.trajectories.append(_trajectory_row(record))

    @property
    def done(self) -> set[str]:
        return {record["task_id"] for record in self.episodes.records}

    def write(self, record: dict[str, Any]) -> None:
        self.episodes.append(record)
        if record["kept"]:
            self.trajectories.append(_trajectory_row(record))

    def close(self) -> None:
        self.episodes.close()
        self.trajectories.close()


def _trajectory_row(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("task_id", "question", "answer", "final_answer", "messages", "steps", "first_thought")
    row = {key: record[key] for key in keys}
    if "tools" in record:  # tool-calling episodes: the chat template renders the schemas in training too
        row["tools"] = record["tools"]
    return row


def _settings(config: GenerateConfig) -> dict[str, Any]:
    return config.recorded_settings(exclude=_RESUMABLE_FIELDS)


def generate_trajectories(config: GenerateConfig, backend: GenerationBackend | None = None) -> dict[str, Any]:
    """Run the teacher over the tasks not yet in `output_dir`; return (and write) the summary of all of them.

    `backend` overrides the configured teacher (e.g. a `PolicyBackend` oracle, or a model already in memory). A
    second run on the same `output_dir` while this one runs is refused (`storage.DirectoryInUseError`).
    """
    tasks = load_tasks(config)
    with lock_directory(config.output_dir, "generate"):
        outputs = _Outputs(config, tasks)
        try:
            todo = [task for task in tasks if task.task_id not in outputs.done]
            started = time.monotonic()
            if todo:
                agent = build_agent(config)
                own_backend = backend is None
                backend = build_backend(config) if own_backend else backend
                try:
                    _run(agent, backend, todo, config, outputs, total=len(tasks))
                finally:
                    if own_backend:
                        backend.close()
            summary = summarize(outputs.episodes.records, tasks=len(tasks),
                                seconds=time.monotonic() - started, new_episodes=len(todo))
        finally:
            outputs.close()
        write_json(Path(config.output_dir) / SUMMARY_FILE, summary)
    return summary


def _run(agent: Agent, backend: GenerationBackend, todo: list[Task], config: GenerateConfig, outputs: _Outputs,
         total: int) -> None:
    from tqdm.auto import tqdm

    done_before = total - len(todo)
    kept = sum(record["kept"] for record in outputs.episodes.records)
    desc = f"{config.model_name_or_path} episodes"
    with tqdm(total=total, initial=done_before, desc=desc, disable=not config.show_progress) as progress:
        for episode, thought in _episodes(agent, backend, todo, config):
            record = {**episode.to_record(), "first_thought": thought, **judge(episode, config)}
            outputs.write(record)
            kept += record["kept"]
            progress.update(1)
            finished = progress.n - done_before
            progress.set_postfix(kept=kept, rate=f"{kept / max(progress.n, 1):.0%}", refresh=finished % 8 == 0)


def _episodes(agent: Agent, backend: GenerationBackend, todo: list[Task],
              config: GenerateConfig) -> Iterator[tuple[Episode, str | None]]:
    """Episodes with the first thought they were seeded with; chunked so the CoT pass never delays output long."""
    if not config.first_thought_prefix:
        for episode in agent.run(backend, todo, batch_size=config.batch_size):
            yield episode, None
        return
    chunk = config.batch_size * 8
    for start in range(0, len(todo), chunk):
        tasks = todo[start : start + chunk]
        thoughts = first_thoughts(backend, tasks, config)
        prefixes = {task_id: f"Thought: {thought}" for task_id, thought in thoughts.items()}
        for episode in agent.run(backend, tasks, batch_size=config.batch_size, prefixes=prefixes):
            yield episode, thoughts.get(episode.task.task_id)


def summarize(records: list[dict[str, Any]], *, tasks: int, seconds: float, new_episodes: int) -> dict[str, Any]:
    """Counts and rates over every episode in the output (earlier runs included)."""
    done = len(records)
    stop_reasons = Counter(record["stop_reason"] for record in records)
    return {
        "tasks": tasks,
        "episodes": done,
        "kept": sum(record["kept"] for record in records),
        "correct": sum(record["correct"] for record in records),
        "success_rate": sum(record["correct"] for record in records) / done if done else 0.0,
        "keep_rate": sum(record["kept"] for record in records) / done if done else 0.0,
        "mean_steps": sum(record["steps"] for record in records) / done if done else 0.0,
        "invalid_actions": sum(record.get("invalid_actions", 0) for record in records),
        "parse_errors": sum(record["parse_errors"] for record in records),
        "tool_errors": sum(record["tool_errors"] for record in records),
        "stop_reasons": dict(sorted(stop_reasons.items())),
        "this_run": {
            "episodes": new_episodes,
            "seconds": round(seconds, 3),
            "episodes_per_second": round(new_episodes / seconds, 4) if seconds > 0 and new_episodes else 0.0,
        },
    }
