"""The episode metrics of Structured Agent Distillation (SAD): success rate, steps per episode, invalid actions,
reasoning length and the CoT match rate.

Pure functions over episodes as `Episode.to_record()` writes them (`messages`, `steps`, `success`,
`invalid_actions`, `tools` ...), as read back from a `generate` or `eval` output file (one row per episode). Every
function names the row and field that is wrong when a row does not hold what it needs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .agent.backends import GenerationBackend, GenerationRequest, SamplingParams
from .formats import AgentFormat, EnvironmentFormat, ParseError
from .segmentation import TrajectoryFormatError, reasoning_field, segment_messages


# ---------------------------------------------------------------------------------------------- per episode
def success_rate(records: Sequence[Mapping[str, Any]]) -> float:
    """The share of episodes the environment scored a success. An episode whose environment failed before it could
    say (`success` None) is not a success."""
    return sum(bool(value) for value in _field(records, "success")) / len(records)


def steps_per_episode(records: Sequence[Mapping[str, Any]]) -> float:
    """The mean number of replies per episode (thoughts, actions and replies that did not parse)."""
    return _mean(_field(records, "steps"), "steps")


def invalid_actions_per_episode(records: Sequence[Mapping[str, Any]]) -> float:
    """The mean number of actions per episode that the environment rejected (`Transition.valid` False)."""
    return _mean(_field(records, "invalid_actions"), "invalid_actions")


# ---------------------------------------------------------------------------------------------- reasoning length
@dataclass(frozen=True)
class ReasoningLength:
    """Length of the REASON spans of the episodes: `mean` per span (None without any span), their `count` and
    `total`, in `unit` ("tokens" of the tokenizer, or "words" when none was given)."""

    mean: float | None
    count: int
    total: int
    unit: str


def reasoning_lengths(records: Sequence[Mapping[str, Any]], tokenizer: Any = None,
                      style: str = "auto") -> ReasoningLength:
    """Tokens per REASON span: each assistant message is segmented (`segment_messages` with `style`) and each of its
    REASON spans is tokenized on its own (no special tokens), markers included (``Thought: ...``,
    ``Action: think[...]``); an assistant message's reasoning field (`reasoning_content`) is one more span. A reply
    that does not segment holds no reasoning. Without a `tokenizer`, spans are counted in whitespace-separated
    words."""
    spans = []
    for row, record in enumerate(records):
        messages = _messages(record, row)
        if not any(message.get("role") == "assistant" for message in messages):
            continue  # an episode whose environment never started: nothing was written
        try:
            segmented = segment_messages(messages, style=style, unparsed_as="act")
        except TrajectoryFormatError as error:
            raise error.with_row(row) from None
        for message, message_spans in zip(messages, segmented):
            if message["role"] != "assistant":
                continue
            content = message.get("content") or ""
            spans += [content[span.start : span.end] for span in message_spans if span.kind == "reason"]
            reasoning = reasoning_field(message)
            if reasoning:
                spans.append(reasoning)
    if tokenizer is None:
        lengths, unit = [len(text.split()) for text in spans], "words"
    else:
        ids = tokenizer(spans, add_special_tokens=False)["input_ids"] if spans else []
        lengths, unit = [len(span_ids) for span_ids in ids], "tokens"
    total = sum(lengths)
    return ReasoningLength(mean=total / len(lengths) if lengths else None, count=len(lengths), total=total, unit=unit)


# ---------------------------------------------------------------------------------------------- CoT match rate
@dataclass(frozen=True)
class MatchCount:
    """`matched` of `turns` turns; `rate` is None without any turn."""

    matched: int
    turns: int

    @property
    def rate(self) -> float | None:
        return self.matched / self.turns if self.turns else None


@dataclass(frozen=True)
class CoTMatch:
    """The CoT match rate (`cot_match_rate`): over all counted turns (`overall`, whose `rate` is the metric), over
    action turns and over thought turns, and how many teacher turns could not be read (not counted)."""

    overall: MatchCount
    action: MatchCount
    thought: MatchCount
    unreadable_teacher_turns: int

    @property
    def rate(self) -> float | None:
        return self.overall.rate

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary for reports."""
        return {"cot_match_rate": self.rate, "turns": self.overall.turns, "matched": self.overall.matched,
                "action_match_rate": self.action.rate, "action_turns": self.action.turns,
                "thought_match_rate": self.thought.rate, "thought_turns": self.thought.turns,
                "unreadable_teacher_turns": self.unreadable_teacher_turns}


@dataclass(frozen=True)
class _Turn:
    key: Any
    thought: bool
    request: GenerationRequest


def cot_match_rate(backend: GenerationBackend, agent_format: AgentFormat,
                   reference_records: Sequence[Mapping[str, Any]], *, batch_size: int = 16,
                   max_new_tokens: int = 512) -> CoTMatch:
    """The CoT match rate of a student (`backend`) on held-out teacher episodes (`reference_records`).

    Teacher-forced: for every assistant turn of every reference episode, the student is given the episode's
    conversation before that turn (the teacher's system prompt, the task, the teacher's earlier replies and the
    observations they got, and the episode's tool schemas) and writes one reply greedily (temperature 0,
    `max_new_tokens`, stopping at the format's stop strings). The format reads both the teacher's turn and the
    student's reply (`agent_format.parse`), and the turn matches when both hold an action and the actions are
    equal: for an environment format, equal `action_key` (WebShop: the same action and argument, case and runs of
    whitespace aside); for other formats, equal actions once whitespace is collapsed in each of their fields
    (ReAct: tool and argument; CodeAct: the code). The CoT match rate is matched turns / counted turns. Teacher turns
    that do not parse (the teacher's own format errors) are not counted (`unreadable_teacher_turns`). Thought turns
    are those whose teacher action the environment never sees (WebShop's `think[...]`): they match when the student
    writes the same thought; action turns are all the others (every turn, in formats without such actions).

    Requests go to the backend in chunks of `batch_size`, one `backend.generate` call per chunk.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not reference_records:
        raise ValueError("cot_match_rate needs at least one reference episode.")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    turns: list[_Turn] = []
    unreadable = 0
    for row, record in enumerate(reference_records):
        messages = _messages(record, row)
        for index, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            if message.get("tool_calls"):
                raise ValueError(f"row {row}, message {index}: the teacher's action is in `tool_calls`; "
                                 "cot_match_rate reads actions from the text of assistant messages.")
            parsed = agent_format.parse(message.get("content") or "")
            if isinstance(parsed, ParseError):
                unreadable += 1
                continue
            request = GenerationRequest(messages=messages[:index], sampling=sampling, stop=agent_format.stop,
                                        tools=record.get("tools"))
            turns.append(_Turn(_action_key(agent_format, parsed.action), _is_thought(agent_format, parsed.action),
                               request))
    matches = []
    for start in range(0, len(turns), batch_size):
        chunk = turns[start : start + batch_size]
        for turn, completions in zip(chunk, backend.generate([turn.request for turn in chunk])):
            reply = completions[0]
            parsed = agent_format.parse(reply.text, truncated=reply.finish_reason == "length")
            matches.append(not isinstance(parsed, ParseError) and _action_key(agent_format, parsed.action) == turn.key)

    def count(selected: list[bool]) -> MatchCount:
        return MatchCount(matched=sum(selected), turns=len(selected))

    return CoTMatch(
        overall=count(matches),
        action=count([match for turn, match in zip(turns, matches) if not turn.thought]),
        thought=count([match for turn, match in zip(turns, matches) if turn.thought]),
        unreadable_teacher_turns=unreadable,
    )


def _action_key(agent_format: AgentFormat, action: Any) -> Any:
    """What two actions must share to be the same action (see `cot_match_rate`)."""
    if isinstance(agent_format, EnvironmentFormat):
        return agent_format.action_key(action)
    if not dataclasses.is_dataclass(action):
        raise TypeError(f"{type(agent_format).__name__} parsed a {type(action).__name__}, which cot_match_rate cannot "
                        "compare: give the format an action_key (an EnvironmentFormat) or dataclass actions.")
    return tuple(" ".join(value.split()) if isinstance(value, str) else value
                 for value in dataclasses.astuple(action))


def _is_thought(agent_format: AgentFormat, action: Any) -> bool:
    return isinstance(agent_format, EnvironmentFormat) and agent_format.reply_without_environment(action) is not None


# ---------------------------------------------------------------------------------------------- records
def _field(records: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    if not records:
        raise ValueError("no episodes: the metrics need at least one record.")
    values = []
    for row, record in enumerate(records):
        if not isinstance(record, Mapping) or name not in record:
            raise ValueError(f"row {row} has no '{name}': pass episodes as Episode.to_record() writes them.")
        values.append(record[name])
    return values


def _mean(values: list[Any], name: str) -> float:
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"row {row}: '{name}' must be a number, got {value!r}.")
    return sum(values) / len(values)


def _messages(record: Mapping[str, Any], row: int) -> list[dict[str, Any]]:
    messages = record.get("messages") if isinstance(record, Mapping) else None
    if not isinstance(messages, list) or not all(isinstance(message, Mapping) for message in messages):
        raise ValueError(f"row {row} has no 'messages' list of chat messages: pass episodes as "
                         "Episode.to_record() writes them.")
    return messages
