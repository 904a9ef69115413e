"""SAD's episode metrics over `Episode.to_record()` rows: success, steps, invalid actions, reasoning length and the
teacher-forced CoT match rate with scripted students."""

import pytest

from trl_agent_distill.agent import PolicyBackend, Task
from trl_agent_distill.agent.loop import Episode
from trl_agent_distill.episode_metrics import (
    CoTMatch,
    MatchCount,
    ReasoningLength,
    cot_match_rate,
    invalid_actions_per_episode,
    reasoning_lengths,
    steps_per_episode,
    success_rate,
)
from trl_agent_distill.formats import ReActFormat, WebShopFormat

WEBSHOP = WebShopFormat()
TOOLS = [{"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]


def record(task_id, replies, *, success=None, steps=None, invalid_actions=0, tools=None, fmt=WEBSHOP):
    """An episode's record: each reply is followed by an observation, as the agent loop stores them."""
    messages = [{"role": "system", "content": fmt.system_prompt()},
                {"role": "user", "content": f"WebShop [SEP] Instruction: [SEP] task {task_id} [SEP] Search"}]
    for number, reply in enumerate(replies):
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": f"Observation: page {number} of {task_id}"}]
    episode = Episode(Task(task_id, f"task {task_id}"), messages, steps=len(replies) if steps is None else steps,
                      success=success, invalid_actions=invalid_actions, tools=tools)
    return episode.to_record()


TEACHER = [
    record("a", ["Action: search[red mug]", "Action: think[B01 is red.]", "Action: click[B01]",
                 "Action: think[Now buy it.]"], success=True, tools=TOOLS),
    record("b", ["Action: search[wool socks]", "Action: think[B02 is wool.]", "Action: click[B02]",
                 "Action: think[Large fits.]"], success=False),
]


class CountingBackend(PolicyBackend):
    """A scripted student that records each `generate` call's requests."""

    def __init__(self, policy):
        super().__init__(policy)
        self.calls = []

    def generate(self, requests):
        self.calls.append(list(requests))
        return super().generate(requests)


def teacher_reply(request):
    """What the teacher wrote next in the reference episode this conversation comes from."""
    for reference in TEACHER:
        messages = reference["messages"]
        if messages[: len(request.messages)] == request.messages:
            return messages[len(request.messages)]["content"]
    raise AssertionError("not a reference conversation")


def turn(request):
    return sum(message["role"] == "assistant" for message in request.messages)


# ---------------------------------------------------------------------------------------------- CoT match rate
def test_a_copy_of_the_teacher_matches_every_turn():
    student = CountingBackend(lambda request: teacher_reply(request) + "\nObservation: made up")
    result = cot_match_rate(student, WEBSHOP, TEACHER, batch_size=3)
    assert result == CoTMatch(overall=MatchCount(8, 8), action=MatchCount(4, 4), thought=MatchCount(4, 4),
                              unreadable_teacher_turns=0)
    assert result.rate == 1.0
    # Teacher-forced, batched: 8 turns in chunks of 3, greedy, with the format's stop strings and the episode's tools.
    assert [len(call) for call in student.calls] == [3, 3, 2]
    requests = [request for call in student.calls for request in call]
    assert all(request.sampling.greedy and request.sampling.n == 1 for request in requests)
    assert all(request.stop == WEBSHOP.stop for request in requests)
    assert [request.tools for request in requests] == [TOOLS] * 4 + [None] * 4
    assert requests[2].messages == TEACHER[0]["messages"][:6]


def test_a_wrong_student_matches_nothing_and_a_half_right_one_half():
    wrong = cot_match_rate(PolicyBackend(lambda request: "Action: click[Back to Search]"), WEBSHOP, TEACHER)
    assert wrong.rate == 0.0 and wrong.overall.turns == 8

    # Right on the first two turns (a search, a thought), then a different product and a different thought.
    def half_right(request):
        return teacher_reply(request) if turn(request) < 2 else ["Action: click[B99]", "Action: think[No.]"][turn(request) % 2]

    half = cot_match_rate(PolicyBackend(half_right), WEBSHOP, TEACHER)
    assert half.rate == 0.5 and half.action.rate == 0.5 and half.thought.rate == 0.5
    assert half.to_dict() == {"cot_match_rate": 0.5, "turns": 8, "matched": 4, "action_match_rate": 0.5,
                              "action_turns": 4, "thought_match_rate": 0.5, "thought_turns": 4,
                              "unreadable_teacher_turns": 0}


def test_actions_match_by_the_formats_normal_form_and_replies_without_one_do_not():
    def student(request):
        replies = ["Action: search[Red  MUG]", "Action: think[b01 is red.]", "I would click B01",
                   "Action: buy[now]"]
        return replies[turn(request)]

    result = cot_match_rate(PolicyBackend(student), WEBSHOP, TEACHER[:1])
    assert (result.action, result.thought) == (MatchCount(1, 2), MatchCount(1, 2))


def test_teacher_turns_that_do_not_parse_are_not_counted():
    reference = [record("c", ["I am not sure what to do.", "Action: search[red mug]"])]
    result = cot_match_rate(PolicyBackend(lambda request: "Action: search[red mug]"), WEBSHOP, reference)
    assert result.overall == MatchCount(1, 1) and result.unreadable_teacher_turns == 1


def test_without_an_action_key_actions_compare_with_whitespace_collapsed():
    react = ReActFormat({"Search": len})
    reference = [record("d", ["Thought: look it up.\nAction: Search[Varnholt  castle]",
                              "Thought: and the other.\nAction: Search[Ostmere]"], fmt=react)]
    # Another thought, the same first action; then another argument.
    replies = ["Thought: I wonder.\nAction: Search[ Varnholt castle ]", "Thought: hm.\nAction: Search[Varnholt]"]
    result = cot_match_rate(PolicyBackend(lambda request: replies[turn(request)]), react, reference)
    assert result.overall == MatchCount(1, 2) and result.thought == MatchCount(0, 0) and result.thought.rate is None


def test_bad_references_are_named():
    with pytest.raises(ValueError, match="at least one reference episode"):
        cot_match_rate(PolicyBackend(lambda request: ""), WEBSHOP, [])
    with pytest.raises(ValueError, match="row 1 has no 'messages' list"):
        cot_match_rate(PolicyBackend(lambda request: ""), WEBSHOP, [TEACHER[0], {"steps": 3}])
    calls = dict(TEACHER[0], messages=[*TEACHER[0]["messages"][:2],
                                       {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}])
    with pytest.raises(ValueError, match="row 0, message 2: the teacher's action is in `tool_calls`"):
        cot_match_rate(PolicyBackend(lambda request: ""), WEBSHOP, [calls])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        cot_match_rate(PolicyBackend(lambda request: ""), WEBSHOP, TEACHER, batch_size=0)


# ---------------------------------------------------------------------------------------------- reasoning length
def test_reasoning_length_counts_tokens_of_each_reason_span(tiny_tokenizer):
    thoughts = ["Action: think[B01 is red.]", "Action: think[Now buy it.]", "Action: think[B02 is wool.]",
                "Action: think[Large fits.]"]
    tokens = [len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) for text in thoughts]
    result = reasoning_lengths(TEACHER, tiny_tokenizer)
    assert result == ReasoningLength(mean=sum(tokens) / 4, count=4, total=sum(tokens), unit="tokens")
    assert reasoning_lengths(TEACHER, style="react") == ReasoningLength(mean=3.75, count=4, total=15, unit="words")


def test_reasoning_length_reads_thought_lines_reasoning_fields_and_skips_unparsed_replies():
    react = ReActFormat({"Search": len})
    episode = record("e", ["Thought: look it up now.\nAction: Search[Varnholt]", "no step at all here"], fmt=react)
    episode["messages"][2]["reasoning_content"] = "first the castle"
    result = reasoning_lengths([episode])
    assert result == ReasoningLength(mean=4.0, count=2, total=8, unit="words")  # "Thought: look it up now." and 3
    nothing = reasoning_lengths([record("f", ["Action: search[red mug]"])])
    assert nothing == ReasoningLength(mean=None, count=0, total=0, unit="words")


def test_reasoning_length_names_the_record_that_does_not_segment():
    broken = record("g", ["Action: search[red mug]"])
    broken["messages"].append({"role": "narrator", "content": "meanwhile"})
    with pytest.raises(ValueError, match="row 1, message 4: .*narrator"):
        reasoning_lengths([TEACHER[0], broken])
    never_started = dict(TEACHER[0], messages=TEACHER[0]["messages"][:2])  # no assistant turn: nothing to count
    assert reasoning_lengths([never_started, TEACHER[1]]) == reasoning_lengths(TEACHER[1:])


# ---------------------------------------------------------------------------------------------- per episode
def test_success_steps_and_invalid_actions_per_episode():
    records = [record("h", ["Action: search[a]"] * 3, success=True, invalid_actions=1),
               record("i", ["Action: search[a]"] * 5, success=False, invalid_actions=2),
               record("j", ["Action: search[a]"], success=None, steps=4)]  # its environment failed
    assert success_rate(records) == pytest.approx(1 / 3)
    assert steps_per_episode(records) == 4.0
    assert invalid_actions_per_episode(records) == 1.0


def test_per_episode_metrics_name_the_bad_record():
    with pytest.raises(ValueError, match="no episodes"):
        success_rate([])
    with pytest.raises(ValueError, match="row 1 has no 'success'"):
        success_rate([TEACHER[0], {"messages": []}])
    with pytest.raises(ValueError, match="row 0: 'steps' must be a number, got '3'"):
        steps_per_episode([dict(TEACHER[0], steps="3")])
