"""Distill tool-using LLM agents into small students: REASON / ACT span-aware distillation on top of TRL.

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer

Making data and measuring students: `generate_trajectories` / `GenerateConfig` (a teacher acting as an agent),
`evaluate` / `EvalConfig` (students as agents, greedy or self-consistent), `AgentRollouts` (the student's own
episodes for on-policy training), `run_demo` / `DemoConfig` (the toy-world pipeline); the agent runtime is in
`trl_agent_distill.agent`, environments in `trl_agent_distill.envs`.
"""

import os

# The trainer builds on TRL's experimental GKD trainer; its import warning says nothing actionable to our users.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .chat_template import ChatTemplateRenderer, end_of_turn_tokens  # noqa: E402
from .collator import AgentTrajectoryCollator  # noqa: E402
from .config import AgentDistillConfig  # noqa: E402
from .data import DATASET_FORMATS, from_smolagents_log, prepare_trajectory_dataset  # noqa: E402
from .demo import DemoConfig, run_demo  # noqa: E402
from .evaluation import EvalConfig, evaluate  # noqa: E402
from .generation import GenerateConfig, generate_trajectories  # noqa: E402
from .losses import SpanLossOutput, span_divergence_loss  # noqa: E402
from .metrics import answers_match, score_answer  # noqa: E402
from .rollout import AgentRollouts  # noqa: E402
from .segmentation import Span, TrajectoryFormatError, segment_messages, segment_text  # noqa: E402
from .trainer import AgentDistillTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AgentDistillConfig",
    "AgentDistillTrainer",
    "AgentRollouts",
    "AgentTrajectoryCollator",
    "ChatTemplateRenderer",
    "DATASET_FORMATS",
    "DemoConfig",
    "EvalConfig",
    "GenerateConfig",
    "Span",
    "SpanLossOutput",
    "TrajectoryFormatError",
    "answers_match",
    "end_of_turn_tokens",
    "evaluate",
    "from_smolagents_log",
    "generate_trajectories",
    "prepare_trajectory_dataset",
    "run_demo",
    "score_answer",
    "segment_messages",
    "segment_text",
    "span_divergence_loss",
]
