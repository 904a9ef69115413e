"""Offline teacher cache: run the teacher once, keep its top-k next-token distribution at every trained position.

Training from the cache loads no teacher at all; the loss compares the student with a sparse teacher (the top-k
log-probabilities plus one bucket for the rest, see `losses.SparseTeacher`). The cache is a folder of `datasets`
shards (`shard-00000/`, ...), one row per dataset row in order, each completed shard sealed by a checksum file
written after it, so an interrupted build resumes without recomputing finished shards and a truncated shard is
rebuilt instead of read. `fingerprint.json` records what the cache was built from and how it is cut into shards; a
run that differs in any field is refused with the field named. At k=64 a trained token costs 388 bytes (int32 ids,
float16 log-probs, float32 tail).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from .collator import CACHED_TEACHER_COLUMNS, ENCODED_COLUMNS, AgentTrajectoryCollator
from .encoding import trained_token_counts
from .heads import FinalHiddenStates, final_norm, logit_head
from .losses import SparseTeacher, bucket_logprobs
from .storage import publish_folder, read_json, write_json

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "fingerprint.json"
_FEATURES = datasets.Features(
    {
        "row_index": datasets.Value("int64"),
        "teacher_topk_ids": datasets.Sequence(datasets.Value("int32")),
        "teacher_topk_logprobs": datasets.Sequence(datasets.Value("float16")),
        "teacher_tail_logprob": datasets.Sequence(datasets.Value("float32")),
    }
)


class TeacherCacheError(ValueError):
    """A cache that does not belong to this run, or that is damaged."""


@dataclass(frozen=True)
class CacheFingerprint:
    """What a cache was built from. Two caches with equal fingerprints hold the same numbers."""

    teacher: str | None
    teacher_revision: str | None
    tokenizer: str
    topk: int
    max_length: int | None
    segmentation_style: str
    temperature: float
    dataset: str
    num_rows: int

    def differences(self, run: CacheFingerprint) -> list[str]:
        """Fields where this cache and a run disagree; a run that does not know its teacher (None) matches any."""
        cache, expected = asdict(self), asdict(run)
        return [
            f"{name}: cache has {cache[name]!r}, this run has {expected[name]!r}"
            for name in cache
            if cache[name] != expected[name] and not (name.startswith("teacher") and expected[name] is None)
        ]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary, merges, special tokens and chat template: anything that changes token ids."""
    digest = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps([str(tokenizer.chat_template), tokenizer.all_special_tokens]).encode())
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset: datasets.Dataset) -> str:
    """A hash of an encoded dataset's token ids and token kinds, row by row in order: what the teacher was run on."""
    missing = [c for c in ENCODED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise TeacherCacheError(
            f"The dataset has no {missing} columns: a teacher cache belongs to an encoded dataset "
            "(trl_agent_distill.encoding.encode_dataset)."
        )
    table = dataset.select_columns(["input_ids", "token_kinds"]).with_format("arrow")[:]
    digest = hashlib.sha256()
    for name in ("input_ids", "token_kinds"):
        column = table[name].combine_chunks()
        digest.update(pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        digest.update(pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def run_fingerprint(args, tokenizer, dataset: datasets.Dataset, teacher_revision: str | None = None) -> CacheFingerprint:
    """The fingerprint a run with `AgentDistillConfig` `args` expects (or builds) for `dataset`."""
    teacher = args.teacher_model_name_or_path
    return CacheFingerprint(
        teacher=str(teacher) if teacher is not None else None,
        teacher_revision=teacher_revision,
        tokenizer=tokenizer_fingerprint(tokenizer),
        topk=args.teacher_cache_topk,
        max_length=args.max_length,
        segmentation_style=args.segmentation_style,
        temperature=float(args.loss_temperature),
        dataset=dataset_fingerprint(dataset),
        num_rows=len(dataset),
    )


# ---------------------------------------------------------------------------------------------- reading
def load_teacher_cache(path: str | os.PathLike, expected: CacheFingerprint) -> tuple[datasets.Dataset, CacheFingerprint]:
    """The cached rows (`CACHED_TEACHER_COLUMNS`, one per dataset row) and the cache's fingerprint, after checks.

    The cache decides k; every other field must match the run.
    """
    root = Path(path)
    fingerprint = _read_fingerprint(root)
    if fingerprint is None:
        raise TeacherCacheError(f"{root} is not a teacher cache (no {FINGERPRINT_FILE}); build it with `cache-teacher`.")
    if expected.topk != fingerprint.topk:
        expected = CacheFingerprint(**{**asdict(expected), "topk": fingerprint.topk})  # k is the cache's choice
    differences = fingerprint.differences(expected)
    if differences:
        raise TeacherCacheError(
            f"The teacher cache at {root} was built for another run ({'; '.join(differences)}). Rebuild it with "
            "`trl-agent-distill cache-teacher` for this recipe, or point teacher_cache at the right folder."
        )
    shards = []
    for shard in range(_num_shards(fingerprint.num_rows, _shard_rows(root))):
        if not _shard_is_sealed(root, shard):
            raise TeacherCacheError(
                f"Shard {shard} of the teacher cache at {root} is missing or damaged (checksum mismatch); run "
                "`trl-agent-distill cache-teacher` again to rebuild it."
            )
        shards.append(datasets.load_from_disk(str(_shard_dir(root, shard))))
    rows = datasets.concatenate_datasets(shards)
    if rows["row_index"] != list(range(fingerprint.num_rows)):
        raise TeacherCacheError(f"The teacher cache at {root} does not hold rows 0..{fingerprint.num_rows - 1} in order.")
    return rows.remove_columns("row_index"), fingerprint


def attach_teacher_cache(dataset: datasets.Dataset, cached_rows: datasets.Dataset) -> datasets.Dataset:
    """The encoded dataset with the cached teacher columns added side by side (same row order), once each row's
    cached positions are checked against its trained tokens."""
    if len(dataset) != len(cached_rows):
        raise TeacherCacheError(f"The dataset has {len(dataset)} rows but the teacher cache {len(cached_rows)}.")
    cached = pc.list_value_length(cached_rows.with_format("arrow")[:]["teacher_tail_logprob"]).to_numpy(zero_copy_only=False)
    trained = trained_token_counts(dataset)
    wrong = np.flatnonzero(cached != trained)
    if wrong.size:
        row = int(wrong[0])
        raise TeacherCacheError(
            f"Row {row} of the dataset has {trained[row]} trained tokens but the teacher cache holds {cached[row]} "
            f"positions for it ({wrong.size} rows differ): the cache was built with other tokenization settings; "
            "rebuild it with `trl-agent-distill cache-teacher`."
        )
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()  # side by side needs both tables in row order
    return datasets.concatenate_datasets([dataset.remove_columns(
        [c for c in CACHED_TEACHER_COLUMNS if c in dataset.column_names]
    ), cached_rows], axis=1)


def sparse_teacher_from_batch(inputs: dict[str, torch.Tensor]) -> SparseTeacher:
    """The `SparseTeacher` rows a collated batch carries (row-major over the trained positions)."""
    rows = inputs["teacher_tail_logprob"].numel()
    # A batch whose trajectories were all truncated before their first trained token carries no rows at all.
    topk = inputs["teacher_topk_ids"].numel() // rows if rows else 1
    return SparseTeacher(
        inputs["teacher_topk_ids"].long().view(rows, topk),
        inputs["teacher_topk_logprobs"].view(rows, topk),
        inputs["teacher_tail_logprob"],
    )


# ---------------------------------------------------------------------------------------------- building
def build_teacher_cache(
    teacher_model: torch.nn.Module,
    collator: AgentTrajectoryCollator,
    dataset: datasets.Dataset,
    output_dir: str | os.PathLike,
    fingerprint: CacheFingerprint,
    *,
    batch_size: int = 4,
    shard_rows: int = 256,
    process_index: int = 0,
    num_processes: int = 1,
    show_progress: bool = True,
) -> Path:
    """Run the teacher over `dataset` (encoded by `encoding.encode_dataset` with `collator`) and write the cache.

    Shards already sealed with the same fingerprint are kept; with several processes each builds the shards
    `shard % num_processes == process_index` (the caller waits for all before training).
    """
    root = Path(output_dir)
    existing = _read_fingerprint(root)
    if existing is not None and existing != fingerprint:
        raise TeacherCacheError(
            f"{root} holds a cache built for another run ({'; '.join(existing.differences(fingerprint))}); choose "
            "another folder or delete this one."
        )
    if existing is not None and _shard_rows(root) != shard_rows:
        # Sealed shards hold the rows of the old cut: under a new one they would pass for rows never computed.
        raise TeacherCacheError(
            f"{root} holds a cache cut into shards of {_shard_rows(root)} rows, this run asks for {shard_rows} "
            f"(teacher_cache_shard_rows); set teacher_cache_shard_rows: {_shard_rows(root)} to resume it, or choose "
            "another folder or delete this one."
        )
    if process_index == 0:
        write_json(root / FINGERPRINT_FILE, {**asdict(fingerprint), "shard_rows": shard_rows})
    if num_processes > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # the others read the fingerprint the main process has just written
    num_shards = _num_shards(len(dataset), shard_rows)
    todo = [s for s in range(process_index, num_shards, num_processes) if not _shard_is_sealed(root, s)]
    rows_todo = sum(len(range(s * shard_rows, min(len(dataset), (s + 1) * shard_rows))) for s in todo)
    progress = tqdm(total=rows_todo, desc=f"teacher cache of {fingerprint.teacher}", unit="row",
                    disable=not show_progress)
    reader = _TeacherReader(teacher_model, fingerprint.topk, fingerprint.temperature)
    try:
        for shard in todo:
            rows = range(shard * shard_rows, min(len(dataset), (shard + 1) * shard_rows))
            records = {name: [] for name in _FEATURES}
            for start in range(rows.start, rows.stop, batch_size):
                indices = list(range(start, min(rows.stop, start + batch_size)))
                batch = collator([dataset[i] for i in indices])
                for index, sparse in zip(indices, reader(batch)):
                    _check_finite(sparse, index)
                    records["row_index"].append(index)
                    records["teacher_topk_ids"].append(sparse.topk_ids.flatten().tolist())
                    records["teacher_topk_logprobs"].append(sparse.topk_logprobs.flatten().tolist())
                    records["teacher_tail_logprob"].append(sparse.tail_logprob.tolist())
                progress.update(len(indices))
            _write_shard(root, shard, datasets.Dataset.from_dict(records, features=_FEATURES))
    finally:
        reader.close()
        progress.close()
    return root


class _TeacherReader:
    """Top-k teacher log-probs at the trained positions of a batch, without the teacher's full logits."""

    def __init__(self, teacher: torch.nn.Module, topk: int, temperature: float):
        self.teacher, self.topk, self.temperature = teacher, topk, temperature
        self.head = logit_head(teacher)
        self.states = FinalHiddenStates(teacher) if self.head is not None and final_norm(teacher) else None

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> list[SparseTeacher]:
        device = next(self.teacher.parameters()).device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        trained = (batch["reason_mask"][:, 1:] | batch["act_mask"][:, 1:]).bool().to(device)
        if self.states is not None:
            self.teacher(**inputs, use_cache=False, logits_to_keep=1)
            hidden = self.states.pop()[:, :-1]
            rows = [hidden[b][trained[b]] for b in range(hidden.shape[0])]
            to_logits = self.head.logits
        else:
            logits = self.teacher(**inputs, use_cache=False).logits[:, :-1]
            rows = [logits[b][trained[b]] for b in range(logits.shape[0])]
            to_logits = torch.Tensor.float
        return [self._sparse(row, to_logits) for row in rows]

    def _sparse(self, rows: torch.Tensor, to_logits) -> SparseTeacher:
        vocab = self.head.weight.shape[0] if self.head is not None else rows.shape[-1]
        chunk = max(1, 2**26 // vocab)
        ids, buckets = [], []
        for start in range(0, rows.shape[0], chunk):
            scaled = to_logits(rows[start : start + chunk]) / self.temperature
            ids.append(scaled.topk(self.topk, dim=-1).indices)
            buckets.append(bucket_logprobs(scaled, ids[-1]))
        ids_ = torch.cat(ids).cpu() if ids else torch.zeros((0, self.topk), dtype=torch.long)
        buckets_ = torch.cat(buckets).cpu() if buckets else torch.zeros((0, self.topk + 1))
        return SparseTeacher(ids_, buckets_[:, :-1], buckets_[:, -1])

    def close(self) -> None:
        if self.states is not None:
            self.states.remove()


def _check_finite(sparse: SparseTeacher, index: int) -> None:
    # The tail may be -inf (the top-k hold all the mass); anything else non-finite is a broken teacher.
    bad = ~torch.isfinite(sparse.topk_logprobs).all() or torch.isnan(sparse.tail_logprob).any()
    if bad or (sparse.tail_logprob == math.inf).any():
        raise TeacherCacheError(
            f"The teacher produced NaN or inf log-probabilities for dataset row {index}; check the teacher (dtype, "
            "quantization) on that row before caching."
        )


# ---------------------------------------------------------------------------------------------- shards
def _shard_dir(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}"


def _seal_file(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.sha256"


def _write_shard(root: Path, shard: int, rows: datasets.Dataset) -> None:
    """Publish the shard folder atomically, then seal it: a crash at any point leaves no sealed half."""
    final = publish_folder(_shard_dir(root, shard), lambda folder: rows.save_to_disk(str(folder)))
    write_json(_seal_file(root, shard), {"rows": len(rows), "files": _checksums(final)})


def _shard_is_sealed(root: Path, shard: int) -> bool:
    seal = _seal_file(root, shard)
    if not seal.is_file() or not _shard_dir(root, shard).is_dir():
        return False
    try:
        recorded = json.loads(seal.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return recorded == _checksums(_shard_dir(root, shard))


def _checksums(folder: Path) -> dict[str, str]:
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()
    }


def _num_shards(num_rows: int, shard_rows: int) -> int:
    return -(-num_rows // shard_rows)


def _shard_rows(root: Path) -> int:
    return _read_fingerprint_file(root)["shard_rows"]


def _read_fingerprint(root: Path) -> CacheFingerprint | None:
    data = _read_fingerprint_file(root)
    if data is None:
        return None
    data.pop("shard_rows", None)
    try:
        return CacheFingerprint(**data)
    except TypeError:
        raise TeacherCacheError(
            f"{root / FINGERPRINT_FILE} does not describe a teacher cache of this version; delete the folder and "
            "run `trl-agent-distill cache-teacher` again."
        ) from None


def _read_fingerprint_file(root: Path) -> dict[str, Any] | None:
    data = read_json(root / FINGERPRINT_FILE, remedy="delete the folder and run `trl-agent-distill cache-teacher` again.")
    if data is not None and not isinstance(data, dict):
        raise TeacherCacheError(f"{root / FINGERPRINT_FILE} holds no fingerprint; delete the folder and build it again.")
    return data
