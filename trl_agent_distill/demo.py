"""The toy-world pipeline behind `make demo`: a teacher that solves tasks with tools, students distilled from it in
four ways, and a table comparing them, on CPU in minutes with nothing downloaded.

    trl-agent-distill demo --config recipes/toy_demo.yaml [--stages eval report]

Stages, in order; each reads what the ones before it wrote into `output_dir`, so any of them can be re-run alone
(`--stages`) and each starts by clearing its own outputs (results are never mixed across runs):

1. `world`: a `ToyWorld` (corpus, train / test tasks about disjoint towns), the oracle's CodeAct trajectories on
   the training tasks through the real agent loop, and its chain-of-thought answers (plan, facts, arithmetic).
2. `teacher`: a BPE tokenizer trained on the world's text; a teacher built from a config and trained by SFT on the
   oracle's trajectories and CoT answers; an untrained student of about a quarter of its size.
3. `generate`: the teacher acts as an agent on the training tasks (`generate`: first-thought prefix from its own CoT
   answer, only correct trajectories kept). These are the students' data.
4. `distill`: one student per method, all from the same initial weights for the same number of steps:
   `sft` (imitation of the teacher's trajectories, the Agent Distillation paper), `token_kd` (KL on every trained
   token, `segmentation_style: none`), `sad` (KL per REASON / ACT span, each span kind averaged on its own), and
   `cot` (the CoT answers, no tools). Not in the default run: `sad_lmbda0.5` / `sad_lmbda1`, SAD whose batches,
   after the first half of the steps, are the student's own episodes (graded by the teacher) with that probability.
5. `eval`: teacher and agent students on the test split, greedy and with self-consistency; the CoT student and the
   teacher also answer without tools.
6. `report`: `report.md`, `report.json`, loss curves and success-rate bars; the table is printed.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import DatasetMixtureConfig, ModelConfig

from .agent.backends import PolicyBackend
from .config import AgentDistillConfig
from .deprecation import take_renamed_option
from .envs.toy import ToyWorld
from .evaluation import EvalConfig, evaluate, results_table
from .generation import GenerateConfig, generate_trajectories
from .jsonl import read_jsonl, write_jsonl
from .report import load_log_history, write_report
from .tasks import cot_messages
from .tiny import build_tiny_model, train_tokenizer
from .training import AgentDistillScriptArguments, format_span_losses, train

STAGES = ("world", "teacher", "generate", "distill", "eval", "report")


@dataclass(frozen=True)
class StudentMethod:
    """How one student is distilled: its training data and the `train` options that make the method."""

    description: str
    data: str  # "trajectories" (the teacher's, from `generate`) or "cot" (CoT answers, no tools)
    options: dict[str, Any]
    mode: str = "agent"  # how it is evaluated

    @property
    def uses_teacher(self) -> bool:
        return self.options.get("lambda_reason", 1.0) > 0 or self.options.get("lambda_act", 1.0) > 0


SFT_OPTIONS = {"lambda_reason": 0.0, "lambda_act": 0.0, "lambda_ce": 1.0, "segmentation_style": "none"}
_SAD_OPTIONS = {"segmentation_style": "codeact", "lambda_reason": 1.0, "lambda_act": 1.0, "span_normalization": "span"}
STUDENT_METHODS: dict[str, StudentMethod] = {
    "sft": StudentMethod("SFT on the teacher's trajectories (Agent Distillation)", "trajectories", SFT_OPTIONS),
    "token_kd": StudentMethod(
        "token-level KD: forward KL on every trained token, REASON and ACT not told apart", "trajectories",
        {"segmentation_style": "none", "lambda_reason": 0.0, "lambda_act": 1.0},
    ),
    "sad": StudentMethod(
        "SAD: forward KL on REASON and on ACT spans, each kind averaged on its own, equal weights", "trajectories",
        _SAD_OPTIONS,
    ),
    "cot": StudentMethod("SFT on chain-of-thought answers, no tools", "cot", SFT_OPTIONS, mode="cot"),
    # On-policy SAD (not in the default run: rollouts cost CPU time). The first half of the steps is offline SAD
    # (`on_policy_start_step`), because a random student's episodes are noise that costs full-length generations;
    # then, with probability lmbda, a batch is the student's own episodes in the toy world (tools run for real),
    # graded span by span. One run, one learning-rate schedule, the same steps as the others.
    "sad_lmbda0.5": StudentMethod(
        "SAD, on-policy half the time after the first half of the steps: the student's own episodes graded by the "
        "teacher", "trajectories", {**_SAD_OPTIONS, "lmbda": 0.5},
    ),
    "sad_lmbda1": StudentMethod(
        "SAD, on-policy always after the first half of the steps", "trajectories", {**_SAD_OPTIONS, "lmbda": 1.0},
    ),
}


@dataclass
class DemoConfig:
    """Options of `trl-agent-distill demo`; the defaults are the `make demo` run (about 10 minutes on 2 cores)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Where every stage writes."})
    stages: list[str] = field(
        default_factory=lambda: list(STAGES),
        metadata={"help": "Stages to run, in pipeline order.", "choices": list(STAGES)},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the world, the models and the training runs."})
    # The world: the toy world's towns, or an interactive environment
    environment: str | None = field(
        default=None,
        metadata={"help": "Run the pipeline in an interactive environment (e.g. alfworld: generated scenes, the "
                  "engine's planner as the oracle) instead of the toy world; no CoT student there."},
    )
    environment_options: dict | None = field(
        default=None, metadata={"help": "The environment's options (e.g. ALFWorld's scene counts and seed)."}
    )
    num_towns: int = field(default=240, metadata={"help": "Towns in the corpus (a quarter are test towns)."})
    train_tasks: int = field(default=400, metadata={"help": "Training tasks (oracle trajectories for the teacher)."})
    test_tasks: int = field(default=50, metadata={"help": "Test tasks, about towns never seen in training."})
    # The models: tiny ones built from configs, or a real pretrained teacher and students pruned from it
    teacher_model: str | None = field(
        default=None,
        metadata={"help": "A pretrained model to fine-tune into the teacher (hub name, directory, GGUF file or "
                  "`package:file.gguf`) instead of a tiny model built from a config; its tokenizer is used."},
    )
    student_keep_fraction: float | None = field(
        default=None,
        metadata={"help": "With teacher_model: students are that model with this fraction of its layers kept "
                  "(`init-student`), instead of tiny models built from a config."},
    )
    vocab_size: int = field(default=1024, metadata={"help": "Size of the BPE tokenizer trained on the world."})
    teacher_hidden_size: int = field(default=128, metadata={"help": "Teacher width (Qwen2 architecture)."})
    teacher_layers: int = field(default=4, metadata={"help": "Teacher depth."})
    student_hidden_size: int = field(default=64, metadata={"help": "Student width."})
    student_layers: int = field(default=3, metadata={"help": "Student depth."})
    teacher_steps: int = field(default=400, metadata={"help": "SFT steps that make the teacher."})
    teacher_cot_answers: int = field(
        default=100,
        metadata={"help": "CoT answers among the teacher's SFT data (its first-thought prefixes come from CoT)."},
    )
    # Distillation
    generate_tasks: int = field(default=200, metadata={"help": "Training tasks the teacher runs to make data."})
    students: list[str] = field(
        default_factory=lambda: ["sft", "token_kd", "sad", "cot"],
        metadata={"help": "Distillation methods, one student each.", "choices": list(STUDENT_METHODS)},
    )
    student_steps: int = field(default=300, metadata={"help": "Optimizer steps of every student."})
    student_seeds: list[int] = field(
        default_factory=list,
        metadata={"help": "One student per method and seed (re-initialized, data re-shuffled); the report gives each "
                  "method's mean success and its 95 percent interval over the seeds. Empty: one student per method, `seed`."},
    )
    max_length: int = field(default=1024, metadata={"help": "Tokens per training sequence (longer ones are cut)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Trajectories per step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak learning rate of every run."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule of every run."})
    # Agents
    max_agent_steps: int = field(default=4, metadata={"help": "Agent steps before an episode ends unanswered."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Deprecated name of max_agent_steps (the students' steps: student_steps)."}
    )
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per agent step."})
    self_consistency: int = field(default=4, metadata={"help": "Candidates per step in the self-consistent setting."})
    batch_size: int = field(default=25, metadata={"help": "Episodes advanced together."})
    show_progress: bool = field(default=True, metadata={"help": "Progress bars."})

    def __post_init__(self) -> None:
        take_renamed_option(self, "max_steps", "max_agent_steps", "the students' optimizer steps are student_steps")
        for name in self.stages:
            if name not in STAGES:
                raise ValueError(f"stages: unknown stage {name!r}; choose among {list(STAGES)}.")
        for name in self.students:
            if name not in STUDENT_METHODS:
                raise ValueError(f"students: unknown method {name!r}; choose among {list(STUDENT_METHODS)}.")
        for name in ("num_towns", "train_tasks", "test_tasks", "teacher_steps", "student_steps", "generate_tasks",
                     "max_agent_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.environment is not None:
            untaught = [name for name in self.students if STUDENT_METHODS[name].data == "cot"]
            if untaught:
                raise ValueError(f"students {untaught} learn chain-of-thought answers to questions, which an "
                                 f"environment ({self.environment}) does not have: leave them out.")
        if self.student_keep_fraction is not None:
            if self.teacher_model is None:
                raise ValueError("student_keep_fraction prunes the layers of teacher_model: set teacher_model.")
            if not 0 < self.student_keep_fraction <= 1:
                raise ValueError(f"student_keep_fraction must be in (0, 1], got {self.student_keep_fraction}")
        if len(set(self.student_seeds)) != len(self.student_seeds):
            raise ValueError(f"student_seeds has repeats: {self.student_seeds}")
        if self.self_consistency == 1 or self.self_consistency < 0:
            raise ValueError(f"self_consistency is 0 (off) or N >= 2 candidates, got {self.self_consistency}")

    # Where each stage writes.
    @property
    def root(self) -> Path:
        return Path(self.output_dir)

    @property
    def seeds(self) -> list[int | None]:
        """The students' seeds; None is the single student of `seed`."""
        return list(self.student_seeds) or [None]

    def student_label(self, method: str, seed: int | None) -> str:
        return method if seed is None else f"{method}-seed{seed}"

    def student_path(self, method: str, seed: int | None) -> Path:
        return self.path("students") / self.student_label(method, seed)

    def student_init_path(self, seed: int | None) -> Path:
        """Pruned students all start from the same weights; tiny students are re-initialized per seed."""
        if seed is None or self.student_keep_fraction is not None:
            return self.path("student_init")
        return self.path("student_init").with_name(f"student_init-seed{seed}")

    def path(self, name: str) -> Path:
        return self.root / {
            "world": "world", "oracle": "oracle", "oracle_test": "oracle_test", "cot_data": "world/cot_train.jsonl",
            "teacher_data": "models/teacher_sft.jsonl", "teacher_init": "models/teacher_init",
            "student_init": "models/student_init", "teacher": "models/teacher", "trajectories": "teacher_trajectories",
            "students": "students", "eval": "eval",
        }[name]


# ---------------------------------------------------------------------------------------------- the stages
def build_world(config: DemoConfig) -> dict[str, Any]:
    """Write the world (corpus, tasks), the oracle's trajectories and its CoT answers on the training tasks; in an
    environment, its tasks and its expert's episodes (on the held-out test tasks too, the reference of the CoT
    match rate)."""
    _clear(config.path("world"), config.path("oracle"), config.path("oracle_test"))
    if config.environment is not None:
        return _build_environment_world(config)
    world = ToyWorld.generate(config.seed, num_towns=config.num_towns, train_tasks=config.train_tasks,
                              test_tasks=config.test_tasks)
    world.save(config.path("world"))
    summary = generate_trajectories(
        _agent_task_config(config, GenerateConfig, dataset_split="train",
                           model_name_or_path="oracle", output_dir=str(config.path("oracle"))),
        backend=PolicyBackend(world.oracle),
    )
    cot_rows = [
        {"messages": [*cot_messages(task.question), {"role": "assistant", "content": world.cot_answer(task)}],
         "task_id": task.id, "answer": task.answer}
        for task in world.tasks("train")
    ]
    write_jsonl(config.path("cot_data"), cot_rows)
    return {"towns": len(world.towns), "oracle_solved": summary["correct"], "oracle_episodes": summary["episodes"]}


def _build_environment_world(config: DemoConfig) -> dict[str, Any]:
    probe = _agent_task_config(config, GenerateConfig, dataset_split="train", model_name_or_path="expert",
                               output_dir=str(config.path("oracle")))
    expert = probe.suite().expert()
    if expert is None:
        raise ValueError(f"environment {config.environment!r} has no expert to make the teacher's data.")
    facts = {}
    for split, output in (("train", "oracle"), ("test", "oracle_test")):
        summary = generate_trajectories(
            _agent_task_config(config, GenerateConfig, dataset_split=split, model_name_or_path="expert",
                               output_dir=str(config.path(output))),
            backend=PolicyBackend(expert),
        )
        facts[f"expert_solved_{split}"] = f"{summary['correct']}/{summary['episodes']}"
        if summary["kept"] == 0:
            raise RuntimeError(f"The expert won none of the {summary['episodes']} {split} tasks in "
                               f"{config.max_agent_steps} steps, so there is nothing to learn from; raise "
                               f"max_agent_steps (see {config.path(output) / 'episodes.jsonl'}).")
    config.path("world").mkdir(parents=True)
    write_jsonl(config.path("cot_data"), [])  # no chain-of-thought answers in an environment
    return facts


def build_teacher(config: DemoConfig) -> dict[str, Any]:
    """Write the initial models (a tokenizer trained on the world and tiny models, or the pretrained teacher_model and
    students pruned from it) and make the teacher by SFT on the oracle's data."""
    _need(config.path("cot_data"), "world")
    _clear(config.path("teacher_init"), config.path("teacher"), *{config.student_init_path(s) for s in config.seeds})
    agent_rows = read_jsonl(config.path("oracle") / "trajectories.jsonl")
    cot_rows = read_jsonl(config.path("cot_data"))[: config.teacher_cot_answers]
    rows = [{"messages": row["messages"]} for row in agent_rows + cot_rows]
    write_jsonl(config.path("teacher_data"), rows)
    sizes = _pretrained_models(config) if config.teacher_model else _tiny_models(config, rows)
    _train(config, model=config.path("teacher_init"), data=config.path("teacher_data"),
           output=config.path("teacher"), steps=config.teacher_steps, options=SFT_OPTIONS)
    return sizes


def _tiny_models(config: DemoConfig, rows: list[dict[str, Any]]) -> dict[str, Any]:
    corpus_path = config.path("world") / "corpus.jsonl"
    corpus = read_jsonl(corpus_path) if corpus_path.is_file() else []  # an environment has no corpus
    texts = [doc["text"] for doc in corpus] + [message["content"] for row in rows for message in row["messages"]]
    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    models = [("teacher_init", config.path("teacher_init"), config.teacher_hidden_size, config.teacher_layers,
               config.seed)]
    models += [("student_init", config.student_init_path(seed), config.student_hidden_size, config.student_layers,
                config.seed + 1 + (seed or 0)) for seed in config.seeds]
    sizes = {}
    for name, path, hidden, layers, seed in models:
        model = build_tiny_model(tokenizer, family="qwen2", hidden_size=hidden, num_layers=layers,
                                 num_heads=max(1, hidden // 32), seed=seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        sizes[name.removesuffix("_init") + "_parameters"] = model.num_parameters()
    return sizes


def _pretrained_models(config: DemoConfig) -> dict[str, Any]:
    """The teacher_model as a directory, and the students: its layers pruned, or tiny models with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from .model_refs import resolve_model
    from .student_init import init_student

    source = Path(resolve_model(config.teacher_model))
    shutil.copytree(source, config.path("teacher_init"))
    sizes = {"teacher_layers": AutoConfig.from_pretrained(source).num_hidden_layers}
    if config.student_keep_fraction is not None:
        init_student(source, config.path("student_init"), fraction=config.student_keep_fraction)
        student = json.loads((config.path("student_init") / "config.json").read_text())
        sizes["student_layers"] = student["num_hidden_layers"]
        return sizes
    tokenizer = AutoTokenizer.from_pretrained(source)
    for seed in config.seeds:
        model = build_tiny_model(tokenizer, family="qwen2", hidden_size=config.student_hidden_size,
                                 num_layers=config.student_layers, num_heads=max(1, config.student_hidden_size // 32),
                                 seed=config.seed + 1 + (seed or 0))
        model.save_pretrained(config.student_init_path(seed))
        tokenizer.save_pretrained(config.student_init_path(seed))
        sizes["student_parameters"] = model.num_parameters()
    return sizes


def generate_data(config: DemoConfig) -> dict[str, Any]:
    """The teacher, as an agent with its first-thought prefix, on the training tasks; correct trajectories kept."""
    _need(config.path("teacher") / "config.json", "teacher")
    _clear(config.path("trajectories"))
    summary = generate_trajectories(_agent_task_config(
        config, GenerateConfig, dataset_split="train",
        max_tasks=config.generate_tasks, model_name_or_path=str(config.path("teacher")),
        first_thought_prefix=config.environment is None, cot_max_new_tokens=48,
        output_dir=str(config.path("trajectories")),
    ))
    if summary["kept"] == 0:
        raise RuntimeError(
            f"The teacher solved none of its {summary['episodes']} training tasks, so there is nothing to distill; "
            f"see {config.path('trajectories') / 'episodes.jsonl'} and give it more teacher_steps."
        )
    return {key: summary[key] for key in ("episodes", "kept", "success_rate", "mean_steps", "parse_errors")}


def distill_students(config: DemoConfig) -> dict[str, Any]:
    """One student per method (and seed), from the same initial weights, for the same number of steps."""
    data = {"trajectories": config.path("trajectories") / "trajectories.jsonl", "cot": config.path("cot_data")}
    for seed in config.seeds:
        _need(config.student_init_path(seed) / "config.json", "teacher")
    if any(STUDENT_METHODS[name].data == "trajectories" for name in config.students):
        _need(data["trajectories"], "generate")
    seconds = {}
    for name in config.students:
        method = STUDENT_METHODS[name]
        options = dict(method.options)
        if options.get("segmentation_style") not in (None, "none"):  # SAD's spans, as the agents' format draws them
            options["segmentation_style"] = _segmentation_style(config)
        if options.get("lmbda", 0) > 0:  # the student acts on the training tasks, as the teacher did
            options.update(rollout=_agent_settings(config, "train"), on_policy_start_step=config.student_steps // 2)
        for seed in config.seeds:
            output = config.student_path(name, seed)
            _clear(output)
            started = time.monotonic()
            _train(config, model=config.student_init_path(seed), data=data[method.data], output=output,
                   steps=config.student_steps, options=options,
                   teacher=config.path("teacher") if method.uses_teacher else None,
                   seed=config.seed if seed is None else seed)
            seconds[config.student_label(name, seed)] = round(time.monotonic() - started, 1)
    per_step = {name: round(value / config.student_steps, 3) for name, value in seconds.items()}
    return {"seconds": seconds, "seconds_per_step": per_step}


def evaluate_models(config: DemoConfig) -> dict[str, Any]:
    """Agents (greedy and self-consistent) and tool-free CoT answers on the test split, as one evaluation."""
    students = {}  # label -> (method, reference)
    for name in config.students:
        for seed in config.seeds:
            path = _need(config.student_path(name, seed) / "config.json", "distill").parent
            students[config.student_label(name, seed)] = (name, f"{config.student_label(name, seed)}={path}")
    _clear(config.path("eval"))
    teacher = f"teacher={config.path('teacher')}"
    agents = [teacher] + [ref for name, ref in students.values() if STUDENT_METHODS[name].mode == "agent"]
    answerers = [teacher] + [ref for name, ref in students.values() if STUDENT_METHODS[name].mode == "cot"]
    runs, tasks = [], 0
    agent_settings = [0, config.self_consistency] if config.self_consistency else [0]
    modes = (("agent", agents),) if config.environment else (("agent", agents), ("cot", answerers))
    for mode, models in modes:
        result = evaluate(_agent_task_config(
            config, EvalConfig, models=models, modes=[mode], self_consistency=agent_settings,
            dataset_split="test", cot_max_new_tokens=128, output_dir=str(config.path("eval") / mode),
            # SAD's CoT match rate against the expert's own episodes on the test tasks
            reference_episodes=str(config.path("oracle_test") / "episodes.jsonl") if config.environment else None,
        ))
        runs += result["runs"]
        tasks = result["tasks"]
    where = f"{config.environment}'s test split" if config.environment else "the toy world's test split"
    evaluation = {"tasks": tasks, "dataset": where, "runs": runs,
                  "methods": {label: method for label, (method, _) in students.items()}}
    (config.path("eval") / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
    return {"runs": len(runs)}


def write_demo_report(config: DemoConfig, timings: dict[str, float] | None = None) -> dict[str, Any]:
    """The report of the whole run in `output_dir`; prints the table."""
    evaluation = json.loads(_need(config.path("eval") / "evaluation.json", "eval").read_text())
    histories = {"teacher (SFT)": load_log_history(config.path("teacher"))}
    for name in config.students:  # one curve per method: its first seed's
        histories[name] = load_log_history(config.student_path(name, config.seeds[0]))
    notes = _notes(config, timings or {})
    report = write_report(config.root, evaluation, histories, notes=notes)
    print(results_table(evaluation["runs"]))
    print(f"\nReport: {config.root / 'report.md'}")
    return report


STAGE_FUNCTIONS: dict[str, Callable[[DemoConfig], dict[str, Any]]] = {
    "world": build_world, "teacher": build_teacher, "generate": generate_data, "distill": distill_students,
    "eval": evaluate_models,
}


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the configured stages in pipeline order; stage facts and timings go to `demo_stages.json`."""
    record_path = config.root / "demo_stages.json"
    config.root.mkdir(parents=True, exist_ok=True)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for stage in (name for name in STAGES if name in config.stages):
        print(f"\n=== {stage} ===", flush=True)
        started = time.monotonic()
        if stage == "report":
            timings = {name: entry["seconds"] for name, entry in record.items()}
            record["report"] = {"seconds": 0.0, "facts": {}}
            write_demo_report(config, timings)
        else:
            facts = STAGE_FUNCTIONS[stage](config)
            record[stage] = {"seconds": round(time.monotonic() - started, 1), "facts": facts}
            print(json.dumps(record[stage]), flush=True)
        record_path.write_text(json.dumps(record, indent=2))
    return record


# ---------------------------------------------------------------------------------------------- helpers
def _agent_settings(config: DemoConfig, split: str) -> dict[str, Any]:
    """How every agent of the demo acts: in the world's way (`ToyWorld.task_settings`) or in the environment, with
    the demo's limits."""
    if config.environment is not None:
        where = {"environment": config.environment, "environment_options": config.environment_options,
                 "dataset_split": split}
    else:
        where = ToyWorld.task_settings(config.path("world"), split)
    return {**where, "max_agent_steps": config.max_agent_steps, "max_new_tokens": config.max_new_tokens}


def _segmentation_style(config: DemoConfig) -> str:
    """The format SAD segments the agents' turns by: CodeAct in the toy world, the environment's own format."""
    if config.environment is None:
        return "codeact"
    from .envs.base import load_environment

    return load_environment(config.environment, config.environment_options).format.name


def _agent_task_config(config: DemoConfig, config_class: type[GenerateConfig | EvalConfig], **options: Any):
    """A `GenerateConfig` / `EvalConfig` for the toy world's `dataset_split` tasks."""
    return config_class(**{
        **_agent_settings(config, options["dataset_split"]), "batch_size": config.batch_size, "seed": config.seed,
        "show_progress": config.show_progress, "dtype": "float32", **options,
    })


def _train(config: DemoConfig, *, model: Path, data: Path, output: Path, steps: int, options: dict[str, Any],
           teacher: Path | None = None, seed: int | None = None) -> None:
    """One training run on CPU, through the same `train` as a recipe's, and its per-span losses printed."""

    training_args = AgentDistillConfig(
        output_dir=str(output), max_steps=steps, per_device_train_batch_size=config.per_device_train_batch_size,
        learning_rate=config.learning_rate, lr_scheduler_type=config.lr_scheduler_type, warmup_steps=0,
        max_length=config.max_length, logging_steps=max(1, steps // 15), save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=config.seed if seed is None else seed, beta=0.0, lmbda=0.0, activation_checkpointing=False,
        disable_tqdm=not config.show_progress, teacher_model_name_or_path=str(teacher) if teacher else None, **options,
    )
    trainer = train(
        AgentDistillScriptArguments(dataset_name=str(data), dataset_format="messages"), training_args,
        ModelConfig(model_name_or_path=str(model), dtype="float32"), DatasetMixtureConfig(),
    )
    print(format_span_losses(trainer.state.log_history))


def _notes(config: DemoConfig, timings: dict[str, float]) -> str:
    methods = "\n".join(f"- `{name}`: {STUDENT_METHODS[name].description}" for name in config.students)
    timing = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items() if stage != "report")
    if config.environment is None:
        oracle, extra = "the oracle's trajectories and CoT answers", " (CoT student: the CoT answers of the training tasks)"
        settings = "`cot` rows answer without tools. "
    else:
        oracle, extra = f"the expert's episodes in {config.environment}", ""
        settings = (f"Episodes of at most {config.max_agent_steps} steps; success is the environment's verdict on "
                    "test tasks no model was trained on. ")
    return (
        f"Teacher: Qwen2 architecture, hidden {config.teacher_hidden_size} x {config.teacher_layers} layers, "
        f"{config.teacher_steps} SFT steps on {oracle}. Students: hidden "
        f"{config.student_hidden_size} x {config.student_layers} layers, {config.student_steps} steps each from the "
        f"same initial weights, on the teacher's correct trajectories from {config.generate_tasks} training tasks"
        f"{extra}.\n\n{methods}\n\n"
        f"Agent settings: greedy and self-consistency with {config.self_consistency} candidates per step. {settings}"
        f"Stage times: {timing}."
    )


def _need(path: Path, stage: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the '{stage}' stage first (e.g. `--stages {stage}`).")
    return path


def _clear(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
