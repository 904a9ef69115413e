"""Answer checks: SQuAD normalisation, numbers, math-verify equality in a worker, and robustness to hostile predictions."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from trl_agent_distill.metrics import (
    MathGrader,
    answers_match,
    default_math_grader,
    exact_match,
    extract_boxed,
    math_source,
    normalize_answer,
    numbers_equal,
    parse_number,
    score_answer,
    score_answers,
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
     "sqrt(9^999*9^999*9^999+7)", "1" * 10_000, "9^{9^{9^{9}}}", "10^{10^{10}}", "(" * 500 + "2" + ")" * 500,
     r"\frac{" * 200 + "1" + "}{2}" * 200, "x" * 1_000_000, "1+" * 500_000 + "1"],
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
        # math-verify reads "31,920" as the number, which the old sympy grammar refused.
        ("31920.0", "31,920", {"exact_match": 0.0, "f1": 0.0, "numeric": 1.0, "symbolic": 1.0, "correct": 1.0}),
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


# The hand-written LaTeX comparison misjudged these common MATH answers (issue 17); math-verify gets them right.
@pytest.mark.parametrize(
    "prediction, gold, expected",
    [
        ("(1, 2)", "(1,2)", True),
        (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)", True),
        ("5", r"5\text{ cm}", True),
        ("3", "x = 3", True),
        (r"\{3,2,1\}", r"\{1,2,3\}", True),
        ("(1, 3]", "[1, 3)", False),
        (r"\boxed{(1, 3]}", "[1, 3)", False),
        (r"the answer is $\boxed{\left( 3, \frac{\pi}{2} \right)}$.", r"(3,\frac{\pi}{2})", True),
    ],
)
def test_math_answers_misjudged_by_the_old_comparison(prediction, gold, expected):
    assert answers_match(prediction, gold) is expected
    assert score_answer(prediction, gold)["correct"] == float(expected)


# Passes every filter (short, shallow, small powers) yet sympy works on it for minutes.
SLOW_PAIR = ("(x+y+z)^{60}", "(x+y+z+1)^{60}")


def test_a_grading_past_its_deadline_kills_the_worker_and_counts_as_unequal():
    with MathGrader(timeout=0.5) as grader:
        assert grader.equal("1", "1") is True  # the worker is up
        started = time.perf_counter()
        assert grader.equal_batch([(r"\frac{1}{2}", "0.5"), SLOW_PAIR, ("(1, 2)", "(1,2)"), ("2", "3")]) == [
            True, False, True, False]
        assert grader.restarts == 1
        # The deadline, then a fresh worker (sympy's import) for the rest of the batch.
        assert time.perf_counter() - started < 15
        assert grader.equal("x = 3", "3") is True


def test_a_dead_worker_is_replaced(caplog):
    with MathGrader() as grader:
        assert grader.equal("(1, 2)", "(1,2)") is True
        grader._worker.kill()  # as if a hostile expression had crashed it
        grader._worker.wait()
        assert grader.equal(r"\{3,2,1\}", r"\{1,2,3\}") is True


def test_grading_works_from_threads():
    # math-verify's own timeout uses signal.alarm, which raises outside the main thread.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda pair: symbolic_equal(*pair), [("(1, 2)", "(1,2)"), ("3", "x = 3"),
                                                                     ("[1, 3)", "(1, 3]"), (r"\frac{1}{2}", "0.5")]))
    assert results == [True, True, False, True]


def grade_and_name_the_worker(prediction, gold):
    return symbolic_equal(prediction, gold), default_math_grader()._worker.pid


def test_a_forked_process_gets_its_own_worker():
    import multiprocessing

    assert symbolic_equal("(1, 2)", "(1,2)") is True  # the parent's worker is up
    parent_worker = default_math_grader()._worker.pid
    with multiprocessing.get_context("fork").Pool(1) as pool:
        results = pool.starmap(grade_and_name_the_worker, [("3", "x = 3"), ("[1, 3)", "(1, 3]")])
    assert [equal for equal, _ in results] == [True, False]
    assert parent_worker not in {worker for _, worker in results}  # the parent's pipes are not shared
    assert symbolic_equal(r"\{3,2,1\}", r"\{1,2,3\}") is True and default_math_grader()._worker.pid == parent_worker


def test_score_answers_grades_a_batch_like_score_answer():
    predictions = ["(1, 2)", "Eiffel Tower", "31920.0", r"\boxed{[1, 3)}", None, "12"]
    golds = ["(1,2)", "the eiffel tower", "31,920", "(1, 3]", "7", "13"]
    assert score_answers(predictions, golds) == [score_answer(p, g) for p, g in zip(predictions, golds)]
    assert [scores["correct"] for scores in score_answers(predictions, golds)] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 predictions for 1 gold"):
        score_answers(["1", "2"], ["1"])


@pytest.mark.parametrize(
    "value, expected",
    [(r"so \boxed{\frac{1}{2}}.", r"$\frac{1}{2}$"), ("sqrt(8)", r"$\sqrt{8}$"), ("sin(x)**2", r"$\sin(x)^2$"),
     (r"5\text{ cm}", r"$5\text{ cm}$"), ("2xy", "$2xy$"), (r"\$5", "$5$"), ("Eiffel Tower", None),
     ("lambda: 1", None), ("(" * 30 + "1" + ")" * 30, None), ("1" * 801, None), ("", None), (None, None)],
)
def test_math_source_refuses_prose_and_oversized_answers(value, expected):
    assert math_source(value) == expected


def test_math_grader_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        MathGrader(timeout=0)
