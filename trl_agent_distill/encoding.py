"""Encode a trajectory dataset once: token ids, a REASON / ACT kind per token, and the on-policy prompt.

Like TRL's `SFTTrainer._prepare_dataset`, the trainer tokenizes with `dataset.map` (`dataset_num_proc` processes,
cached by the dataset's fingerprint, so a second run with the same data and settings encodes nothing), and the
collator then only pads. The columns are `ENCODED_COLUMNS`: `input_ids`, `token_kinds` (0 untrained, 1 REASON,
2 ACT) and `prompt_length` (`input_ids[:prompt_length]` is the history before the last assistant turn, what GKD
samples that turn from). Decisions that need the whole dataset are taken here, from columns the map writes:

- malformed rows raise `TrajectoryFormatError` naming the row and message, or with `on_malformed="skip"` are dropped
  and counted;
- `segmentation_style="auto"` on a dataset where no row has agent step markers (plain chat, as GKD's data) falls
  back to token-level distillation (style `none`), said once in the log; marked and unmarked rows mixed still raise;
- rows left with no trained token (e.g. cut by `max_length`) are dropped with a warning, and a dataset with none at
  all is an error before any model is loaded.

Streaming datasets are encoded lazily with `IterableDataset.map`; there `auto` decides from the first rows.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, IterableDataset
from trl.trainer.utils import global_then_local_main_first

from .collator import AgentTrajectoryCollator
from .segmentation import NoAgentMarkersError, TrajectoryFormatError

logger = logging.getLogger(__name__)

# Written by the map next to the encoded columns, read by the dataset-level checks, then removed.
_FULL_LENGTH, _TRAINED, _ERROR, _UNMARKED = "_full_length", "_trained_tokens", "_error", "_unmarked"
_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "token_kinds": datasets.List(datasets.Value("int8")),
        "prompt_length": datasets.Value("int32"),
        _FULL_LENGTH: datasets.Value("int32"),
        _TRAINED: datasets.Value("int32"),
        _ERROR: datasets.Value("string"),
        _UNMARKED: datasets.Value("bool"),
    }
)
_STREAM_PEEK_ROWS = 64  # rows of a streamed dataset that decide `auto`'s fallback
_REASONS_LOGGED = 3


@dataclass
class EncodingReport:
    """What encoding one split did: rows kept and dropped, rows cut by `max_length`, and the style in effect."""

    split: str
    style: str
    rows: int | None = None  # None for a streamed dataset
    malformed_skipped: int = 0
    truncated: int = 0
    untrained_dropped: int = 0

    @property
    def fell_back(self) -> bool:
        return self.style == "none"


def encode_dataset(
    dataset: Dataset | IterableDataset,
    collator: AgentTrajectoryCollator,
    split: str = "train",
    num_proc: int | None = None,
) -> tuple[Dataset | IterableDataset, EncodingReport]:
    """Encode `dataset` with `collator`'s settings; returns the encoded dataset and what was done.

    Every other column is dropped: the encoded rows are all the collator and the loss need.
    """
    if isinstance(dataset, IterableDataset):
        return _encode_stream(dataset, collator, split)
    report = EncodingReport(split, collator.style)
    encoder = _RowEncoder(collator, split, fallback=None)
    with global_then_local_main_first():
        encoded = dataset.map(
            encoder, with_indices=True, remove_columns=dataset.column_names, features=_FEATURES, num_proc=num_proc,
            desc=f"Encoding the {split} dataset",
        )
    errors = encoded.data.column(_ERROR).to_pylist()
    if collator.style == "auto":
        report.style = _auto_style(dataset, encoded, errors, encoder)
    trained = np.asarray(encoded.data.column(_TRAINED).to_numpy())
    full_length = np.asarray(encoded.data.column(_FULL_LENGTH).to_numpy())
    malformed = np.array([error is not None for error in errors], dtype=bool)
    untrained = ~malformed & (trained == 0)
    cut = ~malformed & (full_length > collator.max_length) if collator.max_length is not None else np.zeros_like(malformed)
    report.malformed_skipped, report.truncated = int(malformed.sum()), int(cut.sum())
    report.untrained_dropped = int(untrained.sum())
    _log_dropped(errors, split, len(dataset))
    if report.untrained_dropped:
        logger.warning(
            "%d rows of the %s dataset have no trained token (%d of them cut to max_length=%s with truncation_mode=%r)"
            ": they are dropped. Raise max_length, or use truncation_mode='keep_end' to keep the ends of long "
            "trajectories.",
            report.untrained_dropped, split, int((untrained & cut).sum()), collator.max_length, collator.truncation_mode,
        )
    elif report.truncated:
        logger.warning(
            "%d %s rows are longer than max_length=%s and were cut (truncation_mode=%s).",
            report.truncated, split, collator.max_length, collator.truncation_mode,
        )
    keep = np.flatnonzero(~malformed & ~untrained)
    if not keep.size:
        raise ValueError(_nothing_to_train(split, len(dataset), report, collator))
    if keep.size < len(encoded):
        encoded = encoded.select(keep)
    report.rows = len(encoded)
    return encoded.remove_columns([_FULL_LENGTH, _TRAINED, _ERROR, _UNMARKED]), report


def trained_token_counts(encoded: Dataset) -> np.ndarray:
    """Trained positions per row of an encoded dataset, after the shift by one (the positions a teacher cache holds)."""
    kinds = encoded.select_columns(["token_kinds"]).with_format("arrow")[:]["token_kinds"].combine_chunks()
    lengths = pc.list_value_length(kinds).to_numpy(zero_copy_only=False)
    trained = pc.list_flatten(kinds).to_numpy(zero_copy_only=False) > 0
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    running = np.concatenate([[0], np.cumsum(trained)])
    first_trained = np.where(lengths > 0, trained[np.minimum(starts, max(trained.size - 1, 0))], False) if trained.size else 0
    return running[starts + lengths] - running[starts] - first_trained


# ---------------------------------------------------------------------------------------------- rows
class _RowEncoder:
    """`collator.encode` as a `dataset.map` function: a row's encoded columns plus what the dataset-level checks
    read (its length before truncation, its trained tokens, its error when malformed rows are skipped, and whether
    `auto` found no agent step markers in it).

    `fallback` (style `auto` only): None, a row without markers is encoded token-level and flagged, to be decided
    for the whole dataset afterwards; True / False, the decision was taken (a streamed dataset) and a row of the
    other kind is malformed.
    """

    def __init__(self, collator: AgentTrajectoryCollator, split: str, fallback: bool | None):
        self.collator = collator
        self.split = split
        self.fallback = fallback
        self.token_level = None
        if collator.style == "auto":
            self.token_level = copy.copy(collator)
            self.token_level.style = "none"

    def __call__(self, row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            encoded, unmarked = self.encode(row, index)
        except TrajectoryFormatError as error:
            if self.collator.on_malformed == "raise":
                raise TrajectoryFormatError(
                    f"{error.reason} (in the {self.split} dataset; fix the row, or set on_malformed='skip' to drop "
                    "such rows)",
                    row_index=error.row_index,
                    message_index=error.message_index,
                ) from None
            return {"input_ids": [], "token_kinds": [], "prompt_length": 0, _FULL_LENGTH: 0, _TRAINED: 0,
                    _ERROR: str(error), _UNMARKED: False}
        return {**encoded.columns(), _FULL_LENGTH: encoded.full_length,
                _TRAINED: int(np.count_nonzero(encoded.kinds[1:])), _ERROR: None, _UNMARKED: unmarked}

    def encode(self, row: dict[str, Any], index: int):
        if self.token_level is None or self.fallback is False:
            return self.collator.encode(row, row_index=index), False
        try:
            encoded = self.collator.encode(row, row_index=index)
        except NoAgentMarkersError:
            return self.token_level.encode(row, row_index=index), True
        if self.fallback:
            raise TrajectoryFormatError(
                f"this row has agent step markers, but the first {_STREAM_PEEK_ROWS} rows of the streamed dataset "
                "had none, so segmentation_style 'auto' fell back to token-level distillation; set "
                "segmentation_style to the rows' style (or 'none') explicitly",
                row_index=index,
            )
        return encoded, False


def _auto_style(dataset: Dataset, encoded: Dataset, errors: list[str | None], encoder: _RowEncoder) -> str:
    """`auto`'s decision for a whole dataset: `none` when no row has agent step markers; mixed rows are malformed."""
    unmarked = encoded.data.column(_UNMARKED).to_pylist()
    valid = [i for i, error in enumerate(errors) if error is None]
    flagged = [i for i in valid if unmarked[i]]
    if not flagged:
        return "auto"
    if len(flagged) == len(valid):
        logger.warning(
            "No row of the %s dataset has agent step markers (Thought: / Action: / Code:): segmentation_style "
            "'auto' falls back to token-level distillation, every assistant token one kind (ACT), observations "
            "untrained, as GKD does. Set segmentation_style: none to say so, or a style to require markers.",
            encoder.split,
        )
        return "none"
    marked = next(i for i in valid if not unmarked[i])
    if encoder.collator.on_malformed == "act":  # unparsed turns are one ACT span anyway: what `none` trained
        return "auto"
    if encoder.collator.on_malformed == "raise":
        try:
            encoder.collator.encode(dataset[flagged[0]], row_index=flagged[0])
        except NoAgentMarkersError as error:
            raise TrajectoryFormatError(
                f"{error.reason} (in the {encoder.split} dataset, whose row {marked} and others have agent step "
                "markers, so segmentation_style 'auto' cannot fall back to token-level distillation; fix the row, "
                "set on_malformed='skip' to drop such rows, or segmentation_style: none for token-level "
                "distillation of every row)",
                row_index=flagged[0],
                message_index=error.message_index,
            ) from None
    for i in flagged:
        errors[i] = f"row {i}: no agent step markers, unlike the other rows of the {encoder.split} dataset"
    return "auto"


def _log_dropped(errors: list[str | None], split: str, total: int) -> None:
    dropped = [error for error in errors if error is not None]
    for error in dropped[:_REASONS_LOGGED]:
        logger.warning("Dropping a malformed %s row: %s", split, error)
    if dropped:
        logger.warning("Dropped %d malformed rows of %d from the %s dataset.", len(dropped), total, split)


def _nothing_to_train(split: str, total: int, report: EncodingReport, collator: AgentTrajectoryCollator) -> str:
    if report.untrained_dropped:
        return (
            f"The {split} dataset has no trained token after encoding: all {report.untrained_dropped} usable rows of "
            f"{total} are left without an assistant token ({report.truncated} cut to max_length={collator.max_length}"
            f", truncation_mode={collator.truncation_mode!r}). Training would change nothing: raise max_length, or "
            "set truncation_mode='keep_end' to keep the ends of long trajectories."
        )
    return (
        f"The {split} dataset has no usable trajectory left ({report.malformed_skipped} of {total} malformed; the "
        "warnings above name the first rows and why). Fix those rows, or set segmentation_style to the style they "
        "are written in (or 'none' for token-level distillation)."
    )


# ---------------------------------------------------------------------------------------------- streams
def _encode_stream(dataset: IterableDataset, collator: AgentTrajectoryCollator, split: str):
    report = EncodingReport(split, collator.style)
    fallback = None
    if collator.style == "auto":
        peek = _RowEncoder(collator, split, fallback=None)
        flags = [peek(row, index)[_UNMARKED] for index, row in enumerate(dataset.take(_STREAM_PEEK_ROWS))]
        fallback = bool(flags) and all(flags)
        if fallback:
            logger.warning(
                "The first %d rows of the streamed %s dataset have no agent step markers: segmentation_style 'auto' "
                "falls back to token-level distillation (every assistant token ACT, observations untrained).",
                len(flags), split,
            )
            report.style = "none"
    columns = dataset.column_names
    encoded = dataset.map(_RowEncoder(collator, split, fallback), with_indices=True, remove_columns=columns)
    encoded = encoded.filter(_StreamFilter(report, collator))
    return encoded.remove_columns([_FULL_LENGTH, _TRAINED, _ERROR, _UNMARKED]), report


class _StreamFilter:
    """Drops a streamed row that is malformed (skip mode) or has no trained token, counting it in the report."""

    def __init__(self, report: EncodingReport, collator: AgentTrajectoryCollator):
        self.report, self.max_length = report, collator.max_length

    def __call__(self, row: dict[str, Any]) -> bool:
        if row[_ERROR] is not None:
            self.report.malformed_skipped += 1
            logger.warning("Dropping a malformed %s row: %s", self.report.split, row[_ERROR])
            return False
        if row[_TRAINED] == 0:
            self.report.untrained_dropped += 1
            logger.warning(
                "Dropping a %s row with no trained token (%d tokens, max_length=%s).",
                self.report.split, row[_FULL_LENGTH], self.max_length,
            )
            return False
        return True
