"""Real chat templates of widely used model families: each assistant turn trains exactly what the model writes.

The templates are TRL's copies of the ones the models ship (`trl/chat_templates/*.jinja`), loaded onto the tiny
tokenizer with their special tokens added. Every check decodes the tokens of each mask: what is REASON, what is ACT,
what is untrained.
"""

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trl
from datasets import Dataset

from trl_agent_distill import AgentDistillConfig, AgentDistillTrainer, chat_template
from trl_agent_distill.agent import TransformersBackend
from trl_agent_distill.chat_template import ChatTemplateRenderer, end_of_turn_tokens
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.encoding import encode_dataset
from trl_agent_distill.segmentation import TrajectoryFormatError
from trl_agent_distill.tiny import CHATML_TEMPLATE

TEMPLATES = Path(trl.__file__).parent / "chat_templates"


@dataclass(frozen=True)
class Family:
    template: str | None  # a file of trl/chat_templates; None: the tiny tokenizer's own ChatML tool template
    special_tokens: dict = field(default_factory=dict)  # bos_token / eos_token and additional_special_tokens
    plain_tokens: tuple = ()  # added tokens that are not special (Qwen's <tool_call>, <think>)
    ends: tuple = ()  # the end-of-turn tokens the two assistant turns of CodeAct / ReAct rows end with
    tool_call_ends: tuple | None = None  # those of the tool_calls row; None: the template cannot render tool calls
    headers: tuple = ()  # generation prompts and headers: never trained


FAMILIES = {
    "chatml-tools": Family(None, ends=("<|im_end|>",) * 2, tool_call_ends=("<|im_end|>",) * 2,
                           headers=("<|im_start|>",)),
    "qwen2.5": Family("qwen2_5.jinja", plain_tokens=("<tool_call>", "</tool_call>"), ends=("<|im_end|>",) * 2,
                      tool_call_ends=("<|im_end|>",) * 2, headers=("<|im_start|>",)),
    "qwen3": Family("qwen3.jinja", plain_tokens=("<tool_call>", "</tool_call>", "<think>", "</think>"),
                    ends=("<|im_end|>",) * 2, tool_call_ends=("<|im_end|>",) * 2, headers=("<|im_start|>",)),
    "llama3.1": Family(
        "llama3_1.jinja",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
         "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"]},
        ends=("<|eot_id|>",) * 2, tool_call_ends=("<|eot_id|>",) * 2,
        headers=("<|start_header_id|>", "<|end_header_id|>"),
    ),
    "gemma3": Family(
        "gemma3.jinja",
        {"bos_token": "<bos>", "eos_token": "<eos>", "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        ends=("<end_of_turn>",) * 2, headers=("<start_of_turn>",),
    ),
    "phi3.5": Family(
        "phi3_5.jinja",
        {"eos_token": "<|endoftext|>",
         "additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]},
        ends=("<|end|>", "<|endoftext|>"), headers=("<|assistant|>", "<|user|>"),  # its last turn also closes the text
    ),
    "deepseek-r1-distill": Family(
        "deepseek_r1_distill.jinja",
        {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
         "additional_special_tokens": ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                                       "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>",
                                       "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>",
                                       "<｜tool▁sep｜>"]},
        plain_tokens=("<think>", "</think>"), ends=("<｜end▁of▁sentence｜>",) * 2, headers=("<｜Assistant｜>",),
    ),
    "gpt-oss": Family(
        "gptoss.jinja",
        {"eos_token": "<|return|>",
         "additional_special_tokens": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>",
                                       "<|constrain|>"]},
        ends=("<|end|>", "<|return|>"), tool_call_ends=("<|call|>", "<|call|>"),
        headers=("<|start|>assistant<|channel|>",),
    ),
}
_TOKENIZERS = {}


def family_tokenizer(tiny_tokenizer, name: str, template: str | None = None):
    """The tiny tokenizer with a family's real chat template (or `template`, e.g. another file) and tokens."""
    key = (name, template)
    if key not in _TOKENIZERS:
        family = FAMILIES[name]
        tokenizer = copy.deepcopy(tiny_tokenizer)
        named = {k: v for k, v in family.special_tokens.items() if k != "additional_special_tokens"}
        specials = list(family.special_tokens.get("additional_special_tokens", [])) + list(named.values())
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
        for attribute, token in named.items():
            setattr(tokenizer, attribute, token)
        tokenizer.add_tokens(list(family.plain_tokens))
        template = template or family.template
        tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8") if template else CHATML_TEMPLATE
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


OBSERVATION = 'Observation:\nExecution logs:\nVarnholt has "4120" inhabitants.\nLast output from code snippet:\nNone'
CODEACT = [
    {"role": "system", "content": "You are an agent with a web_search tool."},
    {"role": "user", "content": "How many people live in Varnholt?"},
    {"role": "assistant",
     "content": 'Thought: I need the population.\nCode:\n```py\nprint(web_search("Varnholt"))\n```<end_code>'},
    {"role": "user", "content": OBSERVATION},
    {"role": "assistant", "content": "Thought: It is 4120.\nCode:\n```py\nfinal_answer(4120)\n```<end_code>"},
]
REACT = [
    {"role": "user", "content": "Question: Which town is larger, Varnholt or Ostmere?"},
    {"role": "assistant",
     "content": "I will compare them.\nThought 1: I should search Varnholt.\nAction 1: Search[Varnholt]"},
    {"role": "user", "content": "Observation 1: Varnholt has 4120 inhabitants."},
    {"role": "assistant", "content": "Thought 2: Ostmere is smaller.\nAction 2: Finish[Varnholt]"},
]


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool(name: str, argument: str) -> dict:
    parameters = {"type": "object", "properties": {argument: {"type": "string", "description": argument}},
                  "required": [argument]}
    function = {"name": name, "description": f"The {name} tool.", "parameters": parameters}
    return {"type": "function", "function": function}


TOOLS = [tool("web_search", "query"), tool("final_answer", "answer")]
TOOL_RESULT = 'Varnholt has "4120"\ninhabitants.'  # quotes and a newline: templates that `| tojson` it escape both
TOOL_CALLS = [
    {"role": "system", "content": "You are an agent."},
    {"role": "user", "content": "How many people live in Varnholt?"},
    {"role": "assistant", "content": "I should search for it.", "tool_calls": [call("web_search", query="Varnholt")]},
    {"role": "tool", "content": TOOL_RESULT},
    {"role": "assistant", "content": "", "tool_calls": [call("final_answer", answer="4120")]},
]
THINKING = [  # Qwen3 / DeepSeek-R1 style: reasoning in <think> blocks of the content
    {"role": "user", "content": "How many people live in Varnholt?"},
    {"role": "assistant", "content": "<think>\nI must search first.\n</think>\n\nThought: search.\n"
                                     'Code:\n```py\nprint(web_search("Varnholt"))\n```<end_code>'},
    {"role": "user", "content": "Observation:\n4120"},
    {"role": "assistant",
     "content": "<think>\nSo it is 4120.\n</think>\n\nThought: done.\nCode:\n```py\nfinal_answer(4120)\n```<end_code>"},
]
REASONING_FIELD = [  # the same with the reasoning in `reasoning_content` (transformers also reads it as `thinking`)
    {"role": "user", "content": "How many people live in Varnholt?"},
    {"role": "assistant", "reasoning_content": "I must search first.",
     "content": 'Thought: search.\nCode:\n```py\nprint(web_search("Varnholt"))\n```<end_code>'},
    {"role": "user", "content": "Observation:\n4120"},
    {"role": "assistant", "reasoning_content": "So it is 4120.",
     "content": "Thought: done.\nCode:\n```py\nfinal_answer(4120)\n```<end_code>"},
]


@dataclass
class Decoded:
    reason: str
    act: str
    untrained: str
    turns: list  # each contiguous trained run (REASON or ACT), decoded: one per assistant turn


def decode(tokenizer, row: dict, **collator_options) -> Decoded:
    batch = AgentTrajectoryCollator(tokenizer, max_length=None, **collator_options)([row])
    ids, trained = batch["input_ids"][0].tolist(), (batch["labels"][0] != -100).tolist()
    runs, previous = [], False
    for token, is_trained in zip(ids, trained):
        if is_trained and not previous:
            runs.append([])
        if is_trained:
            runs[-1].append(token)
        previous = is_trained
    pick = lambda mask: tokenizer.decode([i for i, m in zip(ids, mask) if m])  # noqa: E731
    return Decoded(
        reason=pick(batch["reason_mask"][0].tolist()),
        act=pick(batch["act_mask"][0].tolist()),
        untrained=pick([not t for t in trained]),
        turns=[tokenizer.decode(run) for run in runs],
    )


def assert_turns_end_with(decoded: Decoded, ends: tuple) -> None:
    assert len(decoded.turns) == len(ends), decoded.turns
    for turn, end in zip(decoded.turns, ends):
        assert turn.endswith(end), (turn, end)


def assert_never_trained(decoded: Decoded, family: Family, *texts: str) -> None:
    trained = decoded.reason + decoded.act
    for text in (*texts, *family.headers):
        assert text not in trained, text


BOTH_WAYS = pytest.mark.parametrize("use_training_template", [True, False], ids=["training-template", "rendering"])


# ---------------------------------------------------------------------------------------------- every family
@BOTH_WAYS
@pytest.mark.parametrize("name", FAMILIES)
def test_codeact_rows(tiny_tokenizer, name, use_training_template):
    family = FAMILIES[name]
    decoded = decode(family_tokenizer(tiny_tokenizer, name), {"messages": CODEACT},
                     use_training_chat_template=use_training_template)
    assert decoded.reason == "Thought: I need the population.\nThought: It is 4120.\n"
    assert 'Code:\n```py\nprint(web_search("Varnholt"))\n```<end_code>' in decoded.act
    assert "Code:\n```py\nfinal_answer(4120)\n```<end_code>" in decoded.act
    assert_turns_end_with(decoded, family.ends)
    assert_never_trained(decoded, family, "You are an agent", "How many people", "4120 inhabitants", "Execution logs")
    assert "4120\" inhabitants" in decoded.untrained


@BOTH_WAYS
@pytest.mark.parametrize("name", FAMILIES)
def test_react_rows(tiny_tokenizer, name, use_training_template):
    family = FAMILIES[name]
    decoded = decode(family_tokenizer(tiny_tokenizer, name), {"messages": REACT},
                     use_training_chat_template=use_training_template)
    # Prose before the first step marker is the agent's reasoning too.
    assert decoded.reason == (
        "I will compare them.\nThought 1: I should search Varnholt.\nThought 2: Ostmere is smaller.\n"
    )
    assert "Action 1: Search[Varnholt]" in decoded.act and "Action 2: Finish[Varnholt]" in decoded.act
    assert_turns_end_with(decoded, family.ends)
    assert_never_trained(decoded, family, "Question", "Observation 1", "4120 inhabitants")


@BOTH_WAYS
@pytest.mark.parametrize("name", FAMILIES)
def test_tool_calls_rows(tiny_tokenizer, name, use_training_template, caplog):
    family = FAMILIES[name]
    tokenizer = family_tokenizer(tiny_tokenizer, name)
    row = {"messages": TOOL_CALLS, "tools": TOOLS}
    if family.tool_call_ends is None:
        # Gemma 3 refuses the tool role, Phi-3.5 and DeepSeek-R1-Distill drop the calls: each is an error naming
        # the message, never a turn that teaches the model to stop instead of calling.
        with pytest.raises(TrajectoryFormatError) as error:
            decode(tokenizer, row, use_training_chat_template=use_training_template)
        assert error.value.row_index == 0 and error.value.message_index in (2, 3)
        assert "does not render tool_calls" in str(error.value) or "cannot render" in str(error.value)
        return
    with caplog.at_level(logging.WARNING):
        decoded = decode(tokenizer, row, use_training_chat_template=use_training_template)
    for rendered_call in ("web_search", "Varnholt", "final_answer", "4120"):
        assert rendered_call in decoded.act
    assert_turns_end_with(decoded, family.tool_call_ends)
    # The tool's answer, escaped or not, is never trained (templates that `| tojson` it are not refused).
    assert_never_trained(decoded, family, "inhabitants", "You are an agent", "How many people")
    assert "inhabitants" in decoded.untrained
    if name == "llama3.1":  # its format has the call alone: the text beside it is not rendered, and not trained
        assert decoded.reason == "" and "I should search for it." not in decoded.untrained
    else:
        assert decoded.reason == "I should search for it."


# ---------------------------------------------------------------------------------------------- reasoning
@pytest.mark.parametrize("name", ["qwen3", "deepseek-r1-distill", "qwen2.5", "llama3.1", "gemma3", "chatml-tools"])
def test_think_blocks_are_reason_in_every_turn(tiny_tokenizer, name):
    decoded = decode(family_tokenizer(tiny_tokenizer, name), {"messages": THINKING})
    if name == "deepseek-r1-distill":
        # Its generation prompt ends in `<think>\n`, so the model itself writes from the reasoning on.
        assert decoded.reason == (
            "I must search first.\n</think>\n\nThought: search.\nSo it is 4120.\n</think>\n\nThought: done.\n"
        )
    else:
        assert decoded.reason == (
            "<think>\nI must search first.\n</think>\n\nThought: search.\n"
            "<think>\nSo it is 4120.\n</think>\n\nThought: done.\n"
        )
    assert "final_answer(4120)" in decoded.act and "I must" not in decoded.act


def test_reasoning_fields_are_reason(tiny_tokenizer):
    qwen3 = decode(family_tokenizer(tiny_tokenizer, "qwen3"), {"messages": REASONING_FIELD})
    assert qwen3.reason == (
        "<think>\nI must search first.\n</think>Thought: search.\n<think>\nSo it is 4120.\n</think>Thought: done.\n"
    )
    # gpt-oss renders reasoning in its analysis channel, and drops it from turns that an answer follows.
    gpt_oss = decode(family_tokenizer(tiny_tokenizer, "gpt-oss"), {"messages": REASONING_FIELD})
    assert gpt_oss.reason == "Thought: search.\nSo it is 4120.Thought: done.\n"
    assert "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>" in gpt_oss.act


def test_gpt_oss_thinking_before_a_tool_call_is_reason(tiny_tokenizer):
    messages = [dict(m) for m in TOOL_CALLS]
    messages[2] = {"role": "assistant", "thinking": "The search tool knows.", "tool_calls": messages[2]["tool_calls"]}
    decoded = decode(family_tokenizer(tiny_tokenizer, "gpt-oss"), {"messages": messages, "tools": TOOLS})
    assert decoded.reason == "The search tool knows."
    assert_turns_end_with(decoded, ("<|call|>", "<|call|>"))


def test_reasoning_is_one_kind_with_style_none(tiny_tokenizer):
    for rows in (THINKING, REASONING_FIELD):
        decoded = decode(family_tokenizer(tiny_tokenizer, "qwen3"), {"messages": rows}, style="none")
        assert decoded.reason == "" and "I must search first." in decoded.act


@pytest.mark.parametrize("name", ["qwen3", "deepseek-r1-distill"])
def test_training_templates_keep_earlier_reasoning(tiny_tokenizer, name, caplog, monkeypatch):
    """Their own templates drop the reasoning of earlier turns; TRL's training templates keep it (the switch)."""
    monkeypatch.setattr(chat_template, "_logged", set())
    tokenizer = family_tokenizer(tiny_tokenizer, name)
    with caplog.at_level(logging.INFO, logger="trl_agent_distill.chat_template"):
        kept = decode(tokenizer, {"messages": THINKING})
        decode(tokenizer, {"messages": THINKING})  # a second collator: nothing more is logged
    assert "I must search first." in kept.reason and "So it is 4120." in kept.reason
    assert caplog.text.count("TRL's training chat template") == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_agent_distill.chat_template"):
        own = decode(tokenizer, {"messages": THINKING}, use_training_chat_template=False)
    assert "I must search first." not in own.reason + own.act + own.untrained  # the template left it out
    assert "does not render the reasoning of some assistant messages (the first: message 1)" in caplog.text
    assert "use_training_chat_template is off" in caplog.text
    assert "Thought: search." in own.reason and own.turns[0].endswith(FAMILIES[name].ends[0])


def test_the_switch_is_a_config_field_passed_to_the_collator(tmp_path, tiny_tokenizer, make_model):
    help_text = AgentDistillConfig.__dataclass_fields__["use_training_chat_template"].metadata["help"]
    assert "get_training_chat_template" in help_text
    qwen3 = family_tokenizer(tiny_tokenizer, "qwen3")
    for switch in (True, False):
        args = AgentDistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", lambda_reason=0,
                                  lambda_act=0, lambda_ce=1, use_training_chat_template=switch)
        trainer = AgentDistillTrainer(model=make_model("student", hidden_size=32, num_layers=1), args=args,
                                      train_dataset=Dataset.from_list([{"messages": THINKING}]), processing_class=qwen3)
        assert trainer.data_collator.renderer.uses_generation_markers is switch
    assert AgentDistillConfig(output_dir=str(tmp_path), use_cpu=True).use_training_chat_template is True


# ---------------------------------------------------------------------------------------------- ends of turns
def test_gpt_oss_turns_end_with_their_own_end_of_turn_token(tiny_tokenizer):
    """`<|end|>` closes an answer that more messages follow, `<|return|>` the last one, `<|call|>` a tool call."""
    tokenizer = family_tokenizer(tiny_tokenizer, "gpt-oss")
    for use_training_template in (True, False):
        codeact = decode(tokenizer, {"messages": CODEACT}, use_training_chat_template=use_training_template)
        assert codeact.turns[0].endswith("<end_code><|end|>") and codeact.turns[1].endswith("<end_code><|return|>")
        calls = decode(tokenizer, {"messages": TOOL_CALLS, "tools": TOOLS},
                       use_training_chat_template=use_training_template)
        assert calls.turns[0].endswith('{"query": "Varnholt"}<|call|>')
        assert calls.turns[1] == (
            ' to=functions.final_answer<|channel|>commentary json<|message|>{"answer": "4120"}<|call|>'
        )
    assert end_of_turn_tokens(tokenizer) == ["<|return|>", "<|call|>"]


def test_generation_stops_on_every_end_of_turn_token(tiny_tokenizer, make_model):
    tokenizer = family_tokenizer(tiny_tokenizer, "gpt-oss")
    backend = TransformersBackend(make_model("student", hidden_size=32, num_layers=1), tokenizer, batch_size=1)
    assert set(backend.end_token_ids) == set(tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>"]))
    assert end_of_turn_tokens(family_tokenizer(tiny_tokenizer, "llama3.1")) == ["<|eot_id|>"]
    assert end_of_turn_tokens(family_tokenizer(tiny_tokenizer, "qwen2.5")) == ["<|im_end|>"]
    # Phi-3.5 ends an answer with `<|end|>` and closes the text with its eos after a last turn.
    assert end_of_turn_tokens(family_tokenizer(tiny_tokenizer, "phi3.5")) == ["<|end|>", "<|endoftext|>"]


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("content", ["", None])
def test_a_tool_call_the_template_drops_is_refused(tiny_tokenizer, content):
    tokenizer = family_tokenizer(tiny_tokenizer, "deepseek-r1-distill")
    messages = [dict(m) for m in TOOL_CALLS]
    messages[2]["content"] = content
    collator = AgentTrajectoryCollator(tokenizer)
    with pytest.raises(TrajectoryFormatError) as error:
        collator([{"messages": CODEACT}, {"messages": messages}])
    assert error.value.row_index == 1 and error.value.message_index == 2
    if content == "":
        assert "does not render tool_calls" in str(error.value) and "'web_search'" in str(error.value)
    else:  # the template needs a string content
        assert "cannot render this conversation" in str(error.value)


@pytest.mark.parametrize(
    "name, template, messages, message_index, says",
    [
        ("gemma3", "gemma.jinja", CODEACT, 0, "System role not supported"),
        ("gemma3", None, [REACT[0], REACT[2], *REACT[1:]], 1, "Conversation roles must alternate"),
        ("qwen2.5", None, [REACT[0], {"role": "assistant", "content": None}], 1, "UndefinedError"),
    ],
    ids=["system-role", "alternation", "content-none"],
)
def test_template_errors_name_the_row_and_message(tiny_tokenizer, name, template, messages, message_index, says):
    tokenizer = family_tokenizer(tiny_tokenizer, name, template)
    with pytest.raises(TrajectoryFormatError) as error:
        AgentTrajectoryCollator(tokenizer)([{"messages": REACT}, {"messages": messages}])
    assert error.value.row_index == 1 and error.value.message_index == message_index
    assert says in str(error.value) and "row 1, message" in str(error.value)


def test_skip_drops_rows_the_template_refuses(tiny_tokenizer):
    gemma = family_tokenizer(tiny_tokenizer, "gemma3", "gemma.jinja")
    dropped_tool_call = family_tokenizer(tiny_tokenizer, "deepseek-r1-distill")
    for tokenizer, bad in [(gemma, CODEACT), (dropped_tool_call, TOOL_CALLS)]:
        collator = AgentTrajectoryCollator(tokenizer, on_malformed="skip")
        batch = collator([{"messages": REACT}, {"messages": bad}])
        assert batch["input_ids"].shape[0] == 1 and collator.num_skipped == 1
        dataset, report = encode_dataset(Dataset.from_list([{"messages": REACT}, {"messages": bad}]), collator)
        assert report.malformed_skipped == 1 and len(dataset) == 1


def test_renderer_alone(tiny_tokenizer):
    text, kinds = ChatTemplateRenderer(family_tokenizer(tiny_tokenizer, "qwen2.5")).render(REACT)
    assert len(kinds) == len(text)
    trained = "".join(char for char, kind in zip(text, kinds) if kind)
    assert trained == (
        "I will compare them.\nThought 1: I should search Varnholt.\nAction 1: Search[Varnholt]<|im_end|>"
        "Thought 2: Ostmere is smaller.\nAction 2: Finish[Varnholt]<|im_end|>"
    )
    with pytest.raises(TrajectoryFormatError, match="opens with an assistant message"):
        ChatTemplateRenderer(tiny_tokenizer).render(REACT[1:])


def test_characters_split_into_byte_tokens(tiny_tokenizer):
    """An emoji is several byte tokens sharing one character's offsets (a random student writes such text)."""
    messages = [REACT[0], {"role": "assistant", "content": "Thought 1: 🦜 says hi.\nAction 1: Finish[🦜]"}]
    for name in ("chatml-tools", "llama3.1"):
        decoded = decode(family_tokenizer(tiny_tokenizer, name), {"messages": messages})
        assert decoded.reason == "Thought 1: 🦜 says hi.\n" and decoded.act.startswith("Action 1: Finish[🦜]")


@pytest.mark.parametrize("name", FAMILIES)
def test_the_text_is_what_apply_chat_template_renders(tiny_tokenizer, name):
    """Marked runs come from the function `apply_chat_template` renders with: same text, with either template."""
    tokenizer = family_tokenizer(tiny_tokenizer, name)
    for use_training_template in (True, False):
        renderer = ChatTemplateRenderer(tokenizer, use_training_template=use_training_template)
        text, _ = renderer.render(CODEACT)
        assert text == tokenizer.apply_chat_template(CODEACT, tokenize=False, chat_template=renderer.template)
