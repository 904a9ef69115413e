"""Datasets are encoded once with `dataset.map` (cached), and the dataset-level decisions that encoding takes."""

import json
import logging

import datasets
import pytest
import torch

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer
from trl_agent_distill.collator import ACT, ENCODED_COLUMNS, REASON, AgentTrajectoryCollator
from trl_agent_distill.encoding import encode_dataset, trained_token_counts
from trl_agent_distill.segmentation import TrajectoryFormatError

from test_collator import CODEACT_ROW, REACT_ROW

# Plain chat as in GKD's examples: no Thought: / Action: / Code: anywhere.
CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris is the capital of France."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
                  {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And times three?"},
                  {"role": "assistant", "content": "Twelve."}]},
]


def make_args(tmp_path, **overrides):
    defaults = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1, report_to="none",
                    use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=1024)
    return AgentDistillConfig(**{**defaults, **overrides})


def on_disk(tmp_path, rows, name="rows"):
    """A dataset read from a JSON-lines file, as `load_dataset` gives it: backed by files, so `map` caches."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))


@pytest.fixture
def count_encodes(monkeypatch):
    """A list that grows by one for every row `AgentTrajectoryCollator.encode` tokenizes from then on."""
    calls, encode = [], AgentTrajectoryCollator.encode

    def counting(self, row, *args, **kwargs):
        calls.append(1)
        return encode(self, row, *args, **kwargs)

    monkeypatch.setattr(AgentTrajectoryCollator, "encode", counting)
    return calls


def test_encoded_rows_collate_to_the_same_batch_as_raw_rows(tiny_tokenizer, toy_dataset):
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=512)
    encoded, report = encode_dataset(toy_dataset, collator)
    assert encoded.column_names == list(ENCODED_COLUMNS) and report.rows == len(toy_dataset)
    raw, done = collator([toy_dataset[0], toy_dataset[3]]), collator([encoded[0], encoded[3]])
    assert raw.keys() == done.keys()
    for key in raw:
        assert torch.equal(raw[key], done[key]), key
    counts = trained_token_counts(encoded)
    assert counts.tolist() == [int((collator([row])["labels"][0, 1:] != -100).sum()) for row in toy_dataset]


def test_the_trainer_encodes_each_row_once_and_a_second_run_not_at_all(
    tmp_path, make_model, tiny_tokenizer, toy_dataset, count_encodes
):
    rows = on_disk(tmp_path, toy_dataset.to_list())

    def trainer():
        return AgentDistillTrainer(model=make_model("student"), teacher_model=make_model("teacher"),
                                   args=make_args(tmp_path, max_steps=2), train_dataset=rows,
                                   processing_class=tiny_tokenizer)

    first = trainer()
    assert len(count_encodes) == len(rows)
    first.train()  # batches are padded from the encoded columns: no row is encoded again
    assert len(count_encodes) == len(rows)
    count_encodes.clear()
    second = trainer()  # same data, same settings: the map's cache file is read back
    assert count_encodes == []
    assert second.train_dataset["input_ids"] == first.train_dataset["input_ids"]
    assert any(path.name.startswith("cache-") for path in (tmp_path / "cache").rglob("*.arrow"))


def test_dataset_num_proc_encodes_in_processes_with_the_same_result(tiny_tokenizer, toy_dataset):
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=512)
    alone, _ = encode_dataset(toy_dataset, collator)
    shared, _ = encode_dataset(toy_dataset, collator, num_proc=2)
    assert shared.to_list() == alone.to_list()


def test_malformed_rows_raise_naming_row_and_message_or_are_skipped_and_counted(tmp_path, tiny_tokenizer, caplog):
    unclosed = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Code:\n```py\nx = 1"}]}
    rows = datasets.Dataset.from_list([CODEACT_ROW, unclosed, CODEACT_ROW])
    with pytest.raises(TrajectoryFormatError) as error:
        encode_dataset(rows, AgentTrajectoryCollator(tiny_tokenizer))
    assert (error.value.row_index, error.value.message_index) == (1, 1)
    assert "unclosed code fence" in str(error.value) and "on_malformed='skip'" in str(error.value)
    with caplog.at_level(logging.WARNING):
        encoded, report = encode_dataset(rows, AgentTrajectoryCollator(tiny_tokenizer, on_malformed="skip"))
    assert len(encoded) == report.rows == 2 and report.malformed_skipped == 1
    assert "row 1, message 1" in caplog.text and "Dropped 1 malformed rows of 3" in caplog.text


def test_auto_falls_back_to_token_level_when_no_row_has_markers(tmp_path, make_model, tiny_tokenizer, caplog):
    rows = datasets.Dataset.from_list(CHAT_ROWS)
    with caplog.at_level(logging.WARNING):
        encoded, report = encode_dataset(rows, AgentTrajectoryCollator(tiny_tokenizer))
    assert report.fell_back and caplog.text.count("falls back to token-level distillation") == 1
    batch = AgentTrajectoryCollator(tiny_tokenizer)([encoded[0], encoded[1]])
    none = AgentTrajectoryCollator(tiny_tokenizer, style="none")(CHAT_ROWS)
    assert batch["reason_mask"].sum() == 0 and torch.equal(batch["act_mask"], none["act_mask"])
    trained = tiny_tokenizer.decode(batch["input_ids"][1][batch["act_mask"][1].bool()])
    assert trained == "Four.<|im_end|>Twelve.<|im_end|>"  # every assistant token, nothing the user wrote
    # The trainer runs such a dataset (GKD's kind of data) with the default settings, token-level throughout.
    trainer = AgentDistillTrainer(model=make_model("student"), teacher_model=make_model("teacher"),
                                  args=make_args(tmp_path), train_dataset=rows, processing_class=tiny_tokenizer)
    assert trainer.data_collator.style == "none"
    trainer.train()


def test_auto_on_a_mix_of_marked_and_unmarked_rows_still_raises_naming_the_row(tiny_tokenizer):
    rows = datasets.Dataset.from_list([CODEACT_ROW, CHAT_ROWS[0], CODEACT_ROW])
    with pytest.raises(TrajectoryFormatError, match="no recognisable step") as error:
        encode_dataset(rows, AgentTrajectoryCollator(tiny_tokenizer))
    assert (error.value.row_index, error.value.message_index) == (1, 1)
    assert "row 0 and others have agent step markers" in str(error.value)
    encoded, report = encode_dataset(rows, AgentTrajectoryCollator(tiny_tokenizer, on_malformed="skip"))
    assert (len(encoded), report.malformed_skipped, report.style) == (2, 1, "auto")


def test_the_prompt_of_a_conversation_is_its_history_before_the_last_assistant_turn(tiny_tokenizer):
    collator = AgentTrajectoryCollator(tiny_tokenizer)
    (conversation,), (text,) = (encode_dataset(datasets.Dataset.from_list([row]), collator)[0] for row in (CODEACT_ROW, REACT_ROW))
    history = tiny_tokenizer.apply_chat_template(CODEACT_ROW["messages"][:4], tokenize=False, add_generation_prompt=True)
    assert tiny_tokenizer.decode(conversation["input_ids"][: conversation["prompt_length"]]) == history
    assert tiny_tokenizer.decode(text["input_ids"][: text["prompt_length"]]) == REACT_ROW["prompt"]


def test_a_history_the_template_renders_otherwise_ends_before_the_last_turns_first_trained_token(tiny_tokenizer):
    import copy

    thinking = copy.deepcopy(tiny_tokenizer)  # a generation prompt that opens a think block, as Qwen3's can
    generation_prompt = "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n"
    assert tiny_tokenizer.chat_template.count(generation_prompt) == 1
    thinking.chat_template = tiny_tokenizer.chat_template.replace(generation_prompt, generation_prompt + "<think>\\n")
    assert thinking.chat_template != tiny_tokenizer.chat_template
    encoded = AgentTrajectoryCollator(thinking).encode(CODEACT_ROW)
    history = thinking.apply_chat_template(CODEACT_ROW["messages"][:4], tokenize=False, add_generation_prompt=True)
    full = thinking.apply_chat_template(CODEACT_ROW["messages"], tokenize=False)
    assert history.endswith("<think>\n") and not full.startswith(history)
    prompt = thinking.decode(encoded.input_ids[: encoded.prompt_length])
    assert prompt == history[: -len("<think>\n")]  # everything up to the last assistant turn's content
    assert encoded.kinds[encoded.prompt_length] in (REASON, ACT) and encoded.kinds[encoded.prompt_length - 1] == 0


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_truncation_mode_is_honoured(tiny_tokenizer, mode):
    full = AgentTrajectoryCollator(tiny_tokenizer, max_length=None).encode(CODEACT_ROW)
    cut = AgentTrajectoryCollator(tiny_tokenizer, max_length=60, truncation_mode=mode).encode(CODEACT_ROW)
    assert cut.full_length == len(full.input_ids) and len(cut.input_ids) == 60
    kept = slice(None, 60) if mode == "keep_start" else slice(-60, None)
    assert cut.input_ids == full.input_ids[kept] and cut.kinds == full.kinds[kept]
    if mode == "keep_end":  # the prompt loses what was cut from its start
        assert cut.prompt_length == full.prompt_length - (len(full.input_ids) - 60)


def test_a_max_length_that_cuts_every_trained_token_fails_before_any_model_loads(tmp_path, tiny_tokenizer, caplog):
    rows = datasets.Dataset.from_list([CODEACT_ROW, CODEACT_ROW])
    args = make_args(tmp_path, max_length=20, lambda_reason=0.0, lambda_act=0.0, lambda_ce=1.0)
    with pytest.raises(ValueError, match="no trained token after encoding.*max_length=20"):
        AgentDistillTrainer(model=str(tmp_path / "no-model-here"), args=args, train_dataset=rows,
                            processing_class=tiny_tokenizer)
    # keep_end keeps the last turns, which are trained; a row left without trained tokens is dropped, with a warning
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=20, truncation_mode="keep_end")
    assert trained_token_counts(encode_dataset(rows, collator)[0]).min() > 0
    long_prompt = {"prompt": "Question: " + "very " * 200 + "long?\n", "text": REACT_ROW["text"]}
    fits = len(AgentTrajectoryCollator(tiny_tokenizer, max_length=None).encode(REACT_ROW).input_ids)
    with caplog.at_level(logging.WARNING):
        encoded, report = encode_dataset(datasets.Dataset.from_list([REACT_ROW, long_prompt]),
                                         AgentTrajectoryCollator(tiny_tokenizer, max_length=fits))
    assert (len(encoded), report.untrained_dropped, report.truncated) == (1, 1, 1)
    assert f"1 rows of the train dataset have no trained token (1 of them cut to max_length={fits}" in caplog.text


def test_streaming_datasets_are_encoded_lazily_and_train(tmp_path, make_model, tiny_tokenizer, toy_dataset):
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=512)
    stream, report = encode_dataset(toy_dataset.to_iterable_dataset(), collator)
    assert report.rows is None and isinstance(stream, datasets.IterableDataset)
    expected, _ = encode_dataset(toy_dataset, collator)
    assert [{k: row[k] for k in ENCODED_COLUMNS} for row in stream] == expected.to_list()
    chat, report = encode_dataset(datasets.Dataset.from_list(CHAT_ROWS).to_iterable_dataset(), collator)
    assert report.fell_back and len(list(chat)) == 2
    trainer = AgentDistillTrainer(model=make_model("student"), teacher_model=make_model("teacher"),
                                  args=make_args(tmp_path, max_steps=2), train_dataset=toy_dataset.to_iterable_dataset(),
                                  processing_class=tiny_tokenizer)
    trainer.train()
    assert [entry for entry in trainer.state.log_history if "loss_act" in entry]


def test_completion_kinds_decode_once_however_long_the_completion(tiny_tokenizer, monkeypatch):
    collator = AgentTrajectoryCollator(tiny_tokenizer)
    text = "Thought: café, 東京 and 😀 first.\nCode:\n```py\nfinal_answer(3)\n```<end_code>\n" * 20 + "<|im_end|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    decoded = []
    for name in ("decode", "batch_decode"):
        original = getattr(tiny_tokenizer, name)
        monkeypatch.setattr(tiny_tokenizer, name, lambda *a, _o=original, **k: decoded.append(a[0]) or _o(*a, **k))
    kinds = collator.completion_kinds(ids)
    assert sum(len(x) for x in decoded) <= len(ids)  # decoding every prefix would cost len(ids)**2 / 2 tokens
    assert len(kinds) == len(ids) and kinds[-1] == ACT
    reason = tiny_tokenizer.decode([i for i, k in zip(ids, kinds) if k == REASON])
    act = tiny_tokenizer.decode([i for i, k in zip(ids, kinds) if k == ACT])
    assert reason.count("café, 東京 and 😀 first.") == 20 and "final_answer" not in reason
    assert act.count("final_answer(3)") == 20 and "東京" not in act
