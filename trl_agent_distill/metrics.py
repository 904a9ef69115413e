"""Is an agent's answer right? Checks shared by the trajectory filter (`generate`) and evaluation.

The Agent Distillation paper keeps a teacher trajectory only when its answer matches the gold one; what "matches"
means depends on the task: exact match after SQuAD-style normalisation for factual QA (plus token F1 as a softer
score), numbers equal within a tolerance ("4,210" vs 4210.0), and symbolic equality with sympy for math answers
written as LaTeX (`\\boxed{\\frac{1}{2}}` vs 0.5). Predictions are untrusted model output: the symbolic check only
parses a small whitelisted grammar, never arbitrary code, and gives up on oversized or pathological input.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTION = re.compile(r"([-+]?\d+)\s*/\s*(\d+)")
_LATEX_FRACTION = re.compile(r"([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}")
_MATH_HINT = re.compile(r"\\boxed|\\frac|\\sqrt|\^|\bpi\b|\\pi|\d[a-zA-Z]\b|[a-zA-Z]\s*[+\-*/]\s*\d")

# The symbolic grammar: after LaTeX translation only these names and characters may remain.
_SYMPY_FUNCTIONS = ("sqrt", "sin", "cos", "tan", "log", "exp", "pi", "E")
_ALLOWED_CHARS = re.compile(r"[0-9a-zA-Z+\-*/().,\s]*")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_MAX_SYMBOLIC_CHARS = 200
_MAX_EXPONENT = 1000
_PROBE_POINTS = (0.5772156649, 1.6180339887, 2.7182818284)
_LATEX_REPLACEMENTS = [
    (re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\$"), ""),
    (re.compile(r"\\(?:cdot|times)"), "*"),
    (re.compile(r"\\div"), "/"),
    (re.compile(r"\\pi"), "pi"),
    (re.compile(r"\\(sin|cos|tan|log|exp|ln)\b"), r"\1"),
]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: Any, gold: Any) -> bool:
    prediction, gold = _text(prediction), _text(gold)
    return prediction is not None and gold is not None and normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: Any, gold: Any) -> float:
    """SQuAD token F1 between the normalised answers (1.0 when both are empty, 0.0 when only one is)."""
    prediction, gold = _text(prediction), _text(gold)
    if prediction is None or gold is None:
        return 0.0
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def extract_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), nested braces included; None if absent or open."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[start:position].strip()
    return None


def parse_number(value: Any) -> float | None:
    """A number written alone ("4,210", "$12.50", "45%", "3/4", "\\frac{3}{4}", "1e3", "\\boxed{7}"), else None."""
    text = _text(value)
    if text is None:
        return None
    text = text.strip()
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.strip().rstrip(".").strip().removeprefix("$").removesuffix("$").strip()
    text = text.removesuffix("\\%").removesuffix("%").strip()
    if text.startswith(("$", "-$")):
        text = text.replace("$", "", 1)
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    for pattern in (_LATEX_FRACTION, _FRACTION):
        fraction = pattern.fullmatch(text)
        if fraction:
            *sign, numerator, denominator = fraction.groups()
            if int(denominator) == 0:
                return None
            return (-1 if sign and sign[0] == "-" else 1) * int(numerator) / int(denominator)
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def numbers_equal(prediction: Any, gold: Any, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    predicted, expected = parse_number(prediction), parse_number(gold)
    if predicted is None or expected is None:
        return False
    return math.isclose(predicted, expected, rel_tol=rel_tol, abs_tol=abs_tol)


def symbolic_equal(prediction: Any, gold: Any) -> bool:
    """Whether two math answers (LaTeX subset or plain expressions) are equal as sympy expressions."""
    left, right = _sympy_expression(prediction), _sympy_expression(gold)
    if left is None or right is None:
        return False
    try:
        difference = left - right
        if difference == 0:
            return True
        if difference.is_Rational:  # exact numbers that differ, however little
            return False
        # Evaluate at a few fixed points instead of sympy.simplify, whose time has no useful bound.
        symbols = sorted(left.free_symbols | right.free_symbols, key=str)
        for point in _PROBE_POINTS[: 3 if symbols else 1]:
            values = {symbol: point + k / 7 for k, symbol in enumerate(symbols)}
            left_value, right_value = left.evalf(30, subs=values), right.evalf(30, subs=values)
            if left_value.free_symbols or right_value.free_symbols:
                return False
            left_number, right_number = complex(left_value), complex(right_value)
            if not abs(left_number - right_number) <= 1e-9 * max(1.0, abs(left_number), abs(right_number)):
                return False
        return True
    except Exception:  # sympy raises many kinds of errors on odd input; none of them means "equal"
        return False


def answers_match(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> bool:
    """The correctness filter: exact match, or equal numbers, or (for math-looking answers) equal expressions."""
    if exact_match(prediction, gold) or numbers_equal(prediction, gold, rel_tol=rel_tol):
        return True
    prediction, gold = _text(prediction), _text(gold)
    if prediction is None or gold is None:
        return False
    looks_mathematical = _MATH_HINT.search(prediction) or _MATH_HINT.search(gold)
    return bool(looks_mathematical) and symbolic_equal(prediction, gold)


def score_answer(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> dict[str, float]:
    """Every score for one prediction, for per-example evaluation records."""
    return {
        "exact_match": float(exact_match(prediction, gold)),
        "f1": token_f1(prediction, gold),
        "numeric": float(numbers_equal(prediction, gold, rel_tol=rel_tol)),
        "symbolic": float(symbolic_equal(prediction, gold)),
        "correct": float(answers_match(prediction, gold, rel_tol=rel_tol)),
    }


# ---------------------------------------------------------------------------------------------- sympy
def _sympy_expression(value: Any):
    text = _text(value)
    if text is None or len(text) > 4 * _MAX_SYMBOLIC_CHARS:
        return None
    boxed = extract_boxed(text)
    source = _latex_to_python(boxed if boxed is not None else text)
    if source is None:
        return None
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    names = {name: getattr(sympy, name) for name in _SYMPY_FUNCTIONS}
    names["ln"] = sympy.log
    letters = {letter: sympy.Symbol(letter) for letter in string.ascii_letters if letter != "E"}
    options = dict(
        local_dict={**letters, **names},
        # What the parser's own output calls; nothing else is reachable from the parsed text.
        global_dict={name: getattr(sympy, name) for name in ("Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow")},
        transformations=(*standard_transformations, implicit_multiplication_application, convert_xor),
    )
    try:
        # Check the unevaluated tree first: evaluating 9**9**9 would never finish.
        if not _powers_are_small(parse_expr(source, evaluate=False, **options)):
            return None
        return parse_expr(source, evaluate=True, **options)
    except Exception:  # not an expression in the whitelisted grammar
        return None


def _powers_are_small(expression) -> bool:
    """Nested numeric exponents multiply to at most `_MAX_EXPONENT` ((2^10)^10 passes, 9^(9^9) does not)."""
    return _growth(expression) <= _MAX_EXPONENT


def _growth(expression) -> float:
    import sympy

    if not isinstance(expression, sympy.Pow):
        return max((_growth(arg) for arg in expression.args), default=1.0)
    base, exponent = expression.args
    exponent_growth = _growth(exponent)
    if exponent_growth > _MAX_EXPONENT:
        return math.inf
    magnitude = abs(complex(exponent.evalf(15))) if exponent.is_number else 1.0
    return max(exponent_growth, max(1.0, magnitude) * _growth(base))


def _latex_to_python(text: str) -> str | None:
    """Translate the LaTeX subset to Python syntax and check it against the whitelist; None when it fails."""
    text = text.strip().rstrip(".")
    for pattern, replacement in _LATEX_REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = _replace_braced(text, r"\\sqrt\[(\d+)\]", lambda degree, body: f"(({body})**(1/{degree}))")
    text = _replace_braced(text, r"\\sqrt", lambda _, body: f"sqrt({body})")
    while True:
        replaced = _replace_fraction(text)
        if replaced == text:
            break
        text = replaced
    text = text.replace("{", "(").replace("}", ")").replace("^", "**")
    if len(text) > _MAX_SYMBOLIC_CHARS or "__" in text or "\\" in text or not _ALLOWED_CHARS.fullmatch(text):
        return None
    for name in _IDENTIFIER.findall(text):
        if len(name) > 1 and name not in (*_SYMPY_FUNCTIONS, "ln"):
            return None
    return text


def _replace_braced(text: str, opener: str, build) -> str:
    """Rewrite `opener{body}` (balanced braces) with `build(first opener group or None, body)`."""
    pattern = re.compile(opener + r"\s*\{")
    while (match := pattern.search(text)) is not None:
        end = _closing_brace(text, match.end())
        if end is None:
            return text
        degree = match.group(1) if match.groups() else None
        text = text[: match.start()] + build(degree, text[match.end() : end]) + text[end + 1 :]
    return text


def _replace_fraction(text: str) -> str:
    match = re.search(r"\\[dt]?frac\s*\{", text)
    if match is None:
        return text
    numerator_end = _closing_brace(text, match.end())
    if numerator_end is None or text[numerator_end + 1 : numerator_end + 2] != "{":
        return text
    denominator_end = _closing_brace(text, numerator_end + 2)
    if denominator_end is None:
        return text
    numerator, denominator = text[match.end() : numerator_end], text[numerator_end + 2 : denominator_end]
    return f"{text[: match.start()]}(({numerator})/({denominator})){text[denominator_end + 1 :]}"


def _closing_brace(text: str, start: int) -> int | None:
    depth = 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return position
    return None
