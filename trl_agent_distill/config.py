"""`AgentDistillConfig`: `GKDConfig` plus the span-weighted loss and teacher-loading options."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import BitsAndBytesConfig
from trl.experimental.gkd import GKDConfig

from .collator import ON_MALFORMED
from .envs.base import ENVIRONMENTS
from .envs.toy import ToyWorld
from .losses import SPAN_NORMALIZATIONS
from .segmentation import STYLES
from .tasks import AgentTaskConfig, read_task_recipe, task_config_from

LOSS_IMPLEMENTATIONS = ("chunked", "logits")
# Worlds a rollout can name instead of its tasks and tools: they write their own and know how their agent acts.
WORLDS = ("toy",)
# The on-policy options of the previous release, and where they went (named when an old recipe uses them).
MOVED_OPTIONS = {
    "environment": "`rollout` (`rollout: toy` for the toy world, task settings for your own tasks)",
    **{f"rollout_{old}": f"`rollout` as `{new}`" for old, new in (
        ("tasks", "dataset_name"), ("corpus", "retrieval_corpus"), ("agent", "agent"),
        ("task_variable", "task_variable"), ("retrieval_top_k", "retrieval_top_k"), ("max_steps", "max_agent_steps"),
        ("max_new_tokens", "max_new_tokens"), ("temperature", "temperature"), ("top_p", "top_p"))},
}
# Rollouts sample (GKD's default temperature) and are short; the task settings override these.
ROLLOUT_DEFAULTS = {"dataset_split": "train", "max_new_tokens": 256, "temperature": 0.9, "show_progress": False}

logger = logging.getLogger(__name__)


@dataclass
class AgentDistillConfig(GKDConfig):
    r"""Configuration for [`AgentDistillTrainer`].

    Defaults target offline agent distillation as in the SAD paper: forward KL (`beta=0`) on the teacher's own
    trajectories (`lmbda=0`, no on-policy sampling). Everything `GKDConfig` / `SFTConfig` accept works too.
    `bf16` defaults to what the machine supports (on for a CUDA GPU with bf16, off on CPU).
    """

    _VALID_DICT_FIELDS = GKDConfig._VALID_DICT_FIELDS + ["rollout"]

    lambda_reason: float = field(
        default=1.0, metadata={"help": "Weight of the divergence on REASON (thought) tokens."}
    )
    lambda_act: float = field(
        default=1.0, metadata={"help": "Weight of the divergence on ACT (action, code, final answer) tokens."}
    )
    lambda_ce: float = field(
        default=0.0,
        metadata={
            "help": "Weight of hard-label cross-entropy on the same tokens. With lambda_reason = lambda_act = 0 this "
            "is plain SFT (imitation learning), and no teacher forward is run."
        },
    )
    loss_temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature of both models in the divergence (`temperature` is for sampling)."},
    )
    segmentation_style: str = field(
        default="auto",
        metadata={
            "help": "How trajectories are split into REASON / ACT spans: 'auto' (detect), 'react' (HotPotQA / "
            "WebShop), 'alfworld', 'codeact' (smolagents), or 'none' (all trained tokens one kind: token-level KD).",
            "choices": list(STYLES),
        },
    )
    span_normalization: str = field(
        default="token",
        metadata={
            "help": "'token': divide the weighted divergence by the number of trained tokens; 'span': average "
            "inside each kind so short ACT spans weigh as much as long REASON spans.",
            "choices": list(SPAN_NORMALIZATIONS),
        },
    )
    on_malformed: str = field(
        default="raise",
        metadata={
            "help": "What to do with a trajectory that cannot be segmented: 'raise' (naming the row and message), "
            "'skip' it and count it in the logs, or 'act': train each assistant turn that does not parse as one "
            "ACT span.",
            "choices": list(ON_MALFORMED),
        },
    )
    use_training_chat_template: bool = field(
        default=True,
        metadata={
            "help": "Locate assistant turns in chat rows with TRL's training chat template for the tokenizer's "
            "template where TRL has one (`trl.get_training_chat_template`: prefix-preserving, reasoning kept in "
            "every turn, Jinja `generation` blocks), or with the template's own generation blocks. Other templates, "
            "or False, render with the tokenizer's own template and locate each turn from its rendering."
        },
    )
    loss_implementation: str = field(
        default="chunked",
        metadata={
            "help": "'chunked': project only trained positions through the output heads, a chunk at a time, so no "
            "(batch, tokens, vocab) logits exist (falls back to 'logits' with a warning for a model family it does "
            "not know); 'logits': the models' full logits (simple, for debugging).",
            "choices": list(LOSS_IMPLEMENTATIONS),
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Positions per chunk of the chunked loss; default about 2**25 / vocab (128 MB of float32)."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an offline teacher cache (top-k log-probs per trained token). `cache-teacher` writes "
            "it there; `train` then loads no teacher and distills from the cache."
        },
    )
    teacher_cache_topk: int = field(
        default=64, metadata={"help": "Teacher tokens kept per position when building the cache (plus one tail bucket)."}
    )
    teacher_cache_shard_rows: int = field(
        default=256,
        metadata={"help": "Dataset rows per cache shard: the unit of resuming and of splitting work across processes."},
    )
    teacher_load_in_4bit: bool = field(
        default=False, metadata={"help": "Load a teacher given by name in 4-bit NF4 (bitsandbytes)."}
    )
    teacher_load_in_8bit: bool = field(
        default=False, metadata={"help": "Load a teacher given by name in 8-bit (bitsandbytes)."}
    )
    max_length: int | None = field(
        default=4096,
        metadata={"help": "Maximum tokens per trajectory; longer ones are cut at the end with a warning."},
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "Probability of replacing a batch by the student's own samples (on-policy): completions of the "
            "dataset's prompts, or whole agent episodes with `rollout`. They are segmented again, so REASON / "
            "ACT masks stay correct."
        },
    )
    on_policy_start_step: int = field(
        default=0,
        metadata={"help": "Optimizer steps before on-policy batches start: a random student's episodes are noise "
                  "that costs full-length generations, so let it learn the format offline first."},
    )
    rollout: dict | str | None = field(
        default=None,
        metadata={
            "help": "Where on-policy batches (lmbda > 0) come from. Unset: the student completes the dataset's "
            "prompts (GKD). Otherwise the student acts as an agent, whole episodes with real tool observations, set "
            "as for `generate` / `eval` (the options of `AgentTaskConfig`: dataset_name, retrieval_corpus, agent, "
            "task_variable, max_agent_steps, max_new_tokens, temperature ...) as a dict (JSON on the command line) "
            f"or the path of a YAML task recipe; a world ({list(WORLDS)}: `rollout: toy`, or `world: toy` among "
            "the settings) brings its own tasks and tools, those of seed `seed`, written to output_dir; so does an "
            f"interactive environment ({sorted(ENVIRONMENTS)}: `rollout: alfworld`, or `environment: alfworld` with "
            "`environment_options` among the settings). Rollouts "
            f"default to {ROLLOUT_DEFAULTS}."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={"help": "0: forward KL(teacher || student) as in SAD; 1: reverse KL; between: generalized JSD."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 mixed precision. Defaults to on only where a CUDA GPU supports it."},
    )

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = not self.fp16 and not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        super().__post_init__()
        if self.segmentation_style not in STYLES:
            raise ValueError(f"segmentation_style must be one of {STYLES}, got {self.segmentation_style!r}.")
        if self.span_normalization not in SPAN_NORMALIZATIONS:
            raise ValueError(
                f"span_normalization must be one of {SPAN_NORMALIZATIONS}, got {self.span_normalization!r}."
            )
        if self.on_malformed not in ON_MALFORMED:
            raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {self.on_malformed!r}.")
        if self.loss_implementation not in LOSS_IMPLEMENTATIONS:
            raise ValueError(
                f"loss_implementation must be one of {LOSS_IMPLEMENTATIONS}, got {self.loss_implementation!r}."
            )
        if self.teacher_cache and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                "teacher_cache holds the teacher on the dataset's trajectories only; on-policy samples (lmbda > 0, "
                "seq_kd) need a live teacher: drop teacher_cache or set lmbda=0, seq_kd=False."
            )
        if self.rollout is not None:
            self.rollout_task_config()  # bad settings fail here, before any model loads
            if self.lmbda == 0:
                logger.warning("rollout is set but lmbda is 0: no rollouts will run (set lmbda > 0 for on-policy).")
        if self.teacher_cache_topk < 1:
            raise ValueError(f"teacher_cache_topk must be at least 1, got {self.teacher_cache_topk}.")
        if self.teacher_load_in_4bit and self.teacher_load_in_8bit:
            raise ValueError("Choose one of teacher_load_in_4bit and teacher_load_in_8bit.")
        if self.loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be positive, got {self.loss_temperature}.")
        if min(self.lambda_reason, self.lambda_act, self.lambda_ce) < 0:
            raise ValueError("lambda_reason, lambda_act and lambda_ce must be non-negative.")
        if self.lambda_reason == self.lambda_act == self.lambda_ce == 0:
            raise ValueError("All of lambda_reason, lambda_act and lambda_ce are 0: nothing would be trained.")

    def rollout_settings(self) -> dict | None:
        """`rollout` as a mapping of task options (a YAML recipe read, a world's name as `{"world": name}`)."""
        if isinstance(self.rollout, str) and self.rollout in WORLDS:
            return {"world": self.rollout}
        if isinstance(self.rollout, str) and self.rollout in ENVIRONMENTS:
            return {"environment": self.rollout}
        if isinstance(self.rollout, str):
            if not self.rollout.endswith((".yaml", ".yml")):
                raise ValueError(
                    f"rollout: {self.rollout!r} is neither a world {list(WORLDS)}, an environment "
                    f"{sorted(ENVIRONMENTS)} nor a .yaml task recipe."
                )
            return read_task_recipe(self.rollout, source="rollout")
        return None if self.rollout is None else dict(self.rollout)

    @property
    def rollout_world(self) -> str | None:
        """The world the rollouts act in, if `rollout` names one."""
        return (self.rollout_settings() or {}).get("world")

    @property
    def rollout_world_dir(self) -> Path:
        """Where the trainer writes the world of `rollout`."""
        return Path(self.output_dir) / f"{self.rollout_world}_world"

    def rollout_task_config(self) -> AgentTaskConfig | None:
        """The agent settings of rollouts (`rollout`) as an `AgentTaskConfig`, None without `rollout`. A world's
        settings are those of the world in `rollout_world_dir`, under any the rollout sets itself."""
        settings = self.rollout_settings()
        if settings is None:
            return None
        world = settings.pop("world", None)
        if world is not None:
            if world not in WORLDS:
                raise ValueError(f"rollout: unknown world {world!r}; the worlds are {list(WORLDS)}.")
            settings = {**ToyWorld.task_settings(self.rollout_world_dir), **settings}
        config = task_config_from(settings, defaults={**ROLLOUT_DEFAULTS, "seed": self.seed}, source="rollout")
        if not config.dataset_name and config.environment is None:
            raise ValueError("rollout needs `dataset_name` (the tasks, question and answer, the student acts on), "
                             f"a `world` ({list(WORLDS)}) or an `environment` ({sorted(ENVIRONMENTS)}).")
        return config

    @property
    def uses_divergence(self) -> bool:
        return self.lambda_reason > 0 or self.lambda_act > 0

    @property
    def needs_teacher(self) -> bool:
        """A live teacher is needed unless the loss is pure cross-entropy or reads a teacher cache."""
        return (self.uses_divergence and not self.teacher_cache) or self.lmbda > 0 or self.seq_kd

    def teacher_init_kwargs(self, device) -> dict:
        """`from_pretrained` arguments for a teacher given by name: its dtype, quantization and placement."""
        kwargs = {"dtype": "auto", "trust_remote_code": self.trust_remote_code, **(self.teacher_model_init_kwargs or {})}
        quantization = self.teacher_quantization_config()
        if quantization is not None:
            kwargs["quantization_config"] = quantization
            kwargs.setdefault("device_map", {"": device})  # bitsandbytes weights are placed when loaded
        return kwargs

    def teacher_quantization_config(self) -> BitsAndBytesConfig | None:
        """bitsandbytes settings for a teacher loaded by name (4-bit NF4 with nested quantization, or 8-bit)."""
        if not (self.teacher_load_in_4bit or self.teacher_load_in_8bit):
            return None
        return BitsAndBytesConfig(
            load_in_4bit=self.teacher_load_in_4bit,
            load_in_8bit=self.teacher_load_in_8bit,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if self.bf16 else torch.float32,
        )
