"""Distill tool-using LLM agents into small students: REASON / ACT span-aware distillation on top of TRL.

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer

Making data and measuring students: `generate_trajectories` / `GenerateConfig` (a teacher acting as an agent),
`evaluate` / `EvalConfig` (students as agents, greedy or self-consistent), `AgentRollouts` (the student's own
episodes for on-policy training), `run_demo` / `DemoConfig` (the toy-world pipeline), `train` / `cache_teacher`
(a training recipe's run), `init_student` (a layer-pruned student of a teacher), `resolve_model` (a GGUF file as a
loadable model directory); the agent runtime is in `trl_agent_distill.agent`, environments in
`trl_agent_distill.envs`.

The names below load on first use (PEP 562, as TRL's `_LazyModule`): `import trl_agent_distill` and the command
line's `--help` load no torch.
"""

import importlib
import os
from typing import TYPE_CHECKING

# The trainer builds on TRL's experimental GKD trainer; its import warning says nothing actionable to our users.
# Set here, once: every module of the package is imported after this file.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

__version__ = "0.1.0"

# Public name -> the module that defines it.
_EXPORTS = {
    "AgentDistillConfig": "config",
    "AgentDistillScriptArguments": "training",
    "AgentDistillTrainer": "trainer",
    "AgentRollouts": "rollout",
    "AgentTaskConfig": "tasks",
    "AgentTrajectoryCollator": "collator",
    "ChatTemplateRenderer": "chat_template",
    "DATASET_FORMATS": "data",
    "DemoConfig": "demo",
    "EvalConfig": "evaluation",
    "GenerateConfig": "generation",
    "InitStudentConfig": "student_init",
    "Span": "segmentation",
    "TASK_SETS": "task_sets",
    "SpanLossOutput": "losses",
    "TrajectoryFormatError": "segmentation",
    "answers_match": "metrics",
    "cache_teacher": "training",
    "cot_match_rate": "episode_metrics",
    "end_of_turn_tokens": "chat_template",
    "evaluate": "evaluation",
    "from_smolagents_log": "data",
    "generate_trajectories": "generation",
    "init_student": "student_init",
    "load_environment": "envs.base",
    "load_task_set": "task_sets",
    "prepare_trajectory_dataset": "data",
    "reasoning_lengths": "episode_metrics",
    "resolve_model": "model_refs",
    "run_demo": "demo",
    "score_answer": "metrics",
    "score_answers": "metrics",
    "segment_messages": "segmentation",
    "segment_text": "segmentation",
    "span_divergence_loss": "losses",
    "train": "training",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the names for type checkers and IDEs; `__all__` lists them from `_EXPORTS`
    from .chat_template import ChatTemplateRenderer, end_of_turn_tokens  # noqa: F401
    from .collator import AgentTrajectoryCollator  # noqa: F401
    from .config import AgentDistillConfig  # noqa: F401
    from .data import DATASET_FORMATS, from_smolagents_log, prepare_trajectory_dataset  # noqa: F401
    from .demo import DemoConfig, run_demo  # noqa: F401
    from .envs.base import load_environment  # noqa: F401
    from .episode_metrics import cot_match_rate, reasoning_lengths  # noqa: F401
    from .evaluation import EvalConfig, evaluate  # noqa: F401
    from .generation import GenerateConfig, generate_trajectories  # noqa: F401
    from .losses import SpanLossOutput, span_divergence_loss  # noqa: F401
    from .metrics import answers_match, score_answer, score_answers  # noqa: F401
    from .model_refs import resolve_model  # noqa: F401
    from .rollout import AgentRollouts  # noqa: F401
    from .segmentation import Span, TrajectoryFormatError, segment_messages, segment_text  # noqa: F401
    from .student_init import InitStudentConfig, init_student  # noqa: F401
    from .task_sets import TASK_SETS, load_task_set  # noqa: F401
    from .tasks import AgentTaskConfig  # noqa: F401
    from .trainer import AgentDistillTrainer  # noqa: F401
    from .training import AgentDistillScriptArguments, cache_teacher, train  # noqa: F401
