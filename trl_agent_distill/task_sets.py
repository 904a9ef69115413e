"""The Agent Distillation paper's benchmarks and training questions as named task sets.

Kang et al. (arXiv 2505.17612) evaluate on four factual sets (HotpotQA, Bamboogle, MuSiQue, 2WikiMultiHopQA) and
four math sets (MATH-500, GSM-Hard, AIME, OlymMATH), and train on 1,000 HotpotQA + 2,000 MATH questions. Their code
(Nardien/agent-distillation) ships the subsets as JSON files; here each is rebuilt from its public hub dataset with
the same rows: the same split, filter and window, or the same `random.Random(42).sample` (this reproduces the
paper's 2WikiMultiHopQA and GSM-Hard files row for row).

    rows = load_task_set("musique")            # datasets.Dataset: id, question, answer, answer_aliases
    TASK_SETS["musique"].scoring               # "factual": EM / F1 (+ the optional LLM judge); "math": math-verify

`source` reads a local copy in the dataset's own schema instead of the hub (offline machines, tests); a set made of
several hub configurations (OlymMATH) takes a mapping of configuration to file.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import datasets

from .data import load_any_dataset
from .metrics import extract_boxed

logger = logging.getLogger(__name__)

SCORING_KINDS = ("factual", "math")
PAPER_SEED = 42
COLUMNS = ("id", "question", "answer")
Source = str | os.PathLike | Mapping[str, str | os.PathLike]


# ---------------------------------------------------------------------------------------------- which rows
@dataclass(frozen=True)
class Window:
    """The rows `start:stop` (in the split's order) of those that pass `keep`."""

    start: int = 0
    stop: int | None = None
    keep: Callable[[Mapping[str, Any]], bool] | None = None
    keep_fields: tuple[str, ...] = ()

    def indices(self, rows: datasets.Dataset, seed: int) -> list[int]:
        return _kept(rows, self.keep, self.keep_fields)[self.start : self.stop]


@dataclass(frozen=True)
class Sample:
    """`size` rows drawn by `random.Random(seed).sample` from those that pass `keep`, in the order drawn."""

    size: int
    keep: Callable[[Mapping[str, Any]], bool] | None = None
    keep_fields: tuple[str, ...] = ()

    def indices(self, rows: datasets.Dataset, seed: int) -> list[int]:
        kept = _kept(rows, self.keep, self.keep_fields)
        return [kept[i] for i in random.Random(seed).sample(range(len(kept)), min(self.size, len(kept)))]


def _kept(rows: datasets.Dataset, keep, keep_fields: tuple[str, ...]) -> list[int]:
    if keep is None:
        return list(range(len(rows)))
    columns = rows.select_columns(list(keep_fields))
    return [index for index, row in enumerate(columns) if keep(row)]


@dataclass(frozen=True)
class Part:
    """One hub configuration of a task set and the rows the paper took from it."""

    config: str | None
    rows: Window | Sample = field(default_factory=Window)


# ---------------------------------------------------------------------------------------------- answers as text
def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _boxed(solution: Any) -> str | None:
    """MATH training rows carry only a worked solution; the answer is its last `\\boxed{}`."""
    return extract_boxed(solution) if isinstance(solution, str) else None


def _number(value: Any) -> str | None:
    """GSM-Hard targets are floats with binary noise (561161.7000000001): at most 8 decimals, integers bare."""
    if isinstance(value, str):
        value = _text(value)
        try:
            value = float(value) if value is not None else None
        except ValueError:
            return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.8f}".rstrip("0").rstrip(".")


def _integer(value: Any) -> str | None:
    """AIME answers are integers 0-999, written with leading zeros ("033") in some sources."""
    text = _text(str(value)) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    return str(int(text)) if text is not None and text.isdigit() else text


# ---------------------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class TaskSet:
    """A named task set: where its rows come from, which rows the paper used, and how their fields map."""

    name: str
    hub_name: str | None
    split: str
    parts: tuple[Part, ...]
    question_field: str
    answer_field: str
    scoring: str
    paper_size: int | None
    description: str
    id_field: str | None = None  # None: the row's index in its split (as the paper numbered these sets)
    answer_format: Callable[[Any], str | None] = _text
    aliases_field: str | None = None
    generator: str | None = None  # "module:function(size, seed)" for sets made on the spot instead of loaded

    @property
    def configs(self) -> list[str | None]:
        return list(dict.fromkeys(part.config for part in self.parts))

    @property
    def fields(self) -> list[str]:
        """The source fields a row needs (the filters' fields included)."""
        wanted = [self.question_field, self.answer_field, self.id_field, self.aliases_field]
        wanted += [name for part in self.parts for name in part.rows.keep_fields]
        return [name for name in dict.fromkeys(wanted) if name]


def _hard(row) -> bool:
    return row["level"] == "hard"


def _answerable_three_hops(row) -> bool:
    return bool(row["answerable"]) and len(row["question_decomposition"]) == 3


def _levels(*levels: int) -> Callable[[Mapping[str, Any]], bool]:
    names = {f"Level {level}" for level in levels}
    return lambda row: row["level"] in names


_TASK_SETS = [
    TaskSet(
        "hotpotqa", "hotpotqa/hotpot_qa", "validation", (Part("distractor", Window(100, 600, _hard, ("level",))),),
        "question", "answer", "factual", 500, id_field="id",
        description="HotpotQA dev questions 100-600 of the 'hard' ones (the paper's hotpotqa_500 test file).",
    ),
    TaskSet(
        "bamboogle", "chiayewken/bamboogle", "test", (Part(None),), "Question", "Answer", "factual", 125,
        description="All 125 Bamboogle questions (Press et al.), ids the row numbers.",
    ),
    TaskSet(
        "musique", "dgslibisey/MuSiQue", "validation",
        (Part(None, Window(0, 500, _answerable_three_hops, ("answerable", "question_decomposition"))),),
        "question", "answer", "factual", 500, id_field="id", aliases_field="answer_aliases",
        description="The first 500 answerable 3-hop MuSiQue dev questions (the paper's file says 4-hop; its ids are "
                    "all 3-hop), with MuSiQue's answer aliases.",
    ),
    TaskSet(
        "2wikimultihopqa", "framolfese/2WikiMultihopQA", "validation", (Part(None, Sample(500)),),
        "question", "answer", "factual", 500,
        description="500 2WikiMultiHopQA dev questions drawn with random.Random(42).sample; ids the row numbers, as "
                    "in the paper's file.",
    ),
    TaskSet(
        "math500", "HuggingFaceH4/MATH-500", "test", (Part(None),), "problem", "answer", "math", 500,
        id_field="unique_id", description="MATH-500 (Lightman et al.'s 500 MATH test problems), all of it.",
    ),
    TaskSet(
        "gsm_hard", "reasoning-machines/gsm-hard", "train", (Part(None, Sample(500)),), "input", "target", "math",
        500, answer_format=_number,
        description="500 GSM-Hard problems drawn with random.Random(42).sample (the hub's only split is 'train'); "
                    "ids the row numbers, as in the paper's file.",
    ),
    TaskSet(
        "aime", "AI-MO/aimo-validation-aime", "train", (Part(None),), "problem", "answer", "math", 90,
        id_field="id", answer_format=_integer, description="The 90 AIME 2022-2024 problems (AIMO validation set).",
    ),
    TaskSet(
        "olymmath", "RUC-AIBOX/OlymMATH", "test", (Part("en-easy"), Part("en-hard")), "problem", "answer", "math",
        200, id_field="unique_id", description="OlymMATH in English: the 100 easy then the 100 hard problems.",
    ),
    TaskSet(
        "hotpotqa_train", "hotpotqa/hotpot_qa", "train", (Part("distractor", Window(0, 1000, _hard, ("level",))),),
        "question", "answer", "factual", 1000, id_field="id",
        description="Training questions: the first 1,000 'hard' HotpotQA train questions (the paper's file).",
    ),
    TaskSet(
        "math_train", "DigitalLearningGmbH/MATH-lighteval", "train",
        (Part("default", Sample(1000, _levels(4, 5), ("level",))),
         Part("default", Sample(1000, _levels(2, 3), ("level",)))),
        "problem", "solution", "math", 2000, answer_format=_boxed,
        description="Training questions: 1,000 MATH train problems of levels 4-5 then 1,000 of levels 2-3, each drawn "
                    "with random.Random(42).sample (the paper's two files hold these levels; its draw could not be "
                    "checked offline); the answer is the solution's last \\boxed{}.",
    ),
    TaskSet(
        "gsm_symbolic", None, "train", (), "question", "answer", "math", None,
        generator="trl_agent_distill.corpora:gsm_symbolic_tasks",
        description="GSM-Symbolic word problems generated offline by reasoning-gym (not a paper set): real math "
                    "agent tasks without a download; max_tasks sets how many (default 500).",
    ),
]
TASK_SETS: dict[str, TaskSet] = {task_set.name: task_set for task_set in _TASK_SETS}
PAPER_BENCHMARKS = ("hotpotqa", "bamboogle", "musique", "2wikimultihopqa", "math500", "gsm_hard", "aime", "olymmath")
PAPER_TRAINING_SETS = ("hotpotqa_train", "math_train")
_GENERATED_SIZE = 500


# ---------------------------------------------------------------------------------------------- loading
def load_task_set(name: str, split: str | None = None, *, source: Source | None = None, max_tasks: int | None = None,
                  seed: int = PAPER_SEED) -> datasets.Dataset:
    """The task set `name` as a `datasets.Dataset` with columns id / question / answer (+ answer_aliases where the
    dataset has them), every value text, in the paper's order.

    `split=None` takes the paper's split and its rows; another split takes all of that split's rows, mapped the
    same way. `source` reads a local file or `save_to_disk` directory in the dataset's own schema instead of the hub
    (a mapping of configuration to path for sets of several configurations). `max_tasks` keeps the first N;
    `seed` drives the sets the paper drew at random (42 gives the paper's rows).
    """
    task_set = get_task_set(name)
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    if task_set.generator:
        if source is not None:
            raise ValueError(f"Task set '{name}' is generated on the spot; it takes no source.")
        rows = _generated(task_set, max_tasks or _GENERATED_SIZE, seed)
    else:
        paper_rows = split is None or split == task_set.split
        parts = [_load_part(task_set, part, split or task_set.split, source, seed, paper_rows)
                 for part in (task_set.parts if paper_rows else [Part(config) for config in task_set.configs])]
        rows = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        if paper_rows and len(rows) != task_set.paper_size:
            logger.warning("Task set '%s' has %d rows where the paper used %d: %s is a partial or changed copy of "
                           "%s, so scores will not compare with the paper's.", name, len(rows), task_set.paper_size,
                           source or "the hub's", task_set.hub_name)
        rows = _without_unanswered(rows, task_set)
    _check_unique_ids(rows, task_set)
    if max_tasks is not None:
        rows = rows.select(range(min(max_tasks, len(rows))))
    return rows


def get_task_set(name: str) -> TaskSet:
    """The registered task set `name`; an unknown name fails listing the known ones."""
    if name not in TASK_SETS:
        close = difflib.get_close_matches(name, list(TASK_SETS), n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"Unknown task set '{name}'.{hint} The task sets are {sorted(TASK_SETS)}; for another "
                         "dataset set dataset_name and its question / answer / id fields instead.")
    return TASK_SETS[name]


def _load_part(task_set: TaskSet, part: Part, split: str, source: Source | None, seed: int,
               paper_rows: bool) -> datasets.Dataset:
    where, rows = _read_split(task_set, part.config, split, source)
    missing = [name for name in task_set.fields if name not in rows.column_names
               and (paper_rows or name not in _filter_fields(task_set))]
    if missing:
        raise ValueError(
            f"Task set '{task_set.name}': {where} has no field '{missing[0]}' (needed for "
            f"{_role(task_set, missing[0])}); its fields are {rows.column_names}. Point source at a copy of "
            f"{task_set.hub_name} in its own schema (its fields: {task_set.fields})."
        )
    indices = part.rows.indices(rows, seed) if paper_rows else list(range(len(rows)))
    if not indices:
        raise ValueError(f"Task set '{task_set.name}': none of the {len(rows)} rows of {where} is among the rows the "
                         f"paper used ({task_set.description}) Use the whole split in its own schema.")

    def to_task(row: Mapping[str, Any], position: int) -> dict[str, Any]:
        index = indices[position]
        question = _text(row[task_set.question_field])
        if question is None:
            raise ValueError(f"Task set '{task_set.name}': row {index} of {where} has no question text in "
                             f"'{task_set.question_field}' ({row[task_set.question_field]!r:.80}). Fix or drop it.")
        task_id = str(index) if task_set.id_field is None else _text(str(row[task_set.id_field]))
        mapped = {"id": task_id, "question": question, "answer": task_set.answer_format(row[task_set.answer_field])}
        if task_set.aliases_field:
            aliases = row[task_set.aliases_field] or []
            mapped["answer_aliases"] = [alias.strip() for alias in aliases if _text(alias)]
        return mapped

    selected = rows.select(indices)
    return selected.map(to_task, with_indices=True, remove_columns=selected.column_names,
                        features=_features(task_set))


def _read_split(task_set: TaskSet, config: str | None, split: str,
                source: Source | None) -> tuple[str, datasets.Dataset]:
    """Where the rows come from (for messages) and the split's rows."""
    if source is not None:
        where = str(_source_path(task_set, config, source))
        loaded = load_any_dataset(where, local_split=split)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"Task set '{task_set.name}': {where} has no split '{split}' (it has {list(loaded)}).")
            loaded = loaded[split]
        return where, loaded
    where = f"{task_set.hub_name}" + (f" ({config})" if config else "") + f" split '{split}'"
    try:  # only the split asked for is downloaded (HotpotQA's train split is 90k rows with their contexts)
        return where, datasets.load_dataset(task_set.hub_name, name=config, split=split)
    except Exception as error:  # noqa: BLE001 - hub failures vary (offline, renamed, gated, bad split): re-raised
        raise ValueError(
            f"Task set '{task_set.name}': could not load {where} from the hub ({type(error).__name__}: {error}). "
            "Check the split's name; without the hub, pass source= a local copy in its own schema "
            "(.jsonl/.json/.parquet or a save_to_disk directory)."
        ) from error


def _source_path(task_set: TaskSet, config: str | None, source: Source) -> str | os.PathLike:
    configs = task_set.configs
    if isinstance(source, Mapping):
        if config not in source:
            raise ValueError(f"Task set '{task_set.name}': source has no file for configuration '{config}'; give one "
                             f"per configuration: {configs}.")
        return source[config]
    if len(configs) > 1:
        raise ValueError(f"Task set '{task_set.name}' is made of the configurations {configs} of "
                         f"{task_set.hub_name}: pass source as a mapping of each configuration to its file.")
    return source


def _filter_fields(task_set: TaskSet) -> set[str]:
    return {name for part in task_set.parts for name in part.rows.keep_fields}


def _role(task_set: TaskSet, name: str) -> str:
    roles = {task_set.question_field: "the question", task_set.answer_field: "the answer",
             task_set.id_field: "the task id", task_set.aliases_field: "the answer aliases"}
    return roles.get(name, "choosing the paper's rows")


def _features(task_set: TaskSet) -> datasets.Features:
    features = {name: datasets.Value("string") for name in COLUMNS}
    if task_set.aliases_field:
        features["answer_aliases"] = datasets.Sequence(datasets.Value("string"))
    return datasets.Features(features)


def _without_unanswered(rows: datasets.Dataset, task_set: TaskSet) -> datasets.Dataset:
    """Rows whose answer cannot be read (a MATH solution without `\\boxed{}`) are dropped: no trajectory or score
    could be judged on them."""
    unanswered = [row_id for row_id, answer in zip(rows["id"], rows["answer"]) if answer is None]
    if not unanswered:
        return rows
    logger.warning("Task set '%s': %d rows have no readable answer in '%s' and are left out (ids %s).",
                   task_set.name, len(unanswered), task_set.answer_field, unanswered[:10])
    return rows.filter(lambda row: row["answer"] is not None)


def _check_unique_ids(rows: datasets.Dataset, task_set: TaskSet) -> None:
    seen: dict[str, int] = {}
    for position, task_id in enumerate(rows["id"]):
        if task_id in seen:
            raise ValueError(f"Task set '{task_set.name}': tasks {seen[task_id]} and {position} share the id "
                             f"{task_id!r}; ids must be unique to resume runs. Check the source rows.")
        seen[task_id] = position


def _generated(task_set: TaskSet, size: int, seed: int) -> datasets.Dataset:
    """Rows from the set's generator, imported only when asked for (its package is an optional extra)."""
    module_name, _, function_name = task_set.generator.partition(":")
    try:
        generate = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ImportError(f"Task set '{task_set.name}' needs {task_set.generator} ({error}).") from error
    made = generate(size, seed)
    rows = made if isinstance(made, datasets.Dataset) else datasets.Dataset.from_list([dict(row) for row in made])
    missing = [name for name in COLUMNS if name not in rows.column_names]
    if missing:
        raise ValueError(f"Task set '{task_set.name}': {task_set.generator} made rows without '{missing[0]}' (they "
                         f"have {rows.column_names}); it must return id / question / answer.")
    return rows.select_columns(list(COLUMNS)).cast(_features(task_set))

