"""BFCL multi-turn on its real tasks and back-ends (needs bfcl-eval, installed with --no-deps)."""

import json
import sys

import datasets
import pytest

from trl_agent_distill.agent import EnvironmentAgent, PolicyBackend
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.encoding import encode_dataset
from trl_agent_distill.envs import load_environment
from trl_agent_distill.envs.bfcl import CANNOT_DO, CATEGORIES, BFCLSuite
from trl_agent_distill.formats import FunctionCall
from trl_agent_distill.segmentation import segment_messages

from test_collator import assert_invariants, decode_where


@pytest.fixture(scope="module")
def suite():
    return load_environment("bfcl", {"max_tasks": 4})


def run(suite, policy, tasks, **agent_options):
    agent = EnvironmentAgent(suite, max_steps=agent_options.pop("max_steps", suite.max_steps), **agent_options)
    return {episode.task.task_id: episode for episode in agent.run(PolicyBackend(policy), tasks, batch_size=4)}


# ---------------------------------------------------------------------------------------------- tasks and tools
def test_tasks_come_from_the_wheel_with_their_tools(suite):
    tasks = suite.tasks("all")
    assert [task.task_id for task in tasks] == [f"multi_turn_base_{i}" for i in range(4)]
    task = tasks[0]
    assert task.question.startswith("Move 'final_report.pdf' within document directory")
    schemas = suite.tool_schemas(task)
    names = {schema["function"]["name"] for schema in schemas}
    assert {"cd", "mv", "grep", "post_tweet"} <= names
    assert all(schema["type"] == "function" for schema in schemas)
    text = json.dumps(schemas)
    assert '"type": "dict"' not in text and '"type": "float"' not in text and '"response"' not in text


def test_splits_partition_scenarios_and_keep_variants_together():
    suite = BFCLSuite(BFCLSuite.options_class(categories=CATEGORIES, test_fraction=0.25, seed=3))
    train, test = suite.tasks("train"), suite.tasks("test")
    assert len(train) + len(test) == len(suite.tasks("all")) == 600
    scenario = lambda task: task.task_id.rsplit("_", 1)[1]  # noqa: E731
    assert not {scenario(t) for t in train} & {scenario(t) for t in test}
    assert len({scenario(t) for t in test}) == 50
    assert [t.task_id for t in BFCLSuite(BFCLSuite.options_class(seed=3)).tasks("test")] == [t.task_id for t in test]
    assert [t.task_id for t in BFCLSuite(BFCLSuite.options_class(seed=4)).tasks("test")] != [t.task_id for t in test]


def test_explicit_ids_and_max_tasks():
    ids = ["multi_turn_long_context_5", "multi_turn_base_9"]
    suite = load_environment("bfcl", {"ids": ids})
    assert [task.task_id for task in suite.tasks("all")] == ["multi_turn_base_9", "multi_turn_long_context_5"]
    assert len(load_environment("bfcl", {"max_tasks": 3}).tasks("train")) == 3


@pytest.mark.parametrize("options, message", [
    ({"categories": ["miss_func"]}, "'miss_func' is not supported: its tasks add tools in the middle of an episode"),
    ({"categories": ["simple"]}, "Unknown BFCL category 'simple'"),
    ({"test_fraction": 1.0}, "test_fraction must be in"),
    ({"max_tasks": 0}, "max_tasks must be >= 1"),
    ({"ids": ["multi_turn_base_1000"]}, "BFCL has no task 'multi_turn_base_1000'.*Did you mean"),
    ({"categorys": ["base"]}, "unknown environment option 'categorys'. Did you mean 'categories'"),
])
def test_bad_options_fail_naming_what_to_do(options, message):
    with pytest.raises(ValueError, match=message):
        load_environment("bfcl", options)


def test_unknown_split_names_the_splits(suite):
    with pytest.raises(ValueError, match=r"Unknown BFCL split 'dev'; the splits are \['train', 'test', 'all'\]"):
        suite.tasks("dev")


def test_missing_bfcl_eval_fails_in_the_constructor_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bfcl_eval", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps bfcl-eval"):
        load_environment("bfcl")


# ---------------------------------------------------------------------------------------------- the expert
@pytest.mark.parametrize("category", CATEGORIES)
def test_the_expert_passes_bfcls_state_check(category):
    suite = load_environment("bfcl", {"categories": [category]})
    tasks = suite.tasks("all")[::33]  # seven tasks spread over the category's scenarios and back-ends
    episodes = run(suite, suite.expert(), tasks)
    assert len(episodes) == len(tasks)
    for task in tasks:
        episode = episodes[task.task_id]
        assert episode.stop_reason == "done" and episode.success and episode.reward == 1.0, episode.task.task_id
        assert episode.invalid_actions == 0 and episode.parse_errors == 0
        assert sum(m["role"] == "user" for m in episode.messages) == len(task.setup.turns)
        assert episode.tools == suite.tool_schemas(task)


def test_miss_param_turns_without_ground_truth_get_a_question_back():
    suite = load_environment("bfcl", {"categories": ["miss_param"], "ids": ["multi_turn_miss_param_0"]})
    (task,) = suite.tasks("all")
    empty = [turn for turn, calls in enumerate(task.setup.ground_truth) if not calls]
    assert empty
    episode = run(suite, suite.expert(), [task])[task.task_id]
    assert episode.success
    users = [i for i, m in enumerate(episode.messages) if m["role"] == "user"]
    assert episode.messages[users[empty[0]] + 1] == {"role": "assistant", "content": CANNOT_DO}


def test_a_reply_that_does_not_parse_is_fed_back_and_the_turn_goes_on(suite):
    expert, broken = suite.expert(), '<tool_call>\n{"name": "cd", "arguments": {"folder": \n</tool_call>'
    policy = lambda request: broken if len(request.messages) == 2 else expert(request)  # noqa: E731
    task = suite.tasks("all")[0]
    episode = run(suite, policy, [task])[task.task_id]
    assert episode.parse_errors == 1 and episode.success
    assert episode.messages[2] == {"role": "assistant", "content": broken}
    assert episode.messages[3]["role"] == "user" and "not valid JSON" in episode.messages[3]["content"]
    assert episode.messages[4]["tool_calls"]  # the expert's calls of the same turn


# ---------------------------------------------------------------------------------------------- failures
def test_a_policy_that_never_calls_fails(suite):
    tasks = suite.tasks("all")[:2]
    episodes = run(suite, lambda request: "I have done it.", tasks)
    for episode in episodes.values():
        assert episode.stop_reason == "done" and episode.success is False and episode.reward == 0.0
        assert episode.steps == len(episode.task.setup.turns)  # one reply per user turn


def test_wrong_call_sequences_fail_the_state_or_response_check(suite):
    (task,) = [t for t in suite.tasks("all") if t.task_id == "multi_turn_base_0"]
    expert = suite.expert()

    def without_last_call_of_first_turn(request):
        reply = expert(request)
        parsed = suite.format.parse(reply)
        first_turn = sum(m["role"] == "user" for m in request.messages) == 1
        if first_turn and parsed.action:
            return suite.format.write("", parsed.action[:-1])
        return reply

    def with_a_wrong_argument(request):
        parsed = suite.format.parse(expert(request))
        changed = tuple(FunctionCall(c.name, {k: "temp2" if v == "temp" else v for k, v in c.arguments.items()})
                        for c in parsed.action)
        return suite.format.write("", changed) if parsed.action else parsed.content

    for policy in (without_last_call_of_first_turn, with_a_wrong_argument):
        episode = run(suite, policy, [task])[task.task_id]
        assert episode.stop_reason == "done" and episode.success is False, policy.__name__


def test_a_turn_of_more_than_twenty_call_steps_is_force_quit(suite):
    task = suite.tasks("all")[0]
    episode = run(suite, lambda request: suite.format.write("", (FunctionCall("pwd", {}),)), [task])[task.task_id]
    assert episode.stop_reason == "done" and episode.success is False
    assert episode.steps == 21


@pytest.mark.parametrize("parser, reply", [
    ("hermes", '<tool_call>\n{"name": "__import__", "arguments": {"name": "os"}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "_load_scenario", "arguments": {"scenario": {}}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "cd", "arguments": {"folder": "document", "then": "rm -rf /"}}\n</tool_call>'),
    ("hermes", '<tool_call>\n{"name": "cd", "arguments": {}}\n</tool_call>'),
    ("pythonic", "[__import__('os').system('touch {marker}')]"),
    ("pythonic", "[cd(folder=open('{marker}', 'w').write('x'))]"),
])
def test_hostile_or_bad_calls_are_not_executed(parser, reply, tmp_path):
    marker = tmp_path / "pwned"
    suite = load_environment("bfcl", {"ids": ["multi_turn_base_0"], "parser": parser})
    (task,) = suite.tasks("all")
    environment = suite.make()
    environment.reset(task)
    before = {name: dict(vars(instance)) for name, instance in environment.instances.items()}
    parsed = suite.format.parse(reply.replace("{marker}", str(marker)))
    if parsed.__class__.__name__ == "ParseError":  # never reaches the environment
        assert "No tool was called" in parsed.message
    else:
        transition = environment.step(parsed.action)
        assert transition.valid is False and all(result.error for result in transition.observation)
        assert all(result.content.startswith("Error: ") for result in transition.observation)
    assert not marker.exists()
    assert {name: dict(vars(instance)) for name, instance in environment.instances.items()} == before


def test_a_call_that_raises_gives_bfcls_error_result(suite):
    task = suite.tasks("all")[0]
    environment = suite.make()
    environment.reset(task)
    transition = environment.step((FunctionCall("cd", {"folder": 1}),))  # the back-end calls 1.rstrip()
    (result,) = transition.observation
    assert result.error and result.content.startswith("Error during execution: ") and transition.valid is False


# ---------------------------------------------------------------------------------------------- training data
def test_expert_episodes_round_trip_through_segmentation_and_the_collator(tmp_path, tiny_tokenizer):
    suite = load_environment("bfcl", {"categories": ["base", "miss_param"], "max_tasks": 3})
    tasks = suite.tasks("train")
    episodes = list(run(suite, suite.expert(), tasks).values())
    for episode in episodes:
        spans = segment_messages(episode.messages)
        for message, message_spans in zip(episode.messages, spans):
            kinds = {span.kind for span in message_spans}
            if message["role"] == "tool":
                assert kinds == {"obs"}
            elif message["role"] == "assistant":
                assert kinds == (set() if message.get("tool_calls") else {"act"})
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(episode.to_record()) + "\n" for episode in episodes))
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=None)
    encoded, report = encode_dataset(rows, collator)
    assert len(encoded) == len(episodes) and report.malformed_skipped == 0
    batch = collator([rows[0]])
    assert_invariants(batch)
    act = decode_where(tiny_tokenizer, batch, 0, "act_mask")
    first_call = tasks[0].setup.ground_truth[0][0].split("(")[0]
    assert f'"name": "{first_call}"' in act and "The request is done." in act
    first_result = next(m["content"] for m in rows[0]["messages"] if m["role"] == "tool")
    assert first_result not in act
