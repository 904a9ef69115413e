"""Collator that turns agent trajectories into token ids plus REASON / ACT masks.

Rows hold either chat `messages` (any chat template, rendered by `chat_template`) or plain `text` (with an optional
`prompt`). Spans found by `segmentation` on characters are mapped to tokens through the fast tokenizer's offset mapping,
so the masks follow whatever the template renders. Every assistant turn is trained (TRL's ChatML collator trains only
the last one), and so is each assistant turn's end-of-turn token, so the student learns when to hand control back to
the environment.

The trainer encodes its datasets once (`encoding.encode_dataset`, with `dataset.map`), so the rows it collates are
already `input_ids` / `token_kinds` / `prompt_length` and are only padded here; raw rows (rollouts, or a user calling
the collator directly) are encoded on the spot with `encode`.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from .chat_template import ChatTemplateRenderer
from .segmentation import ACT, REASON, UNTRAINED, Span, TrajectoryFormatError, segment_text  # noqa: F401 (kind codes live here too)
from .segmentation import paint_spans as _paint

logger = logging.getLogger(__name__)

# Columns a teacher cache adds to a dataset (see `teacher_cache`); passed through to the loss.
CACHED_TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
ON_MALFORMED = ("raise", "skip", "act")
TRUNCATION_MODES = ("keep_start", "keep_end")  # TRL SFTConfig's `truncation_mode`
# `str.isspace()` for every code point up to U+3000, the last one it holds for: a token's kind is that of its first
# other character.
_IS_SPACE = np.array([chr(code).isspace() for code in range(0x3001)] + [False])
_TRUNCATION_WARNINGS = 3  # per collator: a long dataset would otherwise flood the log every epoch


@dataclass
class EncodedTrajectory:
    """One row as token ids with a kind code per token (0 untrained, 1 REASON, 2 ACT).

    `input_ids[:prompt_length]` is the on-policy prompt: the history before the last assistant turn, with the
    generation prompt (a text row's `prompt`). `full_length` counts the tokens before truncation to `max_length`.
    """

    input_ids: list[int]
    kinds: list[int]
    prompt_length: int
    full_length: int
    cached_teacher: dict[str, list] | None = None  # a teacher cache's columns for this row, when attached

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)

    def columns(self) -> dict[str, Any]:
        """The row as the encoded dataset stores it (`ENCODED_COLUMNS`)."""
        return {"input_ids": self.input_ids, "token_kinds": self.kinds, "prompt_length": self.prompt_length}

    @classmethod
    def from_columns(cls, row: dict[str, Any]) -> EncodedTrajectory:
        cached = {name: row[name] for name in CACHED_TEACHER_COLUMNS} if row.get(CACHED_TEACHER_COLUMNS[0]) is not None else None
        ids = list(row["input_ids"])
        return cls(ids, list(row["token_kinds"]), int(row["prompt_length"]), len(ids), cached_teacher=cached)


# The columns of an encoded dataset, and of the rows the collator then only pads.
ENCODED_COLUMNS = tuple(EncodedTrajectory([], [], 0, 0).columns())


class AgentTrajectoryCollator:
    """Tokenize trajectories and emit `input_ids`, `attention_mask`, `labels`, `reason_mask`, `act_mask`.

    Also emits left-padded `prompts` / `prompt_attention_mask` (the history before the last assistant turn, as in
    GKD) so GKD's on-policy generation still works. `labels` is -100 exactly where both masks are 0. Rows already
    encoded (`ENCODED_COLUMNS`, see `encoding.encode_dataset`) are only padded.

    Args:
        tokenizer: a fast tokenizer (offsets are needed); chat rows use its chat template.
        max_length: longer sequences are cut, with a warning; the masks stay aligned.
        truncation_mode: `"keep_start"` cuts the end of a long row, `"keep_end"` its start (TRL's SFTConfig field).
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
        truncation_mode: str = "keep_start",
        use_training_chat_template: bool = True,
    ):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"{type(tokenizer).__name__} is not a fast tokenizer: the collator maps spans to tokens through "
                "offset mappings, which only fast tokenizers provide. Load it with `use_fast=True`."
            )
        if on_malformed not in ON_MALFORMED:
            raise ValueError(f"on_malformed must be one of {ON_MALFORMED}, got {on_malformed!r}.")
        if truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}.")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.style = style
        self.on_malformed = on_malformed
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("The tokenizer has neither a pad token nor an eos token to pad with; set one.")
        self.renderer = ChatTemplateRenderer(tokenizer, use_training_template=use_training_chat_template)
        self.num_skipped = 0
        self.num_truncated = 0

    @classmethod
    def from_config(cls, tokenizer: PreTrainedTokenizerBase, args, **overrides) -> AgentTrajectoryCollator:
        """The collator an `AgentDistillConfig` describes (its length, style, malformed-row and template settings),
        with `overrides` for a collator that differs on purpose (rollouts train unparsed turns as ACT)."""
        settings = dict(
            max_length=args.max_length, style=args.segmentation_style, on_malformed=args.on_malformed,
            truncation_mode=args.truncation_mode, use_training_chat_template=args.use_training_chat_template,
        )
        return cls(tokenizer, **{**settings, **overrides})

    # ------------------------------------------------------------------ batching
    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        encoded = []
        for index, row in enumerate(rows):
            try:
                encoded.append(self._encoded_row(row, index))
            except TrajectoryFormatError as error:
                if self.on_malformed == "raise":
                    raise
                self.num_skipped += 1
                logger.warning("Skipping malformed trajectory (%d skipped so far): %s", self.num_skipped, error)
        if not encoded:
            raise TrajectoryFormatError("every row of this batch is malformed; see the warnings above")
        return self.pad(encoded)

    def _encoded_row(self, row: dict[str, Any], index: int) -> EncodedTrajectory:
        """An already encoded row as it is; a raw one encoded now, its truncation counted and warned about."""
        if row.get("token_kinds") is not None:
            return EncodedTrajectory.from_columns(row)
        row_index = row.get("row_index", index)
        encoded = self.encode(row, row_index=row_index)
        if encoded.truncated:
            self.num_truncated += 1
            if self.num_truncated <= _TRUNCATION_WARNINGS:
                kept = "first" if self.truncation_mode == "keep_start" else "last"
                logger.warning(
                    "Row %s has %d tokens, more than max_length=%d: keeping the %s %d (raise max_length to keep "
                    "the whole trajectory). Further cuts are only counted in `num_truncated`.",
                    row_index, encoded.full_length, self.max_length, kept, self.max_length,
                )
        return encoded

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

    # ------------------------------------------------------------------ one row
    def encode(self, row: dict[str, Any], row_index: int | None = None) -> EncodedTrajectory:
        """Tokenize one row and label each token; malformed rows raise `TrajectoryFormatError` naming the row."""
        try:
            if row.get("messages") is not None:
                text, char_kinds = self._render_messages(row["messages"], row.get("tools"))
                prompt = self._history_prompt(row["messages"], row.get("tools"))
                add_special_tokens = False  # the chat template already wrote BOS and friends
            elif row.get("text") is not None:
                prompt = row.get("prompt") or ""
                text, char_kinds = self._render_text(prompt, row["text"])
                add_special_tokens = True
            else:
                present = sorted(k for k, v in row.items() if v is not None)
                raise TrajectoryFormatError(
                    f"the row has neither 'messages' nor 'text' (its fields: {present}); convert it with "
                    "trl_agent_distill.data.prepare_trajectory_dataset"
                )
        except TrajectoryFormatError as error:
            raise (error.with_row(row_index) if row_index is not None else error) from None
        encoded = self._tokenize(text, char_kinds, add_special_tokens, prompt)
        if row.get(CACHED_TEACHER_COLUMNS[0]) is not None:
            encoded.cached_teacher = {name: row[name] for name in CACHED_TEACHER_COLUMNS}
        return encoded

    def _tokenize(self, text: str, char_kinds: bytearray, add_special_tokens: bool, prompt: str | None) -> EncodedTrajectory:
        encoding = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        offsets = np.fromiter(itertools.chain.from_iterable(encoding["offset_mapping"]), dtype=np.int64).reshape(-1, 2)
        kinds = _token_kinds(text, char_kinds, offsets)
        prompt_length = _prompt_length(text, prompt, offsets, kinds)
        full_length = len(ids)
        if self.max_length is not None and full_length > self.max_length:
            if self.truncation_mode == "keep_end":
                cut = full_length - self.max_length
                ids, kinds, prompt_length = ids[cut:], kinds[cut:], max(prompt_length - cut, 0)
            else:
                ids, kinds = ids[: self.max_length], kinds[: self.max_length]
                prompt_length = min(prompt_length, self.max_length)
        return EncodedTrajectory(ids, kinds.tolist(), prompt_length, full_length)

    def _history_prompt(self, messages: list[dict], tools: Any) -> str | None:
        """What GKD generates the last assistant turn from (see `ChatTemplateRenderer.history_prompt`); when None,
        the prompt ends before the last turn's first trained token (`_prompt_length`)."""
        return self.renderer.history_prompt(messages, tools)

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

        The text is decoded once, incrementally (each token's text is known when it completes a character), so the
        cost is linear in the completion's length. Text the segmenter cannot parse is still the model's own output,
        so it is trained as one ACT span rather than dropped. A token that adds no text takes the kind of the text
        it completes (a character split over several byte tokens); trailing ones (the end-of-turn, special tokens
        that decode to nothing) are ACT: stopping is an action.
        """
        if not completion_ids:
            return []
        stream = DecodeStream(skip_special_tokens=True)
        backend = self.tokenizer.backend_tokenizer
        chunks, ends, length = [], np.zeros(len(completion_ids), dtype=np.int64), 0
        for position, token in enumerate(completion_ids):
            chunk = stream.step(backend, token)
            if chunk:
                chunks.append(chunk)
                length += len(chunk)
            ends[position] = length
        text = "".join(chunks)
        try:
            spans = segment_text(text, self.style, role="assistant")
        except TrajectoryFormatError:
            spans = [Span("act", 0, len(text))] if text else []
        char_kinds = bytearray(len(text))
        _paint(char_kinds, spans, offset=0)
        starts = np.concatenate([[0], ends[:-1]])
        kinds = _token_kinds(text, char_kinds, np.stack([starts, ends], axis=1))
        silent = ends == starts
        speaker = _next_index(~silent)  # the next token with text: a silent one holds its character's first bytes
        inherited = np.where(speaker < len(kinds), kinds[np.minimum(speaker, len(kinds) - 1)], ACT)
        return np.where(silent, inherited, kinds).tolist()


def _concatenate_cached_teacher(encoded: list[EncodedTrajectory]) -> dict[str, torch.Tensor]:
    """Cached teacher rows of the batch, in the row-major order of its trained positions."""
    columns = [e.cached_teacher for e in encoded]
    return {
        "teacher_topk_ids": torch.tensor([i for c in columns for i in c["teacher_topk_ids"]], dtype=torch.long),
        "teacher_topk_logprobs": torch.tensor([v for c in columns for v in c["teacher_topk_logprobs"]]),
        "teacher_tail_logprob": torch.tensor([v for c in columns for v in c["teacher_tail_logprob"]]),
    }


def _token_kinds(text: str, char_kinds: bytearray, offsets: np.ndarray) -> np.ndarray:
    """Kind of each token (character offsets `[start, end)`): that of its first non-space character, since a leading
    space belongs to the word it starts; an all-space token takes its first character's kind; an empty one is
    untrained. Vectorized: rows have thousands of tokens."""
    kinds = np.zeros(len(offsets), dtype=np.int8)
    if not text or not len(offsets):
        return kinds
    codes = np.frombuffer(char_kinds, dtype=np.uint8)
    is_space = _IS_SPACE[np.minimum(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), len(_IS_SPACE) - 1)]
    next_non_space = _next_index(~is_space)
    starts, ends = offsets[:, 0], offsets[:, 1]
    nonempty = ends > starts
    first = np.minimum(starts[nonempty], len(text) - 1)
    word = next_non_space[first]
    kinds[nonempty] = codes[np.where(word < ends[nonempty], word, first)]
    return kinds


def _next_index(mask: np.ndarray) -> np.ndarray:
    """For each position i, the first j >= i where `mask` holds (len(mask) if none)."""
    return np.minimum.accumulate(np.where(mask, np.arange(len(mask)), len(mask))[::-1])[::-1]


def _prompt_length(text: str, prompt: str | None, offsets: np.ndarray, kinds: np.ndarray) -> int:
    """Tokens of the on-policy prompt: those that cover `prompt` when it is a prefix of `text` ending on a token
    boundary; otherwise (a template that renders the history differently on its own, or a boundary inside a token)
    the tokens before the first trained token after the text both renderings share."""
    ends = offsets[:, 1]
    if prompt is not None and text.startswith(prompt):
        boundary = int(np.searchsorted(ends, len(prompt), side="right"))
        if boundary == len(kinds) or offsets[boundary, 0] >= len(prompt):
            return boundary
    else:
        shared = len(os.path.commonprefix([text, prompt])) if prompt else 0
        boundary = int(np.searchsorted(ends, shared, side="right"))
    trained = np.flatnonzero(kinds[boundary:])
    return boundary + int(trained[0]) if trained.size else len(kinds)
