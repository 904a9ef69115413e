"""Collator that turns agent trajectories into token ids plus REASON / ACT masks.

Rows hold either chat `messages` (any chat template) or plain `text` (with an optional `prompt`). Spans found by
`segmentation` on characters are mapped to tokens through the fast tokenizer's offset mapping, so the masks follow
whatever the template renders. Every assistant turn is trained (TRL's ChatML collator trains only the last one), and
so is each assistant turn's end-of-turn token, so the student learns when to hand control back to the environment.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch
from datasets import IterableDataset
from transformers import PreTrainedTokenizerBase

from .segmentation import Span, TrajectoryFormatError, segment_messages, segment_text

logger = logging.getLogger(__name__)

UNTRAINED, REASON, ACT = 0, 1, 2
_KIND_CODES = {"reason": REASON, "act": ACT}
# Columns a teacher cache adds to a dataset (see `teacher_cache`); passed through to the loss.
CACHED_TEACHER_COLUMNS = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")
ON_MALFORMED = ("raise", "skip", "act")
_PROBE = "PROBE7d1f0c"  # plain text: templates that `| trim` must keep it whole
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
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int | None = 4096,
        style: str = "auto",
        on_malformed: str = "raise",
        pad_to_multiple_of: int | None = None,
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
        self.end_of_turn = find_end_of_turn(tokenizer) if tokenizer.chat_template else None
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
        if isinstance(tools, str):
            tools = json.loads(tools)
        spans_per_message = segment_messages(
            messages, self.style, unparsed_as="act" if self.on_malformed == "act" else None
        )
        text = self._apply_template(messages, tools=tools)
        char_kinds = bytearray(len(text))
        content_positions = self._locate_contents(messages, text, tools)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end, shift = content_positions[index]
            _paint(char_kinds, spans_per_message[index], offset=shift, clip=(start, end))
            next_start = next((pos[0] for pos in content_positions[index + 1 :]), len(text))
            self._paint_turn_end(char_kinds, text, message, index, end, next_start)
        return text, char_kinds

    def _locate_contents(self, messages: list[dict], text: str, tools: Any) -> list[tuple[int, int, int]]:
        """Where each message's content sits in the rendered text: (start, end, offset of content char 0)."""
        positions = []
        cursor = 0
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                # Rendering the history with a generation prompt ends exactly where this turn's content begins,
                # when the template renders earlier turns the same way regardless of what follows.
                prefix = self._apply_template(messages[:index], tools=tools, add_generation_prompt=True)
                if text.startswith(prefix) and len(prefix) >= cursor:
                    cursor = len(prefix)
            content = message.get("content") or ""
            start, stripped = _find_content(text, content, cursor)
            if start < 0:
                raise TrajectoryFormatError(
                    "the chat template does not render this message's content verbatim, so its spans cannot be "
                    "placed on tokens; use a template that keeps message text as is",
                    message_index=index,
                )
            shift = start - (len(content) - len(content.lstrip())) if stripped else start
            end = start + len(content.strip() if stripped else content)
            positions.append((start, end, shift))
            cursor = end
        return positions

    def _paint_turn_end(
        self, char_kinds: bytearray, text: str, message: dict, index: int, content_end: int, next_start: int
    ) -> None:
        """Train the end-of-turn marker, and the rendered `tool_calls` before it, as ACT."""
        if self.end_of_turn is None:
            if message.get("tool_calls"):
                raise TrajectoryFormatError(
                    "the assistant message has tool_calls but the chat template marks no end of turn, so the "
                    "rendered call cannot be located",
                    message_index=index,
                )
            return
        eot = text.find(self.end_of_turn, content_end, next_start)
        if eot < 0:
            return  # the template ends this turn without a marker (e.g. a final turn it leaves open)
        start = content_end if message.get("tool_calls") else eot
        char_kinds[start : eot + len(self.end_of_turn)] = bytes([ACT]) * (eot + len(self.end_of_turn) - start)

    def _apply_template(self, messages: list[dict], tools: Any = None, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            [_clean_message(m) for m in messages],
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

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


def find_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant message's content, if any.

    Training needs it (stopping is an action) and generation stops on it (a chat model's eos is often another
    token, e.g. Qwen's `<|endoftext|>` against `<|im_end|>`).
    """
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(probe, tokenize=False)
    except Exception as error:  # a template that rejects the probe gets no end-of-turn training
        logger.warning("Could not probe the chat template's end-of-turn marker: %s", error)
        return None
    position = rendered.find(_PROBE)
    if position < 0:
        logger.warning("The chat template does not render assistant content verbatim; no end-of-turn is trained.")
        return None
    after = rendered[position + len(_PROBE) :]
    special = set(tokenizer.all_special_tokens) | {token.content for token in tokenizer.added_tokens_decoder.values()}
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(ids[:1])
    if first and first[0] in special:
        return first[0]
    logger.warning("The chat template writes no special token after an assistant turn; none will be trained.")
    return None


def _clean_message(message: dict) -> dict:
    """Drop keys a `datasets` row fills with None (e.g. `tool_calls`), which some templates would still render."""
    return {key: value for key, value in message.items() if value is not None}


def _find_content(text: str, content: str, cursor: int) -> tuple[int, bool]:
    """Position of `content` at or after `cursor`, trying it verbatim first and then stripped (`| trim`)."""
    if not content:
        return cursor, False
    position = text.find(content, cursor)
    if position >= 0:
        return position, False
    stripped = content.strip()
    return (text.find(stripped, cursor), True) if stripped else (cursor, True)


def _paint(char_kinds: bytearray, spans: list[Span], offset: int, clip: tuple[int, int] | None = None) -> None:
    low, high = clip if clip is not None else (0, len(char_kinds))
    for span in spans:
        code = _KIND_CODES.get(span.kind)
        if code is None:
            continue
        start, end = max(span.start + offset, low), min(span.end + offset, high)
        if end > start:
            char_kinds[start:end] = bytes([code]) * (end - start)


def _token_kind(text: str, char_kinds: bytearray, start: int, end: int) -> int:
    """A token takes the kind of its first non-space character: a leading space belongs to the word it starts."""
    if end <= start:
        return UNTRAINED
    piece = text[start:end]
    return char_kinds[start + (len(piece) - len(piece.lstrip()) if piece.strip() else 0)]
