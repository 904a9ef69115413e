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

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .agent.backends import GenerationBackend, GenerationRequest, OpenAIBackend, SamplingParams, TransformersBackend
from .agent.loop import Agent, CodeActAgent, Episode, ReActAgent, Task
from .jsonl import ResumableJsonl
from .metrics import answers_match

logger = logging.getLogger(__name__)

AGENTS = ("codeact", "react")
EPISODES_FILE, TRAJECTORIES_FILE, SUMMARY_FILE, CONFIG_FILE = (
    "episodes.jsonl", "trajectories.jsonl", "summary.json", "generate_config.json"
)
# Settings that may change between a run and its resumption without changing what an episode is.
_RESUMABLE_FIELDS = ("output_dir", "batch_size", "max_tasks", "show_progress", "request_timeout")
COT_SYSTEM_PROMPT = (
    "Answer the question. Reason step by step in short paragraphs separated by blank lines, then state the final "
    "answer."
)


@dataclass
class GenerateConfig:
    """Options of `trl-agent-distill generate`: the teacher, the tasks, the agent and the filter."""

    # The teacher
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
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key, if any."}
    )
    request_timeout: float = field(default=300.0, metadata={"help": "Seconds before an HTTP request gives up."})
    dtype: str = field(default="auto", metadata={"help": "Local teacher dtype: auto, bfloat16, float16, float32."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the local teacher in 4-bit NF4 (bitsandbytes)."})
    # The tasks
    dataset_name: str | None = field(
        default=None, metadata={"help": "Tasks: hub dataset, `save_to_disk` directory, or .jsonl/.json/.parquet/.csv."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split holding the tasks."})
    question_field: str = field(default="question", metadata={"help": "Column with the question."})
    answer_field: str = field(default="answer", metadata={"help": "Column with the gold answer."})
    id_field: str | None = field(
        default="id", metadata={"help": "Column with a unique task id; without it the row number is the id."}
    )
    max_tasks: int | None = field(default=None, metadata={"help": "Use only the first N tasks."})
    # The agent
    agent: str = field(default="codeact", metadata={"help": "Agent format.", "choices": list(AGENTS)})
    retrieval_corpus: str | None = field(
        default=None,
        metadata={"help": "JSONL or `save_to_disk` corpus (id, title, text) for the search tool; none: no tool."},
    )
    retriever: str = field(default="bm25", metadata={"help": "bm25 or dense.", "choices": ["bm25", "dense"]})
    dense_model: str | None = field(default=None, metadata={"help": "sentence-transformers model for dense."})
    retrieval_top_k: int = field(default=3, metadata={"help": "Documents per search."})
    max_steps: int = field(default=5, metadata={"help": "Agent steps before an episode ends unanswered."})
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens per agent step."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    batch_size: int = field(default=16, metadata={"help": "Episodes advanced together (one batched call per step)."})
    sandbox_timeout: float = field(default=10.0, metadata={"help": "Seconds one code step may run."})
    first_thought_prefix: bool = field(
        default=False,
        metadata={"help": "Ask for a chain-of-thought answer first and force its first paragraph as the start of "
                  "the first agent step."},
    )
    cot_max_new_tokens: int = field(default=256, metadata={"help": "Tokens for the chain-of-thought answer."})
    # The filter and the output
    keep_only_correct: bool = field(
        default=True,
        metadata={"help": "Keep solved tasks only (also dropping parse errors and max-step episodes), as the paper."},
    )
    numeric_tolerance: float = field(default=1e-4, metadata={"help": "Relative tolerance of numeric answers."})
    output_dir: str = field(default="outputs/trajectories", metadata={"help": "Where the JSONL files go."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        if self.agent not in AGENTS:
            raise ValueError(f"agent must be one of {AGENTS}, got {self.agent!r}")
        for name in ("max_steps", "max_new_tokens", "batch_size", "retrieval_top_k", "cot_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


# ---------------------------------------------------------------------------------------------- tasks
def load_tasks(config: GenerateConfig) -> list[Task]:
    """The configured tasks, checked before any model loads: missing fields and duplicate ids name the culprit."""
    import datasets

    from .data import load_any_dataset

    if not config.dataset_name:
        raise ValueError("No tasks: set `dataset_name` (a hub dataset or a local .jsonl file with questions).")
    loaded = load_any_dataset(config.dataset_name, config.dataset_config, local_split=config.dataset_split)
    if isinstance(loaded, datasets.DatasetDict):
        if config.dataset_split not in loaded:
            raise ValueError(
                f"{config.dataset_name} has no split '{config.dataset_split}' (it has {list(loaded)}); set "
                "dataset_split."
            )
        loaded = loaded[config.dataset_split]
    return tasks_from_rows(loaded, config, source=config.dataset_name)


def tasks_from_rows(rows, config: GenerateConfig, *, source: str) -> list[Task]:
    """`Task`s from a `datasets.Dataset` (or a list of dicts) using the configured field names."""
    columns = list(rows.column_names) if hasattr(rows, "column_names") else sorted({k for row in rows for k in row})
    for role, name in (("question_field", config.question_field), ("answer_field", config.answer_field)):
        if name not in columns:
            raise ValueError(f"{source} has no column '{name}' ({role}); its columns are {columns}. Set {role}.")
    use_ids = config.id_field is not None and config.id_field in columns
    if config.id_field is not None and not use_ids:
        logger.info("%s has no '%s' column; task ids are row numbers.", source, config.id_field)
    if config.max_tasks is not None:
        rows = rows.select(range(min(config.max_tasks, len(rows)))) if hasattr(rows, "select") else rows[: config.max_tasks]
    tasks, seen = [], {}
    for index, row in enumerate(rows):
        question = row[config.question_field]
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{source}, row {index}: '{config.question_field}' is empty or not text ({question!r}).")
        task_id = str(row[config.id_field]) if use_ids else str(index)
        if task_id in seen:
            raise ValueError(
                f"{source}: rows {seen[task_id]} and {index} share the id {task_id!r} in '{config.id_field}'; ids "
                "must be unique to resume runs. Fix the data or set id_field: null to use row numbers."
            )
        seen[task_id] = index
        tasks.append(Task(task_id=task_id, question=question, answer=row[config.answer_field]))
    return tasks


# ---------------------------------------------------------------------------------------------- building blocks
def build_backend(config: GenerateConfig) -> GenerationBackend:
    """The teacher: an HTTP endpoint when `base_url` is set, else a local transformers model."""
    if not config.model_name_or_path:
        raise ValueError("No teacher: set `model_name_or_path` (local/hub model, or the model served at base_url).")
    if config.base_url:
        backend = OpenAIBackend(
            config.base_url, config.model_name_or_path, api_key=os.environ.get(config.api_key_env),
            timeout=config.request_timeout, max_concurrency=config.batch_size,
        )
        backend.check()
        return backend
    import torch

    torch.manual_seed(config.seed)
    model_kwargs: dict[str, Any] = {}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    return TransformersBackend.from_pretrained(
        config.model_name_or_path, dtype=config.dtype, batch_size=config.batch_size, **model_kwargs
    )


def build_agent(config: GenerateConfig) -> Agent:
    """The configured agent with its search tool (`web_search` for CodeAct, `Search` for ReAct)."""
    tools = {}
    if config.retrieval_corpus:
        from .agent.retrieval import RetrievalTool

        name = "web_search" if config.agent == "codeact" else "Search"
        tools[name] = RetrievalTool(
            config.retrieval_corpus, top_k=config.retrieval_top_k, retriever=config.retriever,
            dense_model=config.dense_model, name=name,
        )
    if config.agent == "codeact":
        return CodeActAgent(tools, max_steps=config.max_steps, sampling=config.sampling,
                            sandbox_options={"timeout": config.sandbox_timeout})
    return ReActAgent(tools, max_steps=config.max_steps, sampling=config.sampling)


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
    requests = [
        GenerationRequest(
            messages=[{"role": "system", "content": COT_SYSTEM_PROMPT}, {"role": "user", "content": task.question}],
            sampling=sampling,
        )
        for task in tasks
    ]
    thoughts = {task.task_id: first_paragraph(replies[0].text) for task, replies in zip(tasks, backend.generate(requests))}
    return {task_id: thought for task_id, thought in thoughts.items() if thought}


def judge(episode: Episode, config: GenerateConfig) -> dict[str, Any]:
    """Whether the episode solved its task and whether it is kept as training data."""
    correct = episode.answered and answers_match(episode.final_answer, episode.task.answer, rel_tol=config.numeric_tolerance)
    clean = episode.answered and episode.parse_errors == 0
    return {"correct": bool(correct), "kept": bool(clean and correct) if config.keep_only_correct else episode.answered}


# ---------------------------------------------------------------------------------------------- the run
class _Outputs:
    """`episodes.jsonl` is the journal; `trajectories.jsonl` holds the kept ones and is re-synced from it."""

    def __init__(self, config: GenerateConfig):
        self.root = Path(config.output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        _check_same_settings(self.root / CONFIG_FILE, config)
        self.episodes = ResumableJsonl(self.root / EPISODES_FILE)
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
    return {key: record[key] for key in keys}


def _check_same_settings(path: Path, config: GenerateConfig) -> None:
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_FIELDS}
    if path.exists():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in changed)
            raise ValueError(
                f"{path.parent} holds a run with other settings ({details}); resuming would mix them. Use a new "
                "output_dir, or delete the old one to start over."
            )
    else:
        path.write_text(json.dumps(settings, indent=2))


def generate_trajectories(config: GenerateConfig, backend: GenerationBackend | None = None) -> dict[str, Any]:
    """Run the teacher over the tasks not yet in `output_dir`; return (and write) the summary of all of them.

    `backend` overrides the configured teacher (e.g. a `PolicyBackend` oracle, or a model already in memory).
    """
    tasks = load_tasks(config)
    outputs = _Outputs(config)
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
    (Path(config.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _run(agent: Agent, backend: GenerationBackend, todo: list[Task], config: GenerateConfig, outputs: _Outputs,
         total: int) -> None:
    from tqdm.auto import tqdm

    done_before = total - len(todo)
    kept = sum(record["kept"] for record in outputs.episodes.records)
    with tqdm(total=total, initial=done_before, desc="episodes", disable=not config.show_progress) as progress:
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
        "parse_errors": sum(record["parse_errors"] for record in records),
        "tool_errors": sum(record["tool_errors"] for record in records),
        "stop_reasons": dict(sorted(stop_reasons.items())),
        "this_run": {
            "episodes": new_episodes,
            "seconds": round(seconds, 3),
            "episodes_per_second": round(new_episodes / seconds, 4) if seconds > 0 and new_episodes else 0.0,
        },
    }
