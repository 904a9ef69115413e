"""Teacher trajectory generation: tasks, the correctness filter, first-thought prefix, resumable output, the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import datasets
import pytest
import yaml

from trl_agent_distill.agent import PolicyBackend
from trl_agent_distill.cli import run as cli_run
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.data import prepare_trajectory_dataset
from trl_agent_distill.encoding import encode_dataset
from trl_agent_distill.generation import GenerateConfig, first_paragraph, generate_trajectories
from trl_agent_distill.storage import DirectoryInUseError
from trl_agent_distill.tasks import load_tasks

pytestmark = pytest.mark.timeout(180)

CORPUS = Path(__file__).parent / "fixtures" / "retrieval" / "corpus.jsonl"
TASKS = [
    {"id": "pop", "question": "How many people live in Varnholt?", "answer": "4120"},
    {"id": "sum", "question": "How many people live in Varnholt and Dunmarrow together?", "answer": "31,920"},
    {"id": "wrong", "question": "How many people live in Ostmere?", "answer": "11305"},
    {"id": "sloppy", "question": "In which year was Varnholt founded?", "answer": "1731"},
    {"id": "lost", "question": "Who built the Selwick lighthouse?", "answer": "Ilsa Mardrake"},
]


def code(thought: str, body: str) -> str:
    return f"Thought: {thought}\nCode:\n```py\n{body}\n```<end_code>"


# What an oracle teacher writes per task and step: a correct solution, a wrong answer, a solution with a parse
# error on the way, and one that never answers.
SCRIPTS = {
    "How many people live in Varnholt?": [
        code("Search Varnholt.", "print(web_search(query='Varnholt'))"),
        code("It has 4120 people.", "final_answer(4120)"),
    ],
    "How many people live in Varnholt and Dunmarrow together?": [
        code("Add them.", "final_answer(4120 + 27800)"),
    ],
    "How many people live in Ostmere?": [code("Guess.", "final_answer(11000)")],
    "In which year was Varnholt founded?": ["Thought: I forgot the code.", code("Answer.", "final_answer('1731')")],
    "Who built the Selwick lighthouse?": [code("Search.", "print(web_search(query='Selwick'))")],
}


def oracle(request):
    if request.messages[0]["content"].startswith("Answer the question"):  # the chain-of-thought pass
        return "The town must be looked up first.\n\nThen the numbers are read off.\n\nAnswer: 4120"
    steps = SCRIPTS[request.messages[1]["content"].removeprefix("New task:\n")]
    reply = steps[min(sum(m["role"] == "assistant" for m in request.messages), len(steps) - 1)]
    return reply.replace("Thought:", "", 1) if request.prefix else reply  # go on from the forced thought


def write_tasks(path: Path, rows=TASKS) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_config(tmp_path, **overrides) -> GenerateConfig:
    corpus = tmp_path / "corpus.jsonl"  # the index is written beside the corpus: keep it out of the repository
    if not corpus.exists():
        shutil.copy(CORPUS, corpus)
    options = dict(
        model_name_or_path="oracle", dataset_name=str(write_tasks(tmp_path / "tasks.jsonl")),
        retrieval_corpus=str(corpus), max_agent_steps=3, batch_size=4, output_dir=str(tmp_path / "out"),
        show_progress=False,
    )
    return GenerateConfig(**{**options, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_keeps_only_clean_correct_trajectories(tmp_path):
    config = make_config(tmp_path)
    summary = generate_trajectories(config, backend=PolicyBackend(oracle))
    out = Path(config.output_dir)
    episodes = {record["task_id"]: record for record in read_jsonl(out / "episodes.jsonl")}
    assert set(episodes) == {task["id"] for task in TASKS}
    assert {k: (r["correct"], r["kept"]) for k, r in episodes.items()} == {
        "pop": (True, True), "sum": (True, True), "wrong": (False, False),
        "sloppy": (True, False),  # right answer, but a parse error on the way: dropped as in the paper
        "lost": (False, False),
    }
    assert episodes["lost"]["stop_reason"] == "max_steps" and episodes["sloppy"]["parse_errors"] == 1
    assert "Document 1 (Title: Varnholt)" in episodes["pop"]["messages"][3]["content"]

    kept = read_jsonl(out / "trajectories.jsonl")
    assert sorted(row["task_id"] for row in kept) == ["pop", "sum"]
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 5 and summary["episodes"] == 5 and summary["kept"] == 2 and summary["correct"] == 3
    assert summary["success_rate"] == pytest.approx(3 / 5)
    assert summary["mean_steps"] == pytest.approx((2 + 1 + 1 + 2 + 3) / 5)
    assert summary["stop_reasons"] == {"final_answer": 4, "max_steps": 1}


def test_kept_trajectories_load_with_datasets_and_train(tmp_path, tiny_tokenizer):
    config = make_config(tmp_path)
    generate_trajectories(config, backend=PolicyBackend(oracle))
    for name in ("trajectories.jsonl", "episodes.jsonl"):
        loaded = datasets.load_dataset("json", data_files=str(Path(config.output_dir, name)), split="train")
        assert len(loaded) == (2 if name == "trajectories.jsonl" else 5)
    trajectories = datasets.load_dataset(
        "json", data_files=str(Path(config.output_dir, "trajectories.jsonl")), split="train"
    )
    prepared = prepare_trajectory_dataset(trajectories, "auto")
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=None)
    checked, report = encode_dataset(prepared, collator)
    assert report.malformed_skipped == 0 and len(checked) == 2
    batch = collator([checked[0], checked[1]])
    assert batch["act_mask"].sum() > 0 and batch["reason_mask"].sum() > 0


def test_first_thought_prefix_seeds_and_is_kept(tmp_path):
    config = make_config(tmp_path, first_thought_prefix=True)
    generate_trajectories(config, backend=PolicyBackend(oracle))
    records = {r["task_id"]: r for r in read_jsonl(Path(config.output_dir, "episodes.jsonl"))}
    for record in records.values():
        assert record["first_thought"] == "The town must be looked up first."
        first_step = record["messages"][2]["content"]
        assert first_step.startswith("Thought: The town must be looked up first. ")
        assert first_step.count("Thought:") == 1
    kept = read_jsonl(Path(config.output_dir, "trajectories.jsonl"))
    assert all(row["first_thought"] == "The town must be looked up first." for row in kept)


@pytest.mark.parametrize(
    "text, expected",
    [("First idea.\nstill first.\n\nSecond.", "First idea.\nstill first."), ("\n\nThought: Lead.\n\nNext", "Lead."),
     ("   ", "")],
)
def test_first_paragraph(text, expected):
    assert first_paragraph(text) == expected


def test_resume_skips_finished_tasks_and_repairs_a_torn_line(tmp_path):
    calls = []

    def counting(request):
        calls.append(request.messages[1]["content"])
        return oracle(request)

    generate_trajectories(make_config(tmp_path, max_tasks=2), backend=PolicyBackend(counting))
    episodes_path = Path(tmp_path, "out", "episodes.jsonl")
    with open(episodes_path, "a") as file:
        file.write('{"task_id": "wrong", "mess')  # a run killed mid-line
    calls.clear()
    summary = generate_trajectories(make_config(tmp_path), backend=PolicyBackend(counting))
    asked = {question.removeprefix("New task:\n") for question in calls}
    assert asked == {task["question"] for task in TASKS[2:]}
    records = read_jsonl(episodes_path)
    assert sorted(r["task_id"] for r in records) == sorted(t["id"] for t in TASKS)
    assert summary["episodes"] == 5 and summary["kept"] == 2 and summary["this_run"]["episodes"] == 3


def test_a_killed_run_loses_only_episodes_in_flight(tmp_path):
    config = make_config(tmp_path, batch_size=1)
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_generation import oracle, make_config
        from trl_agent_distill.agent import PolicyBackend
        from trl_agent_distill.generation import generate_trajectories
        from pathlib import Path

        def slow(request):
            time.sleep(0.4)
            return oracle(request)

        generate_trajectories(make_config(Path({str(tmp_path)!r}), batch_size=1), backend=PolicyBackend(slow))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    episodes_path = Path(config.output_dir, "episodes.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if episodes_path.exists() and episodes_path.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    text = episodes_path.read_text()
    assert text.endswith("\n")
    finished = [json.loads(line)["task_id"] for line in text.splitlines()]
    assert 2 <= len(finished) < len(TASKS)
    summary = generate_trajectories(config, backend=PolicyBackend(oracle))
    records = read_jsonl(episodes_path)
    assert sorted(r["task_id"] for r in records) == sorted(t["id"] for t in TASKS)  # no duplicates, none lost
    kept = read_jsonl(Path(config.output_dir, "trajectories.jsonl"))
    assert sorted(r["task_id"] for r in kept) == ["pop", "sum"] and summary["kept"] == 2


def test_changed_settings_are_refused_on_resume(tmp_path):
    generate_trajectories(make_config(tmp_path, max_tasks=1), backend=PolicyBackend(oracle))
    with pytest.raises(ValueError, match=r"other settings \(max_agent_steps: 3 -> 4\)"):
        generate_trajectories(make_config(tmp_path, max_agent_steps=4), backend=PolicyBackend(oracle))
    generate_trajectories(make_config(tmp_path, batch_size=2), backend=PolicyBackend(oracle))  # harmless change


def test_a_run_recorded_by_the_previous_release_resumes_under_the_renamed_option(tmp_path):
    config = make_config(tmp_path, max_tasks=1)
    generate_trajectories(config, backend=PolicyBackend(oracle))
    settings_file = Path(config.output_dir, "generate_config.json")
    recorded = json.loads(settings_file.read_text())
    recorded["max_steps"] = recorded.pop("max_agent_steps")  # what the previous release wrote
    settings_file.write_text(json.dumps(recorded))
    summary = generate_trajectories(make_config(tmp_path), backend=PolicyBackend(oracle))
    assert summary["episodes"] == len(TASKS)
    with pytest.raises(ValueError, match=r"max_agent_steps: 3 -> 4"):
        generate_trajectories(make_config(tmp_path, max_agent_steps=4), backend=PolicyBackend(oracle))


def test_a_settings_file_emptied_by_a_kill_is_named_with_what_to_do(tmp_path):
    config = make_config(tmp_path, max_tasks=1)
    generate_trajectories(config, backend=PolicyBackend(oracle))
    Path(config.output_dir, "generate_config.json").write_text("")  # what a kill while writing it used to leave
    with pytest.raises(ValueError, match=r"generate_config.json is empty: a run was killed while writing it.*delete it"):
        generate_trajectories(config, backend=PolicyBackend(oracle))


def test_a_second_run_on_the_same_directory_is_refused(tmp_path):
    config = make_config(tmp_path)
    asked, release = threading.Event(), threading.Event()

    def waiting(request):
        asked.set()
        assert release.wait(60)
        return oracle(request)

    first = threading.Thread(target=generate_trajectories, args=(config,), kwargs={"backend": PolicyBackend(waiting)})
    first.start()
    try:
        assert asked.wait(60)
        with pytest.raises(DirectoryInUseError, match=r"in use by another `generate` run"):
            generate_trajectories(config, backend=PolicyBackend(oracle))
    finally:
        release.set()
        first.join()
    kept = [record["task_id"] for record in read_jsonl(Path(config.output_dir, "trajectories.jsonl"))]
    assert sorted(kept) == ["pop", "sum"]  # once each
    generate_trajectories(config, backend=PolicyBackend(oracle))  # the lock went with the first run


def test_a_task_changed_in_the_task_file_is_refused_on_resume(tmp_path):
    config = make_config(tmp_path)
    generate_trajectories(config, backend=PolicyBackend(oracle))
    write_tasks(Path(config.dataset_name), [TASKS[0], {**TASKS[1], "answer": "31,921"}, *TASKS[2:]])
    with pytest.raises(ValueError, match=r"Task 'sum' changed since .*episodes.jsonl.*answer was '31,920'"):
        generate_trajectories(config, backend=PolicyBackend(oracle))


def test_bad_task_files_fail_before_any_model_loads(tmp_path):
    missing = make_config(tmp_path, question_field="prompt", model_name_or_path="/nonexistent/model")
    with pytest.raises(ValueError, match=r"tasks.jsonl has no column 'prompt' \(question_field\); its columns are"):
        generate_trajectories(missing)
    duplicated = write_tasks(tmp_path / "dup.jsonl", [TASKS[0], {**TASKS[1], "id": "pop"}])
    with pytest.raises(ValueError, match=r"rows 0 and 1 share the id 'pop'"):
        load_tasks(make_config(tmp_path, dataset_name=str(duplicated)))
    empty = write_tasks(tmp_path / "empty.jsonl", [TASKS[0], {**TASKS[1], "question": " "}])
    with pytest.raises(ValueError, match=r"empty.jsonl, row 1: 'question' is empty"):
        load_tasks(make_config(tmp_path, dataset_name=str(empty)))
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_tasks(make_config(tmp_path, dataset_name=str(tmp_path / "nope.jsonl")))


def test_rows_without_ids_use_row_numbers(tmp_path):
    rows = write_tasks(tmp_path / "noid.jsonl", [{"question": t["question"], "answer": t["answer"]} for t in TASKS])
    tasks = load_tasks(make_config(tmp_path, dataset_name=str(rows), max_tasks=3))
    assert [t.task_id for t in tasks] == ["0", "1", "2"] and tasks[1].answer == "31,920"


def test_generate_command_runs_a_recipe_with_a_local_model(tmp_path, tiny_model_dir, capsys):
    model_dir = tiny_model_dir("teacher")
    recipe = tmp_path / "generate.yaml"
    recipe.write_text(yaml.safe_dump({
        "model_name_or_path": str(model_dir), "dataset_name": str(write_tasks(tmp_path / "tasks.jsonl")),
        "retrieval_corpus": make_config(tmp_path).retrieval_corpus, "max_agent_steps": 2, "max_new_tokens": 8,
        "batch_size": 5,
        "first_thought_prefix": True, "cot_max_new_tokens": 8, "output_dir": str(tmp_path / "out"),
        "show_progress": False,
    }))
    summary = cli_run(["generate", "--config", str(recipe)])
    assert summary["episodes"] == 5 and summary["tasks"] == 5
    assert sum(summary["stop_reasons"].values()) == 5
    assert "Kept" in capsys.readouterr().out
    records = read_jsonl(tmp_path / "out" / "episodes.jsonl")
    assert all(1 <= r["steps"] <= 2 for r in records)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model_name_or_path": str(model_dir), "max_stepz": 3}))
    with pytest.raises(ValueError, match=r"unknown key 'max_stepz'.*trl-agent-distill generate --help"):
        cli_run(["generate", "--config", str(bad)])
