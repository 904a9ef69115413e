"""`trl-agent-distill`: the command line.

    trl-agent-distill generate --config recipes/generate-hotpotqa-codeact.yaml
    trl-agent-distill train --config recipes/toy_cpu.yaml [--flag value ...]
    trl-agent-distill eval --config recipes/eval-hotpotqa.yaml
    trl-agent-distill cache-teacher --config recipes/toy_cpu.yaml --teacher_cache outputs/toy_cache
    trl-agent-distill init-tiny --output_dir outputs/toy
    trl-agent-distill demo --config recipes/toy_demo.yaml [--stages eval report]

`generate` runs a teacher as an agent over a task dataset and writes its correct trajectories (see `generation`);
`eval` compares models as agents and as chain-of-thought answerers (see `evaluation`); `demo` runs the whole toy-world
pipeline (see `demo`).
`train` parses a recipe with TRL's `TrlParser` (flat keys across the script, trainer, model and dataset-mixture
dataclasses; command-line flags override the YAML) and runs `AgentDistillTrainer`; it also works under
`accelerate launch -m trl_agent_distill train ...`. Recipes are checked (unknown keys, wrong types) before any model
loads. `init-tiny` writes a tiny teacher / student pair for the CPU demo and tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import AgentDistillConfig
from .data import DATASET_FORMATS


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


def make_train_parser():
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    return TrlParser(
        (AgentDistillScriptArguments, AgentDistillConfig, ModelConfig, DatasetMixtureConfig),
        prog="trl-agent-distill train",
    )


def parse_train_args(argv: list[str]):
    """Parse `train` arguments, failing on unknown recipe keys or wrongly typed values before anything loads."""
    return _parse_checked(make_train_parser(), argv)


def parse_generate_args(argv: list[str]):
    from trl import TrlParser

    from .generation import GenerateConfig

    (config,) = _parse_checked(TrlParser((GenerateConfig,), prog="trl-agent-distill generate"), argv)
    return config


def parse_demo_args(argv: list[str]):
    from trl import TrlParser

    from .demo import DemoConfig

    (config,) = _parse_checked(TrlParser((DemoConfig,), prog="trl-agent-distill demo"), argv)
    return config


def parse_eval_args(argv: list[str]):
    from trl import TrlParser

    from .evaluation import EvalConfig

    (config,) = _parse_checked(TrlParser((EvalConfig,), prog="trl-agent-distill eval"), argv)
    return config


def _parse_checked(parser, argv: list[str]):
    if "--config" in argv:
        config_path = argv[argv.index("--config") + 1]
        check_recipe(parser, config_path)
    return parser.parse_args_and_config(args=argv)


def check_recipe(parser: argparse.ArgumentParser, config_path: str) -> None:
    """Reject unknown keys and values whose type does not fit the field, naming the key and the file."""
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {config_path} does not exist.")
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"Recipe {config_path} must be a YAML mapping of option: value.")
    actions = {action.dest: action for action in parser._actions}
    unknown = sorted(key for key in config if key not in actions and key != "env")
    if unknown:
        raise ValueError(
            f"Recipe {config_path}: unknown key(s) {unknown}. Check the spelling against "
            f"`{parser.prog} --help`."
        )
    for key, value in config.items():
        if key == "env" or value is None:
            continue
        action = actions[key]
        if _is_structured(value) or action.type is None:
            continue  # mixtures and dict options are validated by their own dataclass
        values = value if isinstance(value, list) and action.nargs in ("+", "*") else [value]
        for item in values:
            try:
                converted = action.type(item if isinstance(item, str) else str(item))
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                raise ValueError(
                    f"Recipe {config_path}: key '{key}' has value {value!r}, which is not a valid "
                    f"{getattr(action.type, '__name__', action.type)}."
                ) from None
            if action.choices is not None and converted not in action.choices:
                raise ValueError(
                    f"Recipe {config_path}: key '{key}' has value {value!r}; choose one of {list(action.choices)}."
                )


def _is_structured(value) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def load_trajectory_splits(script_args: AgentDistillScriptArguments, dataset_args):
    """Load the training data from a `datasets:` mixture, a hub name, a directory or a local file."""
    from datasets import DatasetDict
    from trl import get_dataset

    from .data import load_any_dataset, prepare_trajectory_dataset

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


def train(script_args, training_args: AgentDistillConfig, model_args, dataset_args):
    from trl import get_peft_config, get_quantization_config

    from .trainer import AgentDistillTrainer

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
    if trainer.accelerator.is_main_process:
        print(format_span_losses(trainer.state.log_history))
        print(f"Saved the trained model to {training_args.output_dir}")
    # Release the DDP wrapper while its process group is alive: a gloo reducer freed after the group is
    # destroyed blocks the process from exiting.
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()
    trainer.end()
    return trainer


def cache_teacher(script_args, training_args: AgentDistillConfig, model_args, dataset_args) -> Path:
    """Run the recipe's teacher once over its training set and write the cache to `teacher_cache`."""
    from accelerate import PartialState
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    from .collator import AgentTrajectoryCollator
    from .encoding import encode_dataset
    from .quantization import keep_4bit_training_layout
    from .teacher_cache import build_teacher_cache, run_fingerprint

    args = training_args
    if not args.teacher_cache or not args.teacher_model_name_or_path:
        raise ValueError("cache-teacher needs `teacher_model_name_or_path` and `teacher_cache` (the output folder).")
    state = PartialState(cpu=args.use_cpu)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code)
    splits = load_trajectory_splits(script_args, dataset_args)
    collator = AgentTrajectoryCollator(
        tokenizer, max_length=args.max_length, style=args.segmentation_style, on_malformed=args.on_malformed,
        truncation_mode=args.truncation_mode,
        use_training_chat_template=args.use_training_chat_template,
    )
    dataset, _ = encode_dataset(splits[script_args.dataset_train_split], collator, "train", args.dataset_num_proc)
    teacher = create_model_from_path(args.teacher_model_name_or_path, **args.teacher_init_kwargs(state.device))
    if args.teacher_quantization_config() is None:
        teacher = teacher.to(state.device)
    keep_4bit_training_layout(teacher, "teacher")  # cached logits must equal the ones a live teacher gives in training
    fingerprint = run_fingerprint(args, tokenizer, dataset, teacher_revision=getattr(teacher.config, "_commit_hash", None))
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


def init_tiny(argv: list[str]) -> None:
    from .tiny import prepare_toy_pair

    parser = argparse.ArgumentParser(
        prog="trl-agent-distill init-tiny",
        description="Write a tiny tokenizer, a teacher briefly fine-tuned on the toy trajectories, and a smaller "
        "student, for the offline CPU demo.",
    )
    parser.add_argument("--output_dir", default="outputs/toy")
    parser.add_argument("--teacher_sft_steps", type=int, default=80, help="SFT steps that make the teacher a teacher.")
    parser.add_argument("--overwrite", action="store_true")
    options = parser.parse_args(argv)
    teacher, student = prepare_toy_pair(options.output_dir, options.teacher_sft_steps, overwrite=options.overwrite)
    print(f"teacher: {teacher}\nstudent: {student}")


def generate(config) -> dict:
    from .generation import generate_trajectories

    summary = generate_trajectories(config)
    print(json.dumps(summary, indent=2))
    print(f"Kept {summary['kept']} of {summary['episodes']} trajectories in {Path(config.output_dir, 'trajectories.jsonl')}")
    return summary


def evaluate(config) -> dict:
    from .evaluation import TABLE_FILE, evaluate as run_evaluation

    report = run_evaluation(config)
    print(Path(config.output_dir, TABLE_FILE).read_text())
    print(f"Predictions and summaries in {config.output_dir}")
    return report


COMMANDS = {
    "demo": "the toy-world pipeline: teacher, generated data, four students, evaluation, report (CPU, minutes)",
    "eval": "evaluate models as agents (greedy, self-consistent) or with chain-of-thought, in one table",
    "generate": "run a teacher as an agent over tasks and keep its correct trajectories",
    "train": "distill a student from a recipe",
    "cache-teacher": "run the recipe's teacher once and store its top-k log-probs (then train with teacher_cache)",
    "init-tiny": "write the tiny CPU demo models",
}


def main(argv: list[str] | None = None) -> None:
    """The console script: returns None so the exit status is 0 on success."""
    run(argv)


def run(argv: list[str] | None = None):
    """Run one command and return what it produced (the trainer, the cache folder, the model folders)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        usage = "\n".join(f"  {name:<14} {help_}" for name, help_ in COMMANDS.items())
        print(f"usage: trl-agent-distill <command> [options]\n\ncommands:\n{usage}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import run_demo

        return run_demo(parse_demo_args(rest))
    if command == "generate":
        return generate(parse_generate_args(rest))
    if command == "eval":
        return evaluate(parse_eval_args(rest))
    if command == "train":
        return train(*parse_train_args(rest))
    if command == "cache-teacher":
        return cache_teacher(*parse_train_args(rest))
    return init_tiny(rest)


if __name__ == "__main__":
    main()
