"""Options renamed in this release, still read under their old name for one release with a warning."""

from __future__ import annotations

import warnings


def take_renamed_option(config, old: str, new: str, why: str) -> None:
    """Move `config.<old>` (set by an old recipe or call) into `config.<new>` with a `FutureWarning`; `old` stays
    unset (None) so the settings a run records hold one name."""
    value = getattr(config, old)
    if value is None:
        return
    warnings.warn(f"`{old}` is deprecated and will be removed in the next release: use `{new}` ({why}).",
                  FutureWarning, stacklevel=3)
    setattr(config, new, value)
    setattr(config, old, None)


# Settings files written by runs of the previous release name these options by their old names.
_RENAMED_SETTINGS = {"max_steps": "max_agent_steps"}


def upgrade_recorded_settings(recorded: dict) -> dict:
    """`recorded` (a run's settings file) under this release's option names, so an older run can be resumed."""
    upgraded = dict(recorded)
    for old, new in _RENAMED_SETTINGS.items():
        if new not in upgraded and upgraded.get(old) is not None:
            upgraded[new], upgraded[old] = upgraded.pop(old), None
    return upgraded
