"""The toy world: deterministic, disjoint splits, facts only reachable by search, an oracle that solves every task
through the real CodeAct loop and tools."""

import json

import datasets
import pytest

from trl_agent_distill.agent import CodeActAgent, PolicyBackend, RetrievalTool, Task
from trl_agent_distill.envs import ToyWorld
from trl_agent_distill.envs.toy import FACTS, oracle_step, plan
from trl_agent_distill.metrics import answers_match
from trl_agent_distill.segmentation import segment_messages

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world():
    return ToyWorld.generate(seed=3, num_towns=80, train_tasks=60, test_tasks=24)


def test_same_seed_same_world_other_seed_other_world(world):
    again = ToyWorld.generate(seed=3, num_towns=80, train_tasks=60, test_tasks=24)
    assert again.corpus == world.corpus and again.test_tasks == world.test_tasks
    other = ToyWorld.generate(seed=4, num_towns=80, train_tasks=60, test_tasks=24)
    assert other.corpus != world.corpus


def test_splits_use_disjoint_towns_and_answers_are_right(world):
    towns_of = {split: {town for task in world.tasks(split) for town, _ in task.lookups} for split in ("train", "test")}
    assert towns_of["train"] and towns_of["test"] and not towns_of["train"] & towns_of["test"]
    assert len(world.train_tasks) == 60 and len(world.test_tasks) == 24
    assert len({task.question for task in world.train_tasks + world.test_tasks}) == 84
    for task in world.train_tasks + world.test_tasks:
        values = {f"v{i}": getattr(world.towns[town], fact) for i, (town, fact) in enumerate(task.lookups)}
        assert str(eval(task.formula, {}, values)) == task.answer  # noqa: S307 - the world's own formulas and int(task.answer) >= 0
        for town, fact in task.lookups:  # the facts themselves are never in the question
            assert str(getattr(world.towns[town], fact)) not in task.question.split()


def test_every_fact_can_be_read_back_from_its_entry(world):
    import re

    for town in world.towns.values():
        text = town.entry()["text"]
        for fact, pattern in FACTS.items():
            assert int(re.search(pattern, text).group(1)) == getattr(town, fact)


def test_saved_files_load_with_datasets(world, tmp_path):
    paths = world.save(tmp_path)
    test = datasets.load_dataset("json", data_files=str(paths["test"]), split="train")
    assert test.column_names == ["id", "question", "answer"] and len(test) == 24
    corpus = [json.loads(line) for line in paths["corpus"].read_text().splitlines()]
    assert {row["title"] for row in corpus} == set(world.towns)


def test_the_oracle_solves_every_task_through_the_real_loop(world, tmp_path):
    paths = world.save(tmp_path)
    agent = CodeActAgent({"web_search": RetrievalTool(paths["corpus"], top_k=1)}, max_steps=3, task_variable="task")
    assert "variable `task`" in agent.system_prompt
    tasks = [Task(task.id, task.question, task.answer) for task in world.test_tasks]
    episodes = list(agent.run(PolicyBackend(world.oracle), tasks, batch_size=8))
    assert len(episodes) == 24
    for episode in episodes:
        assert episode.answered and episode.steps == 2 and episode.tool_errors == 0 and episode.parse_errors == 0
        assert answers_match(episode.final_answer, episode.task.answer)
        assert "Document 1 (Title:" in episode.messages[3]["content"]  # the numbers came from the search tool
        kinds = [{span.kind for span in spans} for spans in segment_messages(episode.messages)]
        assert kinds[2] == kinds[4] == {"reason", "act"}


def test_the_oracle_reads_names_and_constants_from_the_task_variable(world, tmp_path):
    """Nothing from the question is retyped: the replies are the same for every task of a template."""
    task = next(task for task in world.train_tasks if task.formula.startswith("v0 * v1 - "))
    replies = oracle_step(task, 0) + oracle_step(task, 1)
    constant = task.formula.rsplit(" ", 1)[1]
    assert not any(town in replies for town, _ in task.lookups) and f" {constant}" not in replies
    assert "answer = v0 * v1 - k\n" in oracle_step(task, 0) and "final_answer(answer)" in oracle_step(task, 1)
    same_template = [other for other in world.train_tasks if other.formula.startswith("v0 * v1 - ")]
    assert len({oracle_step(other, 0) + oracle_step(other, 1) for other in same_template}) == 1
    # Without the variable the code fails with a NameError: the agent option is what makes it work.
    paths = world.save(tmp_path)
    agent = CodeActAgent({"web_search": RetrievalTool(paths["corpus"], top_k=1)}, max_steps=2)
    (episode,) = agent.run(PolicyBackend(world.oracle), [Task(task.id, task.question, task.answer)])
    assert not episode.answered and "NameError" in episode.messages[3]["content"]


def test_the_oracle_answers_chain_of_thought_requests_with_the_facts(world):
    from trl_agent_distill.agent import GenerationRequest
    from trl_agent_distill.evaluation import extract_cot_answer
    from trl_agent_distill.generation import first_paragraph
    from trl_agent_distill.tasks import cot_messages

    task = world.test_tasks[0]
    answer = world.oracle(GenerationRequest(cot_messages(task.question)))
    assert answer == world.cot_answer(task) and extract_cot_answer(answer) == task.answer
    assert first_paragraph(answer) == plan(task) and first_paragraph(answer).startswith("I need the ")
    for town, fact in task.lookups:
        assert town in answer and str(getattr(world.towns[town], fact)) in answer


def test_the_oracle_refuses_unknown_tasks(world):
    from trl_agent_distill.agent import GenerationRequest

    request = GenerationRequest([{"role": "system", "content": ""}, {"role": "user", "content": "New task:\nWho?"}])
    with pytest.raises(ValueError, match="does not know the task"):
        world.oracle(request)
