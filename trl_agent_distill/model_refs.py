"""Check that a model a recipe names can be loaded, before any work starts.

A reference is a local directory or a hub name. A path that does not exist fails here naming the option it came
from, and so does a hub name when the hub is off (`HF_HUB_OFFLINE`) and nothing of it is cached: otherwise the
mistake shows only when that model loads, possibly after hours of work on another model, as a hub connection error
that never prints the name.
"""

from __future__ import annotations

import os
from pathlib import Path


def hub_is_offline() -> bool:
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def check_model_reference(reference: str | os.PathLike, option: str) -> None:
    """Raise `FileNotFoundError` naming `option` when `reference` is neither a local directory nor a usable hub name."""
    text = str(reference)
    path = Path(text).expanduser()
    if path.is_dir():
        return
    if path.exists():
        raise FileNotFoundError(f"{option}: {text} is a file; give the model's directory (with config.json).")
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
