"""Tiny local tokenizer / models / toy data: offsets, chat template, model construction, pair writing."""

import contextlib
import io
import json
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, Qwen2ForCausalLM

from trl_agent_distill.tiny import (
    CHATML_TEMPLATE,
    build_tiny_model,
    prepare_toy_pair,
    toy_texts,
    toy_trajectories,
    train_tokenizer,
    write_tiny_pair,
)

PAIR_TEXTS = ["Thought: search.\nCode:\n```py\nprint(web_search(query='Velmora'))\n```<end_code>"] * 3
SMALL_TEACHER = {"hidden_size": 32, "num_layers": 1, "num_heads": 2}
SMALL_STUDENT = {"hidden_size": 16, "num_layers": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(toy_texts(), vocab_size=512)


# ------------------------------------------------------------------------------------------------ tokenizer
def test_offsets_tile_the_original_text(tokenizer):
    text = "  Thought: two leading spaces\n\n\tthen a tab<|im_start|>user\n   indented\nCode:\n```py\nx = 1\n```  \n"
    encoding = tokenizer(text, return_offsets_mapping=True)
    pieces = [text[start:end] for start, end in encoding["offset_mapping"]]
    assert "".join(pieces) == text  # contiguous, no gaps, no trimmed spaces
    assert "<|im_start|>" in pieces and "\n" in "".join(pieces[-3:])
    assert tokenizer.decode(encoding["input_ids"]) == text


def test_any_text_encodes_without_unknown_tokens(tokenizer):
    text = "Zürich → 東京 😀 \x00 tab\tend"
    assert tokenizer.unk_token is None
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_special_tokens(tokenizer):
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token is None  # like Qwen2.5: no BOS is prepended
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert tokenizer(token, add_special_tokens=True)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(tokenizer.all_special_tokens)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert len(tokenizer) <= 512


def test_training_is_deterministic():
    first, second = train_tokenizer(toy_texts(), vocab_size=400), train_tokenizer(toy_texts(), vocab_size=400)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


# ---------------------------------------------------------------------------------------------- chat template
def test_template_renders_every_role_verbatim(tokenizer):
    messages = [
        {"role": "system", "content": "  sys with spaces  "},
        {"role": "user", "content": "\nNew task:\nQ?\n"},
        {"role": "assistant", "content": " Thought: x\n"},
        {"role": "tool", "content": "result\n\n"},
        {"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\n  sys with spaces  <|im_end|>\n"
        "<|im_start|>user\n\nNew task:\nQ?\n<|im_end|>\n"
        "<|im_start|>assistant\n Thought: x\n<|im_end|>\n"
        "<|im_start|>tool\nresult\n\n<|im_end|>\n"
        "<|im_start|>user\npart one, part two<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("Q?\n<|im_end|>\n<|im_start|>assistant\n")


def test_template_renders_tool_calls_after_content(tokenizer):
    messages = [
        {"role": "user", "content": "Find Velmora."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "web_search", "arguments": {"query": "Velmora ü"}}}],
        },
        {"role": "tool", "content": "Population 4,210."},
        {
            "role": "assistant",
            "content": "Two calls.",
            "tool_calls": [
                {"type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
                {"name": "b", "arguments": {}},
            ],
        },
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nFind Velmora.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "web_search", "arguments": {"query": "Velmora ü"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>tool\nPopulation 4,210.<|im_end|>\n"
        '<|im_start|>assistant\nTwo calls.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call><|im_end|>\n'
    )


def test_assistant_mask_covers_assistant_turns_and_their_end(tokenizer):
    messages = [
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Observation: 7"},
        {"role": "assistant", "content": "A2"},
    ]
    encoding = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    kept = [token for token, keep in zip(encoding["input_ids"], encoding["assistant_masks"]) if keep]
    assert tokenizer.decode(kept) == "A1<|im_end|>A2<|im_end|>"


# ------------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize(("family", "model_class"), [("llama", LlamaForCausalLM), ("qwen2", Qwen2ForCausalLM)])
def test_models_build_and_run(tokenizer, family, model_class):
    model = build_tiny_model(tokenizer, family=family, hidden_size=32, num_layers=2, num_heads=4)
    assert type(model) is model_class
    assert model.config.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = tokenizer("Thought: hello", return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_padded_vocab_is_allowed_and_smaller_is_not(tokenizer):
    model = build_tiny_model(tokenizer, family="qwen2", hidden_size=16, num_layers=1, vocab_size=len(tokenizer) + 37)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) + 37
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[-1] == len(tokenizer) + 37
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_tiny_model(tokenizer, vocab_size=len(tokenizer) - 1)


def test_unknown_family_lists_supported_ones(tokenizer):
    with pytest.raises(ValueError, match=r"'gpt2'.*\['llama', 'qwen2'\]"):
        build_tiny_model(tokenizer, family="gpt2")


def test_weights_depend_only_on_the_seed(tokenizer):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=5).state_dict()
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    second = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=5).state_dict()
    other = build_tiny_model(tokenizer, hidden_size=16, num_layers=1, seed=6).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


# -------------------------------------------------------------------------------------------------------- pairs
def _age_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            os.utime(os.path.join(root, name), (1_000_000, 1_000_000))


def _untouched(path):
    return os.stat(path).st_mtime == 1_000_000


def test_write_tiny_pair_is_idempotent(tmp_path):
    teacher_dir, student_dir = write_tiny_pair(tmp_path, PAIR_TEXTS, SMALL_TEACHER, SMALL_STUDENT, vocab_size=300)
    assert (teacher_dir, student_dir) == (str(tmp_path / "teacher"), str(tmp_path / "student"))
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert (teacher.config.hidden_size, student.config.hidden_size) == (32, 16)
    assert AutoTokenizer.from_pretrained(teacher_dir).get_vocab() == AutoTokenizer.from_pretrained(student_dir).get_vocab()
    assert not (tmp_path / "teacher" / "toy_sft.json").exists()

    _age_files(tmp_path)
    write_tiny_pair(tmp_path, PAIR_TEXTS, SMALL_TEACHER, SMALL_STUDENT, vocab_size=300)
    assert _untouched(tmp_path / "teacher" / "model.safetensors") and _untouched(tmp_path / "student" / "config.json")

    write_tiny_pair(tmp_path, PAIR_TEXTS, SMALL_TEACHER, SMALL_STUDENT, vocab_size=300, overwrite=True)
    assert not _untouched(tmp_path / "teacher" / "model.safetensors")

    _age_files(tmp_path)
    write_tiny_pair(tmp_path, PAIR_TEXTS, {**SMALL_TEACHER, "hidden_size": 48}, SMALL_STUDENT, vocab_size=300)
    assert not _untouched(tmp_path / "teacher" / "model.safetensors")  # other settings: rebuilt
    assert AutoModelForCausalLM.from_pretrained(teacher_dir).config.hidden_size == 48

    (tmp_path / "student" / "model.safetensors").unlink()
    write_tiny_pair(tmp_path, PAIR_TEXTS, {**SMALL_TEACHER, "hidden_size": 48}, SMALL_STUDENT, vocab_size=300)
    assert (tmp_path / "student" / "model.safetensors").is_file()  # half a pair: rebuilt


def test_prepare_toy_pair_fine_tunes_the_teacher(tmp_path):
    teacher_dir, student_dir = prepare_toy_pair(tmp_path, teacher_sft_steps=2)
    record = json.loads((tmp_path / "teacher" / "toy_sft.json").read_text())
    assert record["steps"] == 2 and len(record["losses"]) == 2
    assert all(loss > 0 for loss in record["losses"])
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert (teacher.config.hidden_size, teacher.config.num_hidden_layers) == (128, 4)
    assert (student.config.hidden_size, student.config.num_hidden_layers) == (64, 2)
    _age_files(tmp_path)
    prepare_toy_pair(tmp_path, teacher_sft_steps=2)
    assert _untouched(tmp_path / "teacher" / "model.safetensors")


# ------------------------------------------------------------------------------------------------------ toy data
STEP = re.compile(r"\AThought: [^\n]+\nCode:\n```py\n(?P<code>.+?)\n```<end_code>\Z", re.DOTALL)
OBSERVATION = re.compile(r"\AObservation:\nExecution logs:\n(?P<logs>.*)Last output from code snippet:\nNone\Z", re.DOTALL)


class _FinalAnswer(Exception):
    pass


def _run_step(code, state, search_results):
    """Execute one step's code as the agent would; web_search replays the logged results in order."""
    answers = []

    def final_answer(answer):
        answers.append(answer)
        raise _FinalAnswer

    state.update(web_search=lambda query: search_results.pop(0), final_answer=final_answer)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            exec(code, state)  # noqa: S102 - the toy trajectories' own code
        except _FinalAnswer:
            pass
    return printed.getvalue(), answers


def test_toy_trajectories_follow_the_smolagents_format_with_consistent_arithmetic():
    rows = toy_trajectories()
    assert 12 <= len(rows) <= 16 and set(rows.column_names) == {"messages", "task_id", "answer"}
    assert len(set(rows["task_id"])) == len(rows)
    for row in rows:
        messages = row["messages"]
        roles = [message["role"] for message in messages]
        assert roles[:2] == ["system", "user"] and roles[-1] == "assistant"
        assert roles[2:] == ["assistant", "user"] * ((len(roles) - 3) // 2) + ["assistant"]
        assert 2 <= roles.count("assistant") <= 3
        assert "web_search(query" in messages[0]["content"] and "final_answer(answer" in messages[0]["content"]
        assert messages[1]["content"].startswith("New task:\n")
        state, answers = {}, []
        for step, observation in zip(messages[2::2], messages[3::2] + [None]):
            code = STEP.match(step["content"])["code"]
            logs = OBSERVATION.match(observation["content"])["logs"] if observation else ""
            printed, answers = _run_step(code, state, logs.splitlines())
            assert printed == logs, (row["task_id"], code)
            assert bool(answers) == (observation is None)
        assert str(answers[0]) == row["answer"], row["task_id"]


def test_toy_texts_are_every_message():
    rows = toy_trajectories()
    texts = toy_texts()
    assert len(texts) == sum(len(row["messages"]) for row in rows)
    assert texts[1] == rows[0]["messages"][1]["content"]
