"""Resumable JSONL output: records survive, torn lines are cut, corrupt files are named."""

import json

import pytest

from trl_agent_distill.jsonl import ResumableJsonl


def test_appended_records_are_read_back(tmp_path):
    path = tmp_path / "out" / "episodes.jsonl"
    with ResumableJsonl(path) as log:
        log.append({"task_id": "a", "n": 1})
        log.append({"task_id": "b", "text": "ünïcode\nline"})
    with ResumableJsonl(path) as again:
        assert again.records == [{"task_id": "a", "n": 1}, {"task_id": "b", "text": "ünïcode\nline"}]
    assert path.read_text().count("\n") == 2


def test_a_torn_last_line_is_removed_on_open(tmp_path, caplog):
    path = tmp_path / "episodes.jsonl"
    path.write_text(json.dumps({"task_id": "a"}) + "\n" + '{"task_id": "b", "mess')
    with ResumableJsonl(path) as log:
        assert log.records == [{"task_id": "a"}]
        log.append({"task_id": "b"})
    assert "torn line" in caplog.text
    assert [json.loads(line)["task_id"] for line in path.read_text().splitlines()] == ["a", "b"]


def test_a_corrupt_line_in_the_middle_names_the_line(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"task_id": "a"}\nnot json\n{"task_id": "c"}\n')
    with pytest.raises(ValueError, match=r"episodes.jsonl, line 2: not valid JSON"):
        ResumableJsonl(path)
    assert path.read_text().count("\n") == 3  # nothing written is lost
