"""Files and folders that survive a kill at any moment, and output directories that one run uses at a time.

Everything the library keeps on disk for a later run (a retrieval index, a teacher cache, a run's settings, the tiny
models) is published the same way: written in full somewhere hidden, flushed, then renamed into place, so a reader
sees the old version or the new one and never half of one. A folder carries a fingerprint (a JSON file written
last) that tells a later run whether it was built from the same inputs. `lock_directory` keeps a second process
out of an output directory that a run is appending to.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# What makes a model directory a model: weights (full or adapter), the files that say how to read them, and the chat
# template its prompts are written with.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SMALL_FILES = ("config.json", "adapter_config.json", "generation_config.json", "tokenizer_config.json",
                "chat_template.jinja")


class UnreadableFileError(ValueError):
    """A file the library wrote earlier that no longer reads back (edited, truncated by a crash, or foreign)."""


# ---------------------------------------------------------------------------------------------- JSON files
def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` atomically: a kill at any moment leaves the old file or the new one."""
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (parent folders created) through a temporary file and a rename: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_json(path: str | os.PathLike, *, remedy: str) -> Any:
    """The JSON in `path` (None when there is no such file); a file that does not parse is named with `remedy`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise UnreadableFileError(f"{path} cannot be read ({error}); {remedy}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        problem = "is empty" if not text.strip() else f"is not valid JSON ({error.msg}, line {error.lineno})"
        raise UnreadableFileError(f"{path} {problem}: a run was killed while writing it, or it was edited; {remedy}") from None


# ---------------------------------------------------------------------------------------------- folders
def publish_folder(target: str | os.PathLike, write: Callable[[Path], None], fingerprint: dict[str, Any] | None = None,
                   *, fingerprint_name: str = "fingerprint.json") -> Path:
    """Run `write(work_dir)` into a fresh hidden folder beside `target`, then rename it into place.

    The fingerprint, when given, is written last inside the folder, so a folder is only trusted when it carries
    one (`read_fingerprint`). A crash at any point leaves the previous folder, no folder or a hidden work folder
    (removed by the next `publish_folder` on this host), never a half-written `target`. When another process
    publishes the same target first, its folder is kept.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(target)
    work_dir = _make_work_dir(target, "tmp")
    stale = None
    try:
        write(work_dir)
        if fingerprint is not None:
            write_json(work_dir / fingerprint_name, fingerprint)
        _fsync_tree(work_dir)
        if target.exists():
            # rename() cannot replace a non-empty directory: move the outdated one aside, then swap.
            stale = _make_work_dir(target, "old")
            os.rename(target, stale / "folder")
        try:
            os.rename(work_dir, target)
        except OSError:
            if not target.exists():
                raise
            shutil.rmtree(work_dir, ignore_errors=True)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def read_fingerprint(folder: str | os.PathLike, *, fingerprint_name: str = "fingerprint.json") -> dict | None:
    """The fingerprint a published folder carries, or None (no folder, no fingerprint, or an unreadable one)."""
    try:
        data = read_json(Path(folder) / fingerprint_name, remedy="")
    except UnreadableFileError:
        return None
    return data if isinstance(data, dict) else None


def as_stored(value: Any) -> Any:
    """`value` as it reads back from a JSON file (tuples become lists, keys strings), for comparing fingerprints."""
    return json.loads(json.dumps(value))


def remove_stale_work_dirs(target: str | os.PathLike) -> None:
    """Delete the work folders that crashed `publish_folder` calls on this host left beside `target`."""
    target = Path(target)
    if os.name != "posix" or not target.parent.is_dir():
        return  # the liveness check below needs POSIX signals
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-{host}-"
        for entry in target.parent.glob(f"{glob.escape(prefix)}*"):
            pid_text = entry.name[len(prefix):].split("-", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not _process_alive(int(pid_text)):
                logger.info("Removing %s, left by an interrupted write.", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _make_work_dir(target: Path, kind: str) -> Path:
    # Host and pid in the name let a later run tell a crashed write's leftovers from a write still under way.
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp's private 0700 mode would end up on the published folder,
    # hiding it from other users of a shared location; mkdir follows the umask.
    work_dir = target.parent / f".{target.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(6)}"
    os.mkdir(work_dir)
    return work_dir


def _fsync_tree(directory: Path) -> None:
    # The data must be on disk before the rename publishes it: otherwise a power cut can leave a renamed folder,
    # fingerprint included, whose files are empty.
    if os.name != "posix":
        return
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it just belongs to someone else
    except (OSError, OverflowError):
        return False
    return True


def check_writable_directory(directory: str | os.PathLike, name: str) -> None:
    """Fail now, naming `name` and the folder, if `directory` cannot be created or written (not hours later, at the
    first checkpoint). Creates nothing: it probes the folder, or the nearest existing parent it would be made in."""
    directory = Path(directory).absolute()
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as error:
            problem = f"{existing} is not writable ({error.strerror})"
    if problem is not None:
        raise ValueError(f"{name} {str(directory)!r} cannot be written: {problem}. Choose another {name}, or fix the "
                         "folder's permissions.")


# ---------------------------------------------------------------------------------------------- locks
class DirectoryInUseError(ValueError):
    """Another process holds the output directory (a ValueError, like the library's other user-facing errors)."""


@contextmanager
def lock_directory(directory: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold `directory` for this process while the block runs; refuse at once if another process holds it.

    Two runs appending to one output directory would both do the same tasks and write them twice. The lock is an
    OS file lock (`filelock`): a killed run releases it, so a resume never has to clean anything up.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DirectoryInUseError(
            f"{directory} is in use by another `{command}` run (it holds {directory / LOCK_FILE}). Wait for that "
            "run to finish (a re-run then resumes where it stopped), or give this run another output_dir."
        ) from None
    try:
        yield directory
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------- identities
def model_files_identity(model: str | os.PathLike) -> str | None:
    """A short hash that changes when the model saved in directory `model` is saved again; None for a hub name.

    Cheap even for large checkpoints: each weights file counts by name, size, modification time and its
    safetensors header (names, shapes, offsets); the small files (config, adapter config, shard index, tokenizer
    config, chat template) by content.
    """
    directory = Path(model)
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.iterdir() if p.is_file()):
        if path.suffix in _WEIGHT_SUFFIXES:
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            digest.update(_safetensors_header(path) if path.suffix == ".safetensors" else b"")
        elif path.name in _SMALL_FILES or path.name.endswith(".index.json"):
            digest.update(f"{path.name}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return prefix
        (length,) = struct.unpack("<Q", prefix)
        return handle.read(min(length, 100_000_000))
