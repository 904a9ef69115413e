"""Append-only JSONL files that survive being killed: one complete line per record, flushed to disk as it goes.

Long jobs (`generate`, `eval`) write each finished episode at once, so a killed run loses only the episodes in flight
and a re-run skips what is already there. Each record is written with a single `write` of the whole line and
fsynced; if the machine dies mid-line anyway, the torn last line is cut off when the file is opened again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .deprecation import upgrade_recorded_settings
from .storage import as_stored, read_json, write_json, write_text

logger = logging.getLogger(__name__)


class ResumableJsonl:
    """A JSONL file of records, read back on open (torn tail removed) and appended to durably."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._read_and_repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = os.write(self._fd, line)
        if written != len(line):  # a full disk: cut the torn line now rather than leave it for the next reader
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - written)
            raise OSError(f"Could not write a whole record to {self.path} (disk full?).")
        os.fsync(self._fd)
        self.records.append(record)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResumableJsonl:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def _read_and_repair(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            logger.warning("%s ended in a torn line (a run was killed while writing); it was removed.", self.path)
            with open(self.path, "r+b") as file:
                file.truncate(len(complete))
                os.fsync(file.fileno())
        return _records(complete.decode().splitlines(), self.path, remedy=(
            "the file was edited or corrupted. Fix or delete that line, or write to a new output directory."
        ))


def check_same_settings(path: Path, settings: dict[str, Any]) -> None:
    """Record a run's settings in `path`, or refuse to resume a run whose recorded settings differ (naming them)."""
    previous = read_json(path, remedy=(
        "delete it to record this run's settings again (only if they are the ones the run in that folder was "
        "started with), or write to a new output_dir."
    ))
    if previous is None:
        write_json(path, settings)
        return
    previous = upgrade_recorded_settings(previous)
    settings = as_stored(settings)
    changed = sorted(k for k in settings.keys() | previous.keys() if previous.get(k) != settings.get(k))
    if changed:
        details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(
            f"{path.parent} holds a run with other settings ({details}); resuming would mix them. Use a new "
            "output_dir, or delete the old one to start over."
        )


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSONL file (blank lines skipped); a bad line is reported with its file and line number."""
    with Path(path).open(encoding="utf-8") as handle:
        return _records(handle, path, remedy="fix or delete that line.")


def _records(lines: Iterable[str], path: str | os.PathLike, *, remedy: str) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}); {remedy}") from None
    return records


def jsonl_problem(path: str | os.PathLike) -> str | None:
    """What keeps a JSONL file from being read as dataset rows (its first bad line, or no rows), or None.

    Every non-blank line must be one JSON object: one row.
    """
    rows = 0
    try:
        with Path(path).open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))  # so that an unfinished line's column is on it
                except json.JSONDecodeError as error:
                    return (
                        f"line {number} is not valid JSON ({error.msg}, column {error.colno}); fix or delete that "
                        "line: each line must be one JSON object (one row)"
                    )
                if not isinstance(record, dict):
                    return (
                        f"line {number} holds a JSON {type(record).__name__}, not an object; each line must be one "
                        'row, {"column": value, ...}: fix or delete that line'
                    )
                rows += 1
    except UnicodeDecodeError as error:
        return f"it is not UTF-8 text (byte {error.start}); re-encode it as UTF-8"
    return None if rows else "it holds no rows (every line is blank); write one JSON object per line"


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    """Write `records` as a new JSONL file (parent folders created), atomically; returns the path."""
    path = Path(path)
    write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return path
