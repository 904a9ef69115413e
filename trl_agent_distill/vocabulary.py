"""Do teacher and student share a tokenizer? The divergence compares their next-token distributions id by id.

Equal vocabulary sizes prove nothing (Llama-2 and Mistral both have 32,000 tokens), and equal tokenizers may come
with embedding matrices of different row counts (Qwen2.5-0.5B has 151,936 rows, 7B 152,064). So the tokenizers
themselves are compared: every token of the student's vocabulary must have the same id in the teacher's, and both
must split a probe text (prose, code, digits, whitespace, non-Latin script, chat markup) into the same ids, which
catches other merges, normalizers or pre-tokenizers over one vocabulary.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROBE_TEXT = (
    "Thought: I need the population of Varnholt (founded 1642).\nCode:\n```py\n"
    "result = web_search(query=\"Varnholt\")\nprint(result['population'] * 2 - 18)\n```<end_code>\n"
    "\tObservation: 4,120 inhabitants; café Zürich, naïve façade — 東京都 Москва مرحبا 🙂\n"
    "    indented    spaces\r\n<|im_start|>assistant\nFinal answer: 8222"
)


def tokenizer_source(model: Any, name_or_path: str | None = None) -> str | None:
    """Where a model's tokenizer can be loaded from: the name it was given by, else the path its config records."""
    if name_or_path:
        return name_or_path
    source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return str(source) if source else None


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved at `source`, or None (logged) when there is none to load there."""
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        logger.info("No tokenizer could be loaded from %s: %s", source, error)
        return None


def tokenizer_mismatch(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> str | None:
    """What makes `teacher` another tokenizer than `student`, in words; None when the student's ids mean the same.

    Tokens the student appended after the teacher's last id (a pad token added for training) are not a mismatch:
    they collide with none of the teacher's tokens. `added_tokens_appended` lists them for a warning.
    """
    student_vocab, teacher_vocab = student.get_vocab(), teacher.get_vocab()
    teacher_tokens = {index: token for token, index in teacher_vocab.items()}
    conflicts = [
        token
        for token, index in student_vocab.items()
        if teacher_vocab.get(token, index) != index or teacher_tokens.get(index, token) != token
    ]
    appended = set(added_tokens_appended(student, teacher))
    missing = [token for token in student_vocab if token not in teacher_vocab and token not in appended]
    differing = sorted(set(conflicts) | set(missing), key=student_vocab.get)
    if differing:
        examples = ", ".join(
            f"{token!r} is id {student_vocab[token]} in the student's, "
            + (f"id {teacher_vocab[token]}" if token in teacher_vocab else "absent")
            + " in the teacher's"
            for token in differing[:3]
        )
        return (
            f"{len(differing)} of the student's {len(student_vocab)} tokens differ ({examples}); the teacher's "
            f"tokenizer has {len(teacher_vocab)} tokens"
        )
    student_ids = student(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    teacher_ids = teacher(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if student_ids != teacher_ids:
        first = next((i for i, pair in enumerate(zip(student_ids, teacher_ids)) if pair[0] != pair[1]), None)
        first = min(len(student_ids), len(teacher_ids)) if first is None else first
        return (
            "their vocabularies agree but they split the same text differently (other merges or normalization): "
            f"a probe text is {len(student_ids)} tokens for the student and {len(teacher_ids)} for the teacher, first "
            f"differing at token {first} ({student.convert_ids_to_tokens(student_ids[first:first + 1])} vs "
            f"{teacher.convert_ids_to_tokens(teacher_ids[first:first + 1])})"
        )
    return None


def added_tokens_appended(student: PreTrainedTokenizerBase, teacher: PreTrainedTokenizerBase) -> list[str]:
    """Added tokens of the student that the teacher lacks, at ids after every id the teacher's tokenizer uses."""
    teacher_vocab = teacher.get_vocab()
    last_teacher_id = max(teacher_vocab.values(), default=-1)
    return [
        token.content
        for index, token in sorted(student.added_tokens_decoder.items())
        if index > last_teacher_id and token.content not in teacher_vocab
    ]
