"""Trajectory data formats: turn released agent logs into chat `messages`, and check datasets before training.

The Agent Distillation paper (Kang et al., arXiv 2505.17612) released its teacher trajectories
(`agent-distillation/Qwen2.5-32B-Instruct_agent_trajectories_2k`) as smolagents memory logs: a `log_data` JSON string
whose `messages` use roles system / user / assistant / tool-call / tool-response and content lists of text parts.
`from_smolagents_log` rebuilds the conversation the paper fine-tuned on: tool-call dumps dropped, observations
shown to the model as smolagents shows them at inference, same-role neighbours merged. `prepare_trajectory_dataset`
picks or checks the format of a whole dataset, so the collator only ever sees `messages` or `text` rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

from .jsonl import jsonl_problem

logger = logging.getLogger(__name__)

DATASET_FORMATS = ("auto", "messages", "text", "smolagents")
OBSERVATION_ROLES = ("user", "tool")
SMOLAGENTS_ROLES = ("system", "user", "assistant", "tool-call", "tool-response")
# Some logs were written with str(MessageRole.X) (Python >= 3.11 str-enum repr) instead of its value.
_ROLE_ALIASES = {f"MessageRole.{role.upper().replace('-', '_')}": role for role in SMOLAGENTS_ROLES}
# Which column each format lives in; "auto" tries them in this order (a log is the rawest form, so it wins).
_FORMAT_COLUMNS = {"smolagents": "log_data", "messages": "messages", "text": "text"}
# Kept next to the converted messages: handy for evaluation and filtering, ignored by the collator.
_KEPT_COLUMNS = ("question", "true_answer")
_LOCAL_DATA_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_any_dataset(
    name: str, config: str | None = None, *, local_split: str = "train"
) -> datasets.Dataset | datasets.DatasetDict:
    """A hub dataset, a `save_to_disk` directory, or a local .json/.jsonl/.parquet/.csv file (as `local_split`)."""
    path = Path(name)
    builder = _LOCAL_DATA_BUILDERS.get(path.suffix)
    if builder and path.is_file():
        return _load_data_file(path, builder, local_split)
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(name)
    if builder and not path.exists():
        raise FileNotFoundError(f"Dataset file {name} does not exist.")
    return datasets.load_dataset(name, name=config)


def _load_data_file(path: Path, builder: str, split: str) -> datasets.DatasetDict:
    """A local data file as a one-split DatasetDict; a file that cannot be read is an error naming it and saying
    what is wrong where (`datasets` itself ends in a bare StopIteration or DatasetGenerationError)."""
    if path.stat().st_size == 0:
        raise ValueError(
            f"Dataset file {path} is empty: it holds no rows. Write the rows into it (for .jsonl one JSON object per "
            "line), or point dataset_name at another file."
        )
    try:
        return datasets.load_dataset(builder, data_files={split: str(path)})
    except Exception as error:  # noqa: BLE001 - every failure is re-raised, with the file and what to fix
        raise ValueError(f"Dataset file {path} cannot be read: {_unreadable_because(path, builder, error)}.") from error


def _unreadable_because(path: Path, builder: str, error: Exception) -> str:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    if builder == "json":
        problem = _json_file_problem(path)
        if problem:
            return problem
    if builder == "parquet":
        return f"it is not a readable Parquet file ({cause}); write it again with a Parquet library, or use .jsonl"
    return (
        f"`datasets` could not read it as {builder} ({type(cause).__name__}: {cause}); check that every row has the "
        "same columns with values of the same type"
    )


def _json_file_problem(path: Path) -> str | None:
    """The first syntax problem of a .jsonl file, or of a .json file (one JSON document or JSON lines)."""
    if path.suffix == ".jsonl":
        return jsonl_problem(path)
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text)
    except UnicodeDecodeError:
        return jsonl_problem(path)  # says so, with the byte
    except json.JSONDecodeError as error:
        first_line = text.lstrip().split("\n", 1)[0]
        if first_line.startswith("{") and text.strip().count("\n"):  # JSON lines in a .json file
            return jsonl_problem(path)
        return f"it is not valid JSON at line {error.lineno}, column {error.colno} ({error.msg}); fix the file there"
    if isinstance(document, list) and all(isinstance(row, dict) for row in document):
        return None if document else "it holds an empty list: no rows"
    return (
        f"it holds a JSON {type(document).__name__}; a .json dataset is a list of row objects "
        '([{"column": value, ...}, ...]) or one object per line'
    )


def from_smolagents_log(row: Mapping[str, Any], *, observation_role: str = "user") -> dict[str, list[dict[str, str]]]:
    """One released agent-distillation row -> `{"messages": [{"role", "content"}, ...]}` with string contents.

    - text parts of a content list are joined;
    - `tool-call` messages are dropped: smolagents' "Calling tools: [...]" repeats the code of the assistant turn;
    - `tool-response` messages become `observation_role` messages: "user" is how smolagents itself feeds
      observations back to the model, so training matches inference; "tool" is the alternative;
    - consecutive messages of one role are merged (concatenated as is, like smolagents does);
    - observations after the last assistant turn (the echo of `final_answer`) are dropped: nothing follows them
      to train on, as in the paper's preprocessing.

    `log_data` may be the JSON string of the released files or an already parsed dict.
    """
    if observation_role not in OBSERVATION_ROLES:
        raise ValueError(f"observation_role must be one of {OBSERVATION_ROLES}, got {observation_role!r}.")
    messages: list[dict[str, str]] = []
    is_observation: list[bool] = []
    for index, message in enumerate(_log_messages(row)):
        role = _message_role(message, index)
        if role == "tool-call":
            continue
        observation = role == "tool-response"
        role = observation_role if observation else role
        text = _message_text(message, index)
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += text
            is_observation[-1] = is_observation[-1] or observation
        else:
            messages.append({"role": role, "content": text})
            is_observation.append(observation)
    while is_observation and is_observation[-1]:
        messages.pop()
        is_observation.pop()
    return {"messages": messages}


def prepare_trajectory_dataset(
    dataset: datasets.Dataset,
    dataset_format: str = "auto",
    *,
    num_proc: int | None = None,
    observation_role: str = "user",
) -> datasets.Dataset:
    """Check (and for smolagents logs, convert) a trajectory dataset so it has a `messages` or `text` column.

    `dataset_format`: "auto" picks "smolagents" if there is a `log_data` column, else "messages", else "text".
    "smolagents" converts each row with `from_smolagents_log` and keeps `messages` (plus `question` and
    `true_answer` when present); "messages" and "text" only check that their column exists.
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"dataset_format must be one of {DATASET_FORMATS}, got {dataset_format!r}.")
    columns = list(dataset.column_names)
    resolved = _detect_format(columns) if dataset_format == "auto" else dataset_format
    expected = _FORMAT_COLUMNS[resolved]
    if expected not in columns:
        raise ValueError(
            f"dataset_format={dataset_format!r} expects a {expected!r} column, but the dataset has columns "
            f"{columns}. Rename the column, or set the dataset_format option to the format the data is in "
            f"({', '.join(repr(f) for f in DATASET_FORMATS)})."
        )
    if resolved != "smolagents":
        return dataset
    return _convert_smolagents(dataset, num_proc, observation_role)


# ------------------------------------------------------------------------------------------------- helpers
def _detect_format(columns: list[str]) -> str:
    for dataset_format, column in _FORMAT_COLUMNS.items():
        if column in columns:
            return dataset_format
    raise ValueError(
        f"dataset_format='auto' cannot tell the format of a dataset with columns {columns}: expected a 'log_data' "
        "(smolagents), 'messages' or 'text' column. Rename the column, or set the dataset_format option."
    )


def _convert_smolagents(dataset: datasets.Dataset, num_proc: int | None, observation_role: str) -> datasets.Dataset:
    # Runs whose log was not saved carry no trajectory; the paper's preprocessing skipped them too.
    kept = dataset.filter(lambda log: log is not None and log != "", input_columns="log_data", num_proc=num_proc)
    counted = ""
    if len(kept) < len(dataset):
        logger.warning("Skipped %d of %d rows with an empty 'log_data'.", len(dataset) - len(kept), len(dataset))
        counted = " (counted after dropping the rows with an empty 'log_data')"
    drop = [column for column in kept.column_names if column not in _KEPT_COLUMNS]

    def convert(row: dict[str, Any], index: int) -> dict[str, Any]:
        try:
            return from_smolagents_log(row, observation_role=observation_role)
        except ValueError as error:
            raise ValueError(f"Row {index} of the smolagents dataset{counted}: {error}") from error

    return kept.map(convert, with_indices=True, remove_columns=drop, num_proc=num_proc, desc="smolagents logs")


def _log_messages(row: Mapping[str, Any]) -> list[Any]:
    if "log_data" not in row:
        raise ValueError(
            f"The row has no 'log_data' field (its fields: {sorted(row)}). from_smolagents_log expects a row of the "
            "released agent-distillation trajectories; rows that already hold chat 'messages' need no conversion "
            "(dataset_format='messages')."
        )
    log = row["log_data"]
    if log is None or log == "":
        raise ValueError("The row's 'log_data' is empty: the run saved no trajectory. Drop this row.")
    if isinstance(log, (str, bytes)):
        try:
            log = json.loads(log)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"The row's 'log_data' is not valid JSON ({error}). It should be the JSON string of a smolagents "
                "log, '{\"messages\": [...]}', as in the released files; check that the file was not truncated."
            ) from error
    if not isinstance(log, Mapping) or not isinstance(log.get("messages"), list):
        found = sorted(log) if isinstance(log, Mapping) else type(log).__name__
        raise ValueError(
            f"The row's 'log_data' should be an object with a 'messages' list (found: {found}). Pass a row of the "
            "released agent-distillation trajectories."
        )
    return log["messages"]


def _message_role(message: Any, index: int) -> str:
    if not isinstance(message, Mapping):
        raise ValueError(f"log_data message {index} is a {type(message).__name__}, not an object with 'role'/'content'.")
    role = message.get("role")
    role = _ROLE_ALIASES.get(role, role)
    if role not in SMOLAGENTS_ROLES:
        raise ValueError(
            f"log_data message {index} has the unknown role {role!r}; smolagents logs use {SMOLAGENTS_ROLES}. "
            "Fix or drop this row."
        )
    return role


def _message_text(message: Mapping[str, Any], index: int) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ValueError(
            f"log_data message {index} has 'content' of type {type(content).__name__}; expected a string or a list "
            "of {'type': 'text', 'text': ...} parts."
        )
    texts = []
    for part_index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"log_data message {index}, content part {part_index} is {kind!r}, not a text part: only text "
                "trajectories can be trained on. Drop the non-text parts (e.g. images) or the row."
            )
        texts.append(part["text"])
    return "".join(texts)
