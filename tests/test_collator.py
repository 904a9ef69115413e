import copy
import logging

import pytest
import torch

from trl_agent_distill.chat_template import end_of_turn_tokens
from trl_agent_distill.collator import ACT, REASON, AgentTrajectoryCollator
from trl_agent_distill.segmentation import TrajectoryFormatError

THOUGHT = "Thought: I need the population of Varnholt."
CODE = 'Code:\n```py\nresult = web_search("population of Varnholt")\nprint(result)\n```<end_code>'
OBSERVATION = "Observation:\nExecution logs:\nVarnholt has 4120 inhabitants.\nLast output from code snippet:\nNone"
FINAL = 'Thought: The answer is 4120.\nCode:\n```py\nfinal_answer(4120)\n```<end_code>'
CODEACT_ROW = {
    "messages": [
        {"role": "system", "content": "You are an agent. Tools: web_search(query), final_answer(answer)."},
        {"role": "user", "content": "How many people live in Varnholt?"},
        {"role": "assistant", "content": f"{THOUGHT}\n{CODE}"},
        {"role": "user", "content": OBSERVATION},
        {"role": "assistant", "content": FINAL},
    ]
}
REACT_ROW = {
    "prompt": "Question: Which town is larger, Varnholt or Ostmere?\n",
    "text": "Thought 1: I should search Varnholt.\nAction 1: Search[Varnholt]\n"
    "Observation 1: Varnholt has 4120 inhabitants.\nThought 2: Ostmere is smaller.\nAction 2: Finish[Varnholt]",
}


@pytest.fixture
def collator(tiny_tokenizer):
    return AgentTrajectoryCollator(tiny_tokenizer, max_length=512, style="auto")


def decode_where(tokenizer, batch, row, mask):
    ids = batch["input_ids"][row][batch[mask][row].bool()]
    return tokenizer.decode(ids)


def assert_invariants(batch):
    reason, act, labels = batch["reason_mask"], batch["act_mask"], batch["labels"]
    assert not (reason.bool() & act.bool()).any()
    assert torch.equal(labels == -100, (reason == 0) & (act == 0))
    assert torch.equal(labels[labels != -100], batch["input_ids"][labels != -100])
    assert not (labels[batch["attention_mask"] == 0] != -100).any()


def test_codeact_messages_train_every_assistant_turn_and_nothing_else(collator, tiny_tokenizer):
    batch = collator([CODEACT_ROW])
    assert_invariants(batch)
    reason_text = decode_where(tiny_tokenizer, batch, 0, "reason_mask")
    act_text = decode_where(tiny_tokenizer, batch, 0, "act_mask")
    assert "I need the population of Varnholt." in reason_text
    assert "The answer is 4120." in reason_text
    assert "web_search" not in reason_text and "final_answer" not in reason_text
    assert 'web_search("population of Varnholt")' in act_text and "final_answer(4120)" in act_text
    assert act_text.count("<end_code>") == 2
    # Both assistant turns end with a trained end-of-turn token; system, user and observation text is never trained.
    assert act_text.count("<|im_end|>") == 2
    trained_text = reason_text + act_text
    for untrained in ("You are an agent", "How many people", "4120 inhabitants", "Execution logs"):
        assert untrained not in trained_text


def test_end_of_turn_is_found_from_the_template(tiny_tokenizer):
    assert end_of_turn_tokens(tiny_tokenizer) == ["<|im_end|>"]


def test_text_rows_mask_prompt_and_observations(collator, tiny_tokenizer):
    batch = collator([REACT_ROW])
    assert_invariants(batch)
    reason_text = decode_where(tiny_tokenizer, batch, 0, "reason_mask")
    act_text = decode_where(tiny_tokenizer, batch, 0, "act_mask")
    assert "I should search Varnholt." in reason_text and "Ostmere is smaller." in reason_text
    assert "Search[Varnholt]" in act_text and "Finish[Varnholt]" in act_text
    assert act_text.endswith(tiny_tokenizer.eos_token)  # the student learns to stop
    assert "4120 inhabitants" not in reason_text + act_text
    assert "Question" not in reason_text + act_text


def test_padding_and_prompts(collator, tiny_tokenizer):
    batch = collator([CODEACT_ROW, REACT_ROW])
    assert_invariants(batch)
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == lengths.max()
    short = int(lengths.argmin())
    assert (batch["input_ids"][short, lengths[short] :] == collator.pad_token_id).all()
    prompts = []
    for row in range(2):
        prompt = batch["prompts"][row][batch["prompt_attention_mask"][row].bool()]
        assert torch.equal(prompt, batch["input_ids"][row, : len(prompt)])
        assert batch["prompt_attention_mask"][row, -1] == 1  # prompts are left-padded for generation
        prompts.append(tiny_tokenizer.decode(prompt))
    # As in GKD, a conversation's prompt is its history before the last assistant turn, with the generation prompt;
    # a text row's is its `prompt`.
    history = CODEACT_ROW["messages"][:4]
    assert prompts[0] == tiny_tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert prompts[1] == REACT_ROW["prompt"]


def test_truncation_warns_and_keeps_masks_aligned(tiny_tokenizer, caplog):
    full = AgentTrajectoryCollator(tiny_tokenizer, max_length=None)([CODEACT_ROW])
    short_collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=40)
    with caplog.at_level(logging.WARNING):
        short = short_collator([CODEACT_ROW])
    assert "max_length=40" in caplog.text
    assert short["input_ids"].shape[1] == 40 and short_collator.num_truncated == 1
    for key in ("input_ids", "labels", "reason_mask", "act_mask"):
        assert torch.equal(short[key][0], full[key][0, :40])


def test_tool_calls_and_their_end_of_turn_are_act(collator, tiny_tokenizer):
    call = {"type": "function", "function": {"name": "web_search", "arguments": {"query": "Varnholt"}}}
    row = {
        "messages": [
            {"role": "user", "content": "How many people live in Varnholt?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "Varnholt has 4120 inhabitants."},
            {"role": "assistant", "content": "Thought: done.\nCode:\n```py\nfinal_answer(4120)\n```<end_code>"},
        ]
    }
    batch = collator([row])
    assert_invariants(batch)
    act_text = decode_where(tiny_tokenizer, batch, 0, "act_mask")
    assert "<tool_call>" in act_text and "web_search" in act_text and "Varnholt" in act_text
    assert "4120 inhabitants" not in act_text
    assert act_text.count("<|im_end|>") == 2


def test_templates_that_trim_content_still_line_up(tiny_tokenizer):
    trimming = copy.deepcopy(tiny_tokenizer)
    trimming.chat_template = tiny_tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    assert "trim" in trimming.chat_template
    row = {"messages": [dict(m) for m in CODEACT_ROW["messages"]]}
    row["messages"][2]["content"] = "\n  " + row["messages"][2]["content"] + "  \n"
    batch = AgentTrajectoryCollator(trimming)([row])
    assert_invariants(batch)
    assert "I need the population" in decode_where(trimming, batch, 0, "reason_mask")
    assert "web_search" in decode_where(trimming, batch, 0, "act_mask")


def test_segmentation_style_none_trains_all_assistant_tokens_as_one_kind(tiny_tokenizer):
    auto = AgentTrajectoryCollator(tiny_tokenizer)([CODEACT_ROW])
    none = AgentTrajectoryCollator(tiny_tokenizer, style="none")([CODEACT_ROW])
    assert none["reason_mask"].sum() == 0
    assert torch.equal(none["labels"] != -100, auto["labels"] != -100)


def test_malformed_rows_name_row_and_message(tiny_tokenizer):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "abracadabra"}]}
    collator = AgentTrajectoryCollator(tiny_tokenizer)
    with pytest.raises(TrajectoryFormatError) as error:
        collator([CODEACT_ROW, bad])
    assert error.value.row_index == 1 and error.value.message_index == 1
    assert "wizard" in str(error.value)
    with pytest.raises(TrajectoryFormatError, match="neither 'messages' nor 'text'"):
        collator([{"question": "?"}])


def test_skip_mode_drops_and_counts(tiny_tokenizer):
    unclosed = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Code:\n```py\nx = 1"}]}
    collator = AgentTrajectoryCollator(tiny_tokenizer, on_malformed="skip")
    batch = collator([CODEACT_ROW, unclosed])
    assert batch["input_ids"].shape[0] == 1 and collator.num_skipped == 1


def test_completion_kinds_follow_the_generated_text(collator, tiny_tokenizer):
    text = f"{THOUGHT}\n{CODE}<|im_end|>"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    kinds = collator.completion_kinds(ids)
    assert len(kinds) == len(ids)
    reason_ids = [i for i, k in zip(ids, kinds) if k == REASON]
    act_ids = [i for i, k in zip(ids, kinds) if k == ACT]
    assert "I need the population of Varnholt." in tiny_tokenizer.decode(reason_ids)
    assert "web_search" in tiny_tokenizer.decode(act_ids) and tiny_tokenizer.decode(act_ids).endswith("<|im_end|>")
    # Text the segmenter cannot parse is still the model's own output: trained, as ACT.
    gibberish = tiny_tokenizer("zzz qqq", add_special_tokens=False)["input_ids"]
    assert set(collator.completion_kinds(gibberish)) == {ACT}


def test_slow_tokenizers_are_refused():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast tokenizer"):
        AgentTrajectoryCollator(Slow())


LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def test_a_llama3_style_template_trains_the_same_text(tiny_tokenizer):
    llama = copy.deepcopy(tiny_tokenizer)
    llama.add_special_tokens(
        {"bos_token": "<|begin_of_text|>", "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}
    )
    llama.chat_template = LLAMA3_TEMPLATE
    collator = AgentTrajectoryCollator(llama)
    assert end_of_turn_tokens(llama) == ["<|eot_id|>"]
    batch = collator([CODEACT_ROW])
    assert_invariants(batch)
    act_text = decode_where(llama, batch, 0, "act_mask")
    assert act_text.count("<|eot_id|>") == 2 and "final_answer(4120)" in act_text
    assert "<|start_header_id|>" not in act_text + decode_where(llama, batch, 0, "reason_mask")
    chatml = AgentTrajectoryCollator(tiny_tokenizer)([CODEACT_ROW])
    strip = lambda text: text.replace("<|eot_id|>", "").replace("<|im_end|>", "")  # noqa: E731
    for mask in ("reason_mask", "act_mask"):
        assert strip(decode_where(llama, batch, 0, mask)) == strip(decode_where(tiny_tokenizer, chatml, 0, mask))
