"""Tests for `trl_agent_distill.segmentation`: exact spans per format, invariants, and helpful errors."""

import json
import pickle
import random
from pathlib import Path

import pytest

from trl_agent_distill.segmentation import (
    SPAN_KINDS,
    STYLES,
    Span,
    TrajectoryFormatError,
    detect_style,
    reasoning_field,
    reasoning_kind,
    segment_messages,
    segment_text,
    think_block_end,
)

FIXTURES = Path(__file__).parent / "fixtures" / "segmentation"


def pieces(text: str, spans: list[Span]) -> list[tuple[str, str]]:
    """The spans as (kind, covered text), the form every expectation below is written in."""
    return [(span.kind, text[span.start : span.end]) for span in spans]


def assert_partition(text: str, spans: list[Span]) -> None:
    """Sorted, contiguous, non-empty spans that cover `text` exactly, neighbours of different kinds."""
    if not text:
        assert spans == []
        return
    assert spans[0].start == 0
    assert spans[-1].end == len(text)
    for span in spans:
        assert span.kind in SPAN_KINDS
        assert span.start < span.end
    for left, right in zip(spans, spans[1:]):
        assert left.end == right.start
        assert left.kind != right.kind


# ---------------------------------------------------------------------------------------------- react
HOTPOTQA = (
    "Question: Were Scott Derrickson and Ed Wood of the same nationality?\n"
    "Thought 1: I need to search Scott Derrickson and Ed Wood, find their nationalities.\n"
    "Action 1: Search[Scott Derrickson]\n"
    "Observation 1: Scott Derrickson (born July 16, 1966) is an American director, screenwriter and producer.\n"
    "Thought 2: Scott Derrickson is American. I need to search Ed Wood next.\n"
    "Action 2: Search[Ed Wood]\n"
    "Observation 2: Edward Davis Wood Jr. (October 10, 1924 - December 10, 1978) was an American filmmaker.\n"
    "Thought 3: Both are American, so the answer is yes.\n"
    "Action 3: Finish[yes]"
)


def test_react_hotpotqa_numbered_steps():
    spans = segment_text(HOTPOTQA, "react")
    assert pieces(HOTPOTQA, spans) == [
        ("other", "Question: Were Scott Derrickson and Ed Wood of the same nationality?\n"),
        ("reason", "Thought 1: I need to search Scott Derrickson and Ed Wood, find their nationalities.\n"),
        ("act", "Action 1: Search[Scott Derrickson]\n"),
        ("obs", "Observation 1: Scott Derrickson (born July 16, 1966) is an American director, screenwriter and "
         "producer.\n"),
        ("reason", "Thought 2: Scott Derrickson is American. I need to search Ed Wood next.\n"),
        ("act", "Action 2: Search[Ed Wood]\n"),
        ("obs", "Observation 2: Edward Davis Wood Jr. (October 10, 1924 - December 10, 1978) was an American "
         "filmmaker.\n"),
        ("reason", "Thought 3: Both are American, so the answer is yes.\n"),
        ("act", "Action 3: Finish[yes]"),
    ]
    assert_partition(HOTPOTQA, spans)


def test_react_without_numbers_lookup_and_case_insensitive_markers():
    text = (
        "Thought: I should look up the year.\n"
        "Action: Lookup[founded]\n"
        "observation: (Result 1 / 1) The band was founded in 1994.\n"
        "  THOUGHT: It was founded in 1994.\n"
        "action: Finish[1994]\n"
    )
    assert pieces(text, segment_text(text, "react")) == [
        ("reason", "Thought: I should look up the year.\n"),
        ("act", "Action: Lookup[founded]\n"),
        ("obs", "observation: (Result 1 / 1) The band was founded in 1994.\n"),
        ("reason", "  THOUGHT: It was founded in 1994.\n"),
        ("act", "action: Finish[1994]\n"),
    ]


def test_react_multiline_thought_runs_to_next_marker():
    text = "Thought 1: First idea.\nStill thinking about it.\n\nAction 1: Search[X]\n"
    assert pieces(text, segment_text(text, "react")) == [
        ("reason", "Thought 1: First idea.\nStill thinking about it.\n\n"),
        ("act", "Action 1: Search[X]\n"),
    ]


def test_react_bare_finish_line_is_act():
    text = "Thought 2: So the answer is Paris.\nFinish[Paris]"
    assert pieces(text, segment_text(text, "react", role="assistant")) == [
        ("reason", "Thought 2: So the answer is Paris.\n"),
        ("act", "Finish[Paris]"),
    ]


WEBSHOP = (
    "WebShop [SEP] Instruction: [SEP] i need a long clip-in hair extension which is natural looking, and price "
    "lower than 40.00 dollars [SEP] Search\n"
    "Action: search[long clip-in hair extension natural looking]\n"
    "Observation: [Back to Search] Page 1 (Total results: 50) [Next >] [B09QQLDJ93] Clip in Hair Extensions "
    "[SEP] $8.99\n"
    "Action: think[B09QQLDJ93 is a clip-in hair extension under 40 dollars. I can check it first.]\n"
    "Observation: OK.\n"
    "Action: click[B09QQLDJ93]\n"
    "Observation: [Back to Search] [< Prev] color [SEP] natural [SEP] Buy Now\n"
    "Action: Think [the natural color fits the request]\n"
    "Observation: OK.\n"
    "Action: click[Buy Now]\n"
)


def test_webshop_think_is_reason_search_and_click_are_act():
    spans = segment_text(WEBSHOP, "react")
    assert pieces(WEBSHOP, spans) == [
        ("other", "WebShop [SEP] Instruction: [SEP] i need a long clip-in hair extension which is natural looking, "
         "and price lower than 40.00 dollars [SEP] Search\n"),
        ("act", "Action: search[long clip-in hair extension natural looking]\n"),
        ("obs", "Observation: [Back to Search] Page 1 (Total results: 50) [Next >] [B09QQLDJ93] Clip in Hair "
         "Extensions [SEP] $8.99\n"),
        ("reason", "Action: think[B09QQLDJ93 is a clip-in hair extension under 40 dollars. I can check it "
         "first.]\n"),
        ("obs", "Observation: OK.\n"),
        ("act", "Action: click[B09QQLDJ93]\n"),
        ("obs", "Observation: [Back to Search] [< Prev] color [SEP] natural [SEP] Buy Now\n"),
        ("reason", "Action: Think [the natural color fits the request]\n"),
        ("obs", "Observation: OK.\n"),
        ("act", "Action: click[Buy Now]\n"),
    ]
    assert detect_style(WEBSHOP) == "react"


def test_react_adjacent_same_kind_markers_merge():
    text = "Observation 1: a\nObservation 2: b\nThought: c\n"
    assert segment_text(text, "react") == [Span("obs", 0, 34), Span("reason", 34, len(text))]


# ---------------------------------------------------------------------------------------------- alfworld
def test_alfworld_transcript():
    text = (FIXTURES / "alfworld_transcript.txt").read_text()
    spans = segment_text(text, "alfworld")
    task = text[: text.index("> think")]
    assert task.endswith("Your task is to: put a clean apple in fridge.\n")
    assert pieces(text, spans)[:8] == [
        ("other", task),
        ("reason", "> think: To solve the task, I need to find an apple, clean it with the sinkbasin, then put it "
         "in the fridge.\n"),
        ("obs", "OK.\n"),
        ("act", "> go to countertop 1\n"),
        ("obs", "On the countertop 1, you see a apple 1, and a knife 1.\n"),
        ("act", "> take apple 1 from countertop 1\n"),
        ("obs", "You pick up the apple 1 from the countertop 1.\n\n"),  # a blank line joins the line before it
        ("reason", "> think: Now I clean the apple with the sinkbasin.\n"),
    ]
    assert pieces(text, spans)[-2:] == [
        ("act", "> put apple 1 in/on fridge 1\n"),
        ("obs", "You put the apple 1 in/on the fridge 1.\n"),
    ]
    assert [span.kind for span in spans].count("act") == 7
    assert [span.kind for span in spans].count("reason") == 2
    assert_partition(text, spans)
    assert detect_style(text) == "alfworld"


def test_alfworld_assistant_turn_without_prompt():
    text = "think: The apple is probably on the countertop.\ngo to countertop 1\n"
    assert pieces(text, segment_text(text, "alfworld", role="assistant")) == [
        ("reason", "think: The apple is probably on the countertop.\n"),
        ("act", "go to countertop 1\n"),
    ]


def test_alfworld_assistant_turn_with_prompt_and_blank_lines():
    text = "\n> Think: first I look around.\n\n> open fridge 1"
    assert pieces(text, segment_text(text, "alfworld", role="assistant")) == [
        ("reason", "\n> Think: first I look around.\n\n"),  # leading blank lines join the first line
        ("act", "> open fridge 1"),
    ]


def test_alfworld_assistant_text_has_no_observations():
    text = "go to cabinet 1\nOn the cabinet 1, you see a mug 1.\n"
    assert segment_text(text, "alfworld", role="assistant") == [Span("act", 0, len(text))]
    transcript = "> " + text
    assert pieces(transcript, segment_text(transcript, "alfworld")) == [
        ("act", "> go to cabinet 1\n"),
        ("obs", "On the cabinet 1, you see a mug 1.\n"),
    ]


def test_alfworld_crlf_newlines_belong_to_their_line():
    text = "Your task is to: cool a mug.\r\n> think: find a mug\r\nOK.\r\n> go to shelf 1\r\n"
    assert pieces(text, segment_text(text, "alfworld")) == [
        ("other", "Your task is to: cool a mug.\r\n"),
        ("reason", "> think: find a mug\r\n"),
        ("obs", "OK.\r\n"),
        ("act", "> go to shelf 1\r\n"),
    ]


# ---------------------------------------------------------------------------------------------- codeact
CODEACT_STEP = (
    "Thought: I will search for the population of Paris.\n"
    "Code:\n"
    "```py\n"
    "result = web_search(query=\"population of Paris\")\n"
    "# Thought: a marker inside code is code\n"
    "print(result)\n"
    "```<end_code>\n"
)


def test_codeact_fenced_step_with_end_code():
    spans = segment_text(CODEACT_STEP, "codeact", role="assistant")
    assert pieces(CODEACT_STEP, spans) == [
        ("reason", "Thought: I will search for the population of Paris.\n"),
        ("act", "Code:\n```py\nresult = web_search(query=\"population of Paris\")\n"
         "# Thought: a marker inside code is code\nprint(result)\n```<end_code>\n"),
    ]
    assert spans == [Span("reason", 0, 52), Span("act", 52, len(CODEACT_STEP))]


def test_codeact_transcript_with_calling_tools_execution_logs_and_final_answer():
    text = (
        "New task:\nHow many people live in Paris?\n"
        + CODEACT_STEP
        + "Calling tools:\n[{'id': 'call_1', 'type': 'function', 'function': {'name': 'python_interpreter'}}]\n"
        "Observation:\n"
        "Execution logs:\n"
        "Paris has 2,102,650 inhabitants (2023).\n"
        "Last output from code snippet:\n"
        "None\n"
        "Thought: The population is 2,102,650.\n"
        "Code:\n"
        "```python\n"
        "final_answer(\"2,102,650\")\n"
        "```\n"
        "<end_code>\n"
    )
    assert pieces(text, segment_text(text, "codeact")) == [
        ("other", "New task:\nHow many people live in Paris?\n"),
        ("reason", "Thought: I will search for the population of Paris.\n"),
        ("act", CODEACT_STEP[52:]),
        ("other", "Calling tools:\n[{'id': 'call_1', 'type': 'function', 'function': {'name': "
         "'python_interpreter'}}]\n"),
        ("obs", "Observation:\nExecution logs:\nParis has 2,102,650 inhabitants (2023).\n"
         "Last output from code snippet:\nNone\n"),
        ("reason", "Thought: The population is 2,102,650.\n"),
        ("act", "Code:\n```python\nfinal_answer(\"2,102,650\")\n```\n<end_code>\n"),
    ]
    assert detect_style(text) == "codeact"


def test_codeact_text_after_block_is_other_until_next_marker():
    text = "Thought: t\nCode:\n```\nx = 1\n```  \nsome chatter\nThought: u\n"
    assert pieces(text, segment_text(text, "codeact")) == [
        ("reason", "Thought: t\n"),
        ("act", "Code:\n```\nx = 1\n```  \n"),
        ("other", "some chatter\n"),
        ("reason", "Thought: u\n"),
    ]


def test_codeact_newer_code_tags():
    text = "Thought: I compute it.\n<code>\nprint(6 * 7)\n</code>\nObservation:\n42\n"
    assert pieces(text, segment_text(text, "auto")) == [
        ("reason", "Thought: I compute it.\n"),
        ("act", "<code>\nprint(6 * 7)\n</code>\n"),
        ("obs", "Observation:\n42\n"),
    ]
    tagged_after_code = "Thought: t\nCode:\n<code>\nfinal_answer(1)\n</code><end_code>"
    assert pieces(tagged_after_code, segment_text(tagged_after_code, "codeact", role="assistant")) == [
        ("reason", "Thought: t\n"),
        ("act", "Code:\n<code>\nfinal_answer(1)\n</code><end_code>"),
    ]


def test_codeact_line_start_final_answer_outside_code_is_act_to_end_of_line():
    text = "Thought: The answer is 42.\nfinal_answer(42)\nthanks\n"
    assert pieces(text, segment_text(text, "codeact", role="assistant")) == [
        ("reason", "Thought: The answer is 42.\n"),
        ("act", "final_answer(42)\n"),
        ("other", "thanks\n"),
    ]


def test_codeact_code_marker_without_fence_runs_to_next_marker():
    text = "Thought: t\nCode:\nfinal_answer(3)\nObservation: done"
    assert pieces(text, segment_text(text, "codeact")) == [
        ("reason", "Thought: t\n"),
        ("act", "Code:\nfinal_answer(3)\n"),
        ("obs", "Observation: done"),
    ]


def test_codeact_indented_next_marker_keeps_its_indentation():
    text = "Code:\n```py\nx\n```<end_code>\n\n  Thought: next"
    assert pieces(text, segment_text(text, "codeact")) == [
        ("act", "Code:\n```py\nx\n```<end_code>\n\n"),
        ("reason", "  Thought: next"),
    ]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thought: t\nCode:\n```py\nprint(1)\n", "unclosed code fence after 'Code:' (add the closing ``` or "
         "<end_code>); it opens on line 3"),
        ("Thought: t\nCode:\n<code>\nprint(1)\n", "unclosed <code> block after 'Code:' (add the closing </code>); "
         "it opens on line 3"),
        ("Thought: t\n```python\nprint(1)\n", "unclosed code fence '```python' (add the closing ``` or "
         "<end_code>); it opens on line 2"),
    ],
)
def test_codeact_unclosed_block_raises(text, expected):
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_text(text, "codeact")
    assert caught.value.reason == expected
    assert str(caught.value) == expected


# ---------------------------------------------------------------------------------------------- none / auto
def test_none_style_is_one_act_span():
    assert segment_text("Paris", "none", role="assistant") == [Span("act", 0, 5)]
    assert segment_text("Paris", "none") == [Span("act", 0, 5)]  # a transcript without step markers
    assert segment_text("", "none") == []


@pytest.mark.parametrize("style", ["react", "codeact", "alfworld"])
def test_none_style_never_trains_the_observations_of_a_transcript(style):
    """Token-level KD trains the tokens SAD trains, as one kind: observations and the task stay untrained."""
    codeact = CODEACT_STEP + "Observation:\nExecution logs:\n2165423\n" + 'Code:\n```py\nfinal_answer(2165423)\n```<end_code>'
    alfworld = (FIXTURES / "alfworld_transcript.txt").read_text()
    transcript = {"react": HOTPOTQA, "codeact": codeact, "alfworld": alfworld}[style]
    none = segment_text(transcript, "none")
    structured = segment_text(transcript, style)
    trained = lambda spans: [(s.start, s.end) for s in spans if s.kind in ("reason", "act")]  # noqa: E731
    untrained = lambda spans: [(s.kind, s.start, s.end) for s in spans if s.kind not in ("reason", "act")]  # noqa: E731
    assert {s.kind for s in none} <= {"act", "obs", "other"} and "obs" in {s.kind for s in none}
    assert untrained(none) == untrained(structured)
    covered = lambda pairs: {i for start, end in pairs for i in range(start, end)}  # noqa: E731
    assert covered(trained(none)) == covered(trained(structured))
    observation = transcript.index("Observation") if style != "alfworld" else transcript.index("OK.")
    assert next(s for s in none if s.start <= observation < s.end).kind == "obs"


@pytest.mark.parametrize("style", STYLES)
def test_empty_text_gives_no_spans(style):
    assert segment_text("", style) == []
    assert segment_text("", style, role="assistant") == []


@pytest.mark.parametrize(
    "text, style",
    [
        (HOTPOTQA, "react"),
        (WEBSHOP, "react"),
        (CODEACT_STEP, "codeact"),
        ("Execution logs:\n3\n", "codeact"),
        ("Thought: done\n```py\nfinal_answer(1)\n```", "codeact"),
        ("Thought: I know it.\nfinal_answer('Paris')", "codeact"),
        ("Here it is <end_code>", "codeact"),
        ("> go to desk 1\nOn the desk 1, you see a pen 1.", "alfworld"),
        ("think: the pen is on the desk\ngo to desk 1", "alfworld"),
    ],
)
def test_detect_style(text, style):
    assert detect_style(text) == style


def test_detect_style_rejects_unrecognisable_text():
    with pytest.raises(TrajectoryFormatError) as caught:
        detect_style("The capital of France is Paris.")
    assert str(caught.value) == (
        "no recognisable step: expected 'Thought:'/'Action:' (react), 'Thought:'/'Code:' (codeact) or '> ...' "
        "lines (alfworld); the text reads 'The capital of France is Paris.'"
    )


def test_auto_matches_explicit_style():
    assert segment_text(HOTPOTQA) == segment_text(HOTPOTQA, "react")
    assert segment_text(CODEACT_STEP, role="assistant") == segment_text(CODEACT_STEP, "codeact", role="assistant")


def test_unknown_style_is_a_value_error_listing_the_styles():
    with pytest.raises(ValueError, match=r"style must be one of \('auto', 'react', 'alfworld', 'codeact', "
                       r"'tool_calling', 'none'\), got 'json'") as caught:
        segment_text("Thought: x", "json")
    assert not isinstance(caught.value, TrajectoryFormatError)
    with pytest.raises(ValueError, match="style must be one of"):
        segment_messages([{"role": "assistant", "content": "x"}], "ReAct")


# ---------------------------------------------------------------------------------------------- roles
def test_non_assistant_roles_are_one_span_of_their_kind():
    assert segment_text("You are a helpful agent.", role="system") == [Span("other", 0, 24)]
    assert segment_text("Thought: not mine", role="user") == [Span("other", 0, 17)]
    assert segment_text("Observation: 42", role="tool") == [Span("obs", 0, 15)]
    assert segment_text("42", role="ipython") == [Span("obs", 0, 2)]
    assert segment_text("", role="observation") == []


def test_unknown_role_in_segment_text_raises():
    with pytest.raises(TrajectoryFormatError, match="unknown role 'bot'; allowed roles: system, user, assistant"):
        segment_text("hello", role="bot")


@pytest.mark.parametrize(
    "text, style, role, expected",
    [
        ("Paris", "react", "assistant", "no recognisable step: expected a 'Thought:' or 'Action:' line (react); "
         "the text reads 'Paris'"),
        ("Paris", "codeact", "assistant", "no recognisable step: expected 'Thought:', 'Code:' or a "
         "final_answer(...) line (codeact); the text reads 'Paris'"),
        ("Question: Who?\nObservation: only this", "react", None, "no recognisable step: expected a 'Thought:' or "
         "'Action:' line (react); the text reads 'Question: Who?\\nObservation: only this'"),
        ("go to desk 1", "alfworld", None, "no recognisable step: expected '> ...' action lines (alfworld); for the "
         "agent's own output without '>' prompts pass role='assistant'; the text reads 'go to desk 1'"),
        (" \n\n", "alfworld", "assistant", "no recognisable step: the assistant message is blank (alfworld); the "
         "text reads ' \\n\\n'"),
        ("Paris", "auto", "assistant", "no recognisable step: expected 'Thought:'/'Action:' (react), "
         "'Thought:'/'Code:' (codeact) or '> ...' lines (alfworld); the text reads 'Paris'"),
    ],
)
def test_text_without_a_step_raises(text, style, role, expected):
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_text(text, style, role=role)
    assert str(caught.value) == expected


def test_long_text_is_previewed_not_dumped():
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_text("x" * 500, "react", role="assistant")
    assert caught.value.reason.endswith("the text reads '" + "x" * 60 + "...'")


def test_non_string_text_raises_trajectory_format_error():
    with pytest.raises(TrajectoryFormatError, match="expected the trajectory as a string, got list"):
        segment_text([{"type": "text", "text": "Thought: x"}], "react")


# ---------------------------------------------------------------------------------------------- messages
def test_segment_messages_codeact_conversation():
    messages = json.loads((FIXTURES / "codeact_conversation.json").read_text())
    spans = segment_messages(messages)
    assert len(spans) == 5
    assert spans[0] == [Span("other", 0, len(messages[0]["content"]))]
    assert spans[1] == [Span("other", 0, len(messages[1]["content"]))]
    assert spans[3] == [Span("obs", 0, len(messages[3]["content"]))]
    first, last = messages[2]["content"], messages[4]["content"]
    assert pieces(first, spans[2]) == [
        ("reason", "Thought: I will search for the founding years of both magazines and compare them.\n"),
        ("act", "Code:\n```py\nfor magazine in [\"Arthur's Magazine\", \"First for Women\"]:\n"
         "    print(magazine, web_search(query=f\"{magazine} founded\"))\n```<end_code>"),
    ]
    assert pieces(last, spans[4]) == [
        ("reason", "Thought: Arthur's Magazine was started in 1844 and First for Women in 1989, so Arthur's "
         "Magazine came first.\n"),
        ("act", "final_answer(\"Arthur's Magazine\")"),
    ]


def test_segment_messages_detects_style_once_for_the_whole_conversation():
    # On its own, the last turn looks like ReAct; the conversation's Code: step makes it CodeAct, so the
    # `Action:` line there is not a marker and stays inside the thought.
    messages = [
        {"role": "user", "content": "What is 6 * 7?"},
        {"role": "assistant", "content": "Thought: compute\nCode:\n```py\nprint(6 * 7)\n```<end_code>"},
        {"role": "tool", "content": "Observation:\nExecution logs:\n42\n"},
        {"role": "assistant", "content": "Thought: it is 42\nAction: answer\nfinal_answer(42)"},
    ]
    spans = segment_messages(messages, "auto")
    last = messages[3]["content"]
    assert pieces(last, spans[3]) == [
        ("reason", "Thought: it is 42\nAction: answer\n"),
        ("act", "final_answer(42)"),
    ]
    assert detect_style(last) == "codeact"
    assert pieces(last, segment_text(last, "react")) == [
        ("reason", "Thought: it is 42\n"),
        ("act", "Action: answer\nfinal_answer(42)"),
    ]


def test_segment_messages_react_chat():
    messages = [
        {"role": "system", "content": "Solve the question with Thought, Action and Observation steps."},
        {"role": "user", "content": "Question: What is the capital of France?"},
        {"role": "assistant", "content": "Thought 1: I should search France.\nAction 1: Search[France]"},
        {"role": "user", "content": "Observation 1: France's capital is Paris."},
        {"role": "assistant", "content": "Thought 2: The answer is Paris.\nAction 2: Finish[Paris]"},
    ]
    spans = segment_messages(messages)
    assert [[span.kind for span in message_spans] for message_spans in spans] == [
        ["other"], ["other"], ["reason", "act"], ["other"], ["reason", "act"],
    ]
    assert pieces(messages[4]["content"], spans[4]) == [
        ("reason", "Thought 2: The answer is Paris.\n"),
        ("act", "Action 2: Finish[Paris]"),
    ]


def test_segment_messages_alfworld_assistant_turns():
    messages = [
        {"role": "user", "content": "You are in the middle of a room.\nYour task is to: heat some egg."},
        {"role": "assistant", "content": "> think: Eggs are usually in the fridge.\n> go to fridge 1"},
        {"role": "user", "content": "The fridge 1 is closed."},
        {"role": "assistant", "content": "open fridge 1"},
    ]
    spans = segment_messages(messages)
    assert pieces(messages[1]["content"], spans[1]) == [
        ("reason", "> think: Eggs are usually in the fridge.\n"),
        ("act", "> go to fridge 1"),
    ]
    assert spans[3] == [Span("act", 0, 13)]
    assert segment_messages(messages, "none")[1] == [Span("act", 0, len(messages[1]["content"]))]


def test_segment_messages_tool_calls():
    call = [{"type": "function", "function": {"name": "web_search", "arguments": {"query": "Paris"}}}]
    messages = [
        {"role": "user", "content": "How many people live in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "content": "2,102,650"},
        {"role": "assistant", "content": "I should double-check the year.", "tool_calls": call},
        {"role": "tool", "content": "2023"},
        {"role": "assistant", "content": "", "tool_calls": call},
    ]
    spans = segment_messages(messages)
    assert spans == [
        [Span("other", 0, 30)],
        [],
        [Span("obs", 0, 9)],
        [Span("reason", 0, 31)],
        [Span("obs", 0, 4)],
        [],
    ]


def test_segment_messages_tool_call_text_with_markers_is_segmented():
    call = [{"type": "function", "function": {"name": "search", "arguments": "{}"}}]
    content = "Thought 1: search first\nAction 1: Search[Paris]"
    messages = [
        {"role": "user", "content": "Question: Paris?"},
        {"role": "assistant", "content": content, "tool_calls": call},
        {"role": "tool", "content": "Paris is in France."},
        {"role": "assistant", "content": "I will answer now.", "tool_calls": call},
    ]
    spans = segment_messages(messages)
    assert pieces(content, spans[1]) == [("reason", "Thought 1: search first\n"), ("act", "Action 1: Search[Paris]")]
    assert spans[3] == [Span("reason", 0, 18)]


def test_segment_messages_accepts_rows_from_datasets_with_none_fields():
    messages = [
        {"role": "user", "content": "Q", "tool_calls": None},
        {"role": "assistant", "content": "Thought: a\nAction: Finish[b]", "tool_calls": None},
    ]
    assert segment_messages(messages)[1] == [Span("reason", 0, 11), Span("act", 11, 28)]


@pytest.mark.parametrize(
    "messages, message_index, expected",
    [
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Paris"}],
            1,
            "no recognisable step: expected 'Thought:'/'Action:' (react), 'Thought:'/'Code:' (codeact) or '> ...' "
            "lines (alfworld); the message reads 'Paris'",
        ),
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}],
            1,
            "content is a list, not a string; flatten it to a string first (for smolagents rows use "
            "trl_agent_distill.data.from_smolagents_log)",
        ),
        (
            [{"role": "system", "content": {"text": "x"}}, {"role": "assistant", "content": "Thought: a"}],
            0,
            "content is a dict, not a string; flatten it to a string first (for smolagents rows use "
            "trl_agent_distill.data.from_smolagents_log)",
        ),
        (
            [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 7}],
            1,
            "content is a int, not a string; flatten it to a string first (for smolagents rows use "
            "trl_agent_distill.data.from_smolagents_log)",
        ),
        (
            [{"role": "user", "content": "Q"}, {"role": "tool-call", "content": "x"}],
            1,
            "unknown role 'tool-call'; allowed roles: system, user, assistant, tool, observation, ipython (for "
            "smolagents rows use trl_agent_distill.data.from_smolagents_log)",
        ),
        (
            [{"role": "assistant", "content": "Thought: a"}, {"role": "human", "content": "x"}],
            1,
            "unknown role 'human'; allowed roles: system, user, assistant, tool, observation, ipython",
        ),
        (
            [{"role": "assistant", "content": "Thought: a"}, {"content": "x"}],
            1,
            "unknown role None; allowed roles: system, user, assistant, tool, observation, ipython",
        ),
        (
            [{"role": "user", "content": "Q"}, "Thought: a"],
            1,
            "expected a {'role': ..., 'content': ...} dict, got str",
        ),
        (
            [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Thought: t\nCode:\n```py\nprint(1)\n```<end_code>"},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "Thought: t\nCode:\n```py\nfinal_answer(1)\n"},
            ],
            3,
            "unclosed code fence after 'Code:' (add the closing ``` or <end_code>); it opens on line 3",
        ),
        (
            [
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "Thought 1: a\nAction 1: Search[b]"},
                {"role": "user", "content": "Observation 1: c"},
                {"role": "assistant", "content": "b"},
            ],
            3,
            "no recognisable step: expected a 'Thought:' or 'Action:' line (react); the text reads 'b'",
        ),
    ],
)
def test_segment_messages_bad_message_names_its_index(messages, message_index, expected):
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_messages(messages)
    error = caught.value
    assert error.message_index == message_index
    assert error.row_index is None
    assert error.reason == expected
    assert str(error) == f"message {message_index}: {expected}"


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "the conversation has no messages"),
        (
            [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
            "the conversation has no assistant message, so there is nothing to train (roles present: "
            "['system', 'user'])",
        ),
        ("Thought: a", "messages must be a list of {'role': ..., 'content': ...} dicts, got str"),
    ],
)
def test_segment_messages_bad_conversation(messages, expected):
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_messages(messages)
    assert caught.value.message_index is None
    assert str(caught.value) == expected


def test_segment_messages_explicit_style_error_in_later_message():
    messages = [
        {"role": "user", "content": "Your task is to: find a pen."},
        {"role": "assistant", "content": "go to desk 1"},
        {"role": "user", "content": "On the desk 1, you see a pen 1."},
        {"role": "assistant", "content": "\n"},
    ]
    assert segment_messages(messages[:2], "alfworld")[1] == [Span("act", 0, 12)]
    with pytest.raises(TrajectoryFormatError) as caught:
        segment_messages(messages, "alfworld")
    assert caught.value.message_index == 3
    assert caught.value.reason == (
        "no recognisable step: the assistant message is blank (alfworld); the text reads '\\n'"
    )


# ---------------------------------------------------------------------------------------------- the error type
def test_error_with_row_keeps_message_and_formats_both():
    error = TrajectoryFormatError("unclosed code fence after 'Code:' (add the closing ``` or <end_code>)",
                                  message_index=2)
    located = error.with_row(3)
    assert isinstance(located, TrajectoryFormatError) and isinstance(located, ValueError)
    assert located is not error and error.row_index is None
    assert (located.row_index, located.message_index) == (3, 2)
    assert str(located) == "row 3, message 2: unclosed code fence after 'Code:' (add the closing ``` or <end_code>)"
    assert str(TrajectoryFormatError("bad", row_index=0)) == "row 0: bad"
    assert str(TrajectoryFormatError("bad")) == "bad"
    assert str(error.with_message(5)) == (
        "message 5: unclosed code fence after 'Code:' (add the closing ``` or <end_code>)"
    )


def test_error_survives_pickling():
    # Errors cross process boundaries (datasets.map with num_proc, dataloader workers).
    error = pickle.loads(pickle.dumps(TrajectoryFormatError("bad", row_index=4, message_index=1)))
    assert (error.reason, error.row_index, error.message_index) == ("bad", 4, 1)
    assert str(error) == "row 4, message 1: bad"


def test_span_is_frozen_and_validated():
    span = Span("act", 1, 4)
    with pytest.raises(AttributeError):
        span.kind = "reason"
    with pytest.raises(ValueError, match="span kind must be one of"):
        Span("thought", 0, 1)
    with pytest.raises(ValueError, match="0 <= start <= end"):
        Span("act", 5, 2)


# ---------------------------------------------------------------------------------------------- properties
FRAGMENTS = [
    "Thought: ", "Thought 2: ", "Action: ", "Action 3: ", "Observation: ", "Action: think[", "Finish[", "Search[",
    "Code:", "```py", "```python", "```", "<end_code>", "<code>", "</code>", "Execution logs:", "Calling tools:",
    "final_answer(", "> ", "> think: ", "think: ", "OK.", "go to desk 1", "x = 1", "print(x)", "]", ")", " ",
    "  ", "\t", "\n", "\n", "\n", "\r\n", "\n\n", "Question: ", "hello", "é", "\u2028", "<tool_call>", "</tool_call>",
    '{"name": "ls", "arguments": {}}',
]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("role", [None, "assistant"])
def test_random_texts_are_partitioned_exactly(style, role):
    rng = random.Random(f"{style}-{role}")
    segmented = 0
    for _ in range(400):
        text = random_text(rng)
        try:
            spans = segment_text(text, style, role=role)
        except TrajectoryFormatError:
            continue
        assert_partition(text, spans)
        segmented += 1
    assert segmented >= 80  # many random texts hold a step, so the invariants were really exercised


def test_random_conversations_cover_every_message():
    rng = random.Random(0)
    segmented = 0
    for _ in range(300):
        messages = [
            {"role": rng.choice(["system", "user", "assistant", "tool", "assistant"]), "content": random_text(rng)}
            for _ in range(rng.randint(1, 5))
        ]
        try:
            spans = segment_messages(messages, rng.choice(STYLES))
        except TrajectoryFormatError:
            continue
        assert len(spans) == len(messages)
        for message, message_spans in zip(messages, spans):
            assert_partition(message["content"], message_spans)
        segmented += 1
    assert segmented >= 50


# ---------------------------------------------------------------------------------------------- reasoning
def test_prose_before_the_first_step_is_the_assistants_reasoning():
    text = "Let me look this up first.\nThought: search.\nCode:\n```py\nprint(1)\n```<end_code>"
    assert pieces(text, segment_text(text, "codeact", role="assistant")) == [
        ("reason", "Let me look this up first.\nThought: search.\n"),
        ("act", "Code:\n```py\nprint(1)\n```<end_code>"),
    ]
    # In a whole transcript the text before the first step is the prompt.
    assert segment_text(text, "codeact")[0] == Span("other", 0, 27)
    # Blank space before a step goes with that step; prose alone is still no step.
    assert pieces("\n\nAction: Finish[x]", segment_text("\n\nAction: Finish[x]", "react", role="assistant")) == [
        ("act", "\n\nAction: Finish[x]")
    ]
    with pytest.raises(TrajectoryFormatError, match="no recognisable step"):
        segment_text("Just prose.", "react", role="assistant")


def test_think_blocks_are_reason():
    content = "<think>\nCompare the years.\n</think>\n\nThought: 1844 is earlier.\nAction: Finish[1844]"
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": content}]
    assert pieces(content, segment_messages(messages)[1]) == [
        ("reason", "<think>\nCompare the years.\n</think>\n\nThought: 1844 is earlier.\n"),
        ("act", "Action: Finish[1844]"),
    ]
    # DeepSeek-R1 writes its `<think>` in the generation prompt: the content holds only the closing tag.
    assert think_block_end("so 1844.\n</think>\nFinish[1844]") == len("so 1844.\n</think>")
    assert think_block_end("Thought: no block") == 0
    # The style is detected on the text after the block, whatever the reasoning looks like.
    coded = [{"role": "user", "content": "Q"},
             {"role": "assistant", "content": "<think>```py\nx\n```</think>Thought 1: t\nAction 1: Finish[1]"}]
    assert [span.kind for span in segment_messages(coded)[1]] == ["reason", "act"]
    # A turn that only thinks, and style none (one kind for every trained token).
    assert segment_messages([messages[0], {"role": "assistant", "content": "<think>x</think>\n"}])[1] == [
        Span("reason", 0, 17)
    ]
    assert segment_messages(messages, "none")[1] == [Span("act", 0, len(content))]


def test_reasoning_fields_must_be_strings():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Action: Finish[1]",
                                                   "reasoning_content": ["step one"]}]
    with pytest.raises(TrajectoryFormatError) as error:
        segment_messages(messages)
    assert error.value.message_index == 1 and "reasoning_content is a list, not a string" in str(error.value)
    assert reasoning_field({"thinking": "t", "reasoning_content": None}) == "t"
    assert reasoning_kind("react") == "reason" and reasoning_kind("none") == "act"
