"""`trl-agent-distill`: the command line.

    trl-agent-distill generate --config recipes/generate-hotpotqa-codeact.yaml
    trl-agent-distill train --config recipes/toy_cpu.yaml [--flag value ...]
    trl-agent-distill eval --config recipes/eval-hotpotqa.yaml
    trl-agent-distill cache-teacher --config recipes/toy_cpu.yaml --teacher_cache outputs/toy_cache
    trl-agent-distill init-tiny --output_dir outputs/toy
    trl-agent-distill init-student --teacher outputs/teacher --output_dir outputs/student --fraction 0.33
    trl-agent-distill demo --config recipes/toy_demo.yaml [--stages eval report]
    trl-agent-distill <command> ... --debug   # a user error shows its traceback too

Each command has its own parser (`make_parser` below, TRL's `TrlParser` over the command's dataclasses: flat keys,
command-line flags override the YAML), built only when the command runs, so `--help` loads no model library.
`check_recipe` adds what `TrlParser` does not check before the dataclasses are built: unknown keys with a
suggestion, values of the wrong type or outside the choices. Every model a recipe names is checked before any work
starts (`model_refs`: a directory, a hub name, or a GGUF file, converted once). A user error (a bad key or value, a missing file, a malformed row) prints one message and
exits with status 2. `train` also works under `accelerate launch -m trl_agent_distill train ...`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .model_refs import MissingPackageError

PROG = "trl-agent-distill"


# ---------------------------------------------------------------------------------------------- one parser per command
def make_train_parser(prog: str = f"{PROG} train"):
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from .config import AgentDistillConfig
    from .training import AgentDistillScriptArguments

    return TrlParser((AgentDistillScriptArguments, AgentDistillConfig, ModelConfig, DatasetMixtureConfig), prog=prog)


def make_generate_parser(prog: str = f"{PROG} generate"):
    from trl import TrlParser

    from .generation import GenerateConfig

    return TrlParser((GenerateConfig,), prog=prog)


def make_eval_parser(prog: str = f"{PROG} eval"):
    from trl import TrlParser

    from .evaluation import EvalConfig

    return TrlParser((EvalConfig,), prog=prog)


def make_demo_parser(prog: str = f"{PROG} demo"):
    from trl import TrlParser

    from .demo import DemoConfig

    return TrlParser((DemoConfig,), prog=prog)


def make_init_student_parser(prog: str = f"{PROG} init-student"):
    from trl import TrlParser

    from .student_init import InitStudentConfig

    return TrlParser((InitStudentConfig,), prog=prog)


def make_init_tiny_parser(prog: str = f"{PROG} init-tiny"):
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a tiny tokenizer, a teacher briefly fine-tuned on the toy trajectories, and a smaller "
        "student, for the offline CPU demo.",
    )
    parser.add_argument("--output_dir", default="outputs/toy")
    parser.add_argument("--teacher_sft_steps", type=int, default=80, help="SFT steps that make the teacher a teacher.")
    parser.add_argument("--overwrite", action="store_true")
    return parser


def parse_train_args(argv: list[str], prog: str = f"{PROG} train"):
    """Parse `train` arguments, failing on unknown recipe keys or wrongly typed values before anything loads."""
    from .config import MOVED_OPTIONS

    return parse_checked(make_train_parser(prog), argv, moved=MOVED_OPTIONS)


def parse_generate_args(argv: list[str]):
    (config,) = parse_checked(make_generate_parser(), argv)
    return config


def parse_eval_args(argv: list[str]):
    (config,) = parse_checked(make_eval_parser(), argv)
    return config


def parse_demo_args(argv: list[str]):
    (config,) = parse_checked(make_demo_parser(), argv)
    return config


def parse_init_student_args(argv: list[str]):
    (config,) = parse_checked(make_init_student_parser(), argv)
    return config


def parse_checked(parser, argv: list[str], moved: Mapping[str, str] | None = None):
    """`parser.parse_args_and_config(argv)` after `check_flags` and, with `--config`, `check_recipe`; `moved` says
    where options of an earlier release went."""
    check_flags(parser, argv, moved)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ValueError("--config needs the path of a YAML recipe.")
        check_recipe(parser, argv[index + 1], moved)
    return parser.parse_args_and_config(args=argv)


# ---------------------------------------------------------------------------------------------- what TrlParser skips
def check_flags(parser: argparse.ArgumentParser, argv: list[str], moved: Mapping[str, str] | None = None) -> None:
    """Reject a command-line flag no dataclass has, suggesting the option it was probably meant to be."""
    options = {option for action in parser._actions for option in action.option_strings} | {"--config"}
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag not in options:
            raise ValueError(f"{parser.prog}: unknown option {flag}.{_hint(flag, options, moved)} "
                             f"See `{parser.prog} --help`.")


def check_recipe(parser: argparse.ArgumentParser, config_path: str, moved: Mapping[str, str] | None = None) -> None:
    """Reject unknown keys (with a suggestion) and values whose type or choice does not fit, naming the key and the
    file. `TrlParser` reads the file itself; it reports unknown keys only after the dataclasses are built (whose own
    checks may fail first, on a value the misspelt key was meant to change) and sets YAML values unconverted."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"The recipe {config_path} does not exist.")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"The recipe {config_path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        return  # TrlParser names the file and asks for a mapping
    actions = {action.dest: action for action in parser._actions}
    for key in config:
        if key not in actions and key != "env":
            raise ValueError(f"Recipe {config_path}: unknown key '{key}'.{_hint(key, actions, moved)} Check the "
                             f"spelling against `{parser.prog} --help`.")
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


def _hint(name: str, known, moved: Mapping[str, str] | None) -> str:
    """Where an option of an earlier release went, or the known option closest to a misspelt one."""
    bare = name.lstrip("-")
    if moved and bare in moved:
        return f" It moved into {moved[bare]}."
    matches = difflib.get_close_matches(bare, [option.lstrip("-") for option in known], n=1, cutoff=0.75)
    if not matches:
        return ""
    return f" Did you mean '{'--' if name.startswith('--') else ''}{matches[0]}'?"


def _is_structured(value) -> bool:
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


# ---------------------------------------------------------------------------------------------- the commands
def run_train(argv: list[str]):
    from .model_refs import check_model_reference
    from .training import format_span_losses, train

    script_args, training_args, model_args, dataset_args = parse_train_args(argv)
    if not model_args.model_name_or_path:
        raise ValueError("No student: set `model_name_or_path` (a local directory or a hub name).")
    check_model_reference(model_args.model_name_or_path, "model_name_or_path")
    if training_args.needs_teacher and training_args.teacher_model_name_or_path:
        check_model_reference(training_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    trainer = train(script_args, training_args, model_args, dataset_args)
    if trainer.accelerator.is_main_process:
        print(format_span_losses(trainer.state.log_history))
        print(f"Saved the trained model to {training_args.output_dir}")
    return trainer


def run_cache_teacher(argv: list[str]) -> Path:
    from .model_refs import check_model_reference
    from .training import cache_teacher

    script_args, training_args, model_args, dataset_args = parse_train_args(argv, prog=f"{PROG} cache-teacher")
    if training_args.teacher_model_name_or_path:
        check_model_reference(training_args.teacher_model_name_or_path, "teacher_model_name_or_path")
    return cache_teacher(script_args, training_args, model_args, dataset_args)


def run_generate(argv: list[str]) -> dict:
    from .generation import generate_trajectories
    from .model_refs import check_model_reference

    config = parse_generate_args(argv)
    if config.model_name_or_path and not config.base_url:
        check_model_reference(config.model_name_or_path, "model_name_or_path")
    summary = generate_trajectories(config)
    print(json.dumps(summary, indent=2))
    kept_file = Path(config.output_dir, "trajectories.jsonl")
    print(f"Kept {summary['kept']} of {summary['episodes']} trajectories in {kept_file}")
    return summary


def run_eval(argv: list[str]) -> dict:
    from .evaluation import TABLE_FILE, ModelRef, evaluate
    from .model_refs import check_model_reference

    config = parse_eval_args(argv)
    for entry in config.models:
        model = ModelRef.parse(entry)
        if model.base_url is None:
            check_model_reference(model.model, f"models entry {entry!r}")
    report = evaluate(config)
    print(Path(config.output_dir, TABLE_FILE).read_text())
    print(f"Predictions and summaries in {config.output_dir}")
    return report


def run_demo_command(argv: list[str]) -> dict:
    from .demo import run_demo

    return run_demo(parse_demo_args(argv))


def run_init_tiny(argv: list[str]) -> tuple[Path, Path]:
    from .tiny import prepare_toy_pair

    options = make_init_tiny_parser().parse_args(argv)
    print(f"Writing the tiny pair to {options.output_dir}: a tokenizer, a teacher with {options.teacher_sft_steps} SFT "
          "steps, a student (kept if already there with the same settings)", flush=True)
    teacher, student = prepare_toy_pair(options.output_dir, options.teacher_sft_steps, overwrite=options.overwrite,
                                        show_progress=True)
    print(f"teacher: {teacher}\nstudent: {student}")
    return teacher, student


def run_init_student(argv: list[str]) -> Path:
    from .model_refs import check_model_reference
    from .student_init import init_student

    config = parse_init_student_args(argv)
    if not config.teacher or not config.output_dir:
        raise ValueError("init-student needs --teacher (the model to prune) and --output_dir (where the student goes).")
    check_model_reference(config.teacher, "teacher")
    output = init_student(config.teacher, config.output_dir, keep_layers=config.keep_layers, fraction=config.fraction,
                          overwrite=config.overwrite)
    print(f"Saved the student to {output}")
    return output


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], Any]


COMMANDS = {
    "demo": Command("the toy-world pipeline: teacher, generated data, four students, evaluation, report (CPU, minutes)",
                    run_demo_command),
    "eval": Command("evaluate models as agents (greedy, self-consistent) or with chain-of-thought, in one table",
                    run_eval),
    "generate": Command("run a teacher as an agent over tasks and keep its correct trajectories", run_generate),
    "train": Command("distill a student from a recipe", run_train),
    "cache-teacher": Command("run the recipe's teacher once and store its top-k log-probs (then train with "
                             "teacher_cache)", run_cache_teacher),
    "init-tiny": Command("write the tiny CPU demo models", run_init_tiny),
    "init-student": Command("make a smaller student from a teacher by keeping some of its layers (same tokenizer)",
                            run_init_student),
}

# What a user can get wrong (a recipe, a path, a row, a value; and a model server that is down, `BackendError`): one
# message, no traceback. A `JSONDecodeError` or a `TrajectoryFormatError` is a `ValueError`; a model reference whose
# package is not installed says what to pip install (`MissingPackageError`).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                MissingPackageError)


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser: `--debug` and the commands (each parses its own options, see `make_*_parser`)."""
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Distill tool-using LLM agents into small students. `trl-agent-distill <command> --help` lists "
        "a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="Show the traceback of a user error too.")
    commands = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    """The console script: exit status 0 on success, 2 on a user error (one message on stderr)."""
    debug, argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    try:
        run(argv)
    except Exception as error:
        if debug or not _is_user_error(error):
            raise
        print(f"{PROG}: error: {error}\n(add --debug to see the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str] | None = None):
    """Run one command and return what it produced (the trainer, the cache folder, the summary, the report); errors
    are raised (`--debug` changes only how `main` reports them)."""
    _, argv = take_debug_flag(list(sys.argv[1:] if argv is None else argv))
    parser = make_parser()
    split = _command_index(argv)
    parser.parse_args(argv[: split + 1])  # --help, a missing or unknown command: argparse's message, status 0 or 2
    if split == len(argv):
        parser.print_help()
        raise SystemExit(2)
    return COMMANDS[argv[split]].run(argv[split + 1 :])


def take_debug_flag(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether `--debug` is given, before the command or after it, and `argv` without it. After the command, a
    `--debug` followed by a value is TrainingArguments' own option (`--debug underflow_overflow`), left in place."""
    split = _command_index(argv)
    ours = [index for index, token in enumerate(argv) if token == "--debug"
            and (index < split or index + 1 == len(argv) or argv[index + 1].startswith("-"))]
    return bool(ours), [token for index, token in enumerate(argv) if index not in ours]


def _command_index(argv: list[str]) -> int:
    """Where the command is in `argv` (everything after it is the command's); `len(argv)` when there is none."""
    return next((index for index, token in enumerate(argv) if not token.startswith("-")), len(argv))


def _is_user_error(error: Exception) -> bool:
    from .agent.backends import BackendError  # here, not at the top: the agent package loads numpy

    return isinstance(error, (*USER_ERRORS, BackendError))


if __name__ == "__main__":
    main()
