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
