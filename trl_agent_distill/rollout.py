"""On-policy agent rollouts: the student acts in its environment and its episodes become a training batch.

GKD's on-policy step samples one completion of a dataset prompt; an agent's sample is a whole episode whose
observations come from running its own actions. `AgentRollouts.collect(model, count)` samples `count` tasks, runs
them through the agent runtime with the student (batched, tools and sandbox executed for real) and returns the
episodes' messages, which the collator segments like any trajectory: the student's REASON and ACT spans are trained
(a turn that does not parse is one ACT span: it is what the student wrote), observations and prompts are not.
An episode with no assistant text is skipped and counted; a sandbox that crashes is recorded and training goes on.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from .agent.backends import GenerationBackend, TransformersBackend
from .tasks import AgentTaskConfig, build_agent, load_tasks

logger = logging.getLogger(__name__)


@dataclass
class RolloutBatch:
    """What one rollout produced: trainable conversations and what happened on the way."""

    rows: list[dict[str, Any]]
    episodes: int
    skipped_empty: int
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


class AgentRollouts:
    """Sample tasks and run the student on them as an agent (see the module docstring).

    Args:
        config: the agent, its tools and sampling (`AgentDistillConfig.rollout_task_config()`).
        tokenizer: the student's tokenizer.
        seed: seeds the task sampling (add the process index so processes act on different tasks).
    """

    def __init__(self, config: AgentTaskConfig, tokenizer, seed: int = 0):
        self.tasks = load_tasks(config)  # missing fields fail here, before training starts
        self.agent = build_agent(config)
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)

    def collect(self, model, count: int, backend: GenerationBackend | None = None) -> RolloutBatch:
        """Run `count` sampled tasks with `model` (or `backend`) and return their conversations."""
        started = time.monotonic()
        tasks = [self.rng.choice(self.tasks) for _ in range(count)]
        backend = backend or TransformersBackend(model, self.tokenizer, batch_size=count)
        rows, skipped, errors = [], 0, []
        for episode in self.agent.run(backend, tasks, batch_size=count):
            if episode.stop_reason == "error":
                errors.extend(f"task {episode.task.task_id}: {error}" for error in episode.errors)
            replies = [m for m in episode.messages if m["role"] == "assistant" and (m.get("content") or "").strip()]
            if not replies:
                skipped += 1
                continue
            rows.append({"messages": episode.messages, **({"tools": episode.tools} if episode.tools else {})})
        for error in errors:
            logger.warning("Rollout error (training goes on): %s", error)
        return RolloutBatch(rows, episodes=len(tasks), skipped_empty=skipped, errors=errors,
                            seconds=time.monotonic() - started)
