"""The paper's task sets, loaded from fixture rows in each hub dataset's own schema (tests/fixtures/task_sets)."""

import json
import logging
import random
import sys
import types
from pathlib import Path

import datasets
import pytest

from trl_agent_distill import task_sets
from trl_agent_distill.task_sets import (
    PAPER_BENCHMARKS,
    PAPER_TRAINING_SETS,
    SCORING_KINDS,
    TASK_SETS,
    Sample,
    Window,
    load_task_set,
)

FIXTURES = Path(__file__).parent / "fixtures" / "task_sets"
OLYMMATH = {"en-easy": FIXTURES / "olymmath_en-easy.jsonl", "en-hard": FIXTURES / "olymmath_en-hard.jsonl"}


def fixture_rows(name):
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_registry_holds_the_papers_eight_benchmarks_and_training_sets_with_their_sizes():
    sizes = {name: TASK_SETS[name].paper_size for name in PAPER_BENCHMARKS + PAPER_TRAINING_SETS}
    # The sizes of the paper's files in Nardien/agent-distillation/data_processor.
    assert sizes == {"hotpotqa": 500, "bamboogle": 125, "musique": 500, "2wikimultihopqa": 500, "math500": 500,
                     "gsm_hard": 500, "aime": 90, "olymmath": 200, "hotpotqa_train": 1000, "math_train": 2000}
    assert {TASK_SETS[name].scoring for name in PAPER_BENCHMARKS[:4]} == {"factual"}
    assert {TASK_SETS[name].scoring for name in PAPER_BENCHMARKS[4:]} == {"math"}
    assert all(task_set.scoring in SCORING_KINDS for task_set in TASK_SETS.values())
    assert "gsm_symbolic" in TASK_SETS


@pytest.mark.parametrize(
    ("name", "source", "expected"),
    [
        ("bamboogle", "bamboogle", [("0", "james madison"), ("1", "Titan IIIE"), ("2", "1999")]),
        ("math500", "math500", [("test/precalculus/807.json", r"\left( 3, \frac{\pi}{2} \right)"),
                                ("test/algebra/2584.json", r"\frac{14}{3}"), ("test/algebra/1349.json", r"\text{Evelyn}")]),
        # AIME answers are integers: the hub's "033" is 33.
        ("aime", "aime", [("0", "116"), ("6", "245"), ("7", "227"), ("30", "738"), ("57", "33")]),
        # The hub's English easy tier then its hard tier, ids the hub's own.
        ("olymmath", OLYMMATH, [("OlymMATH-EASY-0-EN", "948"), ("OlymMATH-EASY-1-EN", r"4\sqrt{15}-14"),
                                ("OlymMATH-HARD-0-EN", "2625"), ("OlymMATH-HARD-1-EN", "210")]),
    ],
)
def test_whole_sets_keep_every_row_in_order_with_text_ids_and_answers(name, source, expected):
    rows = load_task_set(name, source=source if isinstance(source, dict) else FIXTURES / f"{source}.jsonl")
    assert rows.column_names == ["id", "question", "answer"]
    assert [(row["id"], row["answer"]) for row in rows] == expected
    assert all(isinstance(row["question"], str) and row["question"] for row in rows)


def test_musique_keeps_answerable_three_hop_questions_with_their_aliases():
    rows = load_task_set("musique", source=FIXTURES / "musique.jsonl")
    assert rows.column_names == ["id", "question", "answer", "answer_aliases"]
    # The fixture's 2-hop question and its unanswerable 3-hop one are not among the paper's.
    assert rows.to_list() == [
        {"id": "3hop1__454441_55349_651302", "question": fixture_rows("musique")[1]["question"], "answer": "Denver",
         "answer_aliases": ["Denver, Colorado", "Mile High City"]},
        {"id": "3hop1__145290_443779_52195", "question": fixture_rows("musique")[2]["question"],
         "answer": "Francisco Guterres", "answer_aliases": ["Lú-Olo", "Lu Olo"]},
    ]


def test_gsm_hard_targets_become_numbers_without_float_noise():
    rows = load_task_set("gsm_hard", source=FIXTURES / "gsm_hard.jsonl")
    answers = {row["question"].split()[0]: row["answer"] for row in rows}
    assert answers == {"Janet’s": "-9867630", "A": "3431580", "Marin": "13138980", "Tiffany": "561161.7"}


@pytest.mark.parametrize(("name", "rows_in_split", "first_ids"),
                         [("2wikimultihopqa", 12576, [10476, 1824, 409, 12149, 4506]),
                          ("gsm_hard", 1319, [1309, 228, 51, 563, 501])])
def test_drawn_sets_reproduce_the_papers_rows(name, rows_in_split, first_ids):
    """The paper's 2WikiMultiHopQA and GSM-Hard files list these row numbers first (of 12,576 dev rows and
    1,319 rows): seed 42 draws the same ones, and another seed others."""
    (part,) = TASK_SETS[name].parts
    split = datasets.Dataset.from_dict({"row": list(range(rows_in_split))})
    drawn = part.rows.indices(split, seed=42)
    assert len(drawn) == 500 == len(set(drawn)) and drawn[:5] == first_ids
    assert part.rows.indices(split, seed=7)[:5] != first_ids


def test_drawn_sets_load_in_the_order_drawn_and_the_seed_is_an_option(tmp_path, caplog):
    base = fixture_rows("2wikimultihopqa")[0]
    source = write_rows(tmp_path / "dev.jsonl", [{**base, "question": f"Question {i}?"} for i in range(600)])
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.task_sets"):
        rows = load_task_set("2wikimultihopqa", source=source)
    assert not caplog.text  # the paper's 500 rows: nothing to warn about
    expected = random.Random(42).sample(range(600), 500)
    assert rows["id"] == [str(i) for i in expected] and rows["question"][0] == f"Question {expected[0]}?"
    assert load_task_set("2wikimultihopqa", source=source, seed=3)["id"] != rows["id"]
    assert load_task_set("2wikimultihopqa", source=source, max_tasks=7)["id"] == rows["id"][:7]


def test_hotpotqa_test_set_is_the_window_100_to_600_of_the_hard_dev_questions(tmp_path):
    base = fixture_rows("hotpotqa")[0]
    levels = ["hard", "hard", "medium"] * 300
    source = write_rows(tmp_path / "dev.jsonl", [{**base, "id": f"q{i}", "level": level}
                                                  for i, level in enumerate(levels)])
    hard = [f"q{i}" for i, level in enumerate(levels) if level == "hard"]
    assert load_task_set("hotpotqa", source=source)["id"] == hard[100:600]
    # The training questions are the first 1,000 hard ones of the train split.
    assert load_task_set("hotpotqa_train", source=source)["id"] == hard[:1000]


def test_hotpotqa_training_set_keeps_the_hard_questions():
    rows = load_task_set("hotpotqa_train", source=FIXTURES / "hotpotqa.jsonl")
    assert rows["answer"] == ["President Richard Nixon", "Crambidae", "6.213 km long"]


def test_math_training_set_draws_levels_4_5_then_2_3_and_reads_the_boxed_answer(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.task_sets"):
        rows = load_task_set("math_train", source=FIXTURES / "math_train.jsonl")
    levels = {row["problem"]: row["level"] for row in fixture_rows("math_train")}
    drawn = [levels[question] for question in rows["question"]]
    assert sorted(drawn[:2]) == ["Level 4", "Level 5"] and drawn[2:] == ["Level 2", "Level 3"]
    assert set(rows["answer"]) == {r"(-\infty,-8]\cup [8,\infty)", "4", "70", "-6"}
    # The level-3 row whose solution has no \boxed{} is left out, and said so.
    assert "no readable answer" in caplog.text and "'4'" in caplog.text


def test_a_copy_with_fewer_rows_than_the_papers_set_is_said_to_be_one(caplog):
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.task_sets"):
        load_task_set("bamboogle", source=FIXTURES / "bamboogle.jsonl")
    assert "'bamboogle' has 3 rows where the paper used 125" in caplog.text and "bamboogle.jsonl" in caplog.text


def test_another_split_takes_all_its_rows_mapped_the_same_way():
    rows = load_task_set("hotpotqa", "train", source=FIXTURES / "hotpotqa.jsonl")
    assert len(rows) == 4 and "Arthur's Magazine" in rows["answer"]  # the medium question too


def test_a_set_of_several_configurations_needs_a_file_per_configuration():
    with pytest.raises(ValueError, match=r"olymmath.*\['en-easy', 'en-hard'\].*mapping"):
        load_task_set("olymmath", source=OLYMMATH["en-easy"])
    with pytest.raises(ValueError, match="no file for configuration 'en-hard'"):
        load_task_set("olymmath", source={"en-easy": OLYMMATH["en-easy"]})


def test_a_source_in_another_schema_fails_naming_the_set_the_field_and_the_fix(tmp_path):
    source = write_rows(tmp_path / "bamboogle.jsonl", [{"question": "Who?", "answer": "Me"}])
    with pytest.raises(ValueError) as error:
        load_task_set("bamboogle", source=source)
    message = str(error.value)
    assert "'bamboogle'" in message and "no field 'Question' (needed for the question)" in message
    assert "chiayewken/bamboogle in its own schema" in message and "['Question', 'Answer']" in message
    musique = write_rows(tmp_path / "musique.jsonl", [{k: v for k, v in row.items() if k != "answerable"}
                                                      for row in fixture_rows("musique")])
    with pytest.raises(ValueError, match="no field 'answerable' \\(needed for choosing the paper's rows\\)"):
        load_task_set("musique", source=musique)


def test_bad_rows_and_sources_fail_clearly(tmp_path):
    blank = write_rows(tmp_path / "blank.jsonl", [{"Question": "Who?", "Answer": "Me"}, {"Question": " ", "Answer": "x"}])
    with pytest.raises(ValueError, match=r"'bamboogle': row 1 of .*blank.jsonl has no question text in 'Question'"):
        load_task_set("bamboogle", source=blank)
    twice = write_rows(tmp_path / "twice.jsonl", [fixture_rows("math500")[0]] * 2)
    with pytest.raises(ValueError, match="'math500': tasks 0 and 1 share the id 'test/precalculus/807.json'"):
        load_task_set("math500", source=twice)
    short = write_rows(tmp_path / "short.jsonl", fixture_rows("hotpotqa"))
    with pytest.raises(ValueError, match="none of the 4 rows .* is among the rows the paper used"):
        load_task_set("hotpotqa", source=short)  # the window starts at the 101st hard question
    saved = tmp_path / "saved"
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(fixture_rows("bamboogle"))}).save_to_disk(str(saved))
    with pytest.raises(ValueError, match=r"no split 'test' \(it has \['dev'\]\)"):
        load_task_set("bamboogle", source=saved)
    assert load_task_set("bamboogle", "dev", source=saved)["answer"][0] == "james madison"
    with pytest.raises(ValueError, match="max_tasks must be >= 1"):
        load_task_set("bamboogle", source=saved, max_tasks=0)


def test_an_unknown_name_lists_the_task_sets_with_a_suggestion():
    with pytest.raises(ValueError, match=r"Unknown task set 'hotpot_qa'\. Did you mean 'hotpotqa'\?.*'musique'"):
        load_task_set("hotpot_qa")


def test_the_hub_is_asked_for_the_papers_split_only_and_a_failure_says_to_pass_a_local_source(monkeypatch):
    asked = []

    def hub(path, name=None, split=None):
        asked.append((path, name, split))
        if name == "en-hard":
            raise ConnectionError("offline mode is enabled")
        return datasets.Dataset.from_list(fixture_rows("olymmath_en-easy"))

    monkeypatch.setattr(task_sets.datasets, "load_dataset", hub)
    with pytest.raises(ValueError) as error:
        load_task_set("olymmath")
    assert asked == [("RUC-AIBOX/OlymMATH", "en-easy", "test"), ("RUC-AIBOX/OlymMATH", "en-hard", "test")]
    message = str(error.value)
    assert "could not load RUC-AIBOX/OlymMATH (en-hard) split 'test' from the hub" in message
    assert "ConnectionError: offline mode is enabled" in message and "pass source=" in message


def test_gsm_symbolic_comes_from_its_generator_imported_on_first_use(monkeypatch):
    calls = []

    def gsm_symbolic_tasks(size, seed):
        calls.append((size, seed))
        return [{"id": f"gsm-{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "extra": i}
                for i in range(size)]

    monkeypatch.setitem(sys.modules, "trl_agent_distill.corpora",
                        types.SimpleNamespace(gsm_symbolic_tasks=gsm_symbolic_tasks))
    rows = load_task_set("gsm_symbolic", max_tasks=3, seed=5)
    assert calls == [(3, 5)] and rows.to_list() == [
        {"id": f"gsm-{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(3)
    ]
    with pytest.raises(ValueError, match="generated on the spot; it takes no source"):
        load_task_set("gsm_symbolic", source="tasks.jsonl")
    monkeypatch.setitem(sys.modules, "trl_agent_distill.corpora",
                        types.SimpleNamespace(gsm_symbolic_tasks=lambda size, seed: [{"question": "q", "answer": "1"}]))
    with pytest.raises(ValueError, match="made rows without 'id'"):
        load_task_set("gsm_symbolic")
    monkeypatch.setitem(sys.modules, "trl_agent_distill.corpora", types.SimpleNamespace())
    with pytest.raises(ImportError, match=r"'gsm_symbolic' needs trl_agent_distill\.corpora:gsm_symbolic_tasks"):
        load_task_set("gsm_symbolic")


def test_windows_and_samples_filter_before_choosing():
    split = datasets.Dataset.from_dict({"level": ["hard", "easy", "hard", "hard"], "x": [0, 1, 2, 3]})
    keep = (lambda row: row["level"] == "hard", ("level",))
    assert Window(1, 3, *keep).indices(split, seed=0) == [2, 3]
    assert sorted(Sample(2, *keep).indices(split, seed=0)) in ([0, 2], [0, 3], [2, 3])


def test_a_task_config_names_a_task_set_and_a_local_copy_of_it():
    from trl_agent_distill.tasks import AgentTaskConfig, load_tasks

    config = AgentTaskConfig(task_set="musique", dataset_name=str(FIXTURES / "musique.jsonl"), max_tasks=1)
    (task,) = load_tasks(config)
    assert (task.task_id, task.answer, task.aliases) == ("3hop1__454441_55349_651302", "Denver",
                                                          ("Denver, Colorado", "Mile High City"))
    with pytest.raises(ValueError, match="Did you mean 'musique'"):
        AgentTaskConfig(task_set="musiqe")
