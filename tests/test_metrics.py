"""Answer checks: SQuAD normalisation, numbers, sympy equality, and robustness to hostile predictions."""

import time

import pytest

from trl_agent_distill.metrics import (
    answers_match,
    exact_match,
    extract_boxed,
    normalize_answer,
    numbers_equal,
    parse_number,
    score_answer,
    symbolic_equal,
    token_f1,
)


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Eiffel-Tower!  ") == "eiffeltower"
    assert exact_match("The Eiffel Tower.", "eiffel tower")
    assert not exact_match("Eiffel Tower", "Tower of Pisa")
    assert exact_match(7085, "7085") and not exact_match(None, "None")


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("the cat sat", "cat sat down", 0.8), ("cat", "dog", 0.0), ("a", "the", 1.0), ("cat", "the", 0.0),
     ("Tomas Edrevel", "Tomas Quill Edrevel", 0.8), (None, "x", 0.0)],
)
def test_token_f1(prediction, gold, expected):
    assert token_f1(prediction, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [(r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"), (r"\boxed{1} then \boxed{ 2 }", "2"), (r"\fbox{x}", "x"),
     (r"\boxed{1", None), ("no box", None)],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("4,210", 4210.0), ("$12.50", 12.5), ("45%", 45.0), ("7085.", 7085.0), (" -3 ", -3.0), ("1e3", 1000.0),
     ("3/4", 0.75), (r"\frac{3}{4}", 0.75), (r"-\frac{1}{4}", -0.25), (r"\boxed{7}", 7.0), (7085, 7085.0),
     ("about 12 people", None), ("1,2,3", None), ("nan", None), ("inf", None), ("1/0", None), ("", None), (None, None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numbers_equal_with_tolerance():
    assert numbers_equal(7085, "7085.0") and numbers_equal("31,920", 31920)
    assert numbers_equal("1.00005", "1", rel_tol=1e-4) and not numbers_equal("1.001", "1", rel_tol=1e-4)
    assert not numbers_equal("seven", "7")


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [(r"\frac{1}{2}", "0.5", True), (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True), ("x^2+2x+1", "(x+1)^2", True),
     (r"\pi/2", "pi/2", True), (r"\sqrt[3]{27}", "3", True), (r"3 \cdot 4", "12", True),
     (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", True), ("sin(x)^2+cos(x)^2", "1", True),
     (r"\frac{1}{3}", "0.33", False), ("x^2+2x+2", "(x+1)^2", False), ("2^100", "2^100+1", False), ("x", "y", False)],
)
def test_symbolic_equal(prediction, gold, expected):
    assert symbolic_equal(prediction, gold) is expected


@pytest.mark.parametrize(
    "hostile",
    ["__import__('os').system('touch /tmp/pwned')", "().__class__.__bases__", "9^9^9^9", "9**(9**9)",
     "(2^1000)^1000", "1" * 10_000, "lambda: 1", "(1).real", "x.a", "exec('1')", "[x for x in (1,)]"],
)
def test_hostile_predictions_are_refused_quickly(hostile):
    started = time.monotonic()
    assert symbolic_equal(hostile, "1") is False and answers_match(hostile, "1") is False
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("Eiffel Tower", "the eiffel tower", True), (7085, "7,085", True), (r"\boxed{\frac{1}{2}}", "1/2", True),
     ("x^2 + 2x + 1", "(x+1)^2", True), ("Velmora", "Brannoch", False), (None, "x", False), ("12", "13", False)],
)
def test_answers_match(prediction, gold, expected):
    assert answers_match(prediction, gold) is expected


def test_score_answer_reports_every_score():
    assert score_answer("31920.0", "31,920") == {
        "exact_match": 0.0, "f1": 0.0, "numeric": 1.0, "symbolic": 0.0, "correct": 1.0
    }
    scores = score_answer("Tomas Edrevel", "Tomas Quill Edrevel")
    assert scores["f1"] == pytest.approx(0.8) and scores["correct"] == 0.0
