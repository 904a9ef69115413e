"""Tiny local models for tests, the CPU demo and notebooks: no hub, no download.

A byte-level BPE tokenizer trained in seconds with `tokenizers` (ChatML special tokens and chat template, like
Qwen2.5), Llama / Qwen2 causal LMs built from configs with deterministic weights, and a teacher / student pair
written to disk. The pair shares one tokenizer, as span-aware KD needs (the divergence compares full next-token
distributions). `prepare_toy_pair` also fine-tunes the teacher briefly on the embedded toy CodeAct trajectories,
so that it has something to teach.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import datasets
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    PrinterCallback,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .config import AgentDistillConfig
from .jsonl import read_jsonl
from .storage import as_stored, publish_folder, read_fingerprint, write_json
from .trainer import AgentDistillTrainer

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)
MAX_POSITIONS = 4096

# ChatML as Qwen2.5 writes it, but content goes out exactly as given (no trim) so span offsets computed on message
# text land on the rendered text. Content may also be a list of {"type": "text"} parts (joined). Assistant turns sit
# in {% generation %} blocks so `return_assistant_tokens_mask=True` (and TRL's assistant_only_loss) work.
# OpenAI-style tool_calls follow the content, one <tool_call> block each; string arguments are already JSON.
CHATML_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is iterable and content is not mapping -%}"
    "{%- for part in content -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- set content = render_content(message['content']) -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{- content -}}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for tool_call in message['tool_calls'] -%}"
    "{%- if tool_call['function'] is defined and tool_call['function'] -%}"
    "{%- set call = tool_call['function'] -%}"
    "{%- else -%}"
    "{%- set call = tool_call -%}"
    "{%- endif -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": ' + call['name'] | tojson + ', \"arguments\": ' -}}"
    "{%- if call['arguments'] is string -%}{{- call['arguments'] -}}"
    "{%- else -%}{{- call['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

MODEL_FAMILIES: dict[str, tuple[type, type]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
TEACHER_DEFAULTS: dict[str, Any] = {"hidden_size": 128, "num_layers": 4, "seed": 0}
STUDENT_DEFAULTS: dict[str, Any] = {"hidden_size": 64, "num_layers": 2, "seed": 1}
RECIPE_FILE = "tiny_pair.json"
SFT_RECORD = "toy_sft.json"  # in the teacher's folder: how the teacher was fine-tuned, with its losses
TOY_TRAJECTORIES = "resources/toy_trajectories.jsonl"
TOY_VOCAB_SIZE = 1024


# ---------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with ChatML special tokens; same texts, same tokenizer."""
    backend = Tokenizer(models.BPE())
    # Byte-level: every string encodes (no unk). No prefix space, so "a" at the start of a turn stays "a".
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps a token's leading space inside its offsets, so offsets tile the text exactly.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END,
        extra_special_tokens=[IM_START],
        model_max_length=MAX_POSITIONS,
        chat_template=CHATML_TEMPLATE,
    )


# -------------------------------------------------------------------------------------------------------- model
def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    vocab_size: int | None = None,
) -> PreTrainedModel:
    """A randomly initialized float32 Llama / Qwen2 causal LM sized for CPU tests; same seed, same weights.

    `vocab_size` may exceed `len(tokenizer)`: real checkpoints pad their embedding matrix (Qwen2.5-0.5B has 151936
    rows, 7B 152064, with one tokenizer), and teacher / student pairs like that must be testable.
    """
    if family not in MODEL_FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; supported families: {sorted(MODEL_FAMILIES)}.")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads}).")
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size ({vocab_size}) is smaller than the tokenizer ({len(tokenizer)} tokens).")
    config_class, model_class = MODEL_FAMILIES[family]
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        # Like Qwen2.5 configs: the tokenizer adds no BOS, the config names <|endoftext|> as BOS.
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id,
        eos_token_id=eos_id,
    )
    # fork_rng: seed the init without disturbing the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).to(torch.float32)
    model.config.dtype = torch.float32
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


# --------------------------------------------------------------------------------------------- teacher / student
def write_tiny_pair(
    output_dir: str | Path,
    texts: Iterable[str],
    teacher_kwargs: dict[str, Any] | None = None,
    student_kwargs: dict[str, Any] | None = None,
    *,
    vocab_size: int = 1024,
    overwrite: bool = False,
) -> tuple[str, str]:
    """Write a tiny teacher and student sharing one tokenizer to `output_dir/teacher` and `output_dir/student`.

    `teacher_kwargs` / `student_kwargs` go to `build_tiny_model` over the defaults (teacher: hidden 128, 4 layers;
    student: hidden 64, 2 layers). An existing pair built from the same texts and settings is kept unless
    `overwrite`, so re-running a demo is fast.
    """
    texts = list(texts)
    teacher_kwargs = {**TEACHER_DEFAULTS, **(teacher_kwargs or {})}
    student_kwargs = {**STUDENT_DEFAULTS, **(student_kwargs or {})}
    recipe = {
        "texts_sha256": _texts_digest(texts),
        "vocab_size": vocab_size,
        "teacher": teacher_kwargs,
        "student": student_kwargs,
    }
    return _write_pair(output_dir, texts, vocab_size, teacher_kwargs, student_kwargs, recipe, overwrite)


def prepare_toy_pair(
    output_dir: str | Path = "outputs/toy",
    teacher_sft_steps: int = 80,
    *,
    overwrite: bool = False,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[str, str]:
    """The CPU demo pair: tokenizer trained on the toy trajectories, teacher fine-tuned on them, raw student.

    The teacher gets `teacher_sft_steps` steps of SFT on the assistant turns, so distillation has a signal to
    transfer; the student stays at its random init. Kept as is on re-runs with the same settings (unless
    `overwrite`). `show_progress`: the teacher's SFT shows a progress bar.
    """
    texts = toy_texts()
    teacher_kwargs = {**TEACHER_DEFAULTS, "seed": seed}
    student_kwargs = {**STUDENT_DEFAULTS, "seed": seed + 1}
    recipe = {
        "texts_sha256": _texts_digest(texts),
        "vocab_size": TOY_VOCAB_SIZE,
        "teacher": teacher_kwargs,
        "student": student_kwargs,
        "teacher_sft_steps": teacher_sft_steps,
    }

    def finetune(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
        losses = sft_teacher(teacher, tokenizer, toy_trajectories(), steps=teacher_sft_steps, seed=seed,
                             show_progress=show_progress)
        return {"data": TOY_TRAJECTORIES, "steps": teacher_sft_steps, "seed": seed, "losses": losses}

    return _write_pair(output_dir, texts, TOY_VOCAB_SIZE, teacher_kwargs, student_kwargs, recipe, overwrite, finetune)


def sft_teacher(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, dataset: datasets.Dataset, steps: int, seed: int = 0,
    show_progress: bool = False,
) -> list[float]:
    """A few steps of cross-entropy on the assistant turns (the library's own SFT baseline); the loss of each step."""
    if steps <= 0:
        return []
    with tempfile.TemporaryDirectory() as scratch:
        args = AgentDistillConfig(
            output_dir=scratch,
            lambda_reason=0.0,
            lambda_act=0.0,
            lambda_ce=1.0,
            max_steps=steps,
            per_device_train_batch_size=4,
            learning_rate=3e-3,
            logging_steps=1,
            activation_checkpointing=False,  # a few-million-parameter model: recomputing costs time, saves nothing
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=not show_progress,
            seed=seed,
        )
        trainer = AgentDistillTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the per-step losses go to the record, not to the console
        trainer.train()
    model.eval()
    return [entry["loss_ce"] for entry in trainer.state.log_history if "loss_ce" in entry]


# -------------------------------------------------------------------------------------------------- toy data
def toy_trajectories() -> datasets.Dataset:
    """The embedded CodeAct toy trajectories (`messages`, `task_id`, `answer`) over an invented world."""
    with resources.as_file(resources.files("trl_agent_distill").joinpath(TOY_TRAJECTORIES)) as path:
        return datasets.Dataset.from_list(read_jsonl(path))


def toy_texts() -> list[str]:
    """Every message content of the toy trajectories, in order: the tokenizer's training text."""
    return [message["content"] for row in toy_trajectories() for message in row["messages"]]


# --------------------------------------------------------------------------------------------------- helpers
def _write_pair(
    output_dir: str | Path,
    texts: list[str],
    vocab_size: int,
    teacher_kwargs: dict[str, Any],
    student_kwargs: dict[str, Any],
    recipe: dict[str, Any],
    overwrite: bool,
    finetune_teacher: Callable[[PreTrainedModel, PreTrainedTokenizerFast], dict[str, Any]] | None = None,
) -> tuple[str, str]:
    root = Path(output_dir)
    teacher_dir, student_dir = root / "teacher", root / "student"
    if not overwrite and _pair_is_current(root, recipe):
        return str(teacher_dir), str(student_dir)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    teacher = build_tiny_model(tokenizer, **teacher_kwargs)
    student = build_tiny_model(tokenizer, **student_kwargs)
    sft_record = finetune_teacher(teacher, tokenizer) if finetune_teacher is not None else None
    # The old recipe goes first and the new one last: a crash in between leaves no recipe, so the next run rebuilds
    # instead of trusting a pair whose teacher and student come from different builds.
    (root / RECIPE_FILE).unlink(missing_ok=True)
    for model, directory, record in ((teacher, teacher_dir, sft_record), (student, student_dir, None)):
        publish_folder(directory, lambda folder, model=model, record=record: _save_model(model, tokenizer, folder, record))
    write_json(root / RECIPE_FILE, recipe)
    return str(teacher_dir), str(student_dir)


def _save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, folder: Path,
                sft_record: dict[str, Any] | None) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if sft_record is not None:
        write_json(folder / SFT_RECORD, sft_record)


def _pair_is_current(root: Path, recipe: dict[str, Any]) -> bool:
    """Both models and the tokenizer are on disk and were built from this recipe."""
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    if not all((root / name / file).is_file() for name in ("teacher", "student") for file in needed):
        return False
    return read_fingerprint(root, fingerprint_name=RECIPE_FILE) == as_stored(recipe)


def _texts_digest(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")  # separator, so ["ab"] and ["a", "b"] differ
    return digest.hexdigest()
