"""Run a training recipe: the dataset options, the trajectory splits, `train` and `cache_teacher`.

The CLI's `train` / `cache-teacher` commands and the demo call these with typed settings (the dataclasses that
`TrlParser` fills from a recipe): `AgentDistillScriptArguments`, `AgentDistillConfig`, TRL's `ModelConfig` and
`DatasetMixtureConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from datasets import DatasetDict
from transformers import AutoTokenizer
from trl import DatasetMixtureConfig, ModelConfig, get_dataset, get_peft_config, get_quantization_config
from trl.trainer.utils import create_model_from_path

from .collator import AgentTrajectoryCollator
from .config import AgentDistillConfig
from .data import DATASET_FORMATS, load_any_dataset, prepare_trajectory_dataset
from .encoding import encode_dataset
from .model_refs import resolve_model
from .quantization import keep_4bit_training_layout
from .teacher_cache import build_teacher_cache, run_fingerprint
from .trainer import AgentDistillTrainer


@dataclass
class AgentDistillScriptArguments:
    """Dataset options of `trl-agent-distill train` (besides TRL's `datasets:` mixture)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset name, local dataset directory, or a local .json/.jsonl/.parquet/.csv file."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (when eval is on)."})
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Row format: 'messages' (chat), 'text' (plain trajectory, optional 'prompt'), 'smolagents' "
            "(released agent-distillation rows with 'log_data'), or 'auto' to detect from the columns.",
            "choices": list(DATASET_FORMATS),
        },
    )


def load_trajectory_splits(script_args: AgentDistillScriptArguments, dataset_args: DatasetMixtureConfig) -> DatasetDict:
    """Load the training data from a `datasets:` mixture, a hub name, a directory or a local file."""
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name is None:
        raise ValueError("No training data: set `dataset_name` or a `datasets:` mixture in the recipe.")
    else:
        dataset = load_any_dataset(
            script_args.dataset_name, script_args.dataset_config, local_split=script_args.dataset_train_split
        )
    if not isinstance(dataset, DatasetDict):
        dataset = DatasetDict({script_args.dataset_train_split: dataset})
    return DatasetDict(
        {split: prepare_trajectory_dataset(rows, script_args.dataset_format) for split, rows in dataset.items()}
    )


def train(script_args: AgentDistillScriptArguments, training_args: AgentDistillConfig, model_args: ModelConfig,
          dataset_args: DatasetMixtureConfig) -> AgentDistillTrainer:
    """Train, save the model and `trainer_state.json` (the log history) to `output_dir`; returns the trainer."""
    if model_args.model_name_or_path:
        model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    resolve_teacher(training_args)
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }
    splits = load_trajectory_splits(script_args, dataset_args)
    if script_args.dataset_train_split not in splits:
        raise ValueError(
            f"The dataset has no split '{script_args.dataset_train_split}' (it has {list(splits)}); set "
            "dataset_train_split."
        )
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in splits:
            raise ValueError(
                f"eval_strategy is '{training_args.eval_strategy}' but the dataset has no split "
                f"'{script_args.dataset_test_split}' (it has {list(splits)}); set dataset_test_split."
            )
        eval_dataset = splits[script_args.dataset_test_split]
    trainer = AgentDistillTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=splits[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history, for plots and comparisons
    # Release the DDP wrapper while its process group is alive: a gloo reducer freed after the group is
    # destroyed blocks the process from exiting.
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    trainer.end()
    return trainer


def cache_teacher(script_args: AgentDistillScriptArguments, training_args: AgentDistillConfig,
                  model_args: ModelConfig, dataset_args: DatasetMixtureConfig) -> Path:
    """Run the recipe's teacher once over its training set and write the cache to `teacher_cache`."""
    args = training_args
    if not args.teacher_cache or not args.teacher_model_name_or_path:
        raise ValueError("cache-teacher needs `teacher_model_name_or_path` and `teacher_cache` (the output folder).")
    resolve_teacher(args)
    state = PartialState(cpu=args.use_cpu)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code)
    splits = load_trajectory_splits(script_args, dataset_args)
    collator = AgentTrajectoryCollator.from_config(tokenizer, args)
    dataset, _ = encode_dataset(splits[script_args.dataset_train_split], collator, "train", args.dataset_num_proc)
    teacher = create_model_from_path(args.teacher_model_name_or_path, **args.teacher_init_kwargs(state.device))
    if args.teacher_quantization_config() is None:
        teacher = teacher.to(state.device)
    keep_4bit_training_layout(teacher, "teacher")  # cached logits must equal the ones a live teacher gives in training
    revision = getattr(teacher.config, "_commit_hash", None)
    fingerprint = run_fingerprint(args, tokenizer, dataset, teacher_revision=revision)
    path = build_teacher_cache(
        teacher.eval(),
        collator,
        dataset,
        args.teacher_cache,
        fingerprint,
        batch_size=args.per_device_train_batch_size,
        shard_rows=args.teacher_cache_shard_rows,
        process_index=state.process_index,
        num_processes=state.num_processes,
        show_progress=state.is_main_process,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"Teacher cache for {len(dataset)} rows (top-{args.teacher_cache_topk}) written to {path}")
    return path


def resolve_teacher(args: AgentDistillConfig) -> None:
    """Point `teacher_model_name_or_path` at a loadable directory (a GGUF teacher converted once). Done even when
    a teacher cache stands in for the teacher: the cache records the teacher it was built from, and a run compares."""
    if args.teacher_model_name_or_path:
        args.teacher_model_name_or_path = resolve_model(args.teacher_model_name_or_path)


def format_span_losses(log_history: list[dict]) -> str:
    """A small table of the logged per-span losses, first to last, so a run shows at a glance whether they fall."""
    columns = ["loss", "loss_reason", "loss_act", "loss_ce"]
    rows = [entry for entry in log_history if "loss_reason" in entry or "loss_act" in entry]
    columns = [c for c in columns if any(c in entry for entry in rows)]
    lines = ["step  " + "  ".join(f"{c:>12}" for c in columns)]
    for entry in rows:
        lines.append(f"{entry.get('step', 0):>4}  " + "  ".join(
            f"{entry[c]:>12.4f}" if c in entry else " " * 12 for c in columns))
    return "\n".join(lines)
