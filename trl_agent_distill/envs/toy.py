"""A toy tool-use world: invented towns whose facts no model can know, and questions that need search and arithmetic.

`ToyWorld.generate(seed)` makes, deterministically, a corpus with one encyclopedia entry per town (population,
gates, founding year, mayor and the mayor's age; names are random syllables) and tasks that need one or two
retrievals plus arithmetic, e.g. "What is the population of Varnek times the number of gates of Olbury, minus 17?".
Train and test tasks are about disjoint towns, so a student cannot pass the test by remembering training facts.

`ToyWorld.oracle` is a policy for `PolicyBackend` that solves every task with the real tools through the real
CodeAct loop (run with `task_variable="task"`): its code reads the town names and any constant out of the task text
with a regular expression, searches each town, parses the numbers out of the entries and computes the answer, which
the next step returns with `final_answer`. Asked for a chain of thought it answers from its knowledge of the world
(`cot_answer`). Its trajectories and CoT answers are the demo teacher's training data.

Why the code parses the task instead of retyping names: a model of a million parameters trained for minutes on CPU
does not learn to copy unseen names from the question (measured: 0 of 50 test tasks after 1,200 SFT steps), while
it learns quickly which facts a question needs and how to combine them, which is what the demo is about.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..agent.backends import GenerationRequest
from ..formats import CodeActFormat, CodeAction
from ..jsonl import write_jsonl
from ..tasks import COT_SYSTEM_PROMPT

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "l", "m", "n", "p", "r", "s", "st", "t", "tr", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou"]
_CODAS = ["", "n", "r", "l", "m", "s", "th", "rk", "nd", "x"]
_SUFFIXES = ["", "", "by", "mere", "holt", "wick", "ford", "stead", "ton", "vale"]
_FIRST_NAMES = ["Odile", "Tomas", "Ilsa", "Corvin", "Maren", "Edric", "Sabine", "Jorek", "Liane", "Anselm", "Petra",
                "Wendel", "Ysolde", "Bram", "Helka", "Oren"]

# The pattern that reads each fact back from an entry.
FACTS = {
    "population": r"Population: (\d+)\.",
    "gates": r"It has (\d+) gates\.",
    "founded": r"founded in (\d+)\.",
    "mayor_age": r"is (\d+) years old\.",
}
# How a plan names each fact, and how a chain of thought states it about a town.
_FACT_PHRASES = {
    "population": ("the population of", "has a population of {}"),
    "gates": ("the number of gates of", "has {} gates"),
    "founded": ("the founding year of", "was founded in {}"),
    "mayor_age": ("the age of the mayor of", "has a mayor who is {} years old"),
}
# Town names are the only capitalised words after the first one of a question.
TOWN_PATTERN = r" ([A-Z][a-z]+)"
# The protocol the oracle speaks: it reads the task from the format's task message and writes the format's steps.
_FORMAT = CodeActFormat()


@dataclass(frozen=True)
class Town:
    name: str
    population: int
    gates: int
    founded: int
    mayor: str
    mayor_age: int

    def entry(self) -> dict[str, str]:
        """The corpus document about this town."""
        text = (
            f"{self.name} is a town in the Ardel valley, founded in {self.founded}. Population: {self.population}. "
            f"It has {self.gates} gates. Its mayor, {self.mayor}, is {self.mayor_age} years old."
        )
        return {"id": self.name.lower(), "title": self.name, "text": text}


@dataclass(frozen=True)
class ToyTask:
    """A question, its answer, and how to solve it: which fact of which town, combined by `formula`."""

    id: str
    question: str
    answer: str
    lookups: tuple[tuple[str, str], ...]  # (town, fact) pairs, in the order the formula uses them
    formula: str  # Python over the variables v0, v1, ... (one per lookup)


# (question template, lookups as (town slot, fact), formula over v0, v1 with the constant k)
_TEMPLATES: list[tuple[str, tuple[tuple[int, str], ...], str]] = [
    ("What is the population of {0} times the number of gates of {1}, minus {k}?",
     ((0, "population"), (1, "gates")), "v0 * v1 - {k}"),
    ("How many people live in {0} and {1} together?", ((0, "population"), (1, "population")), "v0 + v1"),
    ("How many years after {0} was {1} founded?", ((0, "founded"), (1, "founded")), "v1 - v0"),
    ("How old will the mayor of {0} be in {k} years?", ((0, "mayor_age"),), "v0 + {k}"),
    ("How many gates do {0} and {1} have together?", ((0, "gates"), (1, "gates")), "v0 + v1"),
    ("How many more people live in {0} than in {1}?", ((0, "population"), (1, "population")), "v0 - v1"),
]


class ToyWorld:
    """Towns, their corpus and the train / test tasks of one seed (see the module docstring)."""

    def __init__(self, towns: list[Town], train_tasks: list[ToyTask], test_tasks: list[ToyTask], seed: int):
        self.towns = {town.name: town for town in towns}
        self.train_tasks = train_tasks
        self.test_tasks = test_tasks
        self.seed = seed

    @classmethod
    def generate(cls, seed: int = 0, num_towns: int = 240, train_tasks: int = 400, test_tasks: int = 100,
                 test_fraction: float = 0.25) -> ToyWorld:
        rng = random.Random(seed)
        towns = _make_towns(rng, num_towns)
        split = max(2, int(len(towns) * test_fraction))
        test_towns, train_towns = towns[:split], towns[split:]
        train = _make_tasks(rng, train_towns, train_tasks, "train")
        test = _make_tasks(rng, test_towns, test_tasks, "test")
        return cls(towns, train, test, seed)

    @property
    def corpus(self) -> list[dict[str, str]]:
        return [town.entry() for town in self.towns.values()]

    def tasks(self, split: str) -> list[ToyTask]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.train_tasks if split == "train" else self.test_tasks

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write `corpus.jsonl`, `train.jsonl` and `test.jsonl` (id, question, answer) for `generate` / `eval`."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        paths = {"corpus": root / "corpus.jsonl", "train": root / "train.jsonl", "test": root / "test.jsonl"}
        write_jsonl(paths["corpus"], self.corpus)
        for split in ("train", "test"):
            rows = [{"id": task.id, "question": task.question, "answer": task.answer} for task in self.tasks(split)]
            write_jsonl(paths[split], rows)
        return paths

    @staticmethod
    def task_settings(directory: str | Path, split: str = "train") -> dict[str, Any]:
        """The `AgentTaskConfig` options of an agent acting in a world saved to `directory`: its `split` tasks, its
        corpus with one document per search (an entry holds every fact of a town), CodeAct with the task text in
        the variable `task` (the oracle's code reads the town names from it, see the module docstring)."""
        root = Path(directory)
        return {
            "dataset_name": str(root / f"{split}.jsonl"), "dataset_split": split,
            "retrieval_corpus": str(root / "corpus.jsonl"), "retrieval_top_k": 1, "agent": "codeact",
            "task_variable": "task",
        }

    # -------------------------------------------------------------------------------------------- the oracle
    @property
    def oracle(self) -> Callable[[GenerationRequest], str]:
        """A policy answering every task: CodeAct steps (`oracle_step`) or, asked for CoT, `cot_answer`."""
        by_question = {task.question: task for task in self.train_tasks + self.test_tasks}

        def policy(request: GenerationRequest) -> str:
            asks_for_cot = request.messages[0]["content"] == COT_SYSTEM_PROMPT
            message = request.messages[1]["content"]
            question = message if asks_for_cot else _FORMAT.question(message)
            task = by_question.get(question)
            if task is None:
                raise ValueError(f"The toy oracle does not know the task {message!r}.")
            if asks_for_cot:
                return self.cot_answer(task)
            steps = sum(message["role"] == "assistant" for message in request.messages)
            return oracle_step(task, steps)

        return policy

    def cot_answer(self, task: ToyTask) -> str:
        """A chain-of-thought answer by someone who knows every town: the plan, the facts, the arithmetic."""
        facts = " ".join(
            f"{town} {_FACT_PHRASES[fact][1].format(getattr(self.towns[town], fact))}." for town, fact in task.lookups
        )
        values = {f"v{i}": str(getattr(self.towns[town], fact)) for i, (town, fact) in enumerate(task.lookups)}
        arithmetic = re.sub(r"v\d+", lambda match: values[match.group(0)], task.formula)
        return f"{plan(task)}\n\n{facts}\n\n{arithmetic} = {task.answer}.\n\n<answer>{task.answer}</answer>"


def plan(task: ToyTask) -> str:
    """What a task needs, said without its town names (which the code reads from `task`): "I need the population
    of the first town and the number of gates of the second town." Also the first paragraph of `cot_answer`."""
    towns = list(dict.fromkeys(town for town, _ in task.lookups))
    slots = ["the town"] if len(towns) == 1 else ["the first town", "the second town"]
    needs = [f"{_FACT_PHRASES[fact][0]} {slots[towns.index(town)]}" for town, fact in task.lookups]
    return f"I need {' and '.join(needs)}."


def oracle_step(task: ToyTask, step: int) -> str:
    """The oracle's CodeAct reply at `step`: 0 reads the towns (and any constant) from `task`, searches, parses the
    entries and computes; 1 gives the answer it printed."""
    if step > 0:
        return _FORMAT.write("The answer is computed.", CodeAction("final_answer(answer)"))
    towns = list(dict.fromkeys(town for town, _ in task.lookups))
    expression = re.sub(r"\b\d+\b", "k", task.formula)  # a constant from the question is read, like the names
    lines = ["import re", f'towns = re.findall(r"{TOWN_PATTERN}", task)']
    if expression != task.formula:
        lines.append('k = int(re.findall(r"\\d+", task)[-1])')
    lines += [f"entry{i} = web_search(query=towns[{i}])" for i in range(len(towns))]
    lines += [f"print(entry{i})" for i in range(len(towns))]
    for index, (town, fact) in enumerate(task.lookups):
        lines.append(f"v{index} = int(re.search(r\"{FACTS[fact]}\", entry{towns.index(town)}).group(1))")
    lines += [f"answer = {expression}", "print(answer)"]
    search = "the town" if len(towns) == 1 else "both towns"
    thought = f"{plan(task)} I will search for {search}, read the numbers and compute {expression}."
    return _FORMAT.write(thought, CodeAction("\n".join(lines)))


# ---------------------------------------------------------------------------------------------- generation
def _make_towns(rng: random.Random, count: int) -> list[Town]:
    names: set[str] = set()
    towns = []
    while len(towns) < count:
        name = _town_name(rng)
        if name in names:
            continue
        names.add(name)
        towns.append(Town(
            name=name,
            population=rng.randint(200, 30_000),
            gates=rng.randint(2, 12),
            founded=rng.randint(1100, 1900),
            mayor=f"{rng.choice(_FIRST_NAMES)} {_town_name(rng)}",
            mayor_age=rng.randint(30, 80),
        ))
    return towns


def _town_name(rng: random.Random) -> str:
    syllables = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.randint(1, 2)))
    return (syllables + rng.choice(_SUFFIXES)).capitalize()


def _make_tasks(rng: random.Random, towns: list[Town], count: int, split: str) -> list[ToyTask]:
    tasks, questions = [], set()
    while len(tasks) < count:
        template, lookups, formula = rng.choice(_TEMPLATES)
        k = rng.randint(2, 40)
        expression = formula.format(k=k)
        chosen = rng.sample(towns, 2)
        answer = _evaluate(expression, chosen, lookups)
        if answer < 0:  # "how many more / years after" questions are asked the way round that has an answer
            chosen.reverse()
            answer = _evaluate(expression, chosen, lookups)
        question = template.format(chosen[0].name, chosen[1].name, k=k)
        if question in questions or answer < 0:
            continue
        questions.add(question)
        pairs = tuple((chosen[slot].name, fact) for slot, fact in lookups)
        tasks.append(ToyTask(id=f"{split}-{len(tasks):04d}", question=question, answer=str(answer),
                             lookups=pairs, formula=expression))
    return tasks


def _evaluate(expression: str, towns: list[Town], lookups: tuple[tuple[int, str], ...]) -> int:
    values = {f"v{i}": getattr(towns[slot], fact) for i, (slot, fact) in enumerate(lookups)}
    return eval(expression, {"__builtins__": {}}, values)  # noqa: S307 - our own template, never model output
