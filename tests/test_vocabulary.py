"""The teacher's tokenizer is compared with the student's, not only the vocabulary sizes."""

import copy
import json
import logging

import pytest
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.tiny import build_tiny_model, toy_texts, train_tokenizer
from trl_agent_distill.vocabulary import added_tokens_appended, tokenizer_mismatch


@pytest.fixture(scope="module")
def foreign_tokenizer(tiny_tokenizer):
    """Another tokenizer of exactly the student's size: trained on other text, so most ids mean other tokens."""
    tokenizer = train_tokenizer([text.upper() for text in toy_texts()], vocab_size=len(tiny_tokenizer))
    assert len(tokenizer) == len(tiny_tokenizer)
    return tokenizer


def args(tmp_path, **overrides):
    return AgentDistillConfig(
        output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to="none",
        use_cpu=True, save_strategy="no", max_length=1024, disable_tqdm=True, **overrides,
    )


def save_teacher(directory, tokenizer, **model_overrides):
    build_tiny_model(tokenizer, hidden_size=32, num_layers=1, seed=1, **model_overrides).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def fewer_merges(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """The same vocabulary with its last merges dropped: the same ids, another way of splitting text."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["model"]["merges"] = state["model"]["merges"][:-200]
    clone = copy.deepcopy(tokenizer)
    clone._tokenizer = type(tokenizer.backend_tokenizer).from_str(json.dumps(state))
    return clone


@pytest.mark.parametrize("given_as", ["name", "loaded model"])
def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(
    tmp_path, make_model, tiny_tokenizer, toy_dataset, foreign_tokenizer, given_as
):
    teacher = save_teacher(tmp_path / "foreign", foreign_tokenizer)
    if given_as == "loaded model":
        teacher = AutoModelForCausalLM.from_pretrained(teacher)
    with pytest.raises(ValueError) as error:
        AgentDistillTrainer(
            model=make_model("student"), teacher_model=teacher, args=args(tmp_path), train_dataset=toy_dataset,
            processing_class=tiny_tokenizer,
        )
    message = str(error.value)
    assert f"teacher's tokenizer ({tmp_path / 'foreign'})" in message
    assert "tokens differ" in message and "trl.experimental.gold" in message


def test_same_tokenizer_with_a_padded_teacher_vocabulary_passes(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    teacher = save_teacher(tmp_path / "padded", tiny_tokenizer, vocab_size=len(tiny_tokenizer) + 64)
    trainer = AgentDistillTrainer(
        model=make_model("student"), teacher_model=teacher, args=args(tmp_path), train_dataset=toy_dataset,
        processing_class=tiny_tokenizer,
    )
    assert trainer._shared_vocab_size == len(tiny_tokenizer)
    assert trainer.teacher_model.config.vocab_size == len(tiny_tokenizer) + 64


def test_same_vocabulary_with_other_merges_is_refused(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    teacher = save_teacher(tmp_path / "merges", fewer_merges(tiny_tokenizer))
    with pytest.raises(ValueError, match=r"vocabularies agree but they split the same text differently.*GOLD"):
        AgentDistillTrainer(
            model=make_model("student"), teacher_model=teacher, args=args(tmp_path), train_dataset=toy_dataset,
            processing_class=tiny_tokenizer,
        )


def test_a_teacher_object_without_a_tokenizer_is_checked_by_size_with_a_warning(
    tmp_path, make_model, tiny_tokenizer, toy_dataset, caplog
):
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.trainer"):
        AgentDistillTrainer(
            model=make_model("student"), teacher_model=make_model("teacher"), args=args(tmp_path),
            train_dataset=toy_dataset, processing_class=tiny_tokenizer,
        )
    assert "only vocabulary sizes are checked" in caplog.text and "by name or path" in caplog.text


def test_mismatch_details(tiny_tokenizer, foreign_tokenizer):
    assert tokenizer_mismatch(tiny_tokenizer, copy.deepcopy(tiny_tokenizer)) is None
    foreign = tokenizer_mismatch(tiny_tokenizer, foreign_tokenizer)
    assert foreign.startswith(f"{foreign.split()[0]} of the student's {len(tiny_tokenizer)} tokens differ")
    # A token the student appended (a new pad token) collides with nothing of the teacher's: a warning, not an error.
    with_pad = copy.deepcopy(tiny_tokenizer)
    with_pad.add_special_tokens({"pad_token": "<|pad|>"})
    assert tokenizer_mismatch(with_pad, tiny_tokenizer) is None
    assert added_tokens_appended(with_pad, tiny_tokenizer) == ["<|pad|>"]
    # One merge fewer: the last token of the larger one is missing from the smaller one's vocabulary.
    larger, smaller = (train_tokenizer(toy_texts(), vocab_size=size) for size in (300, 299))
    last = larger.convert_ids_to_tokens(299)
    assert tokenizer_mismatch(larger, smaller) == (
        f"1 of the student's 300 tokens differ ({last!r} is id 299 in the student's, absent in the teacher's); the "
        "teacher's tokenizer has 299 tokens"
    )
