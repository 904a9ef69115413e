"""Agent loops: CodeAct and ReAct episodes with scripted and tiny models, lockstep batching, errors as observations,
and trajectories that the segmenter and collator label correctly."""

import json
import time

import datasets
import pytest

from trl_agent_distill.agent import (
    CodeActAgent,
    Completion,
    GenerationBackend,
    PolicyBackend,
    ReActAgent,
    SamplingParams,
    Task,
    TransformersBackend,
)
from trl_agent_distill.agent.backends import BackendError
from trl_agent_distill.collator import ACT, REASON, UNTRAINED, AgentTrajectoryCollator
from trl_agent_distill.segmentation import segment_messages

pytestmark = pytest.mark.timeout(120)


def towns(query: str) -> str:
    """Looks a town up."""
    table = {"Velmora": "Velmora: population 4,210.", "Brannoch": "Brannoch: population 2,875."}
    return table.get(query, f"No entry for {query}.")


def step_of(request) -> int:
    return sum(message["role"] == "assistant" for message in request.messages)


def scripted(*replies):
    """A policy replying with `replies[k]` at step k of every episode."""
    return PolicyBackend(lambda request: replies[min(step_of(request), len(replies) - 1)])


class CountingBackend(GenerationBackend):
    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def generate(self, requests):
        self.batches.append(len(requests))
        return self.inner.generate(requests)


LOOKUP = "Thought: I need both populations.\nCode:\n```py\na = web_search(query='Velmora')\nprint(a)\n```<end_code>"
ADD = "Thought: Add them.\nCode:\n```py\ntotal = 4210 + 2875\nprint(total)\n```<end_code>"
ANSWER = "Thought: Done.\nCode:\n```py\nfinal_answer(total)\n```<end_code>"


def run_codeact(backend, tasks, batch_size=4, **options):
    options.setdefault("max_steps", 5)
    return list(CodeActAgent({"web_search": towns}, **options).run(backend, tasks, batch_size=batch_size))


# ---------------------------------------------------------------------------------------------- CodeAct
def test_codeact_episode_keeps_variables_and_ends_on_final_answer():
    (episode,) = run_codeact(scripted(LOOKUP, ADD, ANSWER), [Task("t1", "Combined population?", "7085")])
    assert episode.stop_reason == "final_answer" and episode.answered
    assert episode.final_answer == "7085"  # `total` survived from step 2 to step 3
    assert episode.steps == 3 and episode.parse_errors == 0 and episode.tool_errors == 0
    roles = [message["role"] for message in episode.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert episode.messages[1]["content"] == "New task:\nCombined population?"
    assert episode.messages[3]["content"] == (
        "Observation:\nExecution logs:\nVelmora: population 4,210.\nLast output from code snippet:\nNone"
    )
    assert "- web_search(query: str) -> str: Looks a town up." in episode.messages[0]["content"]


def test_stop_string_is_written_back_and_text_after_the_code_is_dropped():
    hallucinating = LOOKUP.removesuffix("<end_code>") + "\nObservation: Velmora has 9 people\nThought: more"
    (episode,) = run_codeact(scripted(hallucinating, ANSWER.replace("total", "1")), [Task("t", "q")])
    assert episode.messages[2]["content"] == LOOKUP  # cut at the fence, <end_code> restored
    assert "9 people" not in json.dumps(episode.messages)


def test_codeact_trajectory_round_trips_through_segmenter_and_collator(tiny_tokenizer):
    (episode,) = run_codeact(scripted(LOOKUP, ADD, ANSWER), [Task("t1", "Combined population?", "7085")])
    spans = segment_messages(episode.messages)
    for message, message_spans in zip(episode.messages, spans):
        kinds = {span.kind for span in message_spans}
        if message["role"] == "assistant":
            text = message["content"]
            thought_end = text.index("\nCode:")
            reason = [s for s in message_spans if s.kind == "reason"]
            act = [s for s in message_spans if s.kind == "act"]
            assert reason[0].start == 0 and reason[0].end >= thought_end
            assert act[0].start <= text.index("```py") and act[-1].end == len(text)
        else:
            assert kinds <= {"other", "obs"}
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=None)
    encoded = collator.encode({"messages": episode.messages})
    decoded = [tiny_tokenizer.decode([token]) for token in encoded.input_ids]
    text_by_kind = {kind: "".join(t for t, k in zip(decoded, encoded.kinds) if k == kind) for kind in (REASON, ACT)}
    assert "population 4,210" not in text_by_kind[REASON] + text_by_kind[ACT]  # observations are never trained
    assert "web_search(query='Velmora')" in text_by_kind[ACT].replace(" ", "") or "web_search" in text_by_kind[ACT]
    assert "final_answer" in text_by_kind[ACT] and "Add them" in text_by_kind[REASON]
    assert UNTRAINED in encoded.kinds


def test_reply_without_code_is_a_parse_error_observation_and_the_episode_goes_on():
    (episode,) = run_codeact(scripted("Thought: I am not sure what to do.", ANSWER.replace("total", "5")),
                             [Task("t", "q")])
    assert episode.parse_errors == 1 and episode.answered and episode.final_answer == "5"
    observation = episode.messages[3]["content"]
    assert observation.startswith("Observation:\nError:\nNo code block was found")
    assert "```<end_code>" in observation
    assert episode.errors and episode.errors[0].startswith("step 1:")


def test_model_that_never_answers_ends_at_max_steps():
    (episode,) = run_codeact(scripted("Thought: thinking forever ..."), [Task("t", "q")], max_steps=3)
    assert episode.stop_reason == "max_steps" and not episode.answered
    assert episode.steps == 3 and episode.parse_errors == 3 and episode.final_answer is None


def test_unclosed_code_block_that_ran_out_of_tokens_says_so():
    backend = PolicyBackend(lambda request: "x")
    unclosed = Completion(text="Thought: t\nCode:\n```py\nx = 1", finish_reason="length")
    agent = CodeActAgent({}, max_steps=1)
    step = agent.act(None, unclosed.text, unclosed)
    assert step.parse_error and "not closed" in step.observation and "ran out of tokens" in step.observation
    assert backend  # the agent needs no backend to act on one reply


def test_wrong_tool_arguments_and_failing_tools_are_error_observations():
    def failing(query: str) -> str:
        raise RuntimeError("index offline")

    agent = CodeActAgent({"web_search": towns, "broken": failing}, max_steps=3)
    replies = [
        "Thought: t\nCode:\n```py\nweb_search('a', 'b', 'c')\n```<end_code>",
        "Thought: t\nCode:\n```py\nbroken(query='x')\n```<end_code>",
        "Thought: t\nCode:\n```py\nfinal_answer(web_search(query='Velmora'))\n```<end_code>",
    ]
    (episode,) = list(agent.run(scripted(*replies), [Task("t", "q")]))
    assert episode.tool_errors == 2 and episode.answered
    assert "TypeError" in episode.messages[3]["content"] and "too many positional arguments" in episode.messages[3]["content"]
    assert "index offline" in episode.messages[5]["content"]
    assert episode.final_answer == "Velmora: population 4,210."


def test_episodes_run_in_lockstep_batches_and_all_finish():
    backend = CountingBackend(scripted(LOOKUP, ADD, ANSWER))
    tasks = [Task(f"t{i}", f"question {i}") for i in range(10)]
    episodes = run_codeact(backend, tasks, batch_size=4)
    assert sorted(e.task.task_id for e in episodes) == sorted(t.task_id for t in tasks)
    assert all(e.final_answer == "7085" for e in episodes)
    assert max(backend.batches) == 4 and sum(backend.batches) == 30  # 10 episodes x 3 steps
    assert len(backend.batches) < 30  # steps were batched, not one call per step


def test_episodes_have_separate_sandboxes_and_a_slow_one_does_not_stall_the_rest():
    def policy(request):
        task = request.messages[1]["content"]
        if step_of(request) == 0:
            code = "while True:\n    pass" if "slow" in task else "secret = 42"
            return f"Thought: t\nCode:\n```py\n{code}\n```<end_code>"
        return "Thought: t\nCode:\n```py\nfinal_answer(secret)\n```<end_code>"

    agent = CodeActAgent({}, max_steps=2, sandbox_options={"timeout": 1.0})
    started = time.monotonic()
    episodes = {e.task.task_id: e for e in agent.run(PolicyBackend(policy), [Task("slow", "slow"), Task("fast", "fast")])}
    assert time.monotonic() - started < 15
    assert episodes["fast"].final_answer == "42"
    slow = episodes["slow"]
    assert "timed out" in slow.messages[3]["content"] and slow.tool_errors == 2  # then NameError: secret is not shared
    assert not slow.answered


def test_sandbox_crash_is_recorded_for_that_episode_only():
    def policy(request):
        if "bomb" in request.messages[1]["content"] and step_of(request) == 0:
            return "Thought: t\nCode:\n```py\nx = ' ' * (4 * 1024 ** 3)\n```<end_code>"
        return "Thought: t\nCode:\n```py\nfinal_answer('ok')\n```<end_code>"

    agent = CodeActAgent({}, max_steps=3, sandbox_options={"memory_limit_mb": 256})
    episodes = {e.task.task_id: e for e in agent.run(PolicyBackend(policy), [Task("bomb", "bomb"), Task("calm", "calm")])}
    assert episodes["calm"].answered and episodes["bomb"].answered
    assert episodes["bomb"].tool_errors == 1 and "MemoryError" in episodes["bomb"].messages[3]["content"]


def test_first_reply_is_forced_to_start_with_the_prefix():
    seen = []

    def policy(request):
        seen.append(request.prefix)
        return " Then compute.\nCode:\n```py\nfinal_answer(1)\n```<end_code>"

    agent = CodeActAgent({}, max_steps=2)
    prefixes = {"a": "Thought: Velmora has 4,210 people."}
    episodes = {e.task.task_id: e for e in agent.run(PolicyBackend(policy), [Task("a", "q"), Task("b", "q")], prefixes=prefixes)}
    assert episodes["a"].messages[2]["content"].startswith("Thought: Velmora has 4,210 people. Then compute.")
    assert episodes["b"].messages[2]["content"].startswith(" Then compute.")
    assert sorted(seen) == ["", "Thought: Velmora has 4,210 people."]


def test_backend_failure_propagates_and_closes_the_sandboxes():
    class Failing(GenerationBackend):
        def generate(self, requests):
            raise BackendError("Cannot reach the model server at http://127.0.0.1:9/v1")

    agent = CodeActAgent({}, max_steps=2)
    opened = []
    original = agent.open_environment
    agent.open_environment = lambda task: opened.append(original(task)) or opened[-1]
    with pytest.raises(BackendError, match="Cannot reach"):
        list(agent.run(Failing(), [Task("a", "q"), Task("b", "q")]))
    assert len(opened) == 2 and all(sandbox._closed for sandbox in opened)


def test_tiny_model_that_never_emits_a_stop_string_ends_within_max_steps(make_model, tiny_tokenizer):
    backend = TransformersBackend(make_model("student", hidden_size=32), tiny_tokenizer, batch_size=4)
    agent = CodeActAgent({"web_search": towns}, max_steps=2, sampling=SamplingParams(max_new_tokens=12))
    started = time.monotonic()
    episodes = list(agent.run(backend, [Task(str(i), f"question {i}") for i in range(3)], batch_size=4))
    assert time.monotonic() - started < 60
    assert len(episodes) == 3
    for episode in episodes:
        assert episode.stop_reason in ("max_steps", "final_answer")
        assert episode.steps <= 2
        assert len([m for m in episode.messages if m["role"] == "assistant"]) == episode.steps


def test_records_are_json_and_load_with_datasets(tmp_path):
    episodes = run_codeact(scripted(LOOKUP, ADD, ANSWER), [Task("a", "q", 7085)])
    episodes += run_codeact(scripted("no code"), [Task("b", "q", None)], max_steps=1)
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(e.to_record()) + "\n" for e in episodes))
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")
    assert loaded["task_id"] == ["a", "b"] and loaded["answer"] == ["7085", None]
    assert loaded["stop_reason"] == ["final_answer", "max_steps"]
    assert loaded[0]["messages"] == episodes[0].messages


# ---------------------------------------------------------------------------------------------- ReAct
def react_run(*replies, tools=None, max_steps=4):
    agent = ReActAgent(tools if tools is not None else {"Search": towns}, max_steps=max_steps)
    (episode,) = list(agent.run(scripted(*replies), [Task("r", "Which town is larger?", "Velmora")]))
    return episode


def test_react_episode_searches_then_finishes_and_round_trips():
    episode = react_run(
        "Thought: I should look up Velmora.\nAction: Search[Velmora]\nObservation: made up",
        "Thought: Velmora is large.\nFinish[Velmora]",
    )
    assert episode.answered and episode.final_answer == "Velmora" and episode.steps == 2
    assert episode.messages[1]["content"] == "Question: Which town is larger?"
    assert episode.messages[2]["content"] == "Thought: I should look up Velmora.\nAction: Search[Velmora]"
    assert episode.messages[3] == {"role": "user", "content": "Observation: Velmora: population 4,210."}
    spans = segment_messages(episode.messages)
    first = {span.kind: episode.messages[2]["content"][span.start : span.end] for span in spans[2]}
    assert first == {"reason": "Thought: I should look up Velmora.\n", "act": "Action: Search[Velmora]"}
    assert [span.kind for span in spans[4]] == ["reason", "act"]
    assert all(span.kind in ("other", "obs") for message_spans in spans[:2] + spans[3:4] for span in message_spans)


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Thought: hmm\nAction: Lookup[x]", "unknown tool 'Lookup'; use one of Search, Finish"),
        ("Thought: hmm\nAction: search[Atlantis]", "No entry for Atlantis."),  # case-insensitive tool names
        ("Thought: only thinking", "Error: no action was found"),
        ("Thought: hmm\nSearch[Velmora]", "Error: no action was found"),  # an action needs 'Action:'
    ],
)
def test_react_errors_and_lookups_are_observations(reply, expected):
    episode = react_run(reply, "Finish[x]")
    assert expected in episode.messages[3]["content"]
    assert episode.answered


def test_react_failing_tool_is_a_tool_error():
    def broken(argument: str) -> str:
        raise ValueError("bad argument")

    episode = react_run("Action: Search[x]", "Finish[y]", tools={"Search": broken})
    assert episode.tool_errors == 1 and "Search[x] failed: bad argument" in episode.messages[3]["content"]


def test_react_rejects_tool_names_it_cannot_parse():
    with pytest.raises(ValueError, match="single word"):
        ReActAgent({"web search": towns})
    with pytest.raises(ValueError, match="Finish"):
        ReActAgent({"finish": towns})


def test_an_environment_that_cannot_start_ends_only_its_episode():
    from trl_agent_distill.agent import SandboxError

    agent = CodeActAgent({}, max_steps=2)
    original, calls = agent.open_environment, []

    def flaky(task):
        calls.append(1)
        if len(calls) == 1:
            raise SandboxError("no processes left")
        return original(task)

    agent.open_environment = flaky
    episodes = list(agent.run(scripted(ANSWER.replace("total", "3")), [Task("a", "q"), Task("b", "q")], batch_size=1))
    by_id = {e.task.task_id: e for e in episodes}
    assert by_id["a"].stop_reason == "error" and "could not be started: no processes left" in by_id["a"].errors[0]
    assert by_id["b"].answered and by_id["b"].final_answer == "3"


# ---------------------------------------------------------------------------------------------- self-consistency
def candidates_policy(*steps):
    """Step k of every episode gets the candidate list steps[k] (n replies at once)."""
    return PolicyBackend(lambda request: steps[min(step_of(request), len(steps) - 1)])


def block(body: str, thought: str = "t") -> str:
    return f"Thought: {thought}\nCode:\n```py\n{body}\n```<end_code>"


def test_majority_vote_rules():
    from trl_agent_distill.agent.loop import majority

    assert majority([("a",), ("b",), ("b",), ("a",), ("b",)]) == (1, [3, 2])
    assert majority([None, ("x",), ("y",)]) == (1, [1, 1])  # all singletons: the first valid one
    assert majority([("x",), ("y",), ("y",), ("x",)]) == (0, [2, 2])  # a tie goes to the group seen first
    assert majority([None, None]) == (0, [])  # nothing valid: the first sample


def test_self_consistency_takes_the_majority_and_rejected_candidates_leave_no_trace():
    step1 = [block("leak = 'rejected'\nprint(1)"), block("x = 2\nprint(2)"), "no code at all",
             block("x = 2\nprint(2)"), block("raise ValueError('bad')")]
    step2 = [block("final_answer((x, 'leak' in dir()))")] * 5
    agent = CodeActAgent({}, max_steps=3, self_consistency={"n": 5, "temperature": 0.4, "top_p": 0.8})
    (episode,) = list(agent.run(candidates_policy(step1, step2), [Task("t", "q")]))
    assert episode.final_answer == "(2, False)"  # the majority's state was kept, the rejected variable did not leak
    assert episode.votes[0] == {"step": 1, "candidates": 5, "valid": 3, "group_sizes": [2, 1], "chosen": 1}
    assert episode.votes[1]["group_sizes"] == [5] and episode.votes[1]["chosen"] == 0
    assert episode.messages[2]["content"] == block("x = 2\nprint(2)")
    assert episode.messages[3]["content"] == "Observation:\nExecution logs:\n2\nLast output from code snippet:\nNone"
    assert episode.parse_errors == 0 and episode.tool_errors == 0


def test_self_consistency_groups_silent_final_answers_by_value():
    step = [block("final_answer(1)"), block("final_answer(2)"), block("final_answer(2)")]
    agent = CodeActAgent({}, max_steps=1, self_consistency={"n": 3})
    (episode,) = list(agent.run(candidates_policy(step), [Task("t", "q")]))
    assert episode.final_answer == "2" and episode.votes[0]["group_sizes"] == [2, 1]


def test_self_consistency_with_no_valid_candidate_takes_the_first_sample():
    step = [block("raise KeyError('first')"), "unparseable", block("1/0")]
    agent = CodeActAgent({}, max_steps=1, self_consistency={"n": 3})
    (episode,) = list(agent.run(candidates_policy(step), [Task("t", "q")]))
    assert episode.votes[0] == {"step": 1, "candidates": 3, "valid": 0, "group_sizes": [], "chosen": 0}
    assert "KeyError: 'first'" in episode.messages[3]["content"] and episode.tool_errors == 1


def test_self_consistency_samples_n_candidates_in_one_batched_call(make_model, tiny_tokenizer, generate_calls):
    model = make_model("student", hidden_size=32)
    calls = generate_calls(model)
    backend = TransformersBackend(model, tiny_tokenizer, batch_size=8)
    agent = CodeActAgent({}, max_steps=1, sampling=SamplingParams(max_new_tokens=6),
                         self_consistency={"n": 4, "temperature": 0.4, "top_p": 0.8})
    episodes = list(agent.run(backend, [Task("a", "q1"), Task("b", "q2")]))
    assert calls == [8]  # two episodes, four candidates each, one generate call
    assert all(e.votes[0]["candidates"] == 4 for e in episodes)


def test_react_self_consistency_votes_on_the_normalised_action():
    step = ["Thought: a\nAction: Search[Velmora]", "Thought: b\nAction: search[ velmora ]",
            "Thought: c\nAction: Search[Brannoch]", "Thought: d\nAction: Teleport[x]"]
    agent = ReActAgent({"Search": towns}, max_steps=1, self_consistency={"n": 4})
    (episode,) = list(agent.run(candidates_policy(step), [Task("r", "q")]))
    assert episode.votes[0] == {"step": 1, "candidates": 4, "valid": 3, "group_sizes": [2, 1], "chosen": 0}
    assert episode.messages[3]["content"] == "Observation: Velmora: population 4,210."


def test_self_consistency_needs_two_candidates():
    with pytest.raises(ValueError, match="n >= 2"):
        CodeActAgent({}, self_consistency={"n": 1})


def test_task_variable_puts_the_question_in_the_sandbox():
    from trl_agent_distill.tasks import AgentTaskConfig, build_agent

    def policy(request):
        return 'Thought: echo.\nCode:\n```py\nfinal_answer(task.upper())\n```<end_code>'

    agent = CodeActAgent({}, max_steps=1, task_variable="task")
    (episode,) = agent.run(PolicyBackend(policy), [Task("t", "what's \"up\"?\nline two", "-")])
    assert episode.final_answer == "WHAT'S \"UP\"?\nLINE TWO"
    assert "`task`" in agent.system_prompt and "`task`" not in CodeActAgent({}).system_prompt
    with pytest.raises(ValueError, match="identifier"):
        CodeActAgent({}, task_variable="class")
    with pytest.raises(ValueError, match="also the name of a tool"):
        CodeActAgent({"task": len}, task_variable="task")
    with pytest.raises(ValueError, match="needs agent: codeact"):
        AgentTaskConfig(agent="react", task_variable="task")
    assert build_agent(AgentTaskConfig(task_variable="question")).task_variable == "question"
