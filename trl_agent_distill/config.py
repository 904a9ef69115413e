"""`AgentDistillConfig`: `GKDConfig` plus the span-weighted loss and teacher-loading options."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from transformers import BitsAndBytesConfig
from trl.experimental.gkd import GKDConfig

from .collator import ON_MALFORMED
from .losses import SPAN_NORMALIZATIONS
from .segmentation import STYLES

LOSS_IMPLEMENTATIONS = ("chunked", "logits")
ENVIRONMENTS = ("tasks", "toy")

logger = logging.getLogger(__name__)


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
            "dataset's prompts, or whole agent episodes with `environment`. They are segmented again, so REASON / "
            "ACT masks stay correct."
        },
    )
    environment: str | None = field(
        default=None,
        metadata={
            "help": "Where on-policy batches (lmbda > 0) come from: unset, the student completes the dataset's "
            "prompts (GKD); 'tasks', the student acts as an agent on `rollout_tasks` with its tools, whole episodes "
            "with real observations; 'toy', the same in the toy world of seed `seed` (tasks, corpus, `task` "
            "variable set for you).",
            "choices": list(ENVIRONMENTS),
        },
    )
    on_policy_start_step: int = field(
        default=0,
        metadata={"help": "Optimizer steps before on-policy batches start: a random student's episodes are noise "
                  "that costs full-length generations, so let it learn the format offline first."},
    )
    rollout_tasks: str | None = field(
        default=None, metadata={"help": "Task dataset (question, answer) the student acts on; a .jsonl file or hub name."}
    )
    rollout_corpus: str | None = field(
        default=None, metadata={"help": "Corpus of the rollouts' search tool (see `generate`); none: no search tool."}
    )
    rollout_agent: str = field(default="codeact", metadata={"help": "Agent format of the rollouts.",
                                                            "choices": ["codeact", "react"]})
    rollout_task_variable: str | None = field(
        default=None, metadata={"help": "CodeAct: put the task text in this sandbox variable (e.g. `task`)."}
    )
    rollout_retrieval_top_k: int = field(default=3, metadata={"help": "Documents per search in rollouts."})
    rollout_max_steps: int = field(default=5, metadata={"help": "Agent steps before a rollout ends."})
    rollout_max_new_tokens: int = field(default=256, metadata={"help": "Tokens per rollout step."})
    rollout_temperature: float = field(default=0.9, metadata={"help": "Sampling temperature of rollouts."})
    rollout_top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass of rollouts."})
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
        if self.environment not in (None, *ENVIRONMENTS):
            raise ValueError(f"environment must be one of {ENVIRONMENTS} or unset, got {self.environment!r}.")
        if self.environment == "tasks" and not self.rollout_tasks:
            raise ValueError("environment: tasks needs `rollout_tasks` (a dataset of questions and answers to act on).")
        if self.environment is not None and self.lmbda == 0:
            logger.warning("environment is set but lmbda is 0: no rollouts will run (set lmbda > 0 for on-policy).")
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

    def rollout_task_config(self, toy_world_dir: str | None = None):
        """The agent settings of rollouts as an `AgentTaskConfig` (toy: the world written to `toy_world_dir`)."""
        from .tasks import AgentTaskConfig

        options = dict(
            dataset_name=self.rollout_tasks, dataset_split="train", agent=self.rollout_agent,
            retrieval_corpus=self.rollout_corpus, retrieval_top_k=self.rollout_retrieval_top_k,
            task_variable=self.rollout_task_variable, max_steps=self.rollout_max_steps,
            max_new_tokens=self.rollout_max_new_tokens, temperature=self.rollout_temperature, top_p=self.rollout_top_p,
            seed=self.seed, show_progress=False,
        )
        if self.environment == "toy":
            options.update(dataset_name=f"{toy_world_dir}/train.jsonl", retrieval_corpus=f"{toy_world_dir}/corpus.jsonl",
                           agent="codeact", task_variable=self.rollout_task_variable or "task", retrieval_top_k=1)
        return AgentTaskConfig(**options)

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
