"""`AgentDistillConfig`: `GKDConfig` plus the span-weighted loss and teacher-loading options."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import BitsAndBytesConfig
from trl.experimental.gkd import GKDConfig

from .collator import ON_MALFORMED
from .losses import SPAN_NORMALIZATIONS
from .segmentation import STYLES

LOSS_IMPLEMENTATIONS = ("chunked", "logits")


@dataclass
class AgentDistillConfig(GKDConfig):
    r"""Configuration for [`AgentDistillTrainer`].

    Defaults target offline agent distillation as in the SAD paper: forward KL (`beta=0`) on the teacher's own
    trajectories (`lmbda=0`, no on-policy sampling). Everything `GKDConfig` / `SFTConfig` accept works too.
    `bf16` defaults to what the machine supports (on for a CUDA GPU with bf16, off on CPU).
    """

    _VALID_DICT_FIELDS = GKDConfig._VALID_DICT_FIELDS

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
            "help": "What to do with a trajectory that cannot be segmented: 'raise' (naming the row and message) or "
            "'skip' it and count it in the logs.",
            "choices": list(ON_MALFORMED),
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
            "help": "Probability of replacing a batch by completions the student samples (on-policy). The samples "
            "are segmented again, so REASON / ACT masks stay correct."
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
