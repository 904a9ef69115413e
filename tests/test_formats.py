"""Tests for `trl_agent_distill.formats`: each format reads back exactly what it writes.

The round-trip properties generate whole episodes in a format (thoughts, actions, final answers, observations, the
text a model generates around its action) and check that parsing recovers each action and that segmentation puts
REASON / ACT / OBS exactly where the format wrote them, in chat messages and in flat transcripts.
"""

import re
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trl_agent_distill.agent.sandbox import Observation
from trl_agent_distill.formats import (
    ALFWorldFormat,
    CodeActFormat,
    CodeAction,
    ParsedReply,
    ParseError,
    ReActFormat,
    ToolCall,
    ToolError,
    load_prompts,
)
from trl_agent_distill.segmentation import Span, segment_messages, segment_text

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Prose a model writes in a thought or a tool prints: any line that does not open with a step marker of a format
# (in a flat transcript such a line would be a new step; in chat messages observations may hold anything).
_MARKER_AT_LINE_START = re.compile(
    r"[ \t]*(?:thought|action|observation|code|execution logs|calling tools|final_answer|finish|think|```|<code>|>)",
    re.IGNORECASE,
)
_PROSE_ALPHABET = string.ascii_letters + string.digits + " .,;:!?'\"()[]{}=+-*/%#&|_<>"
prose_line = st.text(_PROSE_ALPHABET, min_size=1, max_size=40).filter(
    # `<code>` anywhere opens a code block for `parse` (not only at a line start, as for `segment`).
    lambda line: not _MARKER_AT_LINE_START.match(line)
    and all(tag not in line for tag in ("<code>", "<end_code>", "</think>"))
)
prose = st.lists(prose_line, min_size=1, max_size=3).map("\n".join)
one_line = prose_line.map(str.strip).filter(bool)
anything = st.text(string.printable, max_size=80)

# Code may hold any marker at a line start (markers inside code are not steps), only not the fence that closes it.
_CODE_ALPHABET = string.ascii_letters + string.digits + " \t.,;:!?'\"()[]{}=+-*/%#&|_<>"
code_line = st.one_of(
    st.text(_CODE_ALPHABET, max_size=40),
    st.sampled_from(["Thought: in a string", "# Observation: a comment", "Code:", "final_answer(x)", "<code>",
                     "</code>", "Execution logs:", "Action: Search[x]"]),
).filter(lambda line: "```" not in line and "<end_code>" not in line and "</think>" not in line)
code = st.lists(code_line, min_size=1, max_size=5).map("\n".join)
final_code = st.builds(lambda value, before: f"{before}\nfinal_answer({value!r})", one_line, code)


def transcript_spans(turns: list, joiner: str = "\n") -> tuple[str, list[Span]]:
    """The text of `turns` joined by `joiner`, and its spans: each turn is a (kind, text) piece or a list of them; the
    joiner after a turn goes with that turn's last piece."""
    text, spans = "", []
    for index, turn in enumerate(turns):
        pieces = list(turn) if isinstance(turn, list) else [turn]
        if index < len(turns) - 1:
            kind, last = pieces[-1]
            pieces[-1] = (kind, last + joiner)
        for kind, piece in pieces:
            if spans and spans[-1].kind == kind:
                spans[-1] = Span(kind, spans[-1].start, len(text) + len(piece))
            elif piece:
                spans.append(Span(kind, len(text), len(text) + len(piece)))
            text += piece
    return text, spans


def check_round_trip(fmt, question: str, steps: list, observations: list) -> None:
    """Write an episode in `fmt`, parse every reply, and segment it as messages and as one transcript.

    `steps` are (thought, action or None, text generated after the action); None is a reply without an action,
    which the format keeps as written and answers with a parse error.
    """
    written_steps = []  # per step: the content kept, as (kind, text) pieces
    for thought, action, tail in steps:
        if action is None:
            parsed = fmt.parse(f"Thought: {thought}")
            assert isinstance(parsed, ParseError)
            written_steps.append([("reason", parsed.content)])
            continue
        written = fmt.write(thought, action)
        reply = written.removesuffix(fmt.stop[0]) + tail  # generation stops at (and drops) the stop string
        parsed = fmt.parse(reply)
        assert isinstance(parsed, ParsedReply) and parsed.content == written
        assert parsed.action == normalized(action)
        reason = f"Thought: {thought}\n"
        assert written.startswith(reason)
        written_steps.append([("reason", reason), ("act", written[len(reason) :])])
    rendered = [fmt.render(observation) for observation in observations]

    messages = [{"role": "system", "content": fmt.system_prompt()},
                {"role": "user", "content": fmt.task_message(question)}]
    expected_per_message = [[Span("other", 0, len(message["content"]))] for message in messages]
    for index, pieces in enumerate(written_steps):
        content = "".join(text for _, text in pieces)
        messages.append({"role": "assistant", "content": content})
        expected_per_message.append(transcript_spans(pieces, joiner="")[1])
        if index < len(rendered):
            messages.append({"role": "user", "content": rendered[index]})
            expected_per_message.append([Span("other", 0, len(rendered[index]))])
    for style in (fmt.name, "auto"):
        assert segment_messages(messages, style=style) == expected_per_message

    # One transcript, a newline between turns (the newline goes with the turn before it).
    pieces = [("other", fmt.task_message(question))]
    for index, step in enumerate(written_steps):
        pieces.append(step)
        if index < len(rendered):
            pieces.append([("obs", rendered[index])])
    text, expected = transcript_spans(pieces)
    assert segment_text(text, style=fmt.name) == expected
    assert segment_text(text) == expected  # detected


def normalized(action):
    """The action as `parse` reads it back: code ends with its newline, a tool's argument is stripped."""
    if isinstance(action, CodeAction):
        return CodeAction(action.code if action.code.endswith("\n") else action.code + "\n")
    return ToolCall(action.tool, action.argument.strip())


# ---------------------------------------------------------------------------------------------- codeact
def execution(printed: str, value: str | None, error: str | None) -> Observation:
    return Observation.from_parts(printed=printed, value=value, error_message=error)


codeact_observation = st.one_of(
    st.builds(execution, st.one_of(st.just(""), prose, prose.map(lambda text: text + "\n")),
              st.one_of(st.none(), one_line), st.none()),
    st.builds(execution, st.one_of(st.just(""), prose), st.none(), one_line),
    st.builds(lambda thought: CodeActFormat().parse(f"Thought: {thought}"), prose),  # a parse error
)


@PROPERTY
@given(
    question=prose,
    middle=st.lists(st.tuples(prose, st.one_of(code.map(CodeAction), st.none()), anything), max_size=3),
    last=st.tuples(prose, final_code.map(CodeAction), anything),
    data=st.data(),
)
def test_codeact_segments_back_what_it_writes(question, middle, last, data):
    observations = [data.draw(codeact_observation) for _ in middle]
    check_round_trip(CodeActFormat({"web_search": len}), question, [*middle, last], observations)


def test_codeact_renders_the_sandbox_result_from_its_parts():
    fmt = CodeActFormat()
    observation = Observation.from_parts(printed="4210", value="None")
    assert fmt.render(observation) == "Observation:\nExecution logs:\n4210\nLast output from code snippet:\nNone"
    failed = Observation.from_parts(printed="a\n", error_message="NameError: name 'x' is not defined")
    assert fmt.observation_text(failed) == "Execution logs:\na\nError:\nNameError: name 'x' is not defined"
    assert fmt.observation_text(failed) == failed.text  # the sandbox's text is the format's rendering


def test_codeact_parse_errors_say_what_was_expected():
    fmt = CodeActFormat()
    missing = fmt.parse("Thought: I will think.  \n")
    assert missing == ParseError("Thought: I will think.", missing.message)
    assert missing.message.startswith("Error:\nNo code block was found in the reply.")
    unclosed = fmt.parse("Thought: t\nCode:\n```py\nx = 1", truncated=True)
    assert "not closed (the reply ran out of tokens; write shorter code)" in unclosed.message
    tagged = fmt.parse("Thought: t\n<code>x = 1</code> and more")
    assert tagged == ParsedReply("Thought: t\n<code>x = 1</code>", CodeAction("x = 1"))


def test_codeact_system_prompt_lists_tools_and_the_task_variable():
    def web_search(query: str) -> str:
        """Search the corpus."""

    prompt = CodeActFormat({"web_search": web_search}, task_variable="task").system_prompt()
    assert "- web_search(query: str) -> str: Search the corpus.\n- final_answer(answer: any)" in prompt
    assert prompt.endswith("\n\nThe task text is also in the string variable `task`.")
    assert "variable" not in CodeActFormat().system_prompt()


# ---------------------------------------------------------------------------------------------- react
react_observation = st.one_of(
    prose,
    st.builds(lambda tool, argument, error: ToolError(ToolCall(tool, argument), error),
              st.sampled_from(["Search", "Lookup"]), one_line, st.one_of(st.none(), one_line)),
    st.builds(lambda thought: ReActFormat({"Search": len}).parse(f"Thought: {thought}"), prose),  # a parse error
)
tool_call = st.builds(ToolCall, st.sampled_from(["Search", "Lookup", "search"]), one_line)


@PROPERTY
@given(
    question=one_line,
    middle=st.lists(st.tuples(prose, st.one_of(tool_call, st.none()), anything.map(lambda text: "\n" + text)),
                    max_size=3),
    last=st.tuples(prose, st.builds(ToolCall, st.just("Finish"), one_line), anything.map(lambda text: "\n" + text)),
    data=st.data(),
)
def test_react_segments_back_what_it_writes(question, middle, last, data):
    observations = [data.draw(react_observation) for _ in middle]
    check_round_trip(ReActFormat({"Search": len, "Lookup": len}), question, [*middle, last], observations)


def test_react_parses_actions_and_a_bare_finish_line():
    fmt = ReActFormat({"Search": len})
    assert fmt.parse("Thought: t\nAction 2: search[ Velmora ]  \nObservation: made up") == ParsedReply(
        "Thought: t\nAction 2: search[ Velmora ]  ", ToolCall("search", "Velmora"))
    final = fmt.parse("Thought: done\nfinish[5]").action
    assert final == ToolCall("Finish", "5") and final.is_final
    assert fmt.parse("Thought: hm", truncated=True).message.startswith(
        "Error: the reply ran out of tokens before an action.")


def test_react_renders_tool_errors_naming_the_actions():
    fmt = ReActFormat({"Search": len})
    assert fmt.render(ToolError(ToolCall("Lookup", "x"))) == (
        "Observation: Error: unknown tool 'Lookup'; use one of Search, Finish.")
    assert fmt.observation_text(ToolError(ToolCall("Search", "x"), "offline")) == "Error: Search[x] failed: offline"
    assert fmt.render("Velmora: population 4,210.") == "Observation: Velmora: population 4,210."


@pytest.mark.parametrize("name", ["two words", "Finish", "finish", "1st"])
def test_react_refuses_tool_names_it_could_not_parse(name):
    with pytest.raises(ValueError, match="must be a single word other than Finish"):
        ReActFormat({name: len})


# ---------------------------------------------------------------------------------------------- all formats
@pytest.mark.parametrize("fmt", [CodeActFormat(), ReActFormat()])
def test_task_messages_read_back_their_question(fmt):
    message = fmt.task_message("How old is the mayor of Varnek?")
    assert fmt.question(message) == "How old is the mayor of Varnek?"
    assert fmt.question("How old is the mayor of Varnek?") is None


@pytest.mark.parametrize("name", ["codeact", "react"])
def test_prompts_are_package_data(name):
    prompts = load_prompts(name)
    assert {"system_prompt", "task_message", "observation", "parse_error"} <= set(prompts)
    assert all(isinstance(text, str) and text for text in prompts.values())


def test_alfworld_segments_like_the_style():
    text = "You are in a room.\n> think: find an apple.\nOK.\n> go to countertop 1\nYou arrive."
    assert ALFWorldFormat().segment(text, assistant=False) == segment_text(text, style="alfworld")
    assert [span.kind for span in segment_text(text, style="alfworld")] == ["other", "reason", "obs", "act", "obs"]


# ---------------------------------------------------------------------------------------------- alfworld protocol
alfworld_step = st.one_of(st.tuples(st.just("think"), one_line), st.tuples(st.just("act"), one_line))


@PROPERTY
@given(opening=prose, steps=st.lists(alfworld_step, min_size=1, max_size=5), observations=st.lists(prose, min_size=5,
       max_size=5), tail=anything)
def test_alfworld_segments_back_what_it_writes(opening, steps, observations, tail):
    """Episodes written in the format (a thought answered "OK.", an action answered by the engine) segment back:
    thought -> REASON, action -> ACT; observations are user turns (chat) or OBS lines (ReAct's transcript)."""
    fmt = ALFWorldFormat()
    messages = [{"role": "system", "content": fmt.system_prompt()}, {"role": "user", "content": fmt.task_message(opening)}]
    expected = [[Span("other", 0, len(message["content"]))] for message in messages]
    transcript = [("other", fmt.task_message(opening))]
    for (kind, text), engine_text in zip(steps, observations):
        written = fmt.write(text, None) if kind == "think" else fmt.write(None, text)
        parsed = fmt.parse(written + fmt.stop[0] + tail)  # what follows the line was never carried out
        assert isinstance(parsed, ParsedReply) and parsed.content == written
        assert parsed.action == (f"think: {text.strip()}" if kind == "think" else " ".join(text.split()))
        answer = fmt.reply_without_environment(parsed.action)
        assert (answer == "OK.") == (kind == "think")
        observation = fmt.render(answer if answer is not None else engine_text)
        span_kind = "reason" if kind == "think" else "act"
        messages += [{"role": "assistant", "content": parsed.content}, {"role": "user", "content": observation}]
        expected += [[Span(span_kind, 0, len(parsed.content))], [Span("other", 0, len(observation))]]
        transcript += [(span_kind, f"> {parsed.content}"), ("obs", observation)]
    # Auto-detection needs an ALFWorld marker: a `think:` line (bare commands look like any prose).
    for style in ("alfworld", "auto") if any(kind == "think" for kind, _ in steps) else ("alfworld",):
        assert segment_messages(messages, style=style) == expected
    text, spans = transcript_spans(transcript)
    assert segment_text(text, style="alfworld") == spans


def test_alfworld_reads_one_line_per_reply():
    fmt = ALFWorldFormat()
    assert fmt.stop == ("\n",)
    assert fmt.parse("\n  > go  to   Fridge 1  \nYou arrive at fridge 1.") == ParsedReply("\n  > go  to   Fridge 1  ",
                                                                                         "go to Fridge 1")
    assert fmt.parse("THINK :  the apple is cold").action == "think: the apple is cold"
    assert fmt.action_key("go to Fridge 1") == fmt.action_key("go to fridge 1") == "go to fridge 1"
    assert fmt.action_key("think: a") == fmt.action_key("think: b")  # thoughts never reach the engine: one vote
    with pytest.raises(ValueError, match="give a thought or an action, not both or neither"):
        fmt.write("a thought", "look")


def test_alfworld_parse_errors_say_what_to_write():
    fmt = ALFWorldFormat()
    empty = fmt.parse(" \n\n")
    assert empty == ParseError("", "Error: the reply is empty. Reply with one line: an action such as 'go to "
                                   "countertop 1', or 'think: ...' for a thought.")
    assert fmt.observation_text(empty) == empty.message and fmt.render(empty) == empty.message
    assert fmt.parse("go to cabi", truncated=True).message.startswith(
        "Error: the reply ran out of tokens before its line was complete.")
    assert fmt.task_message("You are in the middle of a room.") == "You are in the middle of a room."
