"""Is an agent's answer right? Checks shared by the trajectory filter (`generate`) and evaluation.

The Agent Distillation paper keeps a teacher trajectory only when its answer matches the gold one; what "matches"
means depends on the task: exact match after SQuAD-style normalisation for factual QA (plus token F1 as a softer
score), numbers equal within a tolerance ("4,210" vs 4210.0), and symbolic equality with sympy for math answers
written as LaTeX (`\\boxed{\\frac{1}{2}}` vs 0.5). Evaluation reports the same checks per example.

Predictions are untrusted model output and sympy's parser calls `eval`: the symbolic check only parses a small
whitelisted grammar (numbers, single-letter variables, a few functions, arithmetic), never attribute access or other
names, and refuses oversized input and huge powers, so every check returns quickly on any input.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTIONS = (re.compile(r"([-+]?\d+)\s*/\s*(\d+)"), re.compile(r"([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}"))
_MATH_HINT = re.compile(r"\\boxed|\\frac|\\sqrt|\^|\bpi\b|\\pi|\d[a-zA-Z]\b|[a-zA-Z]\s*[+\-*/]\s*\d")

# The symbolic grammar: after LaTeX translation only these characters and names may remain.
_SAFE_CHARACTERS = re.compile(r"[0-9a-zA-Z+\-*/()., ]*")
_ATTRIBUTE_ACCESS = re.compile(r"\.(?!\d)")  # a dot that does not start decimals, as in `E.n(...)`
_NAME = re.compile(r"[A-Za-z]\w*")
# Names an answer may use besides single-letter variables, with the sympy objects they stand for.
_SYMPY_NAMES = {"sqrt": "sqrt", "sin": "sin", "cos": "cos", "tan": "tan", "log": "log", "ln": "log", "exp": "exp",
                "pi": "pi", "E": "E"}
_MAX_LATEX_CHARS = 800
_MAX_SYMBOLIC_CHARS = 200
_MAX_EXPONENT = 1000
_MAX_LOG10 = 400  # numbers up to 10^400 (2^1000 is about 10^301); sympy takes seconds on roots of bigger ones
_PROBE_POINTS = (0.5772156649, 1.6180339887, 2.7182818284)
_LATEX_REPLACEMENTS = [
    (re.compile(r"\\left|\\right|\\[!,;: ]|\$"), ""),
    (re.compile(r"\\(?:cdot|times)"), "*"),
    (re.compile(r"\\div"), "/"),
    (re.compile(r"\\(pi|sin|cos|tan|log|ln|exp)\b"), r"\1"),
]


def _text(value: Any) -> str | None:
    """Predictions can be any value returned by the agent (`final_answer(7085)`); None stays None."""
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: Any, gold: Any) -> bool:
    """Equal after `normalize_answer` ("The Eiffel Tower." matches "eiffel tower"); None never matches."""
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
    starts = [match.end() for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    end = _closing_brace(text, starts[-1])
    return None if end is None else text[starts[-1] : end].strip()


def parse_number(value: Any) -> float | None:
    """A number written alone ("4,210", "$12.50", "45%", "3/4", "\\frac{3}{4}", "1e3", "\\boxed{7}"), else None."""
    text = _text(value)
    if text is None:
        return None
    boxed = extract_boxed(text)
    text = (text if boxed is None else boxed).replace("\\$", "$").replace("\\%", "%")
    text = text.strip().rstrip(".").strip().removeprefix("$").removesuffix("$").removesuffix("%").strip()
    if text.startswith(("$", "-$")):
        text = text.replace("$", "", 1)
    if _GROUPED_NUMBER.fullmatch(text):
        text = text.replace(",", "")
    for pattern in _FRACTIONS:
        if fraction := pattern.fullmatch(text):
            *sign, numerator, denominator = fraction.groups()
            if float(denominator) == 0:
                return None
            number = (-1 if sign == ["-"] else 1) * float(numerator) / float(denominator)
            break
    else:
        if not _NUMBER.fullmatch(text):
            return None
        number = float(text)
    return number if math.isfinite(number) else None


def numbers_equal(prediction: Any, gold: Any, *, rel_tol: float = 1e-4, abs_tol: float = 1e-6) -> bool:
    """Both parse as numbers (`parse_number`) and are close: 7085 matches "7,085" and "7085.0"."""
    predicted, expected = parse_number(prediction), parse_number(gold)
    if predicted is None or expected is None:
        return False
    return math.isclose(predicted, expected, rel_tol=rel_tol, abs_tol=abs_tol)


def symbolic_equal(prediction: Any, gold: Any) -> bool:
    """Whether two math answers (the LaTeX subset or plain expressions, boxed or not) are equal sympy expressions."""
    left, right = _sympy_expression(prediction), _sympy_expression(gold)
    if left is None or right is None:
        return False
    import sympy

    try:
        difference = left - right
        if difference == 0:
            return True
        if difference.is_Rational:  # exact numbers that differ, however little
            return False
        # Compare values at a few fixed points instead of calling sympy.simplify, whose time has no useful bound.
        # Complex floats, not sympy's arbitrary precision: exp(exp(exp(exp(exp(x))))) overflows at once.
        symbols = sorted(left.free_symbols | right.free_symbols, key=str)
        functions = [sympy.lambdify(symbols, side, modules="cmath") for side in (left, right)]
        for point in _PROBE_POINTS[: 3 if symbols else 1]:
            values = [point + k / 7 for k in range(len(symbols))]
            left_value, right_value = (complex(function(*values)) for function in functions)
            if not abs(left_value - right_value) <= 1e-9 * max(1.0, abs(left_value), abs(right_value)):
                return False
        return True
    except Exception:  # noqa: BLE001 - sympy raises many kinds of errors on odd input (tuples, infinities); none means "equal"
        return False


def answers_match(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> bool:
    """The correctness filter: exact match, or equal numbers, or (for math-looking answers) equal expressions."""
    if exact_match(prediction, gold) or numbers_equal(prediction, gold, rel_tol=rel_tol):
        return True
    return _looks_mathematical(prediction, gold) and symbolic_equal(prediction, gold)


def score_answer(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> dict[str, float]:
    """Every score for one prediction (0.0 / 1.0 except `f1`), for per-example evaluation records."""
    exact, numeric = exact_match(prediction, gold), numbers_equal(prediction, gold, rel_tol=rel_tol)
    symbolic = symbolic_equal(prediction, gold)
    correct = exact or numeric or (symbolic and _looks_mathematical(prediction, gold))  # answers_match, sympy once
    return {
        "exact_match": float(exact),
        "f1": token_f1(prediction, gold),
        "numeric": float(numeric),
        "symbolic": float(symbolic),
        "correct": float(correct),
    }


def _looks_mathematical(prediction: Any, gold: Any) -> bool:
    """Either answer has LaTeX math, a power, pi or a variable next to a number: worth a symbolic check."""
    texts = (_text(prediction), _text(gold))
    return None not in texts and any(_MATH_HINT.search(text) for text in texts)


# ---------------------------------------------------------------------------------------------- sympy
def _sympy_expression(value: Any):
    """The answer (its boxed part if any) as a sympy expression, or None when outside the safe grammar."""
    text = _text(value)
    if text is None:
        return None
    boxed = extract_boxed(text)
    source = _latex_to_python(text if boxed is None else boxed)
    if source is None:
        return None
    import sympy
    from sympy.parsing.sympy_parser import implicit_multiplication_application, parse_expr, standard_transformations

    def options() -> dict:
        """Fresh namespaces each parse: single letters are symbols, a few functions and constants, no builtins."""
        names = {letter: sympy.Symbol(letter) for letter in string.ascii_letters}
        names.update({name: getattr(sympy, attribute) for name, attribute in _SYMPY_NAMES.items()})
        # What the parser's own output calls; `__builtins__` is set so that `eval` does not add the real ones.
        parser_names = ("Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow")
        return dict(
            local_dict=names,
            global_dict={"__builtins__": {}, **{name: getattr(sympy, name) for name in parser_names}},
            transformations=(*standard_transformations, implicit_multiplication_application),
        )

    try:
        # Check the unevaluated tree first: evaluating 9**9**9 would never finish.
        if _log10_bound(parse_expr(source, evaluate=False, **options())) > _MAX_LOG10:
            return None
        return parse_expr(source, evaluate=True, **options())
    except Exception:  # noqa: BLE001 - not an expression in the whitelisted grammar
        return None


def _log10_bound(expression) -> float:
    """An upper bound on log10 |value| of `expression` and of all its parts (variables count as 10), or inf when an
    exponent exceeds `_MAX_EXPONENT`: sympy's exact arithmetic on huge numbers (a root of 9^999) takes minutes."""
    import sympy

    if expression.is_Rational:
        return math.log10(max(abs(expression.p), expression.q))
    if expression.is_Float:
        return math.log10(max(abs(float(expression)), 1.0))
    if expression.is_Atom:
        return 1.0
    if isinstance(expression, sympy.exp):
        return _log10_bound(sympy.Pow(sympy.E, expression.args[0], evaluate=False))
    parts = [_log10_bound(arg) for arg in expression.args]
    if isinstance(expression, sympy.Mul):
        return sum(parts)
    if not isinstance(expression, sympy.Pow):
        return max(parts, default=0.0) + isinstance(expression, sympy.Add)
    base, exponent = parts
    if exponent > math.log10(_MAX_EXPONENT) + 1:  # far too big: refuse without evaluating it
        return math.inf
    if not expression.exp.is_number:
        return max(parts)
    power = abs(complex(expression.exp.evalf(15)))
    return math.inf if power > _MAX_EXPONENT else max(exponent, base * max(1.0, power))


def _latex_to_python(text: str) -> str | None:
    """Translate the LaTeX subset to Python syntax and check it against the whitelist; None when it fails."""
    if len(text) > _MAX_LATEX_CHARS:
        return None
    text = " ".join(text.split()).rstrip(".")
    for pattern, replacement in _LATEX_REPLACEMENTS:
        text = pattern.sub(replacement, text)
    text = _replace_braced(text, r"\\sqrt\[(\d+)\]", lambda degree, body: f"(({body})**(1/{degree}))")
    text = _replace_braced(text, r"\\sqrt", lambda _, body: f"sqrt({body})")
    while (replaced := _replace_fraction(text)) != text:
        text = replaced
    text = text.replace("{", "(").replace("}", ")").replace("^", "**")
    if len(text) > _MAX_SYMBOLIC_CHARS or not _SAFE_CHARACTERS.fullmatch(text) or _ATTRIBUTE_ACCESS.search(text):
        return None
    if any(len(name) > 1 and name not in _SYMPY_NAMES for name in _NAME.findall(text)):
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
    """Rewrite the first `\\frac{a}{b}` (or `\\dfrac`, `\\tfrac`) as `((a)/(b))`; unchanged when there is none."""
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
    """Index of the `}` closing a brace opened just before `start`, or None when it never closes."""
    depth = 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return position
    return None
