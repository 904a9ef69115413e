import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.student_init import RECORD_FILE, init_student, layers_to_keep, pruned_config, spread_layers

FAMILIES = ["llama", "qwen2"]


@pytest.fixture
def teacher_dir(tmp_path, make_model, tiny_tokenizer):
    """A saved four-layer tiny teacher of a model family, with its tokenizer."""

    def save(family: str):
        directory = tmp_path / f"teacher-{family}"
        make_model("teacher", family=family, num_layers=4).save_pretrained(directory)
        tiny_tokenizer.save_pretrained(directory)
        return directory

    return save


def logits(model, tokenizer, text: str = "Thought: I should search Varnholt.\nAction: Search[Varnholt]"):
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_the_default_spread_keeps_the_first_and_last_layers_evenly_in_between():
    assert spread_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert spread_layers(12, 3) == [0, 6, 11] and spread_layers(4, 4) == [0, 1, 2, 3] and spread_layers(5, 1) == [0]
    for layers in range(1, 20):
        for count in range(1, layers + 1):
            kept = spread_layers(layers, count)
            assert len(set(kept)) == count and kept == sorted(kept) and kept[-1] == (layers - 1 if count > 1 else 0)
    assert layers_to_keep(30, fraction=1 / 3) == spread_layers(30, 10)
    assert layers_to_keep(4, fraction=0.01) == [0]  # at least one layer
    assert layers_to_keep(12, keep_layers=[0, 5, 11]) == [0, 5, 11]


@pytest.mark.parametrize(
    "keep_layers, fraction, message",
    [
        ([0, 1, 2, 3, 4], None, r"asks for 5 layers but the teacher has 4: a student cannot have more layers"),
        (None, 1.5, r"fraction must be in \(0, 1\].*cannot have more layers than its teacher"),
        (None, 0.0, r"fraction must be in \(0, 1\]"),
        ([0, 4], None, r"keep_layers has \[4\], outside the teacher's layers 0\.\.3"),
        ([-1, 2], None, r"keep_layers has \[-1\], outside"),
        ([1, 1, 2], None, r"keep_layers repeats \[1\]"),
        ([2, 0], None, r"not in increasing order.*give \[0, 2\]"),
        ([], None, r"keep_layers is empty"),
        (None, None, r"Give either keep_layers .* or fraction"),
        ([0], 0.5, r"Give either keep_layers .* or fraction"),
    ],
)
def test_bad_layer_choices_are_refused(keep_layers, fraction, message):
    with pytest.raises(ValueError, match=message):
        layers_to_keep(4, keep_layers, fraction)


def test_per_layer_config_lists_follow_the_kept_layers():
    types = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                         num_key_value_heads=2, num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                         layer_types=types)
    config.eos_token_id = [1, 2, 3, 4]  # as many entries as layers, but not one per layer
    student = pruned_config(config, [0, 3])
    assert student.num_hidden_layers == 2 and student.layer_types == ["full_attention", "sliding_attention"]
    assert student.eos_token_id == [1, 2, 3, 4]
    assert config.num_hidden_layers == 4 and config.layer_types == types  # the teacher's config is left alone
    AutoModelForCausalLM.from_config(student)  # a consistent config: the model builds


@pytest.mark.parametrize("family", FAMILIES)
def test_a_student_keeping_every_layer_computes_the_teachers_logits(tmp_path, teacher_dir, family):
    teacher = teacher_dir(family)
    student = init_student(teacher, tmp_path / "student", fraction=1.0)
    tokenizer = AutoTokenizer.from_pretrained(student)
    expected = logits(AutoModelForCausalLM.from_pretrained(teacher), tokenizer)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(student), tokenizer), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_student_holds_the_teachers_kept_layers_and_tokenizer(tmp_path, teacher_dir, family):
    teacher_path = teacher_dir(family)
    student_path = init_student(teacher_path, tmp_path / "student", keep_layers=[0, 2, 3])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path)
    student = AutoModelForCausalLM.from_pretrained(student_path)
    assert student.config.num_hidden_layers == 3 and type(student) is type(teacher)
    if family == "qwen2":
        assert len(student.config.layer_types) == 3
    for student_index, teacher_index in enumerate([0, 2, 3]):
        kept, original = student.model.layers[student_index].state_dict(), teacher.model.layers[teacher_index].state_dict()
        assert kept.keys() == original.keys()
        assert all(torch.equal(kept[name], original[name]) for name in kept)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
    assert student.num_parameters() < teacher.num_parameters()
    assert AutoTokenizer.from_pretrained(student_path).get_vocab() == AutoTokenizer.from_pretrained(teacher_path).get_vocab()
    record = json.loads((student_path / RECORD_FILE).read_text())
    assert record == {"teacher": str(teacher_path), "teacher_layers": 4, "kept_layers": [0, 2, 3]}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_pruned_student_distills_from_its_teacher(tmp_path, teacher_dir, toy_dataset, family):
    teacher = teacher_dir(family)
    student = init_student(teacher, tmp_path / "student", fraction=0.5)
    before = AutoModelForCausalLM.from_pretrained(student).model.layers[0].mlp.up_proj.weight
    args = AgentDistillConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                              learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                              max_length=512, disable_tqdm=True, teacher_model_name_or_path=str(teacher))
    trainer = AgentDistillTrainer(model=str(student), args=args, train_dataset=toy_dataset.select(range(2)))
    trainer.train()
    assert [entry for entry in trainer.state.log_history if "loss_act" in entry]
    assert not torch.equal(trainer.model.model.layers[0].mlp.up_proj.weight.detach(), before)


def test_a_student_of_a_gguf_teacher_keeps_its_layers(tmp_path, make_model, tiny_tokenizer, monkeypatch):
    from gguf_files import write_llama_gguf

    monkeypatch.setenv("TRL_AGENT_DISTILL_CACHE", str(tmp_path / "cache"))
    teacher = make_model("teacher", num_layers=4)
    student_path = init_student(write_llama_gguf(teacher, tiny_tokenizer, tmp_path / "teacher.gguf"),
                                tmp_path / "student", fraction=0.5)
    student = AutoModelForCausalLM.from_pretrained(student_path)
    assert json.loads((student_path / RECORD_FILE).read_text())["kept_layers"] == [0, 3]
    for name, tensor in student.model.layers[1].state_dict().items():
        assert torch.allclose(tensor, teacher.model.layers[3].state_dict()[name], atol=1e-6)
    assert AutoTokenizer.from_pretrained(student_path).chat_template == tiny_tokenizer.chat_template


def test_an_unsupported_architecture_is_named(tmp_path, tiny_tokenizer):
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"Cannot prune the layers of a GPT2LMHeadModel \(gpt2\)"):
        init_student(tmp_path / "gpt2", tmp_path / "student", keep_layers=[0])
    assert not (tmp_path / "student").exists()


def test_a_student_folder_in_use_is_not_replaced_unless_asked(tmp_path, teacher_dir):
    teacher = teacher_dir("llama")
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"output_dir .*student is not empty.*overwrite"):
        init_student(teacher, tmp_path / "student", keep_layers=[0])
    with pytest.raises(ValueError, match="is the teacher's own folder"):
        init_student(teacher, teacher, keep_layers=[0], overwrite=True)
    init_student(teacher, tmp_path / "student", keep_layers=[0], overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "student").config.num_hidden_layers == 1
    assert not (tmp_path / "student" / "notes.txt").exists()
