"""`AgentDistillTrainer`: TRL's `GKDTrainer` with REASON / ACT span-weighted distillation.

A drop-in replacement: same constructor, same on-policy options (`lmbda`, `seq_kd`), but the loss is
`span_divergence_loss` over every assistant turn of an agent trajectory, observations and prompts untrained,
masks rebuilt for generated completions, exact under gradient accumulation, and QLoRA students / quantized
teachers load from the config alone.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from datasets import Dataset, IterableDataset
from transformers import (
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
)
from trl import SFTTrainer
from trl.experimental.gkd import GKDTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

from .collator import ACT, REASON, AgentTrajectoryCollator
from .config import AgentDistillConfig
from .encoding import EncodingReport, encode_dataset
from .envs.toy import ToyWorld
from .heads import FinalHiddenStates, LogitHead, final_norm, logit_head
from .losses import (
    DenseTeacher,
    SpanLossOutput,
    SparseTeacher,
    chunked_span_divergence_loss,
    span_divergence_loss,
    span_normalizers,
)
from .model_refs import resolve_model
from .quantization import keep_4bit_training_layout
from .rollout import AgentRollouts
from .storage import check_writable_directory
from .teacher_cache import attach_teacher_cache, load_teacher_cache, run_fingerprint, sparse_teacher_from_batch
from .vocabulary import added_tokens_appended, load_tokenizer, tokenizer_mismatch, tokenizer_source

logger = logging.getLogger(__name__)

_STAT_NAMES = ("reason_sum", "reason_tokens", "act_sum", "act_tokens", "ce_sum")
# Summed over a logging window: how many rollout batches ran, their wall time, episodes, and trained tokens per kind.
_ROLLOUT_STAT_NAMES = ("rollout_batches", "rollout_seconds", "rollout_episodes", "rollout_skipped_empty",
                       "rollout_errors", "rollout_fallback_batches", "rollout_tokens_reason", "rollout_tokens_act")


class AgentDistillTrainer(GKDTrainer):
    """Distill a teacher agent into a student with `lambda_reason * KL_reason + lambda_act * KL_act`.

    Args:
        model: the student (a model or a name / path; `args.model_init_kwargs` may carry a 4-bit
            `quantization_config` for QLoRA together with `peft_config`).
        teacher_model: the teacher (a model or a name / path; defaults to `args.teacher_model_name_or_path`). It may be
            omitted for the pure cross-entropy (SFT) baseline. Teacher and student must share a tokenizer: the
            teacher's, loaded from its name or from the path its config records, is compared with
            `processing_class` and a different one is refused (a teacher object with no tokenizer to load is only
            checked by vocabulary size, with a warning). A vocabulary padded to a different size (Qwen2.5-0.5B vs
            7B) is fine.
        train_dataset / eval_dataset: rows with `messages` or `text` (see `AgentTrajectoryCollator`). Every row is
            encoded once before training starts (`encoding.encode_dataset`: `dataset.map`, cached), so a malformed
            trajectory fails at once, naming its row, and a dataset with nothing to train fails before any model
            loads.
        data_collator: defaults to an `AgentTrajectoryCollator` built from `args`. A collator that yields GKD's keys
            only (`input_ids`, `attention_mask`, `labels`, `prompts`, `prompt_attention_mask`, e.g. TRL's
            `DataCollatorForChatML`) trains every labelled token as one ACT span: GKD's loss, times `lambda_act`.

    GKD's hooks work as in `GKDTrainer`: `trainer.beta` (and `lmbda`, `seq_kd`) may be changed after construction,
    and a subclass may override `generalized_jsd_loss`; it is then called as GKD calls it, once per span kind with
    the other kind's labels masked, and the loss takes the logits path (full logits, said once in a warning).
    """

    _tag_names = ["trl", "gkd", "trl-agent-distill"]
    _name = "AgentDistill"

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        teacher_model: PreTrainedModel | nn.Module | str | None = None,
        args: AgentDistillConfig | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
    ):
        if args is None:
            args = AgentDistillConfig(output_dir="agent-distill")
        if not isinstance(args, AgentDistillConfig):
            raise TypeError(f"args must be an AgentDistillConfig, got {type(args).__name__}.")
        if args.packing or args.padding_free:
            raise ValueError("packing / padding_free are not supported: REASON / ACT masks are per trajectory.")
        if formatting_func is not None:
            raise ValueError("formatting_func is not supported: give rows with 'messages' or 'text' instead.")
        check_writable_directory(args.output_dir, "output_dir")  # before encoding, model loading and training
        # A GGUF file (path or `package:file`) becomes its converted directory; other references are unchanged.
        model = resolve_model(model) if isinstance(model, str) else model
        teacher_wanted = args.needs_teacher or (args.uses_divergence and eval_dataset is not None)
        if teacher_model is None and teacher_wanted:  # a teacher cache alone needs no teacher weights
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None and args.needs_teacher:
            raise ValueError(
                "No teacher: pass teacher_model= or set teacher_model_name_or_path. Only the pure cross-entropy "
                "baseline (lambda_reason = lambda_act = 0, lambda_ce > 0, lmbda = 0) runs without one."
            )
        if isinstance(teacher_model, str):
            teacher_model = resolve_model(teacher_model)
        if args.teacher_model_init_kwargs is not None and teacher_model is not None and not isinstance(teacher_model, str):
            raise ValueError("teacher_model_init_kwargs was set, but the teacher model is already instantiated.")

        processing_class = processing_class or _load_tokenizer(model, args)
        if data_collator is None:
            data_collator = AgentTrajectoryCollator.from_config(processing_class, args)
        self.encoding_reports: dict[str, EncodingReport] = {}
        if isinstance(data_collator, AgentTrajectoryCollator):
            train_dataset = self._encode_dataset(train_dataset, data_collator, "train", args)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._encode_dataset(v, data_collator, k, args) for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._encode_dataset(eval_dataset, data_collator, "eval", args)

        self._cache_topk = None
        if args.teacher_cache:
            train_dataset = self._attach_teacher_cache(train_dataset, processing_class, args)
            if eval_dataset is not None and teacher_model is None:
                raise ValueError(
                    "The teacher cache covers the training rows only: evaluation needs a live teacher too "
                    "(teacher_model_name_or_path), or no eval_dataset."
                )

        # The encoded columns (or a custom collator's raw ones) must reach the collator; TRL's preparation would
        # tokenize again or drop them.
        args.remove_unused_columns = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        SFTTrainer.__init__(
            self,
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        # Our loss divides by `num_items_in_batch` itself, so the Trainer must count it and not rescale the loss.
        self.model_accepts_loss_kwargs = True
        keep_4bit_training_layout(self.model, "student")  # rollouts and evaluation must not change how it trains

        self.teacher_model = None
        self._shared_vocab_size = self.model.config.get_text_config().vocab_size
        if teacher_model is not None:
            teacher_name = teacher_model if isinstance(teacher_model, str) else None
            if teacher_name is not None:
                teacher_model = self._load_teacher(teacher_name)
            self._shared_vocab_size = self._check_vocabularies(teacher_model, teacher_name)
            keep_4bit_training_layout(teacher_model, "teacher")  # the same logits on every CPU, live or cached
            if self.is_deepspeed_enabled:
                self.teacher_model = prepare_deepspeed(teacher_model, self.accelerator)
            else:
                self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
            self.teacher_model.eval()
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        # A live teacher forward is needed for the divergence unless every batch brings cached teacher rows.
        self._uses_teacher_logits = args.uses_divergence and self.teacher_model is not None
        if args.teacher_cache and self._overrides_divergence():
            raise ValueError(
                f"{type(self).__name__} overrides generalized_jsd_loss, which needs the teacher's full logits, but "
                "teacher_cache holds only its top-k log-probabilities: train with a live teacher (no teacher_cache)."
            )
        self._warned_divergence_override = False
        self._chunked = self._setup_chunked_loss()

        self.lmbda = args.lmbda
        self.beta = args.beta
        self.temperature = args.temperature
        self.seq_kd = args.seq_kd
        self.generation_kwargs = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "do_sample": True,
            "top_k": 0,
            "top_p": 1.0,
            "use_cache": not args.gradient_checkpointing,
            "pad_token_id": self.processing_class.pad_token_id,
        }
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        # Chat models stop on their end-of-turn token (Llama 3's <|eot_id|>, ChatML's <|im_end|>), not only EOS.
        model_eos = getattr(self.model.generation_config, "eos_token_id", None)
        self.generation_config.eos_token_id = model_eos if model_eos is not None else self.processing_class.eos_token_id

        self._span_token_counts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._span_stats = {mode: torch.zeros(len(_STAT_NAMES), dtype=torch.float64) for mode in ("train", "eval")}
        self._rollouts = self._setup_rollouts(args) if args.lmbda > 0 and args.rollout is not None else None
        self._rollout_stats = dict.fromkeys(_ROLLOUT_STAT_NAMES, 0.0)
        self._completion_collator: AgentTrajectoryCollator | None = None

    # ------------------------------------------------------------------ setup
    def _attach_teacher_cache(self, dataset, tokenizer, args: AgentDistillConfig):
        if not isinstance(dataset, Dataset):
            raise ValueError("teacher_cache needs a map-style training dataset (rows are matched by position).")
        expected = run_fingerprint(args, tokenizer, dataset)
        cached_rows, fingerprint = load_teacher_cache(args.teacher_cache, expected)
        self._cache_topk = fingerprint.topk
        return attach_teacher_cache(dataset, cached_rows)

    def _encode_dataset(self, dataset, collator: AgentTrajectoryCollator, split: str, args: AgentDistillConfig):
        if dataset is None:
            return None
        dataset, report = encode_dataset(dataset, collator, split, num_proc=args.dataset_num_proc)
        self.encoding_reports[split] = report
        if split == "train" and report.fell_back and collator.style == "auto":
            # Token-level for the whole run: evaluation rows and generated completions are labelled alike.
            collator.style = "none"
        return dataset

    @property
    def num_malformed_skipped(self) -> int:
        """Training rows dropped as malformed (`on_malformed="skip"`); a streamed dataset counts them as it goes."""
        report = self.encoding_reports.get("train")
        return report.malformed_skipped if report is not None else 0

    def _load_teacher(self, name_or_path: str) -> PreTrainedModel:
        return create_model_from_path(name_or_path, **self.args.teacher_init_kwargs(self.accelerator.device))

    def _check_vocabularies(self, teacher_model: nn.Module, teacher_name: str | None = None) -> int:
        """The number of logit columns both models share; fails when the teacher has another tokenizer, or when
        the tokenizer does not fit in both models."""
        self._check_teacher_tokenizer(teacher_model, teacher_name)
        student_size = self.model.config.get_text_config().vocab_size
        teacher_size = teacher_model.config.get_text_config().vocab_size
        tokenizer_size = len(self.processing_class)
        if student_size != teacher_size and tokenizer_size > min(student_size, teacher_size):
            raise ValueError(
                f"The student has vocab_size {student_size} and the teacher vocab_size {teacher_size}, and the "
                f"tokenizer has {tokenizer_size} tokens: they do not share a vocabulary, so their next-token "
                "distributions cannot be compared. Use a teacher and student of one model family, or TRL's GOLD "
                "trainer (trl.experimental.gold) for cross-tokenizer distillation."
            )
        return min(student_size, teacher_size)

    def _check_teacher_tokenizer(self, teacher_model: nn.Module, teacher_name: str | None) -> None:
        student = self.processing_class
        source = tokenizer_source(teacher_model, teacher_name)
        if source is not None and source == student.name_or_path:
            return  # the student's tokenizer was loaded from the same files
        teacher = load_tokenizer(source, self.args.trust_remote_code) if source else None
        if teacher is None:
            logger.warning(
                "The teacher %s has no tokenizer to compare with the student's, so only vocabulary sizes are checked. "
                "Pass the teacher by name or path (or a model loaded with from_pretrained from a folder holding its "
                "tokenizer) to have the tokenizers compared.",
                f"({source})" if source else "(a model object that names no checkpoint)",
            )
            return
        mismatch = tokenizer_mismatch(student, teacher)
        if mismatch is not None:
            student_source = student.name_or_path or "processing_class"
            raise ValueError(
                f"The teacher's tokenizer ({source}) is not the student's ({student_source}): {mismatch}. The "
                "divergence compares both models' next-token distributions id by id, so they must share a tokenizer. "
                "Use a teacher of the student's model family (a vocabulary padded to another size, like Qwen2.5-0.5B "
                "vs 7B, is fine), or TRL's GOLD trainer (trl.experimental.gold) for cross-tokenizer distillation."
            )
        appended = added_tokens_appended(student, teacher)
        if appended:
            logger.warning(
                "The student's tokenizer has tokens the teacher's lacks, after its last id: %s. The teacher's logits "
                "for them come from its untrained (padded) embedding rows, if it has any.", appended,
            )

    def _setup_rollouts(self, args: AgentDistillConfig) -> AgentRollouts:
        """The student's episodes for on-policy batches (`rollout`); a world is written once, by the main process."""
        if args.rollout_world is not None:
            if self.accelerator.is_main_process:
                ToyWorld.generate(args.seed).save(args.rollout_world_dir)
            self.accelerator.wait_for_everyone()
        config = args.rollout_task_config()
        style = args.segmentation_style if args.segmentation_style != "auto" else config.agent
        self._rollout_collator = AgentTrajectoryCollator.from_config(
            self.processing_class, args, style=style, on_malformed="act"
        )
        return AgentRollouts(config, self.processing_class, seed=args.seed + self.accelerator.process_index)

    # ------------------------------------------------------------------ training
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """GKD's step, with the REASON / ACT masks of generated completions rebuilt from their text; with an
        `rollout`, the on-policy batch is instead whole agent episodes the student plays."""
        generator = None
        if random.random() < self.lmbda and self.state.global_step >= self.args.on_policy_start_step:
            if self._rollouts is None:
                generator = model
            else:
                inputs = self._rollout_inputs(model, inputs["input_ids"].shape[0]) or inputs
        elif self.seq_kd:
            generator = self.teacher_model
        if generator is not None:
            missing = [key for key in ("prompts", "prompt_attention_mask") if key not in inputs]
            if missing:
                raise ValueError(
                    f"lmbda > 0 and seq_kd generate completions from the batch's prompts, but the data collator gave "
                    f"no {missing}: use a collator that emits them (AgentTrajectoryCollator, TRL's "
                    "DataCollatorForChatML), or set lmbda=0 and seq_kd=False."
                )
            with self._unwrapped_for_generation(generator) as unwrapped:
                input_ids, attention_mask, labels = self.generate_on_policy_outputs(
                    unwrapped, inputs, self.generation_config
                )
            if "reason_mask" in inputs:
                generated = self._relabel_generated(input_ids, attention_mask, inputs["prompts"].shape[1])
            else:  # GKD's keys only: every generated token is trained, as one span, as GKD trains it
                generated = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
            inputs = {**inputs, **generated}
        if self.lmbda > 0 or self.seq_kd:
            # Token counts taken from the dataset's labels are stale once any batch may be regenerated:
            # normalize each micro-batch locally and let the Trainer average over accumulation steps.
            num_items_in_batch = None
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    def _unwrapped_for_generation(self, model: nn.Module):
        return unwrap_model_for_generation(
            model,
            self.accelerator,
            generation_kwargs=self.generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
        )

    def _rollout_inputs(self, model: nn.Module, count: int) -> dict[str, torch.Tensor] | None:
        """A batch of `count` student episodes, collated and on the device; None when every episode was empty."""
        with self._unwrapped_for_generation(model) as unwrapped:
            batch = self._rollouts.collect(unwrapped, count)
        model.train()  # the generation backend switched the student to eval mode
        stats = self._rollout_stats
        stats["rollout_batches"] += 1
        stats["rollout_seconds"] += batch.seconds
        stats["rollout_episodes"] += batch.episodes
        stats["rollout_skipped_empty"] += batch.skipped_empty
        stats["rollout_errors"] += len(batch.errors)
        if not batch.rows:
            stats["rollout_fallback_batches"] += 1  # nothing to learn from: the dataset batch is used instead
            return None
        collated = self._rollout_collator(batch.rows)
        stats["rollout_tokens_reason"] += float(collated["reason_mask"].sum())
        stats["rollout_tokens_act"] += float(collated["act_mask"].sum())
        return self._prepare_inputs(collated)

    def _relabel_generated(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> dict:
        collator = self._mask_collator()
        kinds = torch.zeros_like(input_ids)
        for row in range(input_ids.shape[0]):
            completion = input_ids[row, prompt_width:][attention_mask[row, prompt_width:].bool()]
            if completion.numel():
                row_kinds = collator.completion_kinds(completion.tolist())
                kinds[row, prompt_width : prompt_width + len(row_kinds)] = torch.tensor(row_kinds, device=kinds.device)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": torch.where(kinds > 0, input_ids, -100),
            "reason_mask": (kinds == REASON).long(),
            "act_mask": (kinds == ACT).long(),
        }

    def _mask_collator(self) -> AgentTrajectoryCollator:
        """Labels generated completions: the data collator, or (a custom collator with span masks) one built once."""
        if isinstance(self.data_collator, AgentTrajectoryCollator):
            return self.data_collator
        if self._completion_collator is None:
            self._completion_collator = AgentTrajectoryCollator.from_config(self.processing_class, self.args)
        return self._completion_collator

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Also count REASON and ACT tokens over the whole accumulation window, for 'span' normalization."""
        num_items_in_batch = super()._get_num_items_in_batch(batch_samples, device)
        if batch_samples:
            masks = [_span_masks(batch) for batch in batch_samples]
            counts = torch.stack([sum(mask[kind][:, 1:].sum() for mask in masks) for kind in (0, 1)]).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                counts = self.accelerator.gather(counts.unsqueeze(0)).sum(0)
            self._span_token_counts = (counts[0], counts[1])
        return num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if self.model.training else "eval"
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "use_cache": False}
        loss_kwargs = dict(
            lambda_reason=args.lambda_reason,
            lambda_act=args.lambda_act,
            beta=self.beta,
            temperature=args.loss_temperature,
            num_items_in_batch=num_items_in_batch,
            labels=inputs["labels"][:, 1:],
            lambda_ce=args.lambda_ce,
            span_normalization=args.span_normalization,
            span_token_counts=self._span_token_counts if num_items_in_batch is not None else None,
        )
        masks = tuple(mask[:, 1:] for mask in _span_masks(inputs))
        # Evaluation with `compute_metrics` needs the student's logits, so it takes the logits path; so does a
        # subclass's own `generalized_jsd_loss`, which takes logits.
        if self._chunked is not None and not return_outputs and not self._divergence_forces_logits():
            student_outputs, output = self._chunked_loss(model, inputs, model_inputs, masks, loss_kwargs)
        else:
            student_outputs, output = self._logits_loss(model, inputs, model_inputs, masks, loss_kwargs)
        loss = output.loss
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            # The count is global, and DDP averages gradients over processes: undo that average, as Trainer does.
            loss = loss * self.accelerator.num_processes
        stats = torch.stack([getattr(output, name).float() for name in _STAT_NAMES])
        self._span_stats[mode] += self.accelerator.gather(stats.unsqueeze(0)).sum(0).double().cpu()
        return (loss, student_outputs) if return_outputs else loss

    def _logits_loss(self, model, inputs, model_inputs, masks, loss_kwargs):
        vocab = self._shared_vocab_size
        student_outputs = model(**model_inputs)
        student_logits = student_outputs.logits[:, :-1, :vocab]
        teacher = self._cached_teacher(inputs)
        if teacher is None and self._uses_teacher_logits:
            with torch.no_grad():
                teacher = self.teacher_model(**model_inputs).logits[:, :-1, :vocab]
        if teacher is None:
            teacher = student_logits  # pure cross-entropy: no divergence is computed
        if self._overrides_divergence() and self._uses_teacher_logits and not isinstance(teacher, SparseTeacher):
            return student_outputs, self._overridden_divergence_loss(student_logits, teacher, masks, loss_kwargs)
        return student_outputs, span_divergence_loss(student_logits, teacher, *masks, **loss_kwargs)

    def _divergence_forces_logits(self) -> bool:
        """Whether an overridden `generalized_jsd_loss` (it takes logits) rules out the chunked loss; said once."""
        if self.args.loss_implementation != "chunked" or not self._uses_teacher_logits:
            return False
        if not self._overrides_divergence():
            return False
        if not self._warned_divergence_override:
            logger.warning(
                "%s overrides generalized_jsd_loss, which takes full logits: using loss_implementation='logits' "
                "(full (batch, tokens, vocab) logits of both models, more memory) instead of the chunked loss.",
                type(self).__name__,
            )
            self._warned_divergence_override = True
        return True

    def _overrides_divergence(self) -> bool:
        """Whether `generalized_jsd_loss` (GKD's hook for the divergence) was replaced, in a subclass or instance."""
        divergence = self.generalized_jsd_loss
        return getattr(divergence, "__func__", divergence) is not GKDTrainer.generalized_jsd_loss

    def _overridden_divergence_loss(self, student_logits, teacher_logits, masks, loss_kwargs) -> SpanLossOutput:
        """The span-weighted loss with the overridden `generalized_jsd_loss` as the divergence of each kind.

        It is called as GKD calls it (`labels`, `beta`, `num_items_in_batch`; `temperature` only when
        `loss_temperature` is not 1), once per span kind with the other kind's labels set to -100, and with
        `num_items_in_batch` set to what that kind's sum is divided by, so a per-token sum over the kept labels
        divided by `num_items_in_batch` (GKD's own reduction) weighs exactly as the built-in divergence does.
        """
        labels = loss_kwargs["labels"]
        weights = loss_kwargs["lambda_reason"], loss_kwargs["lambda_act"]
        # The cross-entropy part and the token counts, without the built-in divergence.
        output = span_divergence_loss(
            student_logits, teacher_logits, *masks, **{**loss_kwargs, "lambda_reason": 0.0, "lambda_act": 0.0}
        )
        normalizers = span_normalizers(
            output.reason_tokens, output.act_tokens, loss_kwargs["span_normalization"],
            loss_kwargs["num_items_in_batch"], loss_kwargs["span_token_counts"],
        )
        extra = {"temperature": loss_kwargs["temperature"]} if loss_kwargs["temperature"] != 1.0 else {}
        loss, sums = output.loss, []
        for mask, weight, normalizer in zip(masks, weights, normalizers):
            if weight == 0.0 or not mask.any():
                sums.append(torch.zeros((), device=student_logits.device))
                continue
            divergence = self.generalized_jsd_loss(
                student_logits=student_logits,
                teacher_logits=teacher_logits,
                labels=torch.where(mask.bool(), labels, -100),
                beta=self.beta,
                num_items_in_batch=normalizer,
                **extra,
            )
            loss = loss + weight * divergence
            sums.append(divergence.detach() * normalizer)
        return dataclasses.replace(output, loss=loss, reason_sum=sums[0], act_sum=sums[1])

    def _chunked_loss(self, model, inputs, model_inputs, masks, loss_kwargs):
        """Run both models for one position of logits only, and take the loss from their final hidden states."""
        student_states, teacher_states = self._chunked
        student_outputs = model(**model_inputs, logits_to_keep=1)
        student_hidden = student_states.pop()[:, :-1]
        teacher = self._cached_teacher(inputs)
        if teacher is None and self._uses_teacher_logits:
            trained = (masks[0] | masks[1]).bool()
            with torch.no_grad():
                self.teacher_model(**model_inputs, logits_to_keep=1)
                teacher = DenseTeacher(teacher_states.pop()[:, :-1][trained], self._head(self.teacher_model))
        output = chunked_span_divergence_loss(
            student_hidden, self._head(model), teacher, *masks, chunk_size=self.args.loss_chunk_size, **loss_kwargs
        )
        return student_outputs, output

    def _cached_teacher(self, inputs) -> SparseTeacher | None:
        if "teacher_topk_ids" not in inputs:
            return None
        return sparse_teacher_from_batch(inputs)

    def _head(self, model) -> LogitHead:
        """The model's output head restricted to the vocabulary both models share (looked up per step: cheap)."""
        head = logit_head(model)
        vocab = self._shared_vocab_size
        return dataclasses.replace(
            head, weight=head.weight[:vocab], bias=head.bias[:vocab] if head.bias is not None else None
        )

    def _setup_chunked_loss(self) -> tuple[FinalHiddenStates, FinalHiddenStates | None] | None:
        """Hooks for the chunked loss, or None (logits path) when asked for, or when a model's head is unknown."""
        if self.args.loss_implementation != "chunked" or self._divergence_forces_logits():
            return None
        models = [self.model] + ([self.teacher_model] if self._uses_teacher_logits else [])
        unsupported = [type(m).__name__ for m in models if logit_head(m) is None or final_norm(m) is None]
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            unsupported.append("FSDP / DeepSpeed (sharded output heads)")
        if unsupported:
            logger.warning(
                "The chunked loss does not know how %s compute logits; using loss_implementation='logits' (full "
                "logits, more memory).",
                ", ".join(unsupported),
            )
            return None
        teacher_states = FinalHiddenStates(self.teacher_model) if self._uses_teacher_logits else None
        return FinalHiddenStates(self.model), teacher_states

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add per-kind mean divergences (`loss_reason`, `loss_act`, `loss_ce`) and token counts to the logs."""
        mode = "train" if self.model.training else "eval"
        stats = dict(zip(_STAT_NAMES, self._span_stats[mode].tolist()))
        trained = stats["reason_tokens"] + stats["act_tokens"]
        if trained:
            metrics = self._metrics[mode]
            metrics["loss_reason"] = [stats["reason_sum"] / max(stats["reason_tokens"], 1)]
            metrics["loss_act"] = [stats["act_sum"] / max(stats["act_tokens"], 1)]
            if self.args.lambda_ce > 0:
                metrics["loss_ce"] = [stats["ce_sum"] / trained]
            metrics["tokens_reason"] = [stats["reason_tokens"]]
            metrics["tokens_act"] = [stats["act_tokens"]]
            if mode == "train" and self.num_malformed_skipped:
                metrics["malformed_rows_skipped"] = [self.num_malformed_skipped]
        if mode == "train" and self._rollout_stats["rollout_batches"]:
            for name, value in self._rollout_stats.items():
                self._metrics[mode][name] = [value]
            self._rollout_stats = dict.fromkeys(_ROLLOUT_STAT_NAMES, 0.0)
        self._span_stats[mode].zero_()
        super().log(logs, start_time)


def _span_masks(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's REASON and ACT masks (not shifted). Without them (a collator yielding GKD's keys only), the
    labelled tokens (labels != -100) are one ACT span, so the loss is GKD's token-level divergence."""
    if "reason_mask" in batch and "act_mask" in batch:
        return batch["reason_mask"], batch["act_mask"]
    if "reason_mask" in batch or "act_mask" in batch:
        given, absent = ("reason_mask", "act_mask") if "reason_mask" in batch else ("act_mask", "reason_mask")
        raise ValueError(
            f"The batch has '{given}' but no '{absent}': a collator gives both span masks, or neither (then every "
            "labelled token is trained as one span)."
        )
    act = (batch["labels"] != -100).long()
    return torch.zeros_like(act), act


def _load_tokenizer(model: Any, args: AgentDistillConfig) -> PreTrainedTokenizerBase:
    name = model if isinstance(model, str) else model.config._name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
