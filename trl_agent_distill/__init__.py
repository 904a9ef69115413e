"""Distill tool-using LLM agents into small students: REASON / ACT span-aware distillation on top of TRL.

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
"""

import os

# The trainer builds on TRL's experimental GKD trainer; its import warning says nothing actionable to our users.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from .collator import AgentTrajectoryCollator  # noqa: E402
from .config import AgentDistillConfig  # noqa: E402
from .data import DATASET_FORMATS, from_smolagents_log, prepare_trajectory_dataset  # noqa: E402
from .losses import SpanLossOutput, span_divergence_loss  # noqa: E402
from .segmentation import Span, TrajectoryFormatError, segment_messages, segment_text  # noqa: E402
from .trainer import AgentDistillTrainer  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AgentDistillConfig",
    "AgentDistillTrainer",
    "AgentTrajectoryCollator",
    "DATASET_FORMATS",
    "Span",
    "SpanLossOutput",
    "TrajectoryFormatError",
    "from_smolagents_log",
    "prepare_trajectory_dataset",
    "segment_messages",
    "segment_text",
    "span_divergence_loss",
]
