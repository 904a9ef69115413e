"""Character spans of a trajectory (REASON / ACT / OBS / OTHER) and the error for text that cannot be split.

Shared by the formats, which find the spans of their own protocol, and by `segmentation`, which dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass

SPAN_KINDS = ("reason", "act", "obs", "other")
STEP_KINDS = ("reason", "act")


@dataclass(frozen=True)
class Span:
    """A half-open character range `[start, end)` of one kind (see `SPAN_KINDS`)."""

    kind: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.kind not in SPAN_KINDS:
            raise ValueError(f"span kind must be one of {SPAN_KINDS}, got {self.kind!r}")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"span bounds must satisfy 0 <= start <= end, got [{self.start}, {self.end})")


class TrajectoryFormatError(ValueError):
    """A trajectory that cannot be segmented; `str()` names the row and message it came from when known."""

    def __init__(self, reason: str, *, row_index: int | None = None, message_index: int | None = None):
        # args stays (reason,) so that the default pickling rebuilds the error and then restores the indices.
        super().__init__(reason)
        self.reason = reason
        self.row_index = row_index
        self.message_index = message_index

    def __str__(self) -> str:
        where = []
        if self.row_index is not None:
            where.append(f"row {self.row_index}")
        if self.message_index is not None:
            where.append(f"message {self.message_index}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason

    def with_row(self, row_index: int | None) -> TrajectoryFormatError:
        """A copy that names the dataset row (the collator knows it, the segmenter does not)."""
        return type(self)(self.reason, row_index=row_index, message_index=self.message_index)

    def with_message(self, message_index: int | None) -> TrajectoryFormatError:
        """A copy that names the message of the conversation."""
        return type(self)(self.reason, row_index=self.row_index, message_index=message_index)


class NoAgentMarkersError(TrajectoryFormatError):
    """Assistant text without the step markers of any style: `auto` cannot segment it (it reads as plain chat)."""


def spans_from_cuts(cuts: list[tuple[int, str]], length: int) -> list[Span]:
    """Turn non-decreasing `(offset, kind)` boundaries, the first at 0, into contiguous non-empty spans."""
    ends = [offset for offset, _ in cuts[1:]] + [length]
    return merged_spans([Span(kind, start, end) for (start, kind), end in zip(cuts, ends) if end > start])


def merged_spans(spans: list[Span]) -> list[Span]:
    """Contiguous spans with neighbours of one kind joined."""
    merged: list[Span] = []
    for span in spans:
        if merged and merged[-1].kind == span.kind:
            merged[-1] = Span(span.kind, merged[-1].start, span.end)
        else:
            merged.append(span)
    return merged
