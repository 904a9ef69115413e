"""Native tool calling: parsing (Hermes, pythonic), messages, segmentation, the collator, the OpenAI backend."""

import copy
import json
import re
from pathlib import Path

import datasets
import pytest
import trl

from trl_agent_distill.agent import GenerationRequest, OpenAIBackend, PolicyBackend, SamplingParams, TransformersBackend
from trl_agent_distill.collator import AgentTrajectoryCollator
from trl_agent_distill.encoding import encode_dataset
from trl_agent_distill.formats import (
    TOOL_CALL_PARSERS,
    FunctionCall,
    HermesParser,
    ParsedReply,
    ParseError,
    ToolCallingFormat,
    ToolResult,
    check_arguments,
    register_tool_call_parser,
    with_argument_dicts,
)
from trl_agent_distill.segmentation import segment_messages

from openai_server import FakeOpenAIServer
from test_collator import assert_invariants, decode_where


def tool(name, required=(), **properties):
    return {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": {
        "type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()},
        "required": list(required)}}}


TOOLS = [tool("cd", ["folder"], folder="string"), tool("ls", a="boolean"), tool("sort", ["file_name"], file_name="string"),
         tool("fill_fuel_tank", ["fuel_amount"], fuel_amount="number")]
HERMES = ToolCallingFormat()
PYTHONIC = ToolCallingFormat(parser="pythonic")


def calls(parsed):
    return [(call.name, dict(call.arguments)) for call in parsed.action]


# ---------------------------------------------------------------------------------------------- parsing
def test_hermes_reply_with_calls_becomes_an_openai_tool_calls_message():
    reply = ('I will go to the folder, then list it.\n<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "ls", "arguments": {"a": true}}\n</tool_call>')
    parsed = HERMES.parse(reply)
    assert isinstance(parsed, ParsedReply)
    assert calls(parsed) == [("cd", {"folder": "docs"}), ("ls", {"a": True})]
    message = HERMES.assistant_message(parsed)
    assert message["role"] == "assistant" and message["content"] == "I will go to the folder, then list it."
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["cd", "ls"]
    assert [json.loads(call["function"]["arguments"]) for call in message["tool_calls"]] == [{"folder": "docs"},
                                                                                            {"a": True}]
    ids = [call["id"] for call in message["tool_calls"]]
    assert len(set(ids)) == 2 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert ids == [call["id"] for call in HERMES.assistant_message(HERMES.parse(reply))["tool_calls"]]  # stable


def test_reply_without_calls_is_a_plain_assistant_message():
    parsed = HERMES.parse("All files are sorted.")
    assert isinstance(parsed, ParsedReply) and parsed.action == ()
    assert HERMES.assistant_message(parsed) == {"role": "assistant", "content": "All files are sorted."}


@pytest.mark.parametrize("reply, cause", [
    ('<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}', "not closed"),
    ('<tool_call>\n["cd", "docs"]\n</tool_call>', 'must be a JSON object with a "name"'),
    ('<tool_call>\n{"name": "cd", "arguments": ["docs"]}\n</tool_call>', '"arguments" of \'cd\' must be a JSON object'),
])
def test_malformed_calls_are_parse_errors_that_say_what_to_write(reply, cause):
    parsed = HERMES.parse(reply)
    assert isinstance(parsed, ParseError) and parsed.content == reply
    assert cause in parsed.message and "<tool_call>" in parsed.message and "No tool was called" in parsed.message
    assert HERMES.observation_messages(parsed) == [{"role": "user", "content": parsed.message}]


def test_a_truncated_call_says_it_ran_out_of_tokens():
    parsed = HERMES.parse('<tool_call>\n{"name": "cd", "argu', truncated=True)
    assert isinstance(parsed, ParseError) and "ran out of tokens" in parsed.message


@pytest.mark.parametrize("call, problem", [
    ('{"name": "rm", "arguments": {}}', "there is no tool 'rm'"),
    ('{"name": "cd", "arguments": {"dir": "docs"}}', "cd has no argument 'dir'"),
    ('{"name": "cd", "arguments": {}}', "cd needs the argument 'folder'"),
    ('{"name": "ls", "arguments": {"a": "yes"}}', "'a' of ls must be a JSON boolean"),
    ('{"name": "fill_fuel_tank", "arguments": {"fuel_amount": true}}', "must be a JSON number"),
])
def test_with_schemas_unknown_tools_and_bad_arguments_are_parse_errors(call, problem):
    checked = ToolCallingFormat(tool_schemas=TOOLS)
    parsed = checked.parse(f"<tool_call>\n{call}\n</tool_call>")
    assert isinstance(parsed, ParseError) and problem in parsed.message
    assert isinstance(checked.parse('<tool_call>{"name": "fill_fuel_tank", "arguments": {"fuel_amount": 5}}'
                                    '</tool_call>'), ParsedReply)


def test_check_arguments_without_types_checks_names_only():
    assert check_arguments(TOOLS[1], {"a": "yes"}, types=False) is None
    assert "has no argument 'b'" in check_arguments(TOOLS[1], {"b": 1}, types=False)


def test_pythonic_calls_are_read_with_ast():
    reply = 'Going there.\n[cd(folder="docs"), ls(a=True), sort(file_name=\'a.txt\')]'
    parsed = PYTHONIC.parse(reply)
    assert calls(parsed) == [("cd", {"folder": "docs"}), ("ls", {"a": True}), ("sort", {"file_name": "a.txt"})]
    assert PYTHONIC.assistant_message(parsed)["content"] == "Going there."
    assert PYTHONIC.parse("No call here [just brackets].").action == ()


@pytest.mark.parametrize("attack", [
    "[__import__('os').system('touch {marker}')]",
    "[cd(folder=__import__('os').system('touch {marker}'))]",
    "[cd(folder=open('{marker}', 'w').write('x'))]",
    "[os.system('touch {marker}')]",
    "[cd(*['x'])]",
    "[cd('{marker}')]",
])
def test_hostile_pythonic_replies_are_parse_errors_and_never_run(attack, tmp_path):
    marker = tmp_path / "pwned"
    parsed = PYTHONIC.parse(attack.format(marker=marker))
    assert isinstance(parsed, ParseError)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", [HERMES, PYTHONIC], ids=["hermes", "pythonic"])
def test_write_then_parse_round_trips(fmt):
    action = (FunctionCall("cd", {"folder": "docs/ü"}), FunctionCall("ls", {"a": True, "depth": [1, None]}))
    parsed = fmt.parse(fmt.write("Look first.", action))
    assert calls(parsed) == [(call.name, dict(call.arguments)) for call in action]
    assert fmt.assistant_message(parsed)["content"] == "Look first."
    assert fmt.parse(fmt.write("Done.", ())).action == ()


def test_the_chat_template_renders_a_stored_reply_as_the_model_wrote_it(tiny_tokenizer):
    reply = HERMES.write("Look first.", (FunctionCall("cd", {"folder": "docs"}), FunctionCall("ls", {})))
    message = HERMES.assistant_message(HERMES.parse(reply))
    rendered = tiny_tokenizer.apply_chat_template([message], tokenize=False)
    assert rendered == f"<|im_start|>assistant\n{reply}<|im_end|>\n"


def test_action_key_is_canonical_json_of_names_and_arguments():
    one = HERMES.parse('<tool_call>{"name": "ls", "arguments": {"a": true, "b": 1}}</tool_call>')
    same = HERMES.parse('Thinking.\n<tool_call>\n{"arguments": {"b": 1, "a": true}, "name": "ls"}\n</tool_call>')
    other = HERMES.parse('<tool_call>{"name": "ls", "arguments": {"a": false, "b": 1}}</tool_call>')
    assert HERMES.action_key(one.action) == HERMES.action_key(same.action) != HERMES.action_key(other.action)
    assert json.loads(HERMES.action_key(one.action)) == [{"name": "ls", "arguments": {"a": True, "b": 1}}]


def test_results_are_tool_messages_answering_their_calls():
    parsed = HERMES.parse(HERMES.write("", (FunctionCall("cd", {"folder": "x"}), FunctionCall("pwd", {}))))
    results = [ToolResult(parsed.action[0], '{"current_working_directory": "x"}'),
               ToolResult(parsed.action[1], "Error: no", error=True)]
    messages = HERMES.observation_messages(results)
    assert [m["tool_call_id"] for m in messages] == [c["id"] for c in HERMES.assistant_message(parsed)["tool_calls"]]
    assert [(m["role"], m["name"], m["content"]) for m in messages] == [
        ("tool", "cd", '{"current_working_directory": "x"}'), ("tool", "pwd", "Error: no")]
    assert HERMES.observation_messages("Now sort the file.") == [{"role": "user", "content": "Now sort the file."}]


def test_parsers_are_pluggable():
    with pytest.raises(ValueError, match=r"Unknown tool call parser 'xml'.*'hermes', 'pythonic'"):
        ToolCallingFormat(parser="xml")

    class TaggedJSON(HermesParser):
        name = "tagged-json-test"
        _BLOCK = re.compile(r"<call>(?P<body>.*?)(?P<close></call>|\Z)", re.DOTALL)

    register_tool_call_parser(TaggedJSON())
    try:
        parsed = ToolCallingFormat(parser="tagged-json-test").parse('<call>{"name": "ls", "arguments": {}}</call>')
        assert calls(parsed) == [("ls", {})]
    finally:
        del TOOL_CALL_PARSERS["tagged-json-test"]


# ---------------------------------------------------------------------------------------------- segmentation
def conversation():
    first = HERMES.parse(HERMES.write("I will list the folder.", (FunctionCall("ls", {"a": True}),)))
    second = HERMES.parse(HERMES.write("", (FunctionCall("cd", {"folder": "docs"}), FunctionCall("sort", {
        "file_name": "report.txt"}))))
    broken = '<tool_call>{"name": "cd", "arguments": {"folder": </tool_call>'
    return [
        {"role": "system", "content": HERMES.system_prompt()},
        {"role": "user", "content": HERMES.task_message("Sort the report in docs.")},
        HERMES.assistant_message(first),
        *HERMES.observation_messages([ToolResult(first.action[0], '{"current_directory_content": ["docs"]}')]),
        {"role": "assistant", "content": broken},
        *HERMES.observation_messages(HERMES.parse(broken)),
        HERMES.assistant_message(second),
        *HERMES.observation_messages([ToolResult(call, "None") for call in second.action]),
        HERMES.assistant_message(HERMES.parse("The report is sorted.")),
    ]


def test_segmentation_reads_beside_text_as_reason_calls_as_act_results_as_obs():
    messages = conversation()
    spans = segment_messages(messages)
    kinds = [[(span.kind, (message.get("content") or "")[span.start:span.end]) for span in message_spans]
             for message, message_spans in zip(messages, spans)]
    assert kinds[2] == [("reason", "I will list the folder.")]  # the call itself is rendered by the template: ACT
    assert kinds[3] == [("obs", '{"current_directory_content": ["docs"]}')]
    assert kinds[4] == [("act", messages[4]["content"])]  # a reply kept as text: its call markup is ACT
    assert kinds[5][0][0] == "other"  # the parse error, a user message
    assert kinds[6] == []  # calls only
    assert kinds[-1] == [("act", "The report is sorted.")]  # the answer that ends the turn
    assert segment_messages(messages, "tool_calling") == spans


def test_text_around_call_markup_is_reason():
    text = 'Let me look.\n<tool_call>{"name": "ls"}</tool_call>\nand then sort.'
    spans = HERMES.segment(text, assistant=True)
    assert [(span.kind, text[span.start:span.end]) for span in spans] == [
        ("reason", "Let me look.\n"), ("act", '<tool_call>{"name": "ls"}</tool_call>'), ("reason", "\nand then sort.")]


def test_episodes_round_trip_through_datasets_and_the_collator(tmp_path, tiny_tokenizer):
    other = [  # a second row whose calls go to other tools with arguments of other types
        {"role": "user", "content": "Fill the tank."},
        HERMES.assistant_message(HERMES.parse(HERMES.write("", (FunctionCall("fill_fuel_tank", {"fuel_amount": 30.5}),
                                                                 FunctionCall("ls", {"depth": [1, 2]}))))),
        {"role": "tool", "tool_call_id": "x", "name": "fill_fuel_tank", "content": "full"},
        {"role": "tool", "tool_call_id": "y", "name": "ls", "content": "a b"},
        {"role": "assistant", "content": "Done."},
    ]
    path = tmp_path / "episodes.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m, "tools": TOOLS}) for m in (conversation(), other)) + "\n")
    rows = datasets.load_dataset("json", data_files=str(path), split="train")
    # Arguments survive Arrow as written: one string column, not a struct of every tool's argument names.
    loaded = [json.loads(call["function"]["arguments"]) for call in rows[1]["messages"][1]["tool_calls"]]
    assert loaded == [{"fuel_amount": 30.5}, {"depth": [1, 2]}]
    collator = AgentTrajectoryCollator(tiny_tokenizer, max_length=2048)
    batch = collator([rows[0], rows[1]])
    assert_invariants(batch)
    act, reason = decode_where(tiny_tokenizer, batch, 0, "act_mask"), decode_where(tiny_tokenizer, batch, 0, "reason_mask")
    assert '<tool_call>\n{"name": "ls", "arguments": {"a": true}}\n</tool_call>' in act  # not quoted twice
    assert '"name": "sort", "arguments": {"file_name": "report.txt"}' in act and "The report is sorted." in act
    assert "I will list the folder." in reason and "<tool_call>" not in reason
    assert "current_directory_content" not in act + reason and "No tool was called" not in act + reason
    assert '"fuel_amount": 30.5' in decode_where(tiny_tokenizer, batch, 1, "act_mask")
    encoded, report = encode_dataset(rows, collator)
    assert len(encoded) == 2 and report.malformed_skipped == 0 and report.style == "auto"


def test_templates_that_need_argument_dicts_get_them(make_model, tiny_tokenizer, monkeypatch):
    qwen = copy.deepcopy(tiny_tokenizer)
    qwen.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    messages = conversation()[1:4]
    assert '"arguments": "{\\"a\\": true}"' in qwen.apply_chat_template(messages, tokenize=False)  # quoted twice
    assert '"arguments": {"a": true}' in qwen.apply_chat_template(with_argument_dicts(messages), tokenize=False)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a": true}'  # the stored messages stay strings
    prompts = []
    render = qwen.apply_chat_template
    monkeypatch.setattr(qwen, "apply_chat_template", lambda *a, **k: prompts.append(render(*a, **k)) or prompts[-1])
    backend = TransformersBackend(make_model(), qwen)
    backend.generate([GenerationRequest(messages, SamplingParams(max_new_tokens=1), tools=TOOLS)])
    assert '"arguments": {"a": true}' in prompts[-1] and '"name": "sort"' in prompts[-1]  # the tools are shown too


# ---------------------------------------------------------------------------------------------- OpenAI backend
def test_openai_backend_sends_tools_and_reads_structured_tool_calls():
    replies = iter([
        'Listing.\n<tool_call>\n{"name": "ls", "arguments": {"a": true}}\n</tool_call>',
        '<tool_call>\n{"name": "cd", "arguments": {"folder": "docs"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "sort", "arguments": {"file_name": "r.txt"}}\n</tool_call>',
        "All sorted.",
    ])
    scripted = PolicyBackend(lambda request: next(replies))
    conversation_so_far = conversation()[:4]
    with FakeOpenAIServer(scripted, tool_parser="hermes") as server, \
            OpenAIBackend(server.base_url, server.model_name, max_retries=0) as client:
        request = GenerationRequest(conversation_so_far, tools=TOOLS)
        texts = [client.generate([request])[0][0].text for _ in range(3)]
        assert server.bodies[0]["tools"] == TOOLS and server.bodies[0]["messages"][2]["tool_calls"]
    parsed = [HERMES.parse(text) for text in texts]
    assert calls(parsed[0]) == [("ls", {"a": True})] and HERMES.assistant_message(parsed[0])["content"] == "Listing."
    assert calls(parsed[1]) == [("cd", {"folder": "docs"}), ("sort", {"file_name": "r.txt"})]
    assert parsed[2].action == () and texts[2] == "All sorted."


def test_openai_backend_sends_no_tools_key_without_tools():
    with FakeOpenAIServer(PolicyBackend(lambda request: "hi")) as server, \
            OpenAIBackend(server.base_url, server.model_name, max_retries=0) as client:
        assert client.generate([GenerationRequest([{"role": "user", "content": "hello"}])])[0][0].text == "hi"
        assert "tools" not in server.bodies[-1]
