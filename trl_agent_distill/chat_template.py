"""Render chat rows with the tokenizer's chat template, and mark what the model itself writes in each assistant turn.

The rule: inside each assistant turn, everything the model emits is trained: its content, its reasoning, the markup
the template writes between the generation prompt and the end of the turn (rendered tool calls, channel headers) and
that turn's own end-of-turn token. Nothing else is: system, user and tool messages, and the generation prompts.
Content gets its REASON / ACT spans from `segmentation`, reasoning is REASON, markup and the end of turn are ACT.

A turn starts where the generation prompt ends (the history before it rendered with `add_generation_prompt=True`).
Where it ends is found in one of two ways:

- **generation markers**: where TRL has a training template for the tokenizer's template
  (`trl.get_training_chat_template`: prefix-preserving, reasoning kept in every turn, `{% generation %}` around what
  the model writes), or the template has markers of its own, the turn is its marked text (the spans behind
  `return_assistant_tokens_mask`, per character), up to its last non-blank character.
- **rendering** (any other template, or `use_training_template=False`): the turn ends where the conversation cut after
  it ends, so templates with several end-of-turn tokens (gpt-oss: `<|end|>`, `<|call|>`, `<|return|>`) give each turn
  its own. Where the template renders a turn differently once more messages follow, the turn ends at the end-of-turn
  token it is rendered with when it comes last (or at the special token that follows its text).

Only assistant text is looked for in the rendering (verbatim, or trimmed for templates that `| trim`), so templates
that re-encode other messages (`| tojson` of tool results) are fine. A template that refuses a conversation or does
not render a message's `tool_calls` raises `TrajectoryFormatError` naming the message; reasoning that a template leaves
out (Qwen3's and DeepSeek-R1's own templates drop earlier turns' reasoning) is not trained, with a warning.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template
from trl.chat_template_utils import (
    get_training_chat_template,
    has_generation_markers,
    is_chat_template_stop_token_trained,
)

from .formats.tool_calling import with_argument_dicts
from .segmentation import (
    ACT,
    Span,
    TrajectoryFormatError,
    paint_spans,
    reasoning_field,
    reasoning_kind,
    segment_messages,
    think_block_end,
)

logger = logging.getLogger(__name__)

# What jinja templates raise on a conversation they do not accept: `raise_exception` and undefined values
# (TemplateError), `str + dict` or `None + str` (TypeError), and transformers' own checks (ValueError).
_TEMPLATE_ERRORS = (TemplateError, TypeError, ValueError)
_PROBE = "PROBE7d1f0c"  # plain text: templates that `| trim` must keep it whole
_PROBE_CALL = {"type": "function", "function": {"name": "probe_tool", "arguments": {"query": _PROBE}}}
_WHITESPACE = re.compile(r"\s*")
_DROPPED_HINTS = {
    "the reasoning": " (TRL's training templates keep it for Qwen3 and DeepSeek-R1: use_training_chat_template)",
    "the text beside the tool_calls": ": in this template's format the model writes only the call",
}
_THINK_CLOSE = re.compile(r"\s*</think>")
_logged: set[str] = set()


def _log_once(level: int, message: str, key: str | None = None) -> None:
    """Collators are built several times per run (training, rollouts, masks); say each thing once."""
    key = key or message
    if key not in _logged:
        _logged.add(key)
        logger.log(level, message)


class ChatTemplateRenderer:
    """Render `messages` rows as text with a kind code per character (`UNTRAINED`, `REASON`, `ACT`).

    Args:
        tokenizer: its chat template renders the rows.
        use_training_template: locate assistant turns with `{% generation %}` markers: TRL's training template for
            this tokenizer's template when there is one, or the template's own markers. Off, or for templates with
            neither, turns are located by rendering the conversation cut after each turn.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, use_training_template: bool = True):
        self.tokenizer = tokenizer
        self.template, self.uses_generation_markers = _choose_template(tokenizer, use_training_template)
        self.added_tokens = _AddedTokens(tokenizer)
        self.generation_prompt = _generation_prompt(tokenizer, self.template) if self.uses_generation_markers else None

    def render(
        self, messages: list[dict], tools: Any = None, *, style: str = "auto", unparsed_as: str | None = None
    ) -> tuple[str, bytearray]:
        """The rendered conversation and a kind code per character; malformed rows raise `TrajectoryFormatError`.

        `style` and `unparsed_as` are those of `segment_messages`, which splits each assistant message's content.
        """
        content_spans = segment_messages(messages, style, unparsed_as=unparsed_as)
        if not self.tokenizer.chat_template:
            raise TrajectoryFormatError(
                "the tokenizer has no chat template, so `messages` rows cannot be rendered; set "
                "tokenizer.chat_template or give the rows as `text`"
            )
        row = _Row(self, messages, _parse_tools(tools))
        char_kinds = bytearray(len(row.text))
        turn_end = 0
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            pieces = _pieces(message, content_spans[index], reasoning_kind(style))
            start, turn_end, located = row.turn(index, row.turn_start(index, floor=turn_end), pieces)
            char_kinds[start:turn_end] = bytes([ACT]) * (turn_end - start)  # markup and the end of turn
            for piece, (piece_start, piece_end, shift) in located.items():
                char_kinds[piece_start:piece_end] = bytes(piece_end - piece_start)  # its own spans decide
                paint_spans(char_kinds, piece.spans, offset=shift, clip=(piece_start, piece_end))
                if piece.reasoning:
                    row.paint_think_tags(char_kinds, piece_start, piece_end, (start, turn_end))
            _check_tool_calls(message, index, row.text, start, turn_end, located.values())
        return row.text, char_kinds


    def history_prompt(self, messages: list[dict], tools: Any = None) -> str | None:
        """The history before the last assistant turn with the generation prompt, rendered with the template `render`
        uses: what a model generates that turn from (GKD's on-policy prompt). None when the template refuses it."""
        last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
        try:
            return self.tokenizer.apply_chat_template(
                with_argument_dicts(messages[:last]), tools=_parse_tools(tools), chat_template=self.template,
                tokenize=False, add_generation_prompt=True,
            )
        except _TEMPLATE_ERRORS:
            return None

def end_of_turn_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The special tokens a model emits to end its assistant turn, as its chat template writes them.

    Generation stops on each (a chat model's eos is often another token, e.g. Qwen's `<|endoftext|>` against
    `<|im_end|>`): the one right after an answer's text (Phi-3.5's `<|end|>`) and the one a last turn ends with (its
    `<|endoftext|>`; gpt-oss's `<|return|>` after an answer, `<|call|>` after a tool call).
    """
    if not tokenizer.chat_template:
        return []
    added_tokens = _AddedTokens(tokenizer)
    user = {"role": "user", "content": "hi"}
    probes = [
        {"role": "assistant", "content": _PROBE},
        {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]},
    ]
    tokens: list[str] = []
    for probe in probes:
        try:
            prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
            rendered = tokenizer.apply_chat_template([user, probe], tokenize=False).rstrip()
        except _TEMPLATE_ERRORS:
            continue  # e.g. a template without tool calls
        turn = rendered[_common_prefix(prompt, rendered) :]
        answer_end = turn.find(_PROBE) + len(_PROBE) if probe.get("content") and _PROBE in turn else None
        for token in (added_tokens.at(turn, answer_end) if answer_end else None, added_tokens.ending(turn)):
            if token is not None and token not in tokens:
                tokens.append(token)
    if not tokens:
        logger.warning("The chat template writes no special token at the end of an assistant turn; generation only "
                       "stops at eos.")
    return tokens


# ---------------------------------------------------------------------------------------------- choosing a template
def _choose_template(tokenizer: PreTrainedTokenizerBase, use_training_template: bool) -> tuple[str | None, bool]:
    """The template to render with (None: the tokenizer's own) and whether its generation markers locate the turns."""
    if not tokenizer.chat_template:
        return None, False
    if not use_training_template:
        _log_once(logging.INFO, "Chat template: use_training_chat_template is off; assistant turns are located by "
                                "rendering with the tokenizer's own template.")
        return None, False
    if has_generation_markers(tokenizer.chat_template):
        template, source = None, "the template's own {% generation %} markers"
    else:
        try:
            template = get_training_chat_template(tokenizer)
        except _TEMPLATE_ERRORS:  # ValueError: TRL knows no training variant of this template
            _log_once(logging.INFO, "Chat template: TRL has no training template for this tokenizer's chat template; "
                                    "assistant turns are located by rendering with it.")
            return None, False
        source = "TRL's training chat template for this tokenizer's template ({% generation %} markers, reasoning "
        source += "kept in every turn)"
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=template):
        _log_once(logging.WARNING, f"Chat template: {source} leave the end-of-turn token out of the assistant turn; "
                                   "assistant turns are located by rendering instead, so that stopping is trained.")
        return None, False
    _log_once(logging.INFO, f"Chat template: assistant turns are located with {source}; set "
                            "use_training_chat_template=False to render with the tokenizer's own template.")
    return template, True


# ---------------------------------------------------------------------------------------------- one row
@dataclass(eq=False)
class _Piece:
    """Assistant text the template should render: its spans have offsets into `text`."""

    text: str
    spans: list[Span]
    reasoning: bool  # its think tags belong to it
    droppable: str | None  # what it is, where a template may leave it out; None: it must be rendered
    parts: list[_Piece] | None = None  # looked for instead when the template does not render the whole


class _Row:
    """One conversation: its rendering (cached per prefix), token boundaries, and where its assistant turns lie."""

    def __init__(self, renderer: ChatTemplateRenderer, messages: list[dict], tools: Any):
        self.renderer = renderer
        self.messages = with_argument_dicts(messages)  # JSON-string arguments (as stored) decoded for the template
        self.tools = tools
        self._renderings: dict[tuple[int, bool], str] = {}
        self._token_starts: list[int] | None = None  # tokenized only when a position must be snapped
        self._generated: list[tuple[int, int]] = []  # the {% generation %} runs, as character ranges
        if renderer.uses_generation_markers:
            self.text = self._render_marked()
        else:
            self.text = self.render(len(messages))
        assistants = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        # One run per assistant message (the usual case) maps runs to messages in order; otherwise each turn is
        # checked against the renderings of its history.
        self._run_of = dict(zip(assistants, self._generated)) if len(self._generated) == len(assistants) else None

    # ------------------------------------------------------------------ rendering
    def render(self, count: int, generation_prompt: bool = False) -> str:
        """The first `count` messages rendered (optionally with the generation prompt); refusals name the message."""
        key = (count, generation_prompt)
        if key not in self._renderings:
            try:
                self._renderings[key] = self._call_template(
                    self.messages[:count], tokenize=False, add_generation_prompt=generation_prompt
                )
            except _TEMPLATE_ERRORS as error:
                raise TrajectoryFormatError(
                    f"the chat template cannot render this conversation ({type(error).__name__}: {error}); change the "
                    "message or use a chat template that accepts it",
                    message_index=self._first_refused(count),
                ) from None
        return self._renderings[key]

    def _call_template(self, messages: list[dict], **kwargs) -> Any:
        tokenizer = self.renderer.tokenizer
        return tokenizer.apply_chat_template(messages, tools=self.tools, chat_template=self.renderer.template, **kwargs)

    def _render_marked(self) -> str:
        """The whole conversation, with its {% generation %} runs recorded as character ranges.

        `apply_chat_template(return_assistant_tokens_mask=True)` gives these only per token, after tokenizing; the
        function it renders with gives them per character in the same rendering, so no extra tokenization is needed.
        """
        tokenizer = self.renderer.tokenizer
        try:
            (text,), (runs,) = render_jinja_template(
                conversations=[[_without_none(message) for message in self.messages]],
                tools=self.tools,
                chat_template=tokenizer.get_chat_template(self.renderer.template, self.tools),
                return_assistant_tokens_mask=True,
                **tokenizer.special_tokens_map,
            )
        except _TEMPLATE_ERRORS:
            self.render(len(self.messages))  # raises, naming the message
            raise
        for start, end in runs:
            if start == end:
                continue
            if self._generated and start <= self._generated[-1][1]:  # blocks that touch are one run
                self._generated[-1] = (self._generated[-1][0], max(end, self._generated[-1][1]))
            else:
                self._generated.append((start, end))
        self._renderings[(len(self.messages), False)] = text
        return text

    def _first_refused(self, count: int) -> int:
        """The message whose addition makes the template fail (the last one when only the whole fails)."""
        for end in range(1, count):
            try:
                self._call_template(self.messages[:end], tokenize=False)
            except _TEMPLATE_ERRORS:
                return end - 1
        return count - 1

    def _snap(self, position: int) -> int:
        """`position`, moved back to the start of the token it falls in (never inside a special token)."""
        if self._token_starts is None:
            encoding = self.renderer.tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
            self._token_starts = [start for start, _ in encoding["offset_mapping"]]
        index = bisect.bisect_right(self._token_starts, position) - 1
        return self._token_starts[index] if index >= 0 else 0

    # ------------------------------------------------------------------ turns
    def turn_start(self, index: int, floor: int) -> int:
        """Where assistant message `index` starts in the text: after its generation prompt, at or after `floor`."""
        if index == 0:
            raise TrajectoryFormatError(
                "the conversation opens with an assistant message, so nothing marks where its generated text starts; "
                "begin it with the system or user message it answers",
                message_index=0,
            )
        after_prompt = self._after_generation_prompt(index, floor)
        if after_prompt is not None:
            return after_prompt
        prompt = self.render(index, generation_prompt=True)
        if self.text.startswith(prompt) and len(prompt) >= floor:
            return len(prompt)
        # The template writes this turn's opening differently from its generation prompt (DeepSeek-R1's prompt
        # ends in `<think>\n`): the turn starts where they part.
        agreed = self._snap(_common_prefix(prompt, self.text))
        if agreed >= floor:
            return agreed
        # The history renders differently once this turn follows it (Qwen3 drops earlier reasoning): look for the
        # generation prompt itself.
        generation_prompt = prompt[_common_prefix(prompt, self.render(index)) :]
        found = self.text.find(generation_prompt, floor) if generation_prompt else -1
        if found < 0:
            raise TrajectoryFormatError(
                "cannot tell where this assistant message starts in the rendered conversation: the chat template "
                "writes neither its generation prompt nor the history before it as it renders the whole conversation",
                message_index=index,
            )
        return found + len(generation_prompt)

    def _after_generation_prompt(self, index: int, floor: int) -> int | None:
        """Where the template's generation prompt ends, when it is written where the message's marked run starts.

        Saves rendering the history for each turn; templates that write another prompt in some places (DeepSeek-R1
        after tool results) fall back to that.
        """
        prompt = self.renderer.generation_prompt
        if not prompt or self._run_of is None:
            return None
        run_start = self._run_of[index][0]
        found = self.text.find(prompt, max(floor, run_start - len(prompt)), run_start + len(prompt))
        return found + len(prompt) if found >= 0 and found <= run_start <= found + len(prompt) else None

    def turn(self, index: int, start: int, pieces: list[_Piece]) -> tuple[int, int, dict[_Piece, tuple[int, int, int]]]:
        """The trained range of the turn that starts at `start`, and where its pieces lie in it."""
        if self.renderer.uses_generation_markers:
            start, end = self._marked(index, start)
            return start, end, self._locate(index, pieces, start, end)
        last = self.render(index + 1).rstrip()
        if last[:start] == self.text[:start] and self.text.startswith(last[start:], start):
            return start, len(last), self._locate(index, pieces, start, len(last))
        bound = self._next_turn_bound(index)
        located = self._locate(index, pieces, start, bound)
        after = max((piece_end for _, piece_end, _ in located.values()), default=start)
        return start, self._end_of_turn(after, bound, self.renderer.added_tokens.ending(last)), located

    def _marked(self, index: int, start: int) -> tuple[int, int]:
        """The generation-marked text that runs through or follows `start`, trailing whitespace left out."""
        if self._run_of is not None:
            run_start, run_end = self._run_of[index]
        else:
            run = bisect.bisect_right([end for _, end in self._generated], start)
            if run == len(self._generated) or self._generated[run][0] >= self._next_turn_bound(index):
                raise TrajectoryFormatError(
                    "the chat template's {% generation %} markers do not cover this assistant message; mark it, or "
                    "set use_training_chat_template=False to locate turns by rendering",
                    message_index=index,
                )
            run_start, run_end = self._generated[run]
        start = max(start, run_start)
        return start, start + len(self.text[start:run_end].rstrip())

    def _next_turn_bound(self, index: int) -> int:
        """Where the next assistant message's generation prompt ends, when the template renders it as a prefix."""
        for later in range(index + 1, len(self.messages)):
            if self.messages[later]["role"] == "assistant":
                prompt = self.render(later, generation_prompt=True)
                if self.text.startswith(prompt):
                    return len(prompt)
        return len(self.text)

    def _end_of_turn(self, after: int, bound: int, end_token: str | None) -> int:
        """For a turn rendered differently when it is not last: through the end-of-turn token after its text."""
        if end_token is not None and (found := self.text.find(end_token, after, bound)) >= 0:
            return found + len(end_token)
        # gpt-oss ends an answer with `<|return|>` when it is last and with `<|end|>` before more messages.
        position = _WHITESPACE.match(self.text, after, bound).end()
        following = self.renderer.added_tokens.at(self.text, position)
        return position + len(following) if following is not None and position + len(following) <= bound else after

    def _locate(self, index: int, pieces: list[_Piece], low: int, high: int) -> dict[_Piece, tuple[int, int, int]]:
        """Each piece's (start, end, offset of its char 0) in the text between `low` and `high`, in order."""
        located: dict[_Piece, tuple[int, int, int]] = {}
        self._locate_in_order(index, pieces, low, high, located)
        return located

    def _locate_in_order(self, index: int, pieces: list[_Piece], cursor: int, high: int, located: dict) -> int:
        for piece in pieces:
            position = _find(self.text, piece.text, cursor, high)
            if position is not None:
                located[piece] = position
                cursor = position[1]
            elif piece.parts:
                cursor = self._locate_in_order(index, piece.parts, cursor, high, located)
            elif piece.droppable is not None:
                template = self.renderer.template or self.renderer.tokenizer.chat_template
                _log_once(logging.WARNING, f"The chat template does not render {piece.droppable} of some assistant "
                                           f"messages (the first: message {index}); that text is not trained"
                                           f"{_DROPPED_HINTS[piece.droppable]}.",
                          key=f"dropped {piece.droppable} {template}")
            else:
                raise TrajectoryFormatError(
                    "the chat template does not render this message's content verbatim, so its spans cannot be "
                    "placed on tokens; use a template that keeps message text as is",
                    message_index=index,
                )
        return cursor

    def paint_think_tags(self, char_kinds: bytearray, start: int, end: int, turn: tuple[int, int]) -> None:
        """The `<think>` / `</think>` tags around located reasoning are part of it (with the spacing inside them)."""
        code = char_kinds[start]
        opening = self.text.rfind("<think>", turn[0], start)
        if opening >= 0 and not self.text[opening + len("<think>") : start].strip():
            char_kinds[opening:start] = bytes([code]) * (start - opening)
        closing = _THINK_CLOSE.match(self.text, end, turn[1])
        if closing is not None:
            char_kinds[end : closing.end()] = bytes([code]) * (closing.end() - end)


class _AddedTokens:
    """Finds the tokenizer's added and special tokens (end-of-turn markers among them) in rendered text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        tokens = {token.content for token in tokenizer.added_tokens_decoder.values()}
        tokens = sorted((token for token in tokens | set(tokenizer.all_special_tokens) if token), key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        self._longest = len(tokens[0]) if tokens else 0

    def at(self, text: str, position: int) -> str | None:
        """The added token that starts at `position`, if one does."""
        match = self._pattern.match(text, position) if self._pattern else None
        return match.group() if match else None

    def ending(self, text: str) -> str | None:
        """The added token `text` ends with, if any."""
        if self._pattern is None:
            return None
        for start in range(max(0, len(text) - self._longest), len(text)):
            if (match := self._pattern.fullmatch(text, start)) is not None:
                return match.group()
        return None


# ---------------------------------------------------------------------------------------------- pieces and checks
def _pieces(message: dict, content_spans: list[Span], reasoning: str) -> list[_Piece]:
    """What of an assistant message the template should render, in order: its reasoning field, then its content.

    Content is one piece when the template renders it verbatim; where it opens with a think block that the template
    re-renders on its own (Qwen3) or drops (DeepSeek-R1), the block and the answer after it are two pieces.
    """
    pieces = []
    field = reasoning_field(message)
    if field:
        pieces.append(_Piece(field, [Span(reasoning, 0, len(field))], reasoning=True, droppable="the reasoning"))
    content = message.get("content") or ""
    if not content:
        return pieces
    beside_calls = "the text beside the tool_calls" if message.get("tool_calls") else None
    whole = _Piece(content, content_spans, reasoning=False, droppable=beside_calls)
    think_end = think_block_end(content)
    if not think_end:
        return [*pieces, whole]
    inner_start = content.find("<think>", 0, think_end)
    inner_start = 0 if inner_start < 0 else inner_start + len("<think>")
    inner_end = think_end - len("</think>")
    whole.parts = [
        _part(content, content_spans, inner_start, inner_end, reasoning=True, droppable="the reasoning"),
        _part(content, content_spans, think_end, len(content), reasoning=False, droppable=beside_calls),
    ]
    return [*pieces, whole]


def _part(content: str, spans: list[Span], start: int, end: int, **what: Any) -> _Piece:
    """`content[start:end]` as a piece of its own, with the spans that fall in it."""
    inside = [
        Span(span.kind, max(span.start, start) - start, min(span.end, end) - start)
        for span in spans
        if span.end > start and span.start < end
    ]
    return _Piece(content[start:end], inside, **what)


def _check_tool_calls(message: dict, index: int, text: str, start: int, end: int, located) -> None:
    """Every tool call must show in the turn's markup: a template that drops it would teach the model not to call."""
    markup = list(text[start:end])
    for piece_start, piece_end, _ in located:
        markup[piece_start - start : piece_end - start] = " " * (piece_end - piece_start)
    markup = "".join(markup)
    for call in message.get("tool_calls") or []:
        function = call.get("function") or call
        if function.get("name") not in markup:
            raise TrajectoryFormatError(
                f"the chat template does not render tool_calls (the call to {function.get('name')!r} is missing from "
                "the rendered turn), so the turn would teach the model not to call its tool; use a chat template that "
                "renders tool_calls or put the call in the message content",
                message_index=index,
            )


def _generation_prompt(tokenizer: PreTrainedTokenizerBase, template: str | None) -> str | None:
    """What the template writes to open an assistant turn after a user message (None if it cannot say)."""
    user = [{"role": "user", "content": _PROBE}]
    try:
        history = tokenizer.apply_chat_template(user, tokenize=False, chat_template=template)
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, chat_template=template)
    except _TEMPLATE_ERRORS:
        return None
    return prompt[_common_prefix(prompt, history) :] or None


def _without_none(message: dict) -> dict:
    """A `datasets` row fills absent keys with None (e.g. `tool_calls`); templates test for missing keys."""
    return {key: value for key, value in message.items() if value is not None}


def _parse_tools(tools: Any) -> Any:
    if not isinstance(tools, str):
        return tools
    try:
        return json.loads(tools)
    except json.JSONDecodeError as error:
        raise TrajectoryFormatError(f"the row's 'tools' field is not valid JSON ({error}); store the tool schemas as a "
                                    "JSON list or a list of dicts") from None


def _find(text: str, piece: str, low: int, high: int) -> tuple[int, int, int] | None:
    """(start, end, offset of the piece's char 0) of `piece` between `low` and `high`, verbatim or trimmed."""
    if not piece:
        return None
    position = text.find(piece, low, high)
    if position >= 0:
        return position, position + len(piece), position
    stripped = piece.strip()
    position = text.find(stripped, low, high) if stripped else -1
    if position < 0:
        return None
    return position, position + len(stripped), position - (len(piece) - len(piece.lstrip()))


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of `a` and `b`."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # binary search on slices compared in C: fast on long renderings
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low
