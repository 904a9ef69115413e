"""What `generate` and `eval` share: the tasks, the agent with its tools, and how models are run.

`AgentTaskConfig` holds those options (a teacher making data and a student being evaluated face the same tasks
and tools). The tasks come from a dataset of questions (answered by a CodeAct or ReAct agent with its search tool)
or from an interactive environment (`environment: alfworld | bfcl | webshop`, which brings its own tasks, format and
step cap); `load_tasks` reads and checks them before any model loads; `build_agent` makes the agent;
`load_backend` turns a model reference into a generation backend.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import yaml
from transformers import BitsAndBytesConfig

from .agent.backends import GenerationBackend, OpenAIBackend, SamplingParams, TransformersBackend
from .agent.loop import Agent, CodeActAgent, EnvironmentAgent, ReActAgent, SelfConsistency, Task
from .agent.retrieval import RetrievalTool
from .data import load_any_dataset
from .deprecation import take_renamed_option
from .envs.base import ENVIRONMENTS, EnvironmentSuite, load_environment
from .quantization import check_4bit_layers_packable
from .task_sets import TASK_SETS, get_task_set, load_task_set

logger = logging.getLogger(__name__)

AGENTS = ("codeact", "react")
DEFAULT_AGENT_STEPS = 5  # question answering; an environment has its own cap
DEFAULT_STEP_TIMEOUT = 60.0
ALIASES_FIELD = "answer_aliases"  # other accepted answers, where a dataset has them (MuSiQue)


@dataclass
class AgentTaskConfig:
    """Options shared by `trl-agent-distill generate` and `eval`: tasks, agent, and how models are loaded."""

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
    task_set: str | None = field(
        default=None,
        metadata={"help": "A benchmark of the Agent Distillation paper (hotpotqa, bamboogle, musique, "
                  "2wikimultihopqa, math500, gsm_hard, aime, olymmath; training sets hotpotqa_train, math_train; "
                  "gsm_symbolic) loaded with its field mapping, the paper's split and rows, and scored as the paper "
                  "scores it. `dataset_name` then names a local copy in that dataset's own schema instead of the hub.",
                  "choices": sorted(TASK_SETS)},
    )
    environment: str | None = field(
        default=None,
        metadata={"help": "An interactive environment that brings its own tasks (split `dataset_split`), agent format "
                  "and step cap instead of a dataset of questions.", "choices": sorted(ENVIRONMENTS)},
    )
    environment_options: dict | None = field(
        default=None,
        metadata={"help": "The environment's own options (e.g. ALFWorld's data_path or generated scene counts), as "
                  "a mapping (JSON on the command line)."},
    )
    step_timeout: float | None = field(
        default=None,
        metadata={"help": f"Seconds one environment step may take before that episode is recorded as an error "
                  f"(default {DEFAULT_STEP_TIMEOUT:g})."},
    )
    # The agent
    agent: str = field(default="codeact", metadata={"help": "Agent format.", "choices": list(AGENTS)})
    retrieval_corpus: str | None = field(
        default=None,
        metadata={"help": "JSONL or `save_to_disk` corpus (id, title, text) for the search tool; none: no tool."},
    )
    retriever: str = field(default="bm25", metadata={"help": "bm25 or dense.", "choices": ["bm25", "dense"]})
    dense_model: str | None = field(default=None, metadata={"help": "sentence-transformers model for dense."})
    dense_index: dict | str | None = field(
        default=None,
        metadata={"help": "The dense retriever's FAISS index: flat (exact; the default), ivfpq (compressed, so 21M "
                  "passages fit on a workstation) or a mapping of FaissIndexConfig fields (kind, nlist, m, nbits, "
                  "nprobe, train_size)."},
    )
    retrieval_top_k: int = field(default=3, metadata={"help": "Documents per search."})
    max_agent_steps: int | None = field(
        default=None,
        metadata={"help": f"Agent steps before an episode ends unanswered (default {DEFAULT_AGENT_STEPS}; in an "
                  "environment, its own cap, e.g. ALFWorld's 50)."},
    )
    max_steps: int | None = field(
        default=None, metadata={"help": "Deprecated name of max_agent_steps (`train`'s max_steps is optimizer steps)."}
    )
    max_new_tokens: int = field(default=512, metadata={"help": "Tokens per agent step."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature; 0 is greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass."})
    batch_size: int = field(default=16, metadata={"help": "Episodes advanced together (one batched call per step)."})
    sandbox_timeout: float = field(default=10.0, metadata={"help": "Seconds one code step may run."})
    task_variable: str | None = field(
        default=None,
        metadata={"help": "CodeAct: also give the code the task text in a variable of this name (e.g. `task`)."},
    )
    # How models run
    dtype: str = field(default="auto", metadata={"help": "Local model dtype: auto, bfloat16, float16, float32."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load local models in 4-bit NF4 (bitsandbytes)."})
    api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the endpoint's API key, if any."}
    )
    request_timeout: float = field(
        default=300.0, metadata={"help": "Seconds before a generation request to a served model gives up."}
    )
    check_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds the start-up check of a served model waits for an answer (tried once), so a server "
                  "that accepts connections but never answers fails at once."},
    )
    numeric_tolerance: float = field(default=1e-4, metadata={"help": "Relative tolerance of numeric answers."})
    seed: int = field(default=42, metadata={"help": "Seed for sampling."})
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar."})

    def __post_init__(self) -> None:
        take_renamed_option(self, "max_steps", "max_agent_steps", "`train`'s max_steps is optimizer steps")
        if self.agent not in AGENTS:
            raise ValueError(f"agent must be one of {AGENTS}, got {self.agent!r}")
        for name in ("max_agent_steps", "max_new_tokens", "batch_size", "retrieval_top_k"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.step_timeout is not None and self.step_timeout <= 0:
            raise ValueError(f"step_timeout must be > 0 seconds, got {self.step_timeout}")
        if self.task_set is not None:
            get_task_set(self.task_set)  # an unknown name fails naming the closest one
            if self.environment is not None:
                raise ValueError("task_set and environment both bring the tasks: set one of them.")
        if self.environment is not None:
            if self.environment not in ENVIRONMENTS:
                load_environment(self.environment)  # fails naming the closest environment
            brought = [name for name in ("dataset_name", "retrieval_corpus", "task_variable") if getattr(self, name)]
            if brought:
                raise ValueError(f"environment {self.environment!r} brings its own tasks and tools: unset {brought}.")
        elif self.environment_options:
            raise ValueError("environment_options are set but no environment is: set `environment`.")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"max_tasks must be >= 1, got {self.max_tasks}")
        if self.task_variable is not None and self.agent != "codeact":
            raise ValueError("task_variable needs agent: codeact (a ReAct agent has no Python sandbox to put it in).")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)

    def suite(self) -> EnvironmentSuite | None:
        """The environment's suite (made once per config: it may generate its tasks), None without one."""
        if self.environment is None:
            return None
        key = (self.environment, repr(sorted((self.environment_options or {}).items())))
        cached = getattr(self, "_suite", None)
        if cached is None or cached[0] != key:
            cached = (key, load_environment(self.environment, self.environment_options))
            object.__setattr__(self, "_suite", cached)
        return cached[1]

    def recorded_settings(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The settings a run records to refuse resuming with others: the options minus `exclude`, with the step
        cap of question answering written out (as earlier releases recorded it)."""
        settings = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in exclude}
        if "max_agent_steps" in settings and settings["max_agent_steps"] is None and self.environment is None:
            settings["max_agent_steps"] = DEFAULT_AGENT_STEPS
        return settings


def read_task_recipe(path: str | os.PathLike, source: str = "task recipe") -> dict[str, Any]:
    """The options of a YAML task recipe (those of `AgentTaskConfig`), checked by `task_config_from`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{source}: the task recipe {path} does not exist.")
    settings = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(settings, Mapping):
        raise ValueError(f"{source}: the task recipe {path} must be a YAML mapping of option: value.")
    return dict(settings)


def task_config_from(settings: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None,
                     source: str = "settings") -> AgentTaskConfig:
    """An `AgentTaskConfig` from a mapping of its options over `defaults`; an unknown key fails, naming it and the
    closest option."""
    own = [f.name for f in fields(AgentTaskConfig)]
    for key in settings:
        if key not in own:
            close = difflib.get_close_matches(str(key), own, n=1, cutoff=0.75)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{source}: unknown task option '{key}'.{hint} The options are those of "
                             "`trl-agent-distill generate --help` about tasks, the agent, its tools and sampling.")
    try:
        return AgentTaskConfig(**{**(defaults or {}), **settings})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None


# ---------------------------------------------------------------------------------------------- tasks
def load_tasks(config: AgentTaskConfig) -> list[Task]:
    """The configured tasks, checked before any model loads: missing fields and duplicate ids name the culprit; an
    environment's tasks of `dataset_split` (a missing engine or data directory fails here too)."""
    suite = config.suite()
    if suite is not None:
        tasks = suite.tasks(config.dataset_split)
        return tasks[: config.max_tasks] if config.max_tasks is not None else tasks
    if config.task_set is not None:
        # The paper's split and rows; its own seed draws the sets the paper sampled, whatever the sampling seed.
        rows = load_task_set(config.task_set, source=config.dataset_name, max_tasks=config.max_tasks)
        mapped = replace(config, question_field="question", answer_field="answer", id_field="id", max_tasks=None)
        return tasks_from_rows(rows, mapped, source=f"task set {config.task_set!r}")
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


def tasks_from_rows(rows, config: AgentTaskConfig, *, source: str) -> list[Task]:
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
        aliases = tuple(row.get(ALIASES_FIELD) or ()) if ALIASES_FIELD in columns else ()
        tasks.append(Task(task_id=task_id, question=question, answer=row[config.answer_field], aliases=aliases))
    return tasks


# ---------------------------------------------------------------------------------------------- chain of thought
# One prompt for the first-thought prefix and for CoT evaluation: paragraphs (the prefix takes the first), and an
# answer tag the evaluation can find.
COT_SYSTEM_PROMPT = (
    "Answer the question. Reason step by step in short paragraphs separated by blank lines, then give the final "
    "answer between <answer> and </answer>."
)


def cot_messages(question: str) -> list[dict[str, str]]:
    """The conversation asking for a chain-of-thought answer without tools."""
    return [{"role": "system", "content": COT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


# ---------------------------------------------------------------------------------------------- agents and models
def build_agent(config: AgentTaskConfig, self_consistency: SelfConsistency | Mapping[str, Any] | None = None) -> Agent:
    """The configured agent: in its environment, or with its search tool (`web_search` for CodeAct, `Search` for
    ReAct)."""
    suite = config.suite()
    if suite is not None:
        return EnvironmentAgent(suite, max_steps=config.max_agent_steps or suite.max_steps, sampling=config.sampling,
                                step_timeout=config.step_timeout or DEFAULT_STEP_TIMEOUT,
                                self_consistency=self_consistency)
    max_steps = config.max_agent_steps or DEFAULT_AGENT_STEPS
    tools = {}
    if config.retrieval_corpus:
        name = "web_search" if config.agent == "codeact" else "Search"
        tools[name] = RetrievalTool(
            config.retrieval_corpus, top_k=config.retrieval_top_k, retriever=config.retriever,
            dense_model=config.dense_model, name=name,
            **({"dense_index": config.dense_index} if config.dense_index is not None else {}),
        )
    if config.agent == "codeact":
        return CodeActAgent(tools, max_steps=max_steps, sampling=config.sampling,
                            sandbox_options={"timeout": config.sandbox_timeout}, self_consistency=self_consistency,
                            task_variable=config.task_variable)
    return ReActAgent(tools, max_steps=max_steps, sampling=config.sampling, self_consistency=self_consistency)


def load_backend(model: str, config: AgentTaskConfig, *, base_url: str | None = None) -> GenerationBackend:
    """A backend for `model`: served at `base_url` (OpenAI-compatible), else a hub name, a local directory or a LoRA
    adapter directory loaded here with transformers (4-bit with `load_in_4bit`)."""
    if base_url:
        backend = OpenAIBackend(
            base_url, model, api_key=os.environ.get(config.api_key_env), request_timeout=config.request_timeout,
            check_timeout=config.check_timeout,
            max_concurrency=config.batch_size,
        )
        backend.check()
        return backend
    torch.manual_seed(config.seed)
    model_kwargs: dict[str, Any] = {}
    if config.load_in_4bit:
        model_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32,
        )
    backend = TransformersBackend.from_pretrained(model, dtype=config.dtype, batch_size=config.batch_size, **model_kwargs)
    check_4bit_layers_packable(backend.model, model)
    return backend


def check_resumed_tasks(records: list[dict[str, Any]], tasks: list[Task], journal: os.PathLike, *,
                        answer_key: str = "answer") -> None:
    """Refuse to resume when a task already done in `journal` has another question or gold answer in the task file.

    Resumption skips task ids; without this check an edited task file would keep the old tasks' results.
    """
    current = {task.task_id: task for task in tasks}
    for record in records:
        task = current.get(record["task_id"])
        if task is None:
            continue  # outside this run's `max_tasks`: kept, not compared
        answer = None if task.answer is None else str(task.answer)
        for name, was, now in (("question", record["question"], task.question), ("answer", record[answer_key], answer)):
            if was != now:
                raise ValueError(
                    f"Task {task.task_id!r} changed since {journal} was written (its {name} was {was!r:.80}, is "
                    f"{now!r:.80}); resuming would keep results for the old task. Use a new output_dir, or delete "
                    "the old one to start over."
                )
