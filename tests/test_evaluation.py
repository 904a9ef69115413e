"""Evaluation: model references, settings grid, CoT answers, scores, resumable runs, adapters, endpoints, the CLI."""

import json
from pathlib import Path

import pytest
import yaml

from trl_agent_distill.agent import PolicyBackend, TransformersBackend
from trl_agent_distill.cli import run as cli_run
from trl_agent_distill.evaluation import (
    EvalConfig,
    ModelRef,
    Setting,
    evaluate,
    extract_cot_answer,
    settings_of,
)
from trl_agent_distill.storage import DirectoryInUseError, lock_directory
from trl_agent_distill.tasks import load_backend

from openai_server import FakeOpenAIServer

pytestmark = pytest.mark.timeout(240)

TASKS = [
    {"id": "a", "question": "What is 2 + 3?", "answer": "5"},
    {"id": "b", "question": "What is 10 * 4?", "answer": "40"},
    {"id": "c", "question": "What is the capital of Ardel?", "answer": "Velmora"},
]
ANSWERS = {"What is 2 + 3?": "5", "What is 10 * 4?": "40", "What is the capital of Ardel?": "'Velmora'"}


def code(body: str) -> str:
    return f"Thought: I compute it.\nCode:\n```py\n{body}\n```<end_code>"


def oracle(request):
    """Right in agent mode; in CoT mode it knows the arithmetic but not the invented capital."""
    question = request.messages[1]["content"].removeprefix("New task:\n")
    if request.messages[0]["content"].startswith("Answer the question"):
        guess = ANSWERS[question] if "capital" not in question else "Brannoch"
        replies = f"Let me think.\n<answer>{guess}</answer>"
    else:
        replies = code(f"final_answer({ANSWERS[question]})")
    return [replies] * request.sampling.n


def wrong_then_right(request):
    """Self-consistency candidates: the first is wrong, the majority is right."""
    question = request.messages[1]["content"].removeprefix("New task:\n")
    right = code(f"final_answer({ANSWERS[question]})")
    return [code("final_answer(-1)"), right, right][: request.sampling.n] if request.sampling.n > 1 else [code("final_answer(-1)")]


def write_tasks(tmp_path: Path, rows=TASKS) -> str:
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def make_config(tmp_path, **overrides) -> EvalConfig:
    options = dict(models=["good=oracle", "flaky=oracle"], dataset_name=write_tasks(tmp_path), dataset_split="test",
                   modes=["agent", "cot"], self_consistency=[0, 3], max_agent_steps=2, batch_size=2,
                   output_dir=str(tmp_path / "eval"), show_progress=False)
    return EvalConfig(**{**options, **overrides})


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    "entry, expected",
    [("Qwen/Qwen2.5-0.5B-Instruct", ModelRef("Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")),
     ("sad=outputs/student/", ModelRef("sad", "outputs/student/")),
     ("teacher=Qwen/Qwen2.5-7B@http://localhost:8000/v1",
      ModelRef("teacher", "Qwen/Qwen2.5-7B", "http://localhost:8000/v1")),
     ("Qwen/Qwen2.5-7B@http://h:1/v1?x=1", ModelRef("Qwen2.5-7B", "Qwen/Qwen2.5-7B", "http://h:1/v1?x=1"))],
)
def test_model_references(entry, expected):
    assert ModelRef.parse(entry) == expected


def test_settings_grid_and_config_checks(tmp_path):
    config = make_config(tmp_path, self_consistency=[0, 8, 0])
    assert [s.name for s in settings_of(config)] == ["agent-greedy", "agent-sc8", "cot"]
    assert Setting("cot").name == "cot"
    with pytest.raises(ValueError, match="No models"):
        make_config(tmp_path, models=[])
    with pytest.raises(ValueError, match="0 \\(greedy\\) or N >= 2"):
        make_config(tmp_path, self_consistency=[1])
    with pytest.raises(ValueError, match="judge_model and judge_base_url"):
        make_config(tmp_path, judge_model="x")


@pytest.mark.parametrize(
    "text, expected",
    [("so <answer> 42 </answer>", "42"), ("<answer>1</answer> no, <answer>2</answer>", "2"),
     (r"thus \boxed{\frac{1}{2}}", r"\frac{1}{2}"), ("I think 7", None)],
)
def test_cot_answer_extraction(text, expected):
    assert extract_cot_answer(text) == expected


def test_evaluate_grid_writes_predictions_summaries_and_a_table(tmp_path):
    config = make_config(tmp_path)
    report = evaluate(config, backends={"good": PolicyBackend(oracle), "flaky": PolicyBackend(wrong_then_right)})
    runs = {(row["model"], row["setting"]): row for row in report["runs"]}
    assert set(runs) == {(m, s) for m in ("good", "flaky") for s in ("agent-greedy", "agent-sc3", "cot")}
    assert runs["good", "agent-greedy"]["correct"] == 1.0 and runs["good", "agent-greedy"]["mean_steps"] == 1.0
    assert runs["good", "cot"]["correct"] == pytest.approx(2 / 3)  # tools matter for facts it cannot know
    assert runs["flaky", "agent-greedy"]["correct"] == 0.0
    assert runs["flaky", "agent-sc3"]["correct"] == 1.0  # the majority of candidates fixes it
    records = read_jsonl(Path(config.output_dir, "flaky", "agent-sc3", "predictions.jsonl"))
    assert all(r["votes"][0]["group_sizes"] == [2, 1] for r in records)
    first = {r["task_id"]: r for r in read_jsonl(Path(config.output_dir, "good", "cot", "predictions.jsonl"))}
    assert first["c"]["prediction"] == "Brannoch" and first["c"]["gold"] == "Velmora"
    assert first["c"]["scores"] == {"exact_match": 0.0, "f1": 0.0, "numeric": 0.0, "symbolic": 0.0, "correct": 0.0}
    assert first["a"]["messages"][-1]["content"].endswith("<answer>5</answer>")
    table = Path(config.output_dir, "results.md").read_text().splitlines()
    assert len(table) == 2 + 6 and "| flaky | agent-sc3 | 3 | 100.0% |" in "\n".join(table)
    assert json.loads(Path(config.output_dir, "summary.json").read_text()) == report


def test_evaluation_resumes_and_refuses_changed_settings(tmp_path):
    calls = []

    def counting(request):
        calls.append(request.messages[1]["content"])
        return oracle(request)

    config = make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0])
    evaluate(config, backends={"good": PolicyBackend(counting)})
    path = Path(config.output_dir, "good", "agent-greedy", "predictions.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:1]) + "\n" + lines[1][:20])  # killed while writing the second record
    calls.clear()
    report = evaluate(config, backends={"good": PolicyBackend(counting)})
    assert len(calls) == 2 and report["runs"][0]["this_run"]["episodes"] == 2
    assert sorted(r["task_id"] for r in read_jsonl(path)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="max_agent_steps: 2 -> 3"):
        evaluate(make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0], max_agent_steps=3),
                 backends={"good": PolicyBackend(counting)})


def test_a_run_config_emptied_by_a_kill_is_named_with_what_to_do(tmp_path):
    config = make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0])
    evaluate(config, backends={"good": PolicyBackend(oracle)})
    Path(config.output_dir, "good", "agent-greedy", "run_config.json").write_text("")  # a kill while writing it
    with pytest.raises(ValueError, match=r"agent-greedy/run_config.json is empty: a run was killed while writing it"):
        evaluate(config, backends={"good": PolicyBackend(oracle)})


def test_a_model_retrained_at_the_same_path_is_not_resumed(tmp_path, tiny_model_dir, make_model):
    model_dir = tiny_model_dir("student")
    config = make_config(tmp_path, models=[f"student={model_dir}"], modes=["agent"], self_consistency=[0])
    evaluate(config, backends={"student": PolicyBackend(oracle)})
    evaluate(config, backends={"student": PolicyBackend(oracle)})  # the same model resumes
    make_model("student", hidden_size=32, num_layers=1, seed=7).save_pretrained(model_dir)  # retrained
    with pytest.raises(ValueError, match=r"other settings \(model_files: '[0-9a-f]+' -> '[0-9a-f]+'\)"):
        evaluate(config, backends={"student": PolicyBackend(oracle)})


def test_a_task_changed_in_the_task_file_is_not_resumed(tmp_path):
    config = make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0])
    evaluate(config, backends={"good": PolicyBackend(oracle)})
    write_tasks(tmp_path, [*TASKS[:2], {**TASKS[2], "answer": "Brannoch"}])
    with pytest.raises(ValueError, match=r"Task 'c' changed since .*predictions.jsonl.*answer was 'Velmora'"):
        evaluate(config, backends={"good": PolicyBackend(oracle)})


def test_a_second_evaluation_on_the_same_directory_is_refused(tmp_path):
    config = make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0])
    with lock_directory(config.output_dir, "eval"):
        with pytest.raises(DirectoryInUseError, match=r"eval.* in use by another `eval` run"):
            evaluate(config, backends={"good": PolicyBackend(oracle)})
    evaluate(config, backends={"good": PolicyBackend(oracle)})


def test_missing_fields_fail_before_any_model_loads(tmp_path):
    config = make_config(tmp_path, models=["/no/such/model"], answer_field="gold")
    with pytest.raises(ValueError, match="tasks.jsonl has no column 'gold' \\(answer_field\\)"):
        evaluate(config)


def test_a_crashing_sandbox_is_recorded_and_the_evaluation_goes_on(tmp_path):
    def policy(request):
        question = request.messages[1]["content"]
        if "capital" in question and sum(m["role"] == "assistant" for m in request.messages) == 0:
            return code("x = ' ' * (8 * 1024 ** 3)")
        return oracle(request)

    config = make_config(tmp_path, models=["good=oracle"], modes=["agent"], self_consistency=[0], max_agent_steps=3,
                         sandbox_timeout=5.0)
    report = evaluate(config, backends={"good": PolicyBackend(policy)})
    records = {r["task_id"]: r for r in read_jsonl(Path(config.output_dir, "good", "agent-greedy", "predictions.jsonl"))}
    assert records["c"]["tool_errors"] == 1 and "MemoryError" in records["c"]["errors"][0]
    assert report["runs"][0]["correct"] == 1.0  # the episode recovered at its next step, the others were unaffected


def test_models_from_directories_adapters_in_4bit_and_endpoints(tmp_path, tiny_tokenizer, make_model, tiny_model_dir):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir = tiny_model_dir("base", hidden_size=64)  # bitsandbytes' CPU kernels need 4-bit layers this wide
    adapter_dir = tmp_path / "adapter"
    lora = get_peft_model(make_model("student", hidden_size=64, num_layers=1),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.peft_config["default"].base_model_name_or_path = str(base_dir)
    lora.save_pretrained(adapter_dir)

    config = make_config(tmp_path, models=[str(adapter_dir)], load_in_4bit=True, dtype="float32",
                         max_new_tokens=6, cot_max_new_tokens=6)
    backend = load_backend(str(adapter_dir), config)
    assert isinstance(backend.model, PeftModel)
    assert type(backend.model.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"

    server = FakeOpenAIServer(TransformersBackend(make_model("student", hidden_size=32, num_layers=1), tiny_tokenizer))
    try:
        config = make_config(
            tmp_path, models=[f"local={base_dir}", f"adapter={adapter_dir}", f"served=tiny-teacher@{server.base_url}"],
            modes=["agent", "cot"], self_consistency=[0], max_agent_steps=1, max_new_tokens=6, cot_max_new_tokens=6,
            judge_model="tiny-teacher", judge_base_url=server.base_url, load_in_4bit=False,
        )
        report = evaluate(config)
    finally:
        server.stop()
    assert [(r["model"], r["setting"]) for r in report["runs"]] == [
        (m, s) for m in ("local", "adapter", "served") for s in ("agent-greedy", "cot")
    ]
    for row in report["runs"]:
        assert row["examples"] == 3 and 0.0 <= row["judge"] <= 1.0
        assert row["stop_reasons"].keys() <= {"max_steps", "final_answer"}
    assert "judge" in Path(config.output_dir, "results.md").read_text().splitlines()[0]


def test_eval_command_runs_a_recipe(tmp_path, tiny_model_dir, capsys):
    model_dir = tiny_model_dir("student")
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(yaml.safe_dump({
        "models": [f"student={model_dir}"], "modes": ["agent", "cot"], "self_consistency": [0, 2],
        "dataset_name": write_tasks(tmp_path), "dataset_split": "test", "max_agent_steps": 1, "max_new_tokens": 6,
        "cot_max_new_tokens": 6, "output_dir": str(tmp_path / "eval"), "show_progress": False,
    }))
    report = cli_run(["eval", "--config", str(recipe)])
    assert [row["setting"] for row in report["runs"]] == ["agent-greedy", "agent-sc2", "cot"]
    assert "| student | agent-sc2 | 3 |" in capsys.readouterr().out
    recipe.write_text(yaml.safe_dump({"models": [str(model_dir)], "self_consistensy": [0]}))
    with pytest.raises(ValueError, match="unknown key 'self_consistensy'. Did you mean 'self_consistency'"):
        cli_run(["eval", "--config", str(recipe)])


def test_task_sets_are_scored_as_the_paper_scores_them():
    from trl_agent_distill.agent import Task
    from trl_agent_distill.evaluation import answer_scores

    musique = EvalConfig(task_set="musique", models=["m"])
    task = Task("1", "Where?", answer="Denver", aliases=("Mile High City",))
    assert answer_scores("the Mile High City", task, musique)["correct"] == 1.0  # an alias, exactly
    assert answer_scores("Denver Colorado USA", task, musique)["correct"] == 0.0  # F1 > 0 is not correct
    math = EvalConfig(task_set="math500", models=["m"])
    half = Task("2", "x?", answer="\\frac{1}{2}")
    assert answer_scores("\\boxed{0.5}", half, math)["correct"] == 1.0
    assert answer_scores("\\boxed{\\frac{1}{3}}", half, math)["correct"] == 0.0
