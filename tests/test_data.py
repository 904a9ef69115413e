"""Data formats: released smolagents logs -> messages, and dataset format detection / checks."""

import copy
import json
import logging
from pathlib import Path

import datasets
import pytest

from trl_agent_distill.data import DATASET_FORMATS, from_smolagents_log, prepare_trajectory_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "data" / "smolagents_rows.jsonl"
RETRY = (
    "\nNow let's retry: take care not to repeat previous errors! If you have retried several times, try a "
    "completely different approach.\n"
)
EXPECTED_AFTER_SYSTEM = [
    [  # HotPotQA-like: two searches, then final_answer
        ("user", "New task:\nWhich magazine was started first, Arthur's Magazine or First for Women?"),
        (
            "assistant",
            "Thought: I need the founding years of both magazines. I will search for Arthur's Magazine first.\n"
            'Code:\n```py\nresult = web_search(query="Arthur\'s Magazine founding year")\nprint(result)\n```<end_code>',
        ),
        (
            "user",
            "Call id: call_1\nObservation:\nExecution logs:\n\nRetrieved documents:\n\n"
            "===== Document 0, similarity: 0.87 =====\n\"Arthur's Magazine\"\nArthur's Magazine (1844-1846) was an "
            "American literary periodical published in Philadelphia.\n\n===== Document 1, similarity: 0.79 =====\n"
            '"Timothy Shay Arthur"\nTimothy Shay Arthur was an American writer who edited several magazines.\n'
            "Last output from code snippet:\nNone",
        ),
        (
            "assistant",
            "Thought: Arthur's Magazine ran from 1844. Now I need the start year of First for Women.\n"
            'Code:\n```py\nresult = web_search(query="First for Women magazine founding year")\nprint(result)\n'
            "```<end_code>",
        ),
        (
            "user",
            "Call id: call_2\nObservation:\nExecution logs:\n\nRetrieved documents:\n\n"
            '===== Document 0, similarity: 0.85 =====\n"First for Women"\nFirst for Women is a woman\'s magazine '
            "published by Bauer Media Group in the USA. The magazine was started in 1989.\n"
            "Last output from code snippet:\nNone",
        ),
        (
            "assistant",
            "Thought: First for Women started in 1989, long after 1844, so Arthur's Magazine was started first.\n"
            'Code:\n```py\nfinal_answer("Arthur\'s Magazine")\n```<end_code>',
        ),
    ],
    [  # MATH-like: a failed step (partial logs + error, merged into one observation), a fix, final_answer
        ("user", "New task:\nWhat is the sum of all positive divisors of 36?"),
        (
            "assistant",
            "Thought: I will list the divisors of 36 with a comprehension and add them up.\nCode:\n```py\n"
            "divisors = [d for d in range(1, 37) if 36 % d == 0]\nprint(divisors)\nprint(divisor_sum)\n```<end_code>",
        ),
        (
            "user",
            "Call id: call_1\nObservation:\nExecution logs:\n[1, 2, 3, 4, 6, 9, 12, 18, 36]\n"
            "Call id: call_1\nError:\nCode execution failed at line 'print(divisor_sum)' due to: InterpreterError: "
            "The variable `divisor_sum` is not defined." + RETRY,
        ),
        (
            "assistant",
            "Thought: The divisors were printed but I forgot to define divisor_sum. I will compute it now.\n"
            "Code:\n```py\ndivisor_sum = sum(divisors)\nprint(divisor_sum)\n```<end_code>",
        ),
        ("user", "Call id: call_2\nObservation:\nExecution logs:\n91\nLast output from code snippet:\nNone"),
        (
            "assistant",
            'Thought: The divisors of 36 add up to 91.\nCode:\n```py\nfinal_answer("\\\\boxed{91}")\n```<end_code>',
        ),
    ],
    [  # MATH-like: one code step, then final_answer
        ("user", "New task:\nWhat is the remainder when $2^{100}$ is divided by 7?"),
        (
            "assistant",
            "Thought: Python's three-argument pow computes modular powers exactly, so I will use it.\nCode:\n"
            "```py\nremainder = pow(2, 100, 7)\nprint(remainder)\n```<end_code>",
        ),
        ("user", "Call id: call_1\nObservation:\nExecution logs:\n2\nLast output from code snippet:\nNone"),
        ("assistant", 'Thought: The remainder is 2.\nCode:\n```py\nfinal_answer("\\\\boxed{2}")\n```<end_code>'),
    ],
]


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def _log(messages):
    return {"log_data": json.dumps({"messages": messages})}


def _text(text):
    return [{"type": "text", "text": text}]


def _load(tmp_path, name, records, builder="json"):
    path = tmp_path / name
    if builder == "json":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))
    return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ from_smolagents_log
@pytest.mark.parametrize("index", [0, 1, 2])
def test_fixture_rows_convert_to_the_expected_messages(rows, index):
    row = rows[index]
    system_text = json.loads(row["log_data"])["messages"][0]["content"][0]["text"]
    converted = from_smolagents_log(row)
    assert list(converted) == ["messages"]
    assert converted["messages"][0] == {"role": "system", "content": system_text}
    assert system_text.startswith("You are an expert assistant") and "final_answer" in system_text
    after_system = [(m["role"], m["content"]) for m in converted["messages"][1:]]
    assert after_system == EXPECTED_AFTER_SYSTEM[index]


def test_observation_role_tool_and_parsed_log_data(rows):
    row = dict(rows[1], log_data=json.loads(rows[1]["log_data"]))  # already parsed: accepted as is
    messages = from_smolagents_log(row, observation_role="tool")["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert messages[3]["content"] == EXPECTED_AFTER_SYSTEM[1][2][1]


def test_text_parts_join_roles_merge_and_enum_names_are_understood():
    row = _log(
        [
            {"role": "MessageRole.SYSTEM", "content": _text("S")},
            {"role": "user", "content": [{"type": "text", "text": "New task:\n"}, {"type": "text", "text": "Q"}]},
            {"role": "assistant", "content": _text("[FACTS LIST]:\nf")},
            {"role": "assistant", "content": _text("[PLAN]:\np")},
            {"role": "MessageRole.TOOL_CALL", "content": _text("Calling tools:\n[...]")},
            {"role": "MessageRole.TOOL_RESPONSE", "content": _text("Observation:\nA\n")},
            {"role": "user", "content": "Now proceed."},
            {"role": "assistant", "content": None},
            {"role": "tool-response", "content": _text("Observation:\nlast")},
        ]
    )
    assert from_smolagents_log(row)["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "New task:\nQ"},
        {"role": "assistant", "content": "[FACTS LIST]:\nf[PLAN]:\np"},
        {"role": "user", "content": "Observation:\nA\nNow proceed."},
        {"role": "assistant", "content": ""},
    ]


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"question": "Q", "messages": []}, r"no 'log_data' field \(its fields: \['messages', 'question'\]\).*dataset_format='messages'"),
        ({"log_data": '{"messages": [{"role": "user"'}, r"'log_data' is not valid JSON \(Expecting ',' delimiter: .*char 29\)"),
        ({"log_data": None}, r"'log_data' is empty.*Drop this row"),
        ({"log_data": '{"steps": []}'}, r"'messages' list \(found: \['steps'\]\)"),
        (
            _log([{"role": "system", "content": _text("S")}, {"role": "observer", "content": _text("x")}]),
            r"message 1 has the unknown role 'observer'",
        ),
        (
            _log([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "image": "..."}]}]),
            r"message 0, content part 1 is 'image', not a text part.*Drop the non-text parts",
        ),
        (_log([{"role": "user", "content": 3}]), r"message 0 has 'content' of type int"),
    ],
)
def test_errors_name_the_field_and_what_to_do(row, pattern):
    with pytest.raises(ValueError, match=pattern):
        from_smolagents_log(row)


def test_unknown_observation_role(rows):
    with pytest.raises(ValueError, match=r"observation_role must be one of \('user', 'tool'\)"):
        from_smolagents_log(rows[0], observation_role="observation")


# ---------------------------------------------------------------------------------- prepare_trajectory_dataset
@pytest.mark.parametrize("dataset_format", ["auto", "smolagents"])
def test_smolagents_jsonl_is_converted(tmp_path, rows, dataset_format):
    dataset = _load(tmp_path, "rows.jsonl", rows)
    prepared = prepare_trajectory_dataset(dataset, dataset_format)
    assert prepared.column_names == ["question", "true_answer", "messages"]
    assert prepared["true_answer"] == ["Arthur's Magazine", "91", "2"]
    assert prepared[1]["messages"] == from_smolagents_log(rows[1])["messages"]


def test_parquet_and_parsed_log_data_are_converted(tmp_path, rows):
    parsed = [{"log_data": {"messages": json.loads(row["log_data"])["messages"]}} for row in rows]
    from_jsonl = prepare_trajectory_dataset(_load(tmp_path, "parsed.jsonl", parsed))
    from_parquet = prepare_trajectory_dataset(_load(tmp_path, "rows.parquet", rows, builder="parquet"))
    expected = [from_smolagents_log(row)["messages"] for row in rows]
    assert from_jsonl.column_names == ["messages"] and from_jsonl["messages"] == expected
    assert from_parquet["messages"] == expected


def test_empty_logs_are_skipped_and_bad_rows_are_named(tmp_path, rows, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_agent_distill.data"):
        prepared = prepare_trajectory_dataset(_load(tmp_path, "gaps.jsonl", [rows[0], {**rows[1], "log_data": None}]))
    assert len(prepared) == 1 and "Skipped 1 of 2 rows with an empty 'log_data'" in caplog.text
    broken = copy.deepcopy(rows)
    broken[2]["log_data"] = broken[2]["log_data"][:50]
    with pytest.raises(ValueError, match=r"Row 2 of the smolagents dataset: The row's 'log_data' is not valid JSON"):
        prepare_trajectory_dataset(_load(tmp_path, "broken.jsonl", broken), "smolagents")


@pytest.mark.parametrize(
    ("records", "dataset_format"),
    [
        ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "id": 1}], "auto"),
        ([{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}], "messages"),
        ([{"prompt": "Question: Q\n", "text": "Thought 1: t\nAction 1: Finish[A]"}], "auto"),
        ([{"prompt": "Question: Q\n", "text": "Thought 1: t\nAction 1: Finish[A]"}], "text"),
    ],
)
def test_messages_and_text_datasets_pass_through(tmp_path, records, dataset_format):
    dataset = _load(tmp_path, "plain.jsonl", records)
    prepared = prepare_trajectory_dataset(dataset, dataset_format)
    assert prepared.column_names == dataset.column_names and prepared.to_list() == dataset.to_list()


def test_missing_column_names_columns_and_option(tmp_path):
    dataset = _load(tmp_path, "m.jsonl", [{"messages": [{"role": "user", "content": "Q"}], "id": 1}])
    with pytest.raises(
        ValueError, match=r"dataset_format='text' expects a 'text' column, but the dataset has columns \['messages', 'id'\].*dataset_format option"
    ):
        prepare_trajectory_dataset(dataset, "text")
    with pytest.raises(ValueError, match=r"dataset_format='smolagents' expects a 'log_data' column"):
        prepare_trajectory_dataset(dataset, "smolagents")
    unknown = _load(tmp_path, "u.jsonl", [{"conversation": "x"}])
    with pytest.raises(ValueError, match=r"'auto' cannot tell the format.*\['conversation'\].*'log_data'"):
        prepare_trajectory_dataset(unknown)
    with pytest.raises(ValueError, match=r"dataset_format must be one of \('auto', 'messages', 'text', 'smolagents'\)"):
        prepare_trajectory_dataset(dataset, "sharegpt")
    assert DATASET_FORMATS == ("auto", "messages", "text", "smolagents")


# --------------------------------------------------------------------------------------------- load_any_dataset
@pytest.fixture
def local_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")


ROW = '{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}\n'


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("empty.jsonl", "", r"empty\.jsonl is empty: it holds no rows\. Write the rows"),
        ("blank.jsonl", "\n  \n", r"blank\.jsonl cannot be read: it holds no rows \(every line is blank\)"),
        ("broken.jsonl", ROW + '{"messages": [\n' + ROW, r"broken\.jsonl cannot be read: line 2 is not valid JSON "
         r"\(Expecting value, column 15\); fix or delete that line"),
        ("torn.jsonl", ROW + ROW + ROW[:30], r"torn\.jsonl cannot be read: line 3 is not valid JSON"),
        ("list.jsonl", ROW + "[1, 2]\n", r"list\.jsonl cannot be read: line 2 holds a JSON list, not an object"),
        ("rows.json", '[{"text": "a"},\n {"text": ', r"rows\.json cannot be read: it is not valid JSON at line 2, "
         r"column 11 \(Expecting value\); fix the file there"),
        ("lines.json", ROW + "{oops}\n", r"lines\.json cannot be read: line 2 is not valid JSON"),
        ("table.parquet", "not parquet", r"table\.parquet cannot be read: it is not a readable Parquet file"),
        ("empty.csv", "", r"empty\.csv is empty"),
    ],
)
def test_unreadable_files_are_named_with_the_line_and_what_to_fix(tmp_path, local_cache, name, content, expected):
    from trl_agent_distill.data import load_any_dataset

    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^Dataset file {tmp_path}/{expected}"):
        load_any_dataset(str(path))


def test_a_readable_file_loads_as_one_split(tmp_path, local_cache):
    from trl_agent_distill.data import load_any_dataset

    path = tmp_path / "rows.jsonl"
    path.write_text(ROW * 3)
    loaded = load_any_dataset(str(path), local_split="train")
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 3
