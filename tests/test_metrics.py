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


@pytest.mark.parametrize(
    "text, expected",
    [("  The Eiffel Tower. ", "eiffel tower"), ("An apple,  a PEAR!", "apple pear"), ("Eiffel-Tower", "eiffeltower"),
     ("theatre", "theatre"), ("", "")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [("The Eiffel Tower.", "eiffel tower", True), ("Eiffel Tower", "Tower of Pisa", False), (7085, "7085", True),
     ("7085", 7086, False), (None, "None", False), ("theatre", "atre", False)],
)
def test_exact_match(prediction, gold, expected):
    assert exact_match(prediction, gold) is expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("the cat sat", "cat sat down", 0.8),  # P = 2/2, R = 2/3
        ("Tomas Edrevel", "Tomas Quill Edrevel", 0.8),
        ("red big dog", "big cat", 0.4),  # P = 1/3, R = 1/2
        ("cat cat", "cat", 2 / 3),  # P = 1/2, R = 1: a repeated token counts once
        ("cat", "dog", 0.0),
        ("a", "the", 1.0),  # both empty after normalisation
        ("cat", "the", 0.0),
        (None, "x", 0.0),
    ],
)
def test_token_f1(prediction, gold, expected):
    assert token_f1(prediction, gold) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text, expected",
    [(r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"), (r"\boxed{1} then \boxed{ 2 }", "2"), (r"\fbox{x}", "x"),
     (r"\boxed {a^{2}}", "a^{2}"), (r"\boxed{1", None), (r"\boxed{2} and \boxed{3", None), ("no box", None)],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [("4,210", 4210.0), ("$1,234.50", 1234.5), ("$12.50", 12.5), (r"\$5", 5.0), ("-$5", -5.0), ("45%", 45.0),
     (r"45\%", 45.0), ("7085.", 7085.0), (" -3 ", -3.0), ("1e3", 1000.0), ("2.5e-3", 0.0025), ("3/4", 0.75),
     (r"\frac{3}{4}", 0.75), (r"-\frac{1}{4}", -0.25), (r"\dfrac{-3}{4}", -0.75), (r"\boxed{7}", 7.0), (7085, 7085.0),
     ("about 12 people", None), ("12 apples", None), ("1,2,3", None), ("12,50", None), ("nan", None), ("inf", None),
     ("1e400", None), ("1/0", None), ("1" * 5000 + "/2", None), ("", None), (None, None)],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize(
    "prediction, gold, kwargs, expected",
    [(7085, "7085.0", {}, True), ("31,920", 31920, {}, True), ("3/4", "0.75", {}, True),
     ("1.00005", "1", {}, True), ("1.0002", "1", {}, False), ("1.0002", "1", {"rel_tol": 1e-3}, True),
     ("0.0000005", "0", {}, True), ("0.00001", "0", {}, False), ("seven", "7", {}, False), (None, "7", {}, False)],
)
def test_numbers_equal_with_tolerance(prediction, gold, kwargs, expected):
    assert numbers_equal(prediction, gold, **kwargs) is expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        (r"\frac{1}{2}", "0.5", True),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        (r"\left(x+1\right)^{2}", "x**2 + 2*x + 1", True),
        (r"\pi/2", "pi/2", True),
        (r"$\tfrac{\pi}{2}$", r"\frac{1}{2} \cdot \pi", True),
        (r"\sqrt[3]{27}", "3", True),
        (r"3 \times 4", "12", True),
        (r"\dfrac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", True),
        ("sin(x)^2+cos(x)^2", "1", True),
        (r"\frac{1}{3}", "0.33", False),
        (r"2\sqrt{2}", r"\sqrt{6}", False),
        ("x^2+2x+2", "(x+1)^2", False),
        ("2^100", "2^100+1", False),
        ("x", "y", False),
        ("Eiffel Tower", "Eiffel Tower", False),  # prose is not an expression
        (None, "1", False),
    ],
)
def test_symbolic_equal(prediction, gold, expected):
    assert symbolic_equal(prediction, gold) is expected


@pytest.mark.parametrize(
    "hostile",
    ["().__class__.__bases__", "(1).real", "x.a", "E.n(9^7)", "lambda: 1", "exec('1')", "[x for x in (1,)]",
     "9^9^9^9", "9**(9**9)", "(2^1000)^1000", "x^1001", "2^exp(9^999)", "exp(exp(exp(exp(exp(x)))))",
     "sqrt(9^999*9^999*9^999+7)", "1" * 10_000],
)
def test_hostile_predictions_are_refused_quickly(hostile):
    started = time.perf_counter()
    assert symbolic_equal(hostile, "1") is False and answers_match(hostile, "1") is False
    assert score_answer(hostile, hostile + "+1")["symbolic"] == 0.0
    assert time.perf_counter() - started < 1.0


def test_predictions_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    for attack in (f"__import__('os').system('touch {marker}')", f"\\boxed{{open('{marker}', 'w')}}"):
        assert symbolic_equal(attack, "0") is False and answers_match(attack, "0") is False
    assert not marker.exists()


@pytest.mark.parametrize(
    "prediction, gold, kwargs, expected",
    [("Eiffel Tower", "the eiffel tower", {}, True), (7085, "7,085", {}, True),
     (r"\boxed{\frac{1}{2}}", "1/2", {}, True), ("x^2 + 2x + 1", "(x+1)^2", {}, True),
     (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", {}, True),
     ("101", "100", {"rel_tol": 0.02}, True), ("101", "100", {}, False), ("Velmora", "Brannoch", {}, False),
     ("12", "13", {}, False), (r"\boxed{\frac{1}{3}}", "0.33", {}, False), (None, "x", {}, False)],
)
def test_answers_match(prediction, gold, kwargs, expected):
    assert answers_match(prediction, gold, **kwargs) is expected


@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("31920.0", "31,920", {"exact_match": 0.0, "f1": 0.0, "numeric": 1.0, "symbolic": 0.0, "correct": 1.0}),
        ("The Eiffel Tower", "eiffel tower", {"exact_match": 1.0, "f1": 1.0, "numeric": 0.0, "symbolic": 0.0,
                                              "correct": 1.0}),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", {"exact_match": 0.0, "f1": 0.0, "numeric": 0.0, "symbolic": 1.0,
                                             "correct": 1.0}),
        ("Tomas Edrevel", "Tomas Quill Edrevel", {"exact_match": 0.0, "f1": 0.8, "numeric": 0.0, "symbolic": 0.0,
                                                   "correct": 0.0}),
        (None, "7", {"exact_match": 0.0, "f1": 0.0, "numeric": 0.0, "symbolic": 0.0, "correct": 0.0}),
    ],
)
def test_score_answer_reports_every_score(prediction, gold, expected):
    scores = score_answer(prediction, gold)
    assert scores == pytest.approx(expected) and scores["correct"] == float(answers_match(prediction, gold))
