"""Split agent trajectories into REASON / ACT / OBS / OTHER character spans.

Structured Agent Distillation weighs the distillation loss separately on an agent's reasoning ("Thought: ...")
and on its actions ("Action: Search[...]", code, the final answer), and trains neither on observations nor on the
prompt. This module finds those regions with the line-based rules of each trajectory format (the objects of
`trl_agent_distill.formats`, which the agent loops speak through: ReAct for HotPotQA and WebShop, ALFWorld,
smolagents CodeAct), and adds what is common to all of them: style detection, chat messages, think blocks. It
works on characters, not tokens, so the rules do not depend on a tokenizer or a chat template; `chat_template`
paints them onto the rendered conversation as one code per character (`UNTRAINED`, `REASON`, `ACT`) and the
collator maps those onto tokens through the offset mapping.

An assistant's reasoning is REASON wherever it is written: a leading `<think>...</think>` block in its content (Qwen3,
SmolLM3, DeepSeek-R1), a reasoning field (`reasoning_content`, `thinking`), or prose before its first step marker.

Malformed input raises `TrajectoryFormatError`, which says where (row, message) and what was expected, so one bad
row in a large dataset can be found and fixed (or skipped) instead of silently training on the wrong tokens.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .formats import ALFWorldFormat, CodeActFormat, ReActFormat, ToolCallingFormat, TrajectoryFormat
from .spans import (  # noqa: F401 (Span and the errors are part of this module's API)
    SPAN_KINDS,
    STEP_KINDS,
    NoAgentMarkersError,
    Span,
    TrajectoryFormatError,
    merged_spans,
    spans_from_cuts,
)

# The formats segmentation reads, in the order `auto` tries them: CodeAct first, as its `Thought:` lines would also
# pass for ReAct; tool calling last, as its markup may sit inside any of them.
FORMATS: dict[str, TrajectoryFormat] = {
    fmt.name: fmt for fmt in (CodeActFormat(), ReActFormat(), ALFWorldFormat(), ToolCallingFormat())
}
STYLES = ("auto", "react", "alfworld", "codeact", "tool_calling", "none")
ROLES = ("system", "user", "assistant", "tool", "observation", "ipython")
# The names chat templates read an assistant's reasoning from (transformers fills each from the others).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# Per-character codes of a rendered row: what the loss sees. Observations and "other" text are untrained.
UNTRAINED, REASON, ACT = 0, 1, 2
_KIND_CODES = {"reason": REASON, "act": ACT}

# Only the assistant's own text is segmented; every other role is one span of a fixed kind.
_ROLE_KINDS = {"system": "other", "user": "other", "tool": "obs", "observation": "obs", "ipython": "obs"}

# Everything up to the first `</think>` is reasoning, with or without its `<think>` (DeepSeek-R1's generation prompt
# already holds it), as the Qwen3 and DeepSeek templates split it.
_THINK_BLOCK = re.compile(r"(?:[^<]|<(?!/think>))*</think>")
_CONVERTER_HINT = "for smolagents rows use trl_agent_distill.data.from_smolagents_log"

_NO_STYLE_REASON = (
    "no recognisable step: expected 'Thought:'/'Action:' (react), 'Thought:'/'Code:' (codeact) "
    "or '> ...' lines (alfworld)"
)
_NO_STEP_IN_OBSERVATIONS = "no recognisable step: the text holds only observations and other untrained text"


# ---------------------------------------------------------------------------------------------- public API
def detect_style(text: str) -> str:
    """Guess the trajectory format of `text`: `"codeact"`, `"react"` or `"alfworld"`.

    CodeAct is checked first because its `Thought:` lines would also pass for ReAct.
    """
    _check_is_text(text)
    for name, fmt in FORMATS.items():
        if fmt.looks_like(text):
            return name
    raise NoAgentMarkersError(f"{_NO_STYLE_REASON}; the text reads {_preview(text)}")


def segment_text(text: str, style: str = "auto", *, role: str | None = None) -> list[Span]:
    """Split `text` into sorted, contiguous spans that cover it exactly, merging neighbours of one kind.

    `role=None` means a whole transcript (prompt, steps and observations in one string); `role="assistant"` means
    the agent's own output only. Other roles give one span of their fixed kind (`other` or `obs`).
    """
    _check_style(style)
    fixed_kind = None if role in (None, "assistant") else _role_kind(role)
    _check_is_text(text)
    if not text:
        return []
    if fixed_kind is not None:
        return [Span(fixed_kind, 0, len(text))]
    assistant = role == "assistant"
    resolved = detect_style(text) if style == "auto" else style
    spans = _segment(text, resolved, assistant=assistant)
    if not _has_step(spans):
        raise TrajectoryFormatError(f"{_no_step_reason(resolved, assistant)}; the text reads {_preview(text)}")
    return _reason_before_first_step(text, spans) if assistant else spans


def segment_messages(messages: list[dict], style: str = "auto", *, unparsed_as: str | None = None) -> list[list[Span]]:
    """One span list per message, with offsets into that message's `content`.

    With `style="auto"` the style is detected once from all assistant contents together, so a last turn that
    holds only part of the format (e.g. a CodeAct `Thought:` before the final answer) is read the same way.
    `unparsed_as="act"` (or `"reason"`) makes an assistant turn that does not segment one span of that kind instead
    of an error: a student's own rollout is a training sample whatever it wrote.
    """
    _check_style(style)
    _check_conversation(messages)
    if unparsed_as is not None and unparsed_as not in ("reason", "act"):
        raise ValueError(f"unparsed_as must be 'reason', 'act' or None, got {unparsed_as!r}")
    try:
        resolved = _conversation_style(messages, style)
    except TrajectoryFormatError:
        if unparsed_as is None:
            raise
        resolved = None
    spans = []
    for index, message in enumerate(messages):
        try:
            spans.append(_segment_message(message, index, resolved))
        except TrajectoryFormatError:
            if unparsed_as is None or message["role"] != "assistant":
                raise
            spans.append([Span(unparsed_as, 0, len(message.get("content") or ""))])
    return spans


def think_block_end(content: str) -> int:
    """Where the `<think>...</think>` block an assistant's content opens with ends (0 when it has none)."""
    block = _THINK_BLOCK.match(content)
    return block.end() if block else 0


def reasoning_field(message: Mapping) -> str | None:
    """The message's reasoning (`reasoning_content`, `thinking` or `reasoning`), as chat templates read it."""
    return next((message[name] for name in REASONING_FIELDS if message.get(name) is not None), None)


def reasoning_kind(style: str) -> str:
    """The span kind of reasoning: REASON, except with style `none`, where every trained token is one kind."""
    return "act" if style == "none" else "reason"


def paint_spans(char_kinds: bytearray, spans: list[Span], offset: int, clip: tuple[int, int] | None = None) -> None:
    """Write the code of each REASON / ACT span at `offset` into `char_kinds`, inside `clip` (other kinds: left)."""
    low, high = clip if clip is not None else (0, len(char_kinds))
    for span in spans:
        code = _KIND_CODES.get(span.kind)
        if code is None:
            continue
        start, end = max(span.start + offset, low), min(span.end + offset, high)
        if end > start:
            char_kinds[start:end] = bytes([code]) * (end - start)


# ---------------------------------------------------------------------------------------------- conversations
def _check_conversation(messages: object) -> None:
    if not isinstance(messages, (list, tuple)):
        raise TrajectoryFormatError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise TrajectoryFormatError("the conversation has no messages")
    for index, message in enumerate(messages):
        _check_message(message, index)
    if not any(message["role"] == "assistant" for message in messages):
        roles = sorted({message["role"] for message in messages})
        raise TrajectoryFormatError(
            f"the conversation has no assistant message, so there is nothing to train (roles present: {roles})"
        )


def _check_message(message: object, index: int) -> None:
    if not isinstance(message, Mapping):
        raise TrajectoryFormatError(
            f"expected a {{'role': ..., 'content': ...}} dict, got {type(message).__name__}", message_index=index
        )
    role = message.get("role")
    if role not in ROLES:
        raise TrajectoryFormatError(_unknown_role_reason(role), message_index=index)
    for field in ("content", *REASONING_FIELDS):
        value = message.get(field)
        if value is not None and not isinstance(value, str):
            raise TrajectoryFormatError(
                f"{field} is a {type(value).__name__}, not a string; flatten it to a string first "
                f"({_CONVERTER_HINT})",
                message_index=index,
            )


def _conversation_style(messages: list[dict], style: str) -> str | None:
    """The style for every assistant message; None when none could be detected and no message needs one."""
    if style != "auto":
        return style
    answers = {
        index: _answer(message["content"])
        for index, message in enumerate(messages)
        if message["role"] == "assistant" and message.get("content")
    }
    try:
        return detect_style("\n".join(answer for answer in answers.values() if answer))
    except TrajectoryFormatError:
        pass
    # A conversation with structured tool_calls speaks native tool calling: the text beside a call is reasoning, a
    # reply without calls the answer. Any other assistant text needs a style.
    if any(message.get("tool_calls") for message in messages):
        return "tool_calling"
    for index, answer in answers.items():
        if answer.strip():
            reason = f"{_NO_STYLE_REASON}; the message reads {_preview(answer)}"
            raise NoAgentMarkersError(reason, message_index=index)
    return None


def _answer(content: str) -> str:
    """An assistant's content after its think block: what its step markers are looked for in."""
    return content[think_block_end(content) :]


def _segment_message(message: dict, index: int, style: str | None) -> list[Span]:
    content = message.get("content") or ""
    role = message["role"]
    try:
        if role != "assistant":
            return segment_text(content, role=role)
        if not content:
            return []  # a tool_calls-only turn: the chat template renders the call itself
        think_end = think_block_end(content) if style != "none" else 0
        answer = content[think_end:]
        if think_end and not answer.strip():
            return [Span("reason", 0, len(content))]  # a turn that only thinks
        if not message.get("tool_calls"):
            spans = segment_text(answer, style or "auto", role="assistant")
        else:
            # Native tool calling keeps its calls out of the content: the text beside them holds no step.
            spans = _segment(answer, style, assistant=True) if style not in (None, "tool_calling") else []
            # Free text before a structured call (no Thought:/Action: marker) is the agent thinking aloud.
            spans = _reason_before_first_step(answer, spans) if _has_step(spans) else [Span("reason", 0, len(answer))]
        shifted = [Span(span.kind, span.start + think_end, span.end + think_end) for span in spans]
        return merged_spans([Span("reason", 0, think_end)] + shifted if think_end else shifted)
    except TrajectoryFormatError as error:
        raise error.with_message(index) from None


# ---------------------------------------------------------------------------------------------- dispatch
def _segment(text: str, style: str, *, assistant: bool) -> list[Span]:
    """Spans of a non-empty `text` in a concrete style, without checking that it holds a step."""
    if style == "none":
        return [Span("act", 0, len(text))] if assistant else _token_level_transcript(text)
    return FORMATS[style].segment(text, assistant=assistant)


def _token_level_transcript(text: str) -> list[Span]:
    """Style `none` on a whole transcript: what the agent wrote is one kind (ACT); observations stay untrained.

    The observations are found with the transcript's own style, so `none` trains exactly the tokens the other
    styles train, as one kind; a transcript with no step markers at all is the agent's text throughout.
    """
    try:
        style = detect_style(text)
    except NoAgentMarkersError:
        return [Span("act", 0, len(text))]
    spans = _segment(text, style, assistant=False)
    cuts = [(span.start, "act" if span.kind in STEP_KINDS else span.kind) for span in spans]
    return spans_from_cuts(cuts, len(text))


def _has_step(spans: list[Span]) -> bool:
    return any(span.kind in STEP_KINDS for span in spans)


def _reason_before_first_step(text: str, spans: list[Span]) -> list[Span]:
    """An assistant's prose before its first step marker is its reasoning (in a transcript it is the prompt).

    Blank space there goes with the step it leads to. Checked after `_has_step`, so a style that finds no marker
    at all still fails instead of passing as prose.
    """
    first = spans[0]
    if first.kind != "other" or len(spans) == 1:
        return spans
    kind = "reason" if text[first.start : first.end].strip() else spans[1].kind
    return merged_spans([Span(kind, first.start, first.end), *spans[1:]])


# ---------------------------------------------------------------------------------------------- checks
def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def _check_is_text(text: object) -> None:
    if not isinstance(text, str):
        raise TrajectoryFormatError(
            f"expected the trajectory as a string, got {type(text).__name__}; flatten it first ({_CONVERTER_HINT})"
        )


def _role_kind(role: object) -> str:
    if not isinstance(role, str) or role not in _ROLE_KINDS:
        raise TrajectoryFormatError(_unknown_role_reason(role))
    return _ROLE_KINDS[role]


def _unknown_role_reason(role: object) -> str:
    reason = f"unknown role {role!r}; allowed roles: {', '.join(ROLES)}"
    if role in ("tool-call", "tool-response"):
        reason += f" ({_CONVERTER_HINT})"
    return reason


def _no_step_reason(style: str, assistant: bool) -> str:
    if style == "none":
        return _NO_STEP_IN_OBSERVATIONS
    return FORMATS[style].no_step_reason(assistant=assistant)


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
