"""Collator that turns agent trajectories into token ids plus REASON / ACT masks.

Rows hold either chat `messages` (any chat template, rendered by `chat_template`) or plain `text` (with an optional
`prompt`). Spans found by `segmentation` on characters are mapped to tokens through the fast tokenizer's offset mapping,
so the masks follow whatever the template renders. Every assistant turn is trained (TRL's ChatML collator trains only
the last one), and so is each assistant turn's end-of-turn token, so the student learns when to hand control back to
the environment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import IterableDataset
from transformers import PreTrainedTokenizerBase

from .chat_template import ChatTemplateRenderer
from .segmentation import ACT, REASON, UNTRAINED, Span, TrajectoryFormatError, segment_text
from .segmentation import paint_spans as _paint

logger = logging.getLogger(__name__)

# Columns a teacher cache adds to a dataset (see `teacher_cache`); passed through to the loss.
CACHED_TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
ON_MALFORMED = ("raise", "skip", "act")
_TRUNCATION_WARNINGS = 3  # per collator: a long dataset would otherwise flood the log every epoch


@dataclass
class EncodedTrajectory:
    """One row as token ids with a kind code per token (0 untrained, 1 REASON, 2 ACT)."""

    input_ids: list[int]
    kinds: list[int]
    prompt_length: int
    truncated: bool
    cached_teacher: dict[str, list] | None = None  # a teacher cache's columns for this row, when attached


class AgentTrajectoryCollator:
    """Tokenize trajectories and emit `input_ids`, `attention_mask`, `labels`, `reason_mask`, `act_mask`.

    Also emits left-padded `prompts` / `prompt_attention_mask` (everything before the first trained token) so
    GKD's on-policy generation still works. `labels` is -100 exactly where both masks are 0.

    Args:
        tokenizer: a fast tokenizer (offsets are needed); chat rows use its chat template.
        max_length: longer sequences are cut at the end, with a warning; the masks stay aligned.
        style: segmentation style (`"auto"`, `"react"`, `"alfworld"`, `"codeact"` or `"none"`).
        on_malformed: `"raise"` a `TrajectoryFormatError`, `"skip"` the row and count it in `num_skipped`, or `"act"`:
            train an assistant turn that does not segment as one ACT span (on-policy rollouts: the student's own
            text is a sample whatever it wrote).
        use_training_chat_template: locate assistant turns with TRL's training chat template for the tokenizer's
            template (`{% generation %}` markers, reasoning kept in every turn) where TRL has one; see `chat_template`.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = 4096,
        style: str = "auto",
        on_malformed: str = "raise",
        pad_to_multiple_of: int | None = None,
        use_training_chat_template: bool = True,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: the collator maps spans to tokens through "
                "offset mappings, which only fast tokenizers provide. Load it with `use_fast=True`."
            )
        if on_malformed not in ON_MALFORMED:
            raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.style = style
        self.on_malformed = on_malformed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with; set one.")
        self.renderer = ChatTemplateRenderer(tokenizer, use_training_template=use_training_chat_template)
        self.num_skipped = 0
        self.num_truncated = 0

    # ------------------------------------------------------------------ batching
    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = []
        for index, row in enumerate(rows):
            try:
                encoded.append(self.encode(row, row_index=row.get("row_index", index)))
            except TrajectoryFormatError as error:
                if self.on_malformed == "raise":
                    raise
                self.num_skipped += 1
                logger.warning("Skipping malformed trajectory (%d skipped so far): %s", self.num_skipped, error)
        if not encoded:
            raise TrajectoryFormatError("every row of this batch is malformed; see the warnings above")
        return self.pad(encoded)

    def pad(self, encoded: list[EncodedTrajectory]) -> dict[str, torch.Tensor]:
        """Right-pad sequences (training) and left-pad prompts (generation)."""
        length = self._padded_length(max(len(e.input_ids) for e in encoded))
        prompt_width = max(e.prompt_length for e in encoded)
        batch = {
            name: torch.full((len(encoded), length), fill, dtype=torch.long)
            for name, fill in [("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100)]
        }
        kinds = torch.zeros((len(encoded), length), dtype=torch.long)
        prompts = torch.full((len(encoded), prompt_width), self.pad_token_id, dtype=torch.long)
        prompt_attention_mask = torch.zeros((len(encoded), prompt_width), dtype=torch.long)
        for i, e in enumerate(encoded):
            n = len(e.input_ids)
            ids = torch.tensor(e.input_ids, dtype=torch.long)
            batch["input_ids"][i, :n] = ids
            batch["attention_mask"][i, :n] = 1
            kinds[i, :n] = torch.tensor(e.kinds, dtype=torch.long)
            batch["labels"][i, :n] = torch.where(kinds[i, :n] > 0, ids, -100)
            if e.prompt_length:
                prompts[i, prompt_width - e.prompt_length :] = ids[: e.prompt_length]
                prompt_attention_mask[i, prompt_width - e.prompt_length :] = 1
        if encoded[0].cached_teacher is not None:
            batch.update(_concatenate_cached_teacher(encoded))
        batch["reason_mask"] = (kinds == REASON).long()
        batch["act_mask"] = (kinds == ACT).long()
        batch["prompts"] = prompts
        batch["prompt_attention_mask"] = prompt_attention_mask
        return batch

    def _padded_length(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if not multiple else -(-length // multiple) * multiple

    def check_dataset(self, dataset, split: str = "train"):
        """Encode every row once, so a malformed trajectory fails before training, naming its row.

        With `on_malformed="skip"` such rows are dropped instead; returns the dataset and how many were dropped.
        Streaming datasets cannot be checked ahead and are returned as they are.
        """
        if isinstance(dataset, IterableDataset):
            return dataset, 0
        keep, truncated_before = [], self.num_truncated
        for index, row in enumerate(dataset):
            try:
                self.encode(row, row_index=index)
                keep.append(index)
            except TrajectoryFormatError as error:
                if self.on_malformed == "raise":
                    raise TrajectoryFormatError(
                        f"{error.reason} (in the {split} dataset; fix the row, or set on_malformed='skip' to drop "
                        "such rows)",
                        row_index=error.row_index,
                        message_index=error.message_index,
                    ) from None
                logger.warning("Dropping %s row %d: %s", split, index, error)
        dropped = len(dataset) - len(keep)
        if dropped:
            logger.warning("Dropped %d malformed rows of %d from the %s dataset.", dropped, len(dataset), split)
            dataset = dataset.select(keep)
        if not len(dataset):
            raise ValueError(f"The {split} dataset has no usable trajectory left.")
        if self.num_truncated > truncated_before:
            logger.warning(
                "%d %s rows are longer than max_length=%s and will be cut at the end.",
                self.num_truncated - truncated_before, split, self.max_length,
            )
        return dataset, dropped

    # ------------------------------------------------------------------ one row
    def encode(self, row: dict[str, Any], row_index: int | None = None) -> EncodedTrajectory:
        """Tokenize one row and label each token; malformed rows raise `TrajectoryFormatError` naming the row."""
        try:
            if row.get("messages") is not None:
                text, char_kinds = self._render_messages(row["messages"], row.get("tools"))
                add_special_tokens = False  # the chat template already wrote BOS and friends
            elif row.get("text") is not None:
                text, char_kinds = self._render_text(row.get("prompt") or "", row["text"])
                add_special_tokens = True
            else:
                present = sorted(k for k, v in row.items() if v is not None)
                raise TrajectoryFormatError(
                    f"the row has neither 'messages' nor 'text' (its fields: {present}); convert it with "
                    "trl_agent_distill.data.prepare_trajectory_dataset"
                )
        except TrajectoryFormatError as error:
            raise error.with_row(row_index) if row_index is not None else error
        encoded = self._tokenize(text, char_kinds, add_special_tokens, row_index)
        if row.get(CACHED_TEACHER_COLUMNS[0]) is not None:
            encoded.cached_teacher = _cached_teacher_of(row, encoded, row_index)
        return encoded

    def _tokenize(
        self, text: str, char_kinds: bytearray, add_special_tokens: bool, row_index: int | None
    ) -> EncodedTrajectory:
        encoding = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        kinds = [_token_kind(text, char_kinds, start, end) for start, end in encoding["offset_mapping"]]
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            self.num_truncated += 1
            if self.num_truncated <= _TRUNCATION_WARNINGS:
                logger.warning(
                    "Row %s has %d tokens, more than max_length=%d: keeping the first %d (raise max_length to keep "
                    "the whole trajectory). Further cuts are only counted in `num_truncated`.",
                    row_index, len(ids), self.max_length, self.max_length,
                )
            ids, kinds = ids[: self.max_length], kinds[: self.max_length]
        prompt_length = next((i for i, kind in enumerate(kinds) if kind), len(kinds))
        return EncodedTrajectory(ids, kinds, prompt_length, truncated)

    def _render_text(self, prompt: str, completion: str) -> tuple[str, bytearray]:
        spans = segment_text(completion, self.style)
        eos = self.tokenizer.eos_token or ""
        text = prompt + completion + eos
        char_kinds = bytearray(len(text))
        _paint(char_kinds, spans, offset=len(prompt))
        # The appended EOS teaches the student to stop once the trajectory is over: an action.
        char_kinds[len(text) - len(eos) :] = bytes([ACT]) * len(eos)
        return text, char_kinds

    def _render_messages(self, messages: list[dict], tools: Any) -> tuple[str, bytearray]:
        unparsed_as = "act" if self.on_malformed == "act" else None
        return self.renderer.render(messages, tools, style=self.style, unparsed_as=unparsed_as)

    # ------------------------------------------------------------------ generated completions
    def completion_kinds(self, completion_ids: list[int]) -> list[int]:
        """Kind codes for generated assistant tokens (on-policy / sequence-level KD), from their decoded text.

        Text the segmenter cannot parse is still the model's own output, so it is trained as one ACT span rather
        than dropped. Special tokens (the end-of-turn) decode to no text and are ACT: stopping is an action.
        """
        pieces = [
            self.tokenizer.decode(completion_ids[: i + 1], skip_special_tokens=True)
            for i in range(len(completion_ids))
        ]
        text = pieces[-1] if pieces else ""
        try:
            spans = segment_text(text, self.style, role="assistant")
        except TrajectoryFormatError:
            spans = [Span("act", 0, len(text))] if text else []
        char_kinds = bytearray(len(text))
        _paint(char_kinds, spans, offset=0)
        kinds, previous_end = [], 0
        for piece in pieces:
            end = max(len(piece), previous_end)
            kinds.append(_token_kind(text, char_kinds, previous_end, end) if end > previous_end else ACT)
            previous_end = end
        return kinds


def _cached_teacher_of(row: dict[str, Any], encoded: EncodedTrajectory, row_index: int | None) -> dict[str, list]:
    """A teacher cache's columns for one row, checked against the row's trained positions (after the shift)."""
    cached = {name: row[name] for name in CACHED_TEACHER_COLUMNS}
    trained = sum(1 for kind in encoded.kinds[1:] if kind)
    if len(cached["teacher_tail_logprob"]) != trained:
        raise TrajectoryFormatError(
            f"the teacher cache holds {len(cached['teacher_tail_logprob'])} positions for this row but it has "
            f"{trained} trained tokens: the cache was built with other tokenization settings; rebuild it",
            row_index=row_index,
        )
    return cached


def _concatenate_cached_teacher(encoded: list[EncodedTrajectory]) -> dict[str, torch.Tensor]:
    """Cached teacher rows of the batch, in the row-major order of its trained positions."""
    columns = [e.cached_teacher for e in encoded]
    return {
        "teacher_topk_ids": torch.tensor([i for c in columns for i in c["teacher_topk_ids"]], dtype=torch.long),
        "teacher_topk_logprobs": torch.tensor([v for c in columns for v in c["teacher_topk_logprobs"]]),
        "teacher_tail_logprob": torch.tensor([v for c in columns for v in c["teacher_tail_logprob"]]),
    }


def _token_kind(text: str, char_kinds: bytearray, start: int, end: int) -> int:
    """A token takes the kind of its first non-space character: a leading space belongs to the word it starts."""
    if end <= start:
        return UNTRAINED
    piece = text[start:end]
    return char_kinds[start + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)]
