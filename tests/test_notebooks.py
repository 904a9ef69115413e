"""The Colab notebooks run top to bottom with tiny local models swapped in through their parameters cell."""

import json
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def execute(name: str, parameters: dict, workdir: Path) -> nbformat.NotebookNode:
    """Run a notebook like papermill does: the overrides go in a cell right after the one tagged `parameters`."""
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    overrides = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    NotebookClient(notebook, timeout=540, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def test_notebooks_are_colab_ready():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        sources = "\n".join(cell.source for cell in notebook.cells)
        assert "pip" in notebook.cells[2].source and "INSTALL" in notebook.cells[2].source, path.name
        assert "/work/" not in sources and "tests/" not in sources, f"{path.name} refers to a local path"
        assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "strip outputs"


def test_qlora_notebook_runs_with_tiny_models(tmp_path, tiny_tokenizer, make_model):
    for role in ("teacher", "student"):
        make_model(role).save_pretrained(tmp_path / role)
        tiny_tokenizer.save_pretrained(tmp_path / role)
    shutil.copy(FIXTURES / "retrieval" / "corpus.jsonl", tmp_path / "corpus.jsonl")
    tasks = [{"id": "1", "question": "How many people live in Varnholt?", "answer": "4120"},
             {"id": "2", "question": "Which lake is Varnholt on?", "answer": "Lake Ostmere"}]
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps(task) + "\n" for task in tasks))
    notebook = execute("02_qlora_agent_distillation.ipynb", {
        "INSTALL": False,
        "TEACHER": str(tmp_path / "teacher"),
        "STUDENT": str(tmp_path / "student"),
        "TRAJECTORIES": str(FIXTURES / "data" / "smolagents_rows.jsonl"),
        "MAX_ROWS": 3,
        "MAX_LENGTH": 768,  # the released rows' first assistant token comes after about 480 tiny-tokenizer tokens
        "LORA_R": 4,
        "TRAIN_ARGS": ["--max_steps", "2", "--per_device_train_batch_size", "1", "--logging_steps", "1",
                       "--learning_rate", "1e-3"],
        "EVAL_TASKS": str(tmp_path / "tasks.jsonl"),
        "EVAL_CONFIG": None,
        "EVAL_SPLIT": "test",
        "EVAL_MAX_TASKS": 2,
        "CORPUS": str(tmp_path / "corpus.jsonl"),
        "AGENT_MAX_NEW_TOKENS": 8,
        "SC_CANDIDATES": 2,
        "OUTPUT_DIR": str(tmp_path / "run"),
    }, tmp_path)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the loss plot
    summary = json.loads((tmp_path / "run" / "eval" / "summary.json").read_text())
    assert [(run["model"], run["setting"]) for run in summary["runs"]] == [
        ("distilled", "agent-greedy"), ("distilled", "agent-sc2"), ("base", "agent-greedy"), ("base", "agent-sc2")
    ]
    assert (tmp_path / "run" / "teacher_cache").is_dir()
    assert (tmp_path / "run" / "student" / "adapter_config.json").is_file()


def test_quickstart_notebook_runs_the_demo_step_by_step(tmp_path, tiny_demo_settings):
    notebook = execute("01_quickstart_toy_world.ipynb", {
        "INSTALL": False, "OUTPUT_DIR": str(tmp_path / "demo"), "SETTINGS": tiny_demo_settings,
    }, tmp_path)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 3  # teacher loss, students' span losses, success rates
    assert any("text/markdown" in output.get("data", {}) and "token_kd" in output["data"]["text/markdown"]
               for output in outputs)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert {run["model"] for run in report["evaluation"]["runs"]} == {"teacher", "sft", "token_kd", "sad", "cot"}


def test_alfworld_real_model_notebook_runs_with_a_tiny_gguf_teacher(tmp_path, monkeypatch):
    from gguf_files import write_llama_gguf

    from trl_agent_distill.agent import EnvironmentAgent, PolicyBackend
    from trl_agent_distill.envs import load_environment
    from trl_agent_distill.tiny import build_tiny_model, train_tokenizer

    monkeypatch.setenv("TRL_AGENT_DISTILL_CACHE", str(tmp_path / "cache"))  # the kernel inherits it
    scenes = {"num_train": 1, "num_test": 1, "seed": 0, "task_types": ["pick_and_place_simple"],
              "scenes_dir": str(tmp_path / "scenes")}
    # A tiny stand-in for SmolLM2, as a GGUF file, whose tokenizer knows ALFWorld's words (short sequences, so it
    # learns its one kitchen in seconds).
    suite = load_environment("alfworld", scenes)
    (episode,) = EnvironmentAgent(suite, max_steps=20).run(PolicyBackend(suite.expert()), suite.tasks("train"))
    tokenizer = train_tokenizer([message["content"] for message in episode.messages], vocab_size=700)
    teacher = write_llama_gguf(build_tiny_model(tokenizer, hidden_size=64, num_layers=3, seed=0), tokenizer,
                               tmp_path / "teacher.gguf")
    notebook = execute("03_alfworld_real_model.ipynb", {
        "INSTALL": False, "OUTPUT_DIR": str(tmp_path / "run"), "TEACHER_MODEL": str(teacher),
        "SETTINGS": {"environment_options": scenes, "teacher_steps": 250, "learning_rate": 3e-3, "max_length": 2048,
                     "generate_tasks": 1, "student_steps": 1, "student_seeds": [0, 1], "per_device_train_batch_size": 1,
                     "max_agent_steps": 20, "max_new_tokens": 48, "self_consistency": 2, "batch_size": 2,
                     "show_progress": False},
    }, tmp_path)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.output_type == "error"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # Two seeds per method: a mean and a 95% interval for each method and setting.
    assert {(row["method"], row["seeds"]) for row in report["over_seeds"]} == {
        (method, 2) for method in ("sft", "token_kd", "sad")}
    assert all(row["interval"] is not None for row in report["over_seeds"])
