"""Is an agent's answer right? Checks shared by the trajectory filter (`generate`) and evaluation.

The Agent Distillation paper keeps a teacher trajectory only when its answer matches the gold one; what "matches"
means depends on the task: exact match after SQuAD-style normalisation for factual QA (plus token F1 as a softer
score), numbers equal within a tolerance ("4,210" vs 4210.0), and for math answers symbolic equality as
`math-verify` (the grader of TRL and open-r1) decides it: `\\boxed{\\frac{1}{2}}` equals 0.5, `(1,2)` equals
`(1, 2)`, `x = 3` equals 3, `\\{1,2,3\\}` equals `\\{3,2,1\\}`, and `[1, 3)` differs from `(1, 3]`. Evaluation
reports the same checks per example.

Predictions are untrusted model output. Only LaTeX is parsed (math-verify's ANTLR grammar, never sympy's `eval`-based
expression parser), prose and oversized or deeply nested answers are refused before parsing, huge powers after it,
and the comparison itself runs in a long-lived worker process that is killed and replaced when one grading passes
its deadline (math-verify's own timeout uses signals, so it only works in a main thread; a worker also keeps a
crash or a memory blow-up out of the caller). Grading many answers at once (`score_answers`,
`MathGrader.equal_batch`) sends them to the worker in one message.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import select
import string
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_GROUPED_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_FRACTIONS = (re.compile(r"([-+]?\d+)\s*/\s*(\d+)"), re.compile(r"([-+]?)\\[dt]?frac\{([-+]?\d+)\}\{(\d+)\}"))
# A math answer is a formula, not prose: runs of three or more letters (`xy` is a product) must be LaTeX commands (`\\frac`), the bodies of
# `\\text{...}`-like commands (units: `5\\text{ cm}`) or these function names.
_FUNCTION_NAMES = frozenset({"sin", "cos", "tan", "sec", "csc", "cot", "arcsin", "arccos", "arctan", "sinh", "cosh",
                             "tanh", "log", "ln", "exp", "sqrt", "pi", "infty"})
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LETTER_RUN = re.compile(r"[A-Za-z]{3,}")
_PLAIN_FUNCTION = re.compile(r"(?<![\\A-Za-z])(" + "|".join(sorted(_FUNCTION_NAMES, key=len, reverse=True)) + r")(?![A-Za-z])")
_MAX_MATH_CHARS = 800  # a MATH answer is a few dozen characters; the parser's time grows fast with length
_MAX_NESTING = 24  # brackets and braces; deeper nesting makes the parser crawl
_MAX_EXPONENT = 1000
_MAX_LOG10 = 400  # numbers up to 10^400 (2^1000 is about 10^301); sympy takes seconds on roots of bigger ones
DEFAULT_MATH_TIMEOUT = 5.0  # seconds one comparison may take in the worker before it is killed (counts as unequal)
_WORKER_MEMORY_BYTES = 4 << 30
_WORKER_STARTUP_TIMEOUT = 120.0  # importing sympy on a busy machine


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
    """Whether two math answers (LaTeX or plain, boxed or not) are equal for math-verify: values, tuples, intervals,
    sets, equations (`x = 3` vs 3) and units in `\\text{}` (`5\\text{ cm}` vs 5). Prose is never an expression."""
    return default_math_grader().equal(prediction, gold)


def answers_match(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> bool:
    """The correctness filter: exact match, or equal numbers, or equal math answers (`symbolic_equal`)."""
    if _same_answer(prediction, gold) or numbers_equal(prediction, gold, rel_tol=rel_tol):
        return True
    return symbolic_equal(prediction, gold)


def score_answer(prediction: Any, gold: Any, *, rel_tol: float = 1e-4) -> dict[str, float]:
    """Every score for one prediction (0.0 / 1.0 except `f1`), for per-example evaluation records."""
    return score_answers([prediction], [gold], rel_tol=rel_tol)[0]


def score_answers(predictions: Sequence[Any], golds: Sequence[Any], *, rel_tol: float = 1e-4) -> list[dict[str, float]]:
    """`score_answer` for many predictions, their math comparisons graded in one batch by the worker."""
    if len(predictions) != len(golds):
        raise ValueError(f"score_answers got {len(predictions)} predictions for {len(golds)} gold answers.")
    symbolic = default_math_grader().equal_batch(list(zip(predictions, golds, strict=True)))
    scores = []
    for prediction, gold, is_equal in zip(predictions, golds, symbolic, strict=True):
        numeric = numbers_equal(prediction, gold, rel_tol=rel_tol)
        scores.append({
            "exact_match": float(exact_match(prediction, gold)),
            "f1": token_f1(prediction, gold),
            "numeric": float(numeric),
            "symbolic": float(is_equal),
            "correct": float(_same_answer(prediction, gold) or numeric or is_equal),
        })
    return scores


def _same_answer(prediction: Any, gold: Any) -> bool:
    """Exact match as a correctness criterion. SQuAD normalisation drops brackets, so that `(1, 3]` would match
    `[1, 3)`: two formulas must be the same text, case and spaces aside."""
    if not exact_match(prediction, gold):
        return False
    formulas = math_source(prediction), math_source(gold)
    return None in formulas or len({"".join(formula.split()).casefold() for formula in formulas}) == 1


# ---------------------------------------------------------------------------------------------- math-verify
def math_source(value: Any) -> str | None:
    """The answer (its last `\\boxed{}` if any) as the `$...$` LaTeX math-verify reads, or None when it is not a
    formula: prose, over `_MAX_MATH_CHARS` characters or nested deeper than `_MAX_NESTING`."""
    text = _text(value)
    if text is None:
        return None
    boxed = extract_boxed(text)
    text = (text if boxed is None else boxed).replace("\\$", "").replace("$", "").strip().rstrip(".").strip()
    if not text or len(text) > _MAX_MATH_CHARS or _nesting(text) > _MAX_NESTING:
        return None
    words = _LETTER_RUN.findall(_LATEX_COMMAND.sub(" ", _TEXT_COMMAND.sub(" ", text)))
    if any(word not in _FUNCTION_NAMES for word in words):
        return None
    # Plain-text habits to LaTeX: `sqrt(8)` -> `\sqrt{8}`, `sin(x)` -> `\sin(x)`, `x**2` -> `x^2`.
    text = _PLAIN_FUNCTION.sub(r"\\\1", text).replace("**", "^")
    text = _braced_sqrt_argument(text)
    return f"${text}$"


class MathGrader:
    """math-verify comparisons in a long-lived worker process, each bounded by `timeout` seconds.

    A comparison that runs past its deadline (a pathological expression that sympy chews on) or that crashes the
    worker counts as unequal; the worker is killed and the next comparison starts a fresh one. Thread-safe: calls
    from several threads take turns. `close()` (or leaving a `with` block) stops the worker.
    """

    def __init__(self, timeout: float = DEFAULT_MATH_TIMEOUT):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        self.timeout = float(timeout)
        self.restarts = 0  # workers killed for passing the deadline or dying; for logs and tests
        self._lock = threading.Lock()
        self._worker: subprocess.Popen | None = None
        self._worker_parent = os.getpid()
        self._buffer = b""

    def equal(self, prediction: Any, gold: Any) -> bool:
        return self.equal_batch([(prediction, gold)])[0]

    def equal_batch(self, pairs: Sequence[tuple[Any, Any]]) -> list[bool]:
        """For each (prediction, gold) pair, whether math-verify calls them equal; prose pairs never reach it."""
        sources = [(math_source(prediction), math_source(gold)) for prediction, gold in pairs]
        results = [False] * len(pairs)
        pending = [position for position, (left, right) in enumerate(sources) if left is not None and right is not None]
        with self._lock:
            while pending:
                answered = self._grade([sources[position] for position in pending])
                for position, result in zip(pending, answered):
                    results[position] = result
                # A killed worker answered a prefix: the pair it was stuck on counts as unequal, the rest go to a new one.
                pending = pending[len(answered) + 1 :] if len(answered) < len(pending) else []
        return results

    def close(self) -> None:
        with self._lock:
            self._stop()

    def __enter__(self) -> MathGrader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- the worker ------------------------------------------------------------------------------------------
    def _grade(self, sources: list[tuple[str, str]]) -> list[bool]:
        """Results for a prefix of `sources`: all of them, or those before the one that hung or crashed the worker."""
        worker = self._ensure_worker()
        answered: list[bool] = []
        try:
            worker.stdin.write(json.dumps(sources).encode() + b"\n")
            worker.stdin.flush()
            while len(answered) < len(sources):
                line = self._read_line(worker, self.timeout)
                if line is None:
                    break
                answered.append(json.loads(line))
        except (OSError, ValueError):
            pass  # a dead worker (broken pipe) or a garbled line: the pair in progress counts as unequal
        if len(answered) < len(sources):
            logger.warning(
                "math grading of %r against %r passed its %.1fs deadline or crashed the worker; counted as unequal "
                "and the worker restarted.", sources[len(answered)][0][:80], sources[len(answered)][1][:80],
                self.timeout,
            )
            self.restarts += 1
            self._stop()
        return answered

    def _ensure_worker(self) -> subprocess.Popen:
        if self._worker_parent != os.getpid():
            # A forked copy of this process (a data-loader worker) must not talk over its parent's pipes.
            self._worker, self._worker_parent = None, os.getpid()
        if self._worker is not None and self._worker.poll() is None:
            return self._worker
        self._stop()
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        self._worker = subprocess.Popen(
            [sys.executable, "-c", "from trl_agent_distill.metrics import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        self._buffer = b""
        if self._read_line(self._worker, _WORKER_STARTUP_TIMEOUT) != b"ready":
            self._stop()
            raise RuntimeError(
                "The math grading worker did not start: check that math-verify is installed "
                '(pip install "math-verify[antlr4_13_2]") and that `python -c "import math_verify"` works.'
            )
        return self._worker

    def _read_line(self, worker: subprocess.Popen, timeout: float) -> bytes | None:
        """The worker's next output line, or None when it sends none within `timeout` seconds or exits."""
        deadline = time.monotonic() + timeout
        descriptor = worker.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                return None
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout):
                stream.close()


_default_grader: MathGrader | None = None
_default_grader_lock = threading.Lock()


def default_math_grader() -> MathGrader:
    """The process-wide grader behind `symbolic_equal`, `answers_match` and `score_answer(s)`; its worker starts on
    first use and stops at exit."""
    global _default_grader
    with _default_grader_lock:
        if _default_grader is None:
            _default_grader = MathGrader()
            atexit.register(_default_grader.close)
        return _default_grader


def _serve() -> None:
    """The worker's loop: read a JSON list of [prediction, gold] sources per line, write one JSON bool per pair."""
    import resource

    # A runaway expression must exhaust the worker, not the machine.
    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": the parent enforces it
    from math_verify import LatexExtractionConfig, parse, verify

    extraction = [LatexExtractionConfig()]

    def equal(prediction: str, gold: str) -> bool:
        try:
            parsed = [parse(source, extraction_config=extraction, parsing_timeout=None) for source in (gold, prediction)]
            expressions = [item for answer in parsed for item in answer if not isinstance(item, str)]
            # Evaluating 9^{9^{9}} would never finish: check the unevaluated trees first.
            if not all(parsed) or any(_log10_bound(expression) > _MAX_LOG10 for expression in expressions):
                return False
            return bool(verify(*parsed, timeout_seconds=None))
        except Exception:  # noqa: BLE001 - any failure to parse or compare means "not shown equal"
            return False

    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        for prediction, gold in json.loads(line):
            out.write(b"true\n" if equal(prediction, gold) else b"false\n")
            out.flush()


def _log10_bound(expression) -> float:
    """An upper bound on log10 |value| of `expression` and of all its parts (variables count as 10), or inf when an
    exponent exceeds `_MAX_EXPONENT`: sympy's exact arithmetic on huge numbers (a root of 9^999) takes minutes."""
    import sympy

    if not isinstance(expression, sympy.Basic):
        return max((_log10_bound(item) for item in getattr(expression, "args", ())), default=0.0)
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


def _nesting(text: str) -> int:
    """The deepest nesting of brackets and braces in `text`."""
    depth = deepest = 0
    for character in text:
        if character in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif character in ")]}":
            depth = max(depth - 1, 0)
    return deepest


def _braced_sqrt_argument(text: str) -> str:
    """`\\sqrt(...)` (from plain `sqrt(...)`) as `\\sqrt{...}`, which is what LaTeX means by it."""
    while (match := re.search(r"\\sqrt\s*\(", text)) is not None:
        depth = 1
        for position in range(match.end(), len(text)):
            depth += {"(": 1, ")": -1}.get(text[position], 0)
            if depth == 0:
                break
        else:
            return text
        text = f"{text[: match.start()]}\\sqrt{{{text[match.end() : position]}}}{text[position + 1 :]}"
    return text

def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing a brace opened just before `start`, or None when it never closes."""
    depth = 1
    for position in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return position
    return None
