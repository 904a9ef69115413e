"""Durable files and folders: atomic JSON, published folders, directory locks, model identities, writable checks."""

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

from trl_agent_distill.storage import (
    DirectoryInUseError,
    UnreadableFileError,
    check_writable_directory,
    lock_directory,
    model_files_identity,
    publish_folder,
    read_fingerprint,
    read_json,
    write_json,
)


def test_a_kill_while_writing_json_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "settings.json"
    write_json(path, {"max_steps": 3})

    def killed(*args):
        raise KeyboardInterrupt  # the job died after the data went out, before it was in place

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"max_steps": 4})
    assert json.loads(path.read_text()) == {"max_steps": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["settings.json"]  # no temporary file left beside it

def test_unreadable_json_is_named_with_the_remedy(tmp_path):
    assert read_json(tmp_path / "missing.json", remedy="-") is None
    (tmp_path / "torn.json").write_text('{"max_steps": ')
    with pytest.raises(UnreadableFileError, match=r"torn.json is not valid JSON \(Expecting value, line 1\).*; do X"):
        read_json(tmp_path / "torn.json", remedy="do X")
    (tmp_path / "empty.json").write_text("")
    with pytest.raises(UnreadableFileError, match=r"empty.json is empty: a run was killed while writing it"):
        read_json(tmp_path / "empty.json", remedy="do X")

def test_a_crash_while_publishing_a_folder_keeps_the_old_one(tmp_path):
    target = tmp_path / "index"
    publish_folder(target, lambda folder: (folder / "data").write_text("old"), {"version": 1})

    def write_then_crash(folder):
        (folder / "data").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        publish_folder(target, write_then_crash, {"version": 2})
    assert (target / "data").read_text() == "old" and read_fingerprint(target) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    publish_folder(target, lambda folder: (folder / "data").write_text("new"), {"version": 2})
    assert (target / "data").read_text() == "new" and read_fingerprint(target) == {"version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]

def test_a_folder_without_its_fingerprint_is_not_trusted(tmp_path):
    (tmp_path / "half").mkdir()
    assert read_fingerprint(tmp_path / "half") is None and read_fingerprint(tmp_path / "absent") is None
    (tmp_path / "half" / "fingerprint.json").write_text("")
    assert read_fingerprint(tmp_path / "half") is None

def test_a_locked_directory_refuses_another_process_until_released(tmp_path):
    script = textwrap.dedent(f"""
        from trl_agent_distill.storage import DirectoryInUseError, lock_directory
        try:
            with lock_directory({str(tmp_path)!r}, "generate"):
                print("got it")
        except DirectoryInUseError as error:
            print(error)
    """)

    def other_process() -> str:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env).stdout

    with lock_directory(tmp_path, "generate"):
        assert "is in use by another `generate` run" in other_process()
        with pytest.raises(DirectoryInUseError, match=str(tmp_path)):
            with lock_directory(tmp_path, "generate"):
                pass
    assert other_process().strip() == "got it"

def test_model_identity_changes_when_the_model_is_saved_again(tmp_path, tiny_model_dir, make_model):
    model_dir = tiny_model_dir("student")
    first = model_files_identity(model_dir)
    assert first == model_files_identity(model_dir) and len(first) == 16
    (model_dir / "notes.txt").write_text("not part of the model")
    assert model_files_identity(model_dir) == first
    make_model("student", hidden_size=32, num_layers=1, seed=3).save_pretrained(model_dir)
    assert model_files_identity(model_dir) != first
    assert model_files_identity("Qwen/Qwen2.5-0.5B-Instruct") is None  # a hub name: nothing local to identify

def test_a_safetensors_header_is_part_of_the_identity(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", 12) + b'{"a": "xyz"}')
    stat = weights.stat()
    first = model_files_identity(tmp_path)
    weights.write_bytes(struct.pack("<Q", 12) + b'{"b": "xyz"}')  # same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same time: copied over, say
    assert model_files_identity(tmp_path) != first

def test_an_output_dir_that_cannot_be_written_is_named(tmp_path):
    check_writable_directory(tmp_path / "new" / "run", "output_dir")  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"output_dir '.*file/run' cannot be written: .*file is a file, not a folder"):
        check_writable_directory(tmp_path / "file" / "run", "output_dir")
