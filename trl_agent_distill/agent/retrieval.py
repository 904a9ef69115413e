"""Local document retrieval, exposed to agents as the `web_search(query)` tool.

The Agent Distillation teacher (Kang et al., arXiv 2505.17612) answers factual questions with a `web_search` tool
that returns the top-3 Wikipedia passages, ranked by `intfloat/e5-base-v2` embeddings. Generating trajectories,
training and evaluating students must run offline and give the same observations every time, so this module serves
that tool from a local corpus (a JSONL file or a `datasets.Dataset` of `id` / `title` / `text`) with BM25 (`bm25s`,
the CPU default) or the paper's dense retriever: sentence-transformers embeddings in a FAISS index (exact inner
product, or IVF-PQ so that the 21M passages of wiki-18 fit in a workstation's memory). An index is built once, saved
atomically beside the corpus together with a fingerprint of the corpus and the settings, and reused by later runs as
long as both match; a dense build writes its embeddings in shards, so a killed build resumes where it stopped.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bm25s
import numpy as np

from ..storage import (
    as_stored,
    model_files_identity,
    publish_folder,
    read_fingerprint,
    remove_stale_work_dirs,
    write_json,
)

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

RETRIEVERS = ("bm25", "dense")
CORPUS_FIELDS = ("id", "title", "text")
DENSE_INSTALL_HINT = 'pip install "trl-agent-distill[dense]"'
# The paper's retriever and the prefixes its model family was trained with (without them E5 retrieves worse).
PAPER_DENSE_MODEL = "intfloat/e5-base-v2"
E5_PROMPTS = {"query": "query: ", "document": "passage: "}
_E5_NAME = re.compile(r"(?:^|[/_-])(?:multilingual-)?e5-(?:small|base|large)", re.IGNORECASE)
FAISS_INDEX_KINDS = ("flat", "ivfpq")
# Bump when the on-disk layout changes, so indexes written by older code are rebuilt rather than misread (the FAISS
# index needed no bump: its settings carry a "faiss" entry that no older manifest has).
INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_FAISS_NAME = "index.faiss"
# Documents tokenized per step while indexing with BM25: bounds memory spikes without slowing small corpora.
_INDEX_BATCH_SIZE = 4096
# Documents per embedding shard: what a killed dense build loses at most (a few seconds of GPU time).
_EMBED_SHARD_SIZE = 16384


@dataclass(frozen=True)
class Document:
    """One retrieved document; `score` is the retriever's relevance (BM25 score or cosine similarity)."""

    id: str
    title: str
    text: str
    score: float


@dataclass(frozen=True)
class FaissIndexConfig:
    """How a dense retriever searches its embeddings (FAISS, inner product of unit vectors = cosine similarity).

    - `kind="flat"` (default): exact search; 4 bytes per dimension per passage in memory (e5-base: 3 KB, so 64 GB for
      the 21M passages of wiki-18: fine for a Wikipedia subset, too much for the whole).
    - `kind="ivfpq"`: the vectors are split into `nlist` cells (k-means) and stored as product-quantisation codes of
      `m` sub-vectors of `nbits` bits each: `m * nbits / 8` bytes per passage (64 B with m=64, nbits=8: 1.3 GB for
      21M passages, ~2% of flat) plus 8 B of id; a query visits the `nprobe` nearest cells. Approximate: recall
      against flat search grows with `nprobe`. The quantisers are trained on `train_size` passages sampled uniformly
      with `seed` (default `min(num passages, 64 * nlist)`: ~1M vectors, ~3 GB, for nlist=16384, the size that
      suits 21M passages; use about 4 * sqrt(num passages) cells). `m` must divide the embedding dimension (768 for
      e5-base).

    `nprobe` only changes searching, so changing it reuses the saved index; the other fields rebuild it.
    """

    kind: str = "flat"
    nlist: int = 16384
    m: int = 64
    nbits: int = 8
    nprobe: int = 64
    train_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAISS_INDEX_KINDS:
            raise ValueError(f"FaissIndexConfig.kind must be one of {FAISS_INDEX_KINDS}, got {self.kind!r}.")
        for name in ("nlist", "m", "nbits", "nprobe", "train_size", "seed"):
            value = getattr(self, name)
            if value is None and name == "train_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                wanted = "a non-negative int" if name == "seed" else "a positive int"
                raise ValueError(f"FaissIndexConfig.{name} must be {wanted}, got {value!r}.")
        if self.nbits > 16:
            raise ValueError(f"FaissIndexConfig.nbits must be at most 16 (codes of 2^nbits centroids), got {self.nbits}.")

    @classmethod
    def from_value(cls, value: str | Mapping[str, Any] | FaissIndexConfig) -> FaissIndexConfig:
        """A config from itself, a kind name ("flat", "ivfpq") or a mapping of its fields (as in a YAML recipe)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(kind=value)
        if isinstance(value, Mapping):
            known = [field.name for field in dataclasses.fields(cls)]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"dense_index has unknown fields {unknown}; known fields: {known}.")
            return cls(**value)
        raise TypeError(
            f"dense_index must be 'flat', 'ivfpq', a mapping of FaissIndexConfig fields or a FaissIndexConfig, "
            f"got {type(value).__name__}."
        )

    def build_settings(self, num_documents: int) -> dict[str, Any]:
        """What the saved index depends on (nprobe aside), with the training sample size resolved."""
        if self.kind == "flat":
            return {"kind": "flat"}
        return {"kind": "ivfpq", "nlist": self.nlist, "m": self.m, "nbits": self.nbits,
                "train_size": self.resolved_train_size(num_documents), "seed": self.seed}

    def resolved_train_size(self, num_documents: int) -> int:
        return min(num_documents, self.train_size if self.train_size is not None else 64 * self.nlist)


class RetrievalTool:
    """Top-k retrieval over a local corpus with the call shape of the paper's `web_search` tool.

    `corpus` is a JSONL file (one `{"id", "title", "text"}` object per line), a directory written by
    `Dataset.save_to_disk`, or an in-memory `datasets.Dataset` with those columns. `retriever="bm25"` indexes
    title and text with `bm25s`; `retriever="dense"` embeds them with the sentence-transformers model `dense_model`
    (name or local path; the paper's is `PAPER_DENSE_MODEL`, intfloat/e5-base-v2) and ranks them by cosine
    similarity in a FAISS index (`dense_index`: a `FaissIndexConfig`, "flat" or "ivfpq", or a mapping of its fields).

    The index is saved in `index_dir`, by default beside a corpus that lives on disk (`<corpus>.bm25s/`, or
    `<corpus>.dense-<model>/`); an in-memory Dataset keeps its index in memory unless `index_dir` is given. A dense
    build shows a progress bar and writes the embeddings in shards to `<index_dir>.embeddings/`: a killed build run
    again with the same corpus and model embeds only the shards still missing; the shards are deleted once the index
    is saved.

    Extra knobs beyond the tool interface:
    - `stemming`: `None` stems English words with PyStemmer when it is installed, `True` requires it, `False` never
      stems. What was used is part of the index settings, so an index is only reused with the same choice.
    - `dense_prompts`: prompts handed to the sentence-transformers model, prefixed to queries ("query") and to
      documents ("document"). E5 models (the paper's) get `E5_PROMPTS` ("query: " / "passage: "), the prefixes
      they were trained with, unless the model configures prompts of its own or `dense_prompts` is given.
    """

    name = "web_search"

    def __init__(
        self,
        corpus: str | os.PathLike | datasets.Dataset,
        *,
        top_k: int = 3,
        retriever: str = "bm25",
        dense_model: str | None = None,
        index_dir: str | os.PathLike | None = None,
        name: str = "web_search",
        max_chars_per_document: int | None = 1000,
        stemming: bool | None = None,
        dense_prompts: dict[str, str] | None = None,
        dense_index: str | Mapping[str, Any] | FaissIndexConfig = "flat",
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a Python identifier (the agent calls it as a function), got {name!r}.")
        if retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}, got {retriever!r}.")
        if retriever == "dense" and not dense_model:
            raise ValueError('retriever="dense" needs dense_model: a sentence-transformers model name or local path.')
        if retriever != "dense" and (dense_model is not None or dense_prompts is not None or dense_index != "flat"):
            raise ValueError('dense_model, dense_prompts and dense_index are only used with retriever="dense".')
        if retriever != "bm25" and stemming is not None:
            raise ValueError('stemming is only used with retriever="bm25".')
        if max_chars_per_document is not None and (
            isinstance(max_chars_per_document, bool)
            or not isinstance(max_chars_per_document, int)
            or max_chars_per_document < 1
        ):
            raise ValueError(f"max_chars_per_document must be a positive int or None, got {max_chars_per_document!r}.")
        self.name = name
        self.top_k = _check_top_k(top_k)
        self.retriever = retriever
        self.max_chars_per_document = max_chars_per_document

        self._corpus = _open_corpus(corpus)
        if retriever == "bm25":
            self._index: _Index = _BM25Index(stemming)
        else:
            self._index = _DenseIndex(dense_model, dense_prompts, FaissIndexConfig.from_value(dense_index))

        if index_dir is not None:
            self.index_dir: Path | None = Path(index_dir)
        elif self._corpus.path is not None:
            self.index_dir = self._corpus.path.with_name(self._corpus.path.name + self._index.dir_suffix)
        else:
            self.index_dir = None
        if self.index_dir is not None and self._corpus.fingerprint is None:
            logger.warning(
                "The dataset has no fingerprint, so its index cannot be matched to it later: kept in memory."
            )
            self.index_dir = None
        if self.index_dir is not None:
            self._index.resume_dir = self.index_dir.with_name(self.index_dir.name + ".embeddings")
        self.loaded_from_cache = self._load_or_build()

    # -- the tool as the agent sees it ------------------------------------------------------------------------

    @property
    def signature(self) -> str:
        return f"{self.name}(query: str) -> str"

    @property
    def description(self) -> str:
        """One line for an agent's system prompt: the call signature and what comes back."""
        return (
            f"{self.signature}: Searches a local encyclopedia-style corpus and returns the top {self.top_k} "
            "documents for the query, numbered, each with its title and text."
        )

    def __call__(self, query: str) -> str:
        """The observation the agent reads: numbered documents, or a sentence saying why there are none."""
        documents = self.search(query)
        if not query.strip():
            return f"No documents found: the query is empty. Call {self.name} with a few words to search for."
        if not documents:
            return f'No documents found for query "{query}".'
        return self.format(documents)

    def format(self, documents: Sequence[Document]) -> str:
        """`Document 1 (Title: ...)\\n<text>`, blank-line separated; texts cut at `max_chars_per_document`."""
        if not documents:
            return "No documents found."
        return "\n\n".join(
            f"Document {number} (Title: {document.title})\n{self._shorten(document.text)}"
            for number, document in enumerate(documents, start=1)
        )

    # -- retrieval --------------------------------------------------------------------------------------------

    def search(self, query: str, top_k: int | None = None) -> list[Document]:
        """The best `top_k` (default: the tool's) documents for `query`, best first; [] for an empty query."""
        return self.search_batch([self._check_query(query)], top_k)[0]

    def search_batch(self, queries: Sequence[str], top_k: int | None = None) -> list[list[Document]]:
        """`search` for many queries at once, in one tokenization / encoding pass.

        BM25 gives exactly the results of one-by-one `search`; a dense encoder pads the batch, which can move
        scores in the last float bits.
        """
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise TypeError(f"search_batch takes a list of query strings, got {type(queries).__name__}.")
        k = self.top_k if top_k is None else _check_top_k(top_k)
        queries = [self._check_query(query) for query in queries]
        # Blank queries never reach the retriever: BM25 would score nothing and a dense model would still
        # return its nearest neighbours of "", which reads to the agent as an answer.
        asked = [position for position, query in enumerate(queries) if query.strip()]
        results: list[list[Document]] = [[] for _ in queries]
        hits = self._index.search([queries[position] for position in asked], min(k, len(self._corpus))) if asked else []
        for position, ranked in zip(asked, hits, strict=True):
            results[position] = [self._document(row, score) for row, score in ranked]
        return results

    @property
    def num_documents(self) -> int:
        return len(self._corpus)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, retriever={self.retriever!r}, "
            f"documents={self.num_documents}, top_k={self.top_k}, index_dir={self.index_dir})"
        )

    # -- helpers ----------------------------------------------------------------------------------------------

    def _check_query(self, query: Any) -> str:
        if not isinstance(query, str):
            # Models sometimes call the tool with a list or dict; the agent sandbox shows this message as the
            # error observation, so it must say how to call the tool correctly.
            raise TypeError(
                f"{self.name} takes a single query string: call it as {self.signature}, "
                f'e.g. {self.name}("capital of France"); got {type(query).__name__} {query!r:.80}.'
            )
        return query

    def _document(self, row: int, score: float) -> Document:
        doc_id, title, text = self._corpus.record(row)
        return Document(id=doc_id, title=title, text=text, score=score)

    def _shorten(self, text: str) -> str:
        limit = self.max_chars_per_document
        if limit is None or len(text) <= limit:
            return text
        cut = text[:limit]
        # End on a word boundary so the model does not read half a word (or half a number) as a fact; a single
        # word longer than half the budget is cut where it is.
        space = cut.rfind(" ")
        if space >= limit // 2:
            cut = cut[:space]
        return cut.rstrip() + "..."

    def _load_or_build(self) -> bool:
        """Reuse the saved index when its manifest matches this corpus and these settings; else build (and save)."""
        manifest = as_stored(
            {
                "format_version": INDEX_FORMAT_VERSION,
                "retriever": self.retriever,
                "corpus": self._corpus.fingerprint,
                "num_documents": len(self._corpus),
                "settings": self._index.settings(len(self._corpus)),
            }
        )
        directory = self.index_dir
        if directory is not None:
            remove_stale_work_dirs(directory)
            if read_fingerprint(directory, fingerprint_name=MANIFEST_NAME) == manifest:
                start = time.perf_counter()
                try:
                    self._index.load(directory, len(self._corpus))
                except Exception as error:  # noqa: BLE001 - a damaged file must cost a rebuild, not a crashed agent run
                    logger.warning("Index %s could not be read (%s); rebuilding it.", directory, error)
                else:
                    logger.info(
                        "Loaded %s index from %s in %.2fs.", self.retriever, directory, time.perf_counter() - start
                    )
                    return True

        start = time.perf_counter()
        self._index.build(self._corpus)
        logger.info(
            "Built %s index over %d documents in %.2fs.", self.retriever, len(self._corpus), time.perf_counter() - start
        )
        if directory is not None:
            try:
                # The manifest goes last: an index directory is trusted only if its manifest is there and matches.
                publish_folder(directory, self._index.save, manifest, fingerprint_name=MANIFEST_NAME)
            except OSError as error:
                # A read-only corpus location must not stop the agent: the index still works from memory.
                logger.warning("Could not save the index to %s (%s); keeping it in memory only.", directory, error)
            else:
                self._index.discard_resume_state()
        return False


# ------------------------------------------------------------------------------------------------------------
# Corpora: a uniform read-only view with the fingerprint that keys the saved index.
# ------------------------------------------------------------------------------------------------------------


class _Corpus(abc.ABC):
    path: Path | None  # where the corpus lives on disk; the default index location is derived from it
    fingerprint: dict | None  # identifies the content; None means it cannot be told apart later

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of documents."""

    @abc.abstractmethod
    def record(self, row: int) -> tuple[str, str, str]:
        """(id, title, text) of the document at position `row`."""

    @abc.abstractmethod
    def title_text_batches(self, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
        """All titles and texts in corpus order, `batch_size` documents at a time."""


def _open_corpus(corpus: Any) -> _Corpus:
    if isinstance(corpus, (str, os.PathLike)):
        path = Path(corpus)
        if path.is_dir():
            return _DatasetCorpus(_load_dataset_dir(path), path)
        if not path.is_file():
            raise FileNotFoundError(f"Corpus not found: {path}")
        return _JsonlCorpus(path)
    import datasets

    if isinstance(corpus, datasets.Dataset):
        return _DatasetCorpus(corpus, None)
    raise TypeError(
        f"corpus must be a JSONL file path, a Dataset.save_to_disk directory or a datasets.Dataset, "
        f"got {type(corpus).__name__}."
    )


class _JsonlCorpus(_Corpus):
    """A JSONL file read into memory; hashed in the same pass, so the fingerprint costs no second read."""

    def __init__(self, path: Path):
        self.path = path
        self._ids: list[str] = []
        self._titles: list[str] = []
        self._texts: list[str] = []
        digest = hashlib.sha256()
        size = 0
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                digest.update(raw)
                size += len(raw)
                if not raw.strip():
                    continue  # blank lines (a trailing newline, a separator) carry no document
                where = f"{path}, line {line_number}"
                try:
                    record = json.loads(raw)
                except UnicodeDecodeError as error:
                    raise ValueError(f"{where}: not valid UTF-8 ({error.reason}).") from None
                except json.JSONDecodeError as error:
                    raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from None
                doc_id, title, text = _check_record(record, where)
                self._ids.append(doc_id)
                self._titles.append(title)
                self._texts.append(text)
        if not self._ids:
            raise ValueError(f"{path}: the corpus has no documents.")
        self.fingerprint = {"type": "jsonl", "size": size, "sha256": digest.hexdigest()}

    def __len__(self) -> int:
        return len(self._ids)

    def record(self, row: int) -> tuple[str, str, str]:
        return self._ids[row], self._titles[row], self._texts[row]

    def title_text_batches(self, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
        for start in range(0, len(self._ids), batch_size):
            yield self._titles[start : start + batch_size], self._texts[start : start + batch_size]


def _check_record(record: Any, where: str) -> tuple[str, str, str]:
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with fields 'id', 'title' and 'text', got {type(record).__name__}."
        )
    for field in CORPUS_FIELDS:
        if field not in record:
            raise ValueError(f"{where}: missing field '{field}' (each line needs 'id', 'title' and 'text').")
    doc_id = record["id"]
    # bool is an int subclass, but an id of `true` is a data error, not a document number.
    if isinstance(doc_id, bool) or not isinstance(doc_id, (int, str)):
        raise ValueError(f"{where}: field 'id' must be a string or an integer, got {type(doc_id).__name__}.")
    for field in ("title", "text"):
        if not isinstance(record[field], str):
            raise ValueError(f"{where}: field '{field}' must be a string, got {type(record[field]).__name__}.")
    return str(doc_id), record["title"], record["text"]


def _load_dataset_dir(path: Path) -> datasets.Dataset:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        raise ValueError(
            f"{path} holds a DatasetDict with splits {sorted(loaded)}; save the single split to search instead."
        )
    return loaded


class _DatasetCorpus(_Corpus):
    """A `datasets.Dataset`: rows are read on demand from Arrow, so a large corpus is never copied into Python."""

    def __init__(self, dataset: datasets.Dataset, path: Path | None):
        import datasets

        where = f"{path}" if path is not None else "The corpus dataset"
        for field in CORPUS_FIELDS:
            if field not in dataset.column_names:
                raise ValueError(
                    f"{where}: missing column '{field}' (columns: {dataset.column_names}; needs 'id', 'title', 'text')."
                )
            feature = dataset.features[field]
            allowed = ("string", "int", "uint") if field == "id" else ("string",)
            if not (isinstance(feature, datasets.Value) and any(kind in feature.dtype for kind in allowed)):
                wanted = "strings or integers" if field == "id" else "strings"
                raise ValueError(f"{where}: column '{field}' must hold {wanted}, got {feature}.")
        if len(dataset) == 0:
            raise ValueError(f"{where}: the corpus has no documents.")
        self.path = path
        self._where = where
        self._rows = dataset.select_columns(list(CORPUS_FIELDS))
        fingerprint = getattr(dataset, "_fingerprint", None)
        self.fingerprint = {"type": "dataset", "fingerprint": fingerprint} if fingerprint else None

    def __len__(self) -> int:
        return len(self._rows)

    def record(self, row: int) -> tuple[str, str, str]:
        values = self._rows[row]
        return str(values["id"]), values["title"], values["text"]

    def title_text_batches(self, batch_size: int) -> Iterator[tuple[list[str], list[str]]]:
        start = 0
        for batch in self._rows.select_columns(["title", "text"]).iter(batch_size=batch_size):
            # Arrow string columns may hold nulls, which the JSONL reader rules out; find them while indexing.
            for field in ("title", "text"):
                if None in batch[field]:
                    row = start + batch[field].index(None)
                    raise ValueError(f"{self._where}: row {row} has no value in column '{field}'.")
            yield batch["title"], batch["text"]
            start += len(batch["text"])


# ------------------------------------------------------------------------------------------------------------
# Indexes: build from a corpus, save to / load from a directory, score queries against every document.
# ------------------------------------------------------------------------------------------------------------


class _Index(abc.ABC):
    dir_suffix: str  # appended to the corpus path for the default index directory
    # Where a resumable build keeps its partial work between runs (set by the tool; None: build in memory only).
    resume_dir: Path | None = None

    @abc.abstractmethod
    def settings(self, num_documents: int) -> dict:
        """Everything besides the corpus that changes the saved index; part of the manifest."""

    @abc.abstractmethod
    def build(self, corpus: _Corpus) -> None:
        """Index every document of `corpus`, in corpus order."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the built index into the (empty) `directory`."""

    @abc.abstractmethod
    def load(self, directory: Path, num_documents: int) -> None:
        """Read an index written by `save`; raise if it does not hold `num_documents` documents."""

    @abc.abstractmethod
    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to `k` (row, score) pairs, best first, ties in corpus order."""

    def discard_resume_state(self) -> None:
        """Delete what `build` kept in `resume_dir`, once the index it led to is saved."""


def _index_text(title: str, text: str) -> str:
    return f"{title}\n{text}"


class _BM25Index(_Index):
    dir_suffix = ".bm25s"
    # bm25s' default variant and parameters, written down so the manifest notices if they ever change.
    _BM25_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}
    _STOPWORDS = "en"

    def __init__(self, stemming: bool | None):
        self._stemmer, self._stemmer_id = _english_stemmer(stemming)
        # PyStemmer objects are not thread-safe, and an agent runtime may search from several threads.
        self._tokenize_lock = threading.Lock()
        self._model: bm25s.BM25 | None = None

    def settings(self, num_documents: int) -> dict:
        return {
            "bm25s": bm25s.__version__,
            "bm25": self._BM25_PARAMS,
            "stopwords": self._STOPWORDS,
            "stemmer": self._stemmer_id,
            "fields": "title + text",
        }

    def _tokenize(self, texts: list[str], *, return_ids: bool) -> Any:
        with self._tokenize_lock:
            return bm25s.tokenize(
                texts, stopwords=self._STOPWORDS, stemmer=self._stemmer, return_ids=return_ids, show_progress=False
            )

    def build(self, corpus: _Corpus) -> None:
        texts = [
            _index_text(title, text)
            for titles, bodies in corpus.title_text_batches(_INDEX_BATCH_SIZE)
            for title, text in zip(titles, bodies, strict=True)
        ]
        model = bm25s.BM25(**self._BM25_PARAMS)
        model.index(self._tokenize(texts, return_ids=True), show_progress=False)
        self._model = model

    def save(self, directory: Path) -> None:
        self._model.save(str(directory), show_progress=False)

    def load(self, directory: Path, num_documents: int) -> None:
        model = bm25s.BM25.load(str(directory), show_progress=False)
        if model.scores["num_docs"] != num_documents:
            raise ValueError(f"index has {model.scores['num_docs']} documents, corpus has {num_documents}")
        self._model = model

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        results = []
        for tokens in self._tokenize(queries, return_ids=False):
            token_ids = self._model.get_tokens_ids(tokens)
            if not token_ids:  # nothing in the query is in the vocabulary: no document matches
                results.append([])
                continue
            scores = self._model.get_scores_from_ids(token_ids)
            # A zero BM25 score means "shares no term", not "least similar": such documents are no results.
            results.append([(row, float(scores[row])) for row in _top_k(scores, k, positive_only=True)])
        return results


def _english_stemmer(stemming: bool | None) -> tuple[Any, str | None]:
    """(stemmer, identifier for the manifest); stemming is optional because PyStemmer is a compiled extra."""
    if stemming is False:
        return None, None
    try:
        import Stemmer
    except ImportError:
        if stemming:
            raise ImportError("stemming=True needs PyStemmer: pip install PyStemmer") from None
        logger.info("PyStemmer is not installed: BM25 indexes words without stemming.")
        return None, None
    # The version is part of the identifier: a query must be stemmed exactly like the indexed documents.
    return Stemmer.Stemmer("english"), f"snowball-english/PyStemmer-{importlib.metadata.version('PyStemmer')}"


class _DenseIndex(_Index):
    _ENCODE_BATCH_SIZE = 64

    def __init__(self, model_name: str, prompts: dict[str, str] | None, index_config: FaissIndexConfig):
        self._faiss = _faiss()
        self._model_name = model_name
        self._model = _load_sentence_transformer(model_name, prompts)
        self._config = index_config
        self._dimension = self._model.get_embedding_dimension()
        if index_config.kind == "ivfpq" and self._dimension % index_config.m:
            raise ValueError(
                f"FaissIndexConfig.m={index_config.m} must divide the embedding dimension {self._dimension} of "
                f"{model_name} (e.g. m={_largest_divisor(self._dimension, index_config.m)})."
            )
        # A slug of the model name keeps caches of different models side by side instead of overwriting each other.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_name)).strip("_")[-80:]
        self.dir_suffix = f".dense-{slug}"
        self._index: Any = None

    def _embedding_settings(self) -> dict:
        """What the embeddings depend on (the shards' key); the index settings add the FAISS parameters."""
        local = Path(self._model_name)
        return {
            "model": str(local.resolve()) if local.is_dir() else self._model_name,
            "model_files": model_files_identity(self._model_name),
            "document_prompt": self._model.prompts.get("document", ""),
            "max_seq_length": self._model.max_seq_length,
            "dimension": self._dimension,
            "normalized": True,
            "fields": "title + text",
        }

    def settings(self, num_documents: int) -> dict:
        return {**self._embedding_settings(), "faiss": self._config.build_settings(num_documents)}

    def build(self, corpus: _Corpus) -> None:
        shards = self._embed(corpus)
        faiss = self._faiss
        if self._config.kind == "flat":
            index = faiss.IndexFlatIP(self._dimension)
        else:
            index = self._trained_ivfpq(shards, len(corpus))
        for shard in shards:
            index.add(np.ascontiguousarray(shard))
        self._index = index
        self._set_search_parameters()

    def _embed(self, corpus: _Corpus) -> list[np.ndarray]:
        """The unit-norm embeddings of every document, in shards of `_EMBED_SHARD_SIZE` rows (memory-mapped files
        under `resume_dir` when there is one, so that a killed build keeps the shards it finished)."""
        from tqdm.auto import tqdm

        directory = self.resume_dir
        if directory is not None:
            state = as_stored({"format_version": INDEX_FORMAT_VERSION, "corpus": corpus.fingerprint,
                               "num_documents": len(corpus), "shard_size": _EMBED_SHARD_SIZE,
                               "embeddings": self._embedding_settings()})
            if read_fingerprint(directory, fingerprint_name=MANIFEST_NAME) != state:
                shutil.rmtree(directory, ignore_errors=True)  # shards of another corpus or model
                try:
                    directory.mkdir(parents=True)
                    write_json(directory / MANIFEST_NAME, state)
                except OSError as error:
                    # As for the index itself: a read-only corpus location must not stop the agent.
                    logger.warning("Cannot keep embedding shards in %s (%s): embedding in memory, without resume.",
                                   directory, error)
                    directory = None
        shards: list[np.ndarray] = []
        with tqdm(total=len(corpus), unit="doc", desc="Embedding the corpus", disable=None) as bar:
            for number, (titles, texts) in enumerate(corpus.title_text_batches(_EMBED_SHARD_SIZE)):
                path = None if directory is None else directory / f"shard-{number:06d}.npy"
                shard = _read_shard(path, len(texts), self._dimension) if path is not None else None
                if shard is None:
                    shard = self._model.encode_document(
                        [_index_text(title, text) for title, text in zip(titles, texts, strict=True)],
                        batch_size=self._ENCODE_BATCH_SIZE,
                        normalize_embeddings=True,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    ).astype(np.float32, copy=False)
                    if path is not None:
                        # Memory-mapped from the file once written: a corpus larger than memory can be embedded.
                        shard = _write_shard(path, shard)
                else:
                    bar.set_postfix_str("resumed", refresh=False)
                shards.append(shard)
                bar.update(len(texts))
        return shards

    def _trained_ivfpq(self, shards: list[np.ndarray], num_documents: int) -> Any:
        config, faiss = self._config, self._faiss
        train_size = config.resolved_train_size(num_documents)
        # k-means needs a point per cell, and PQ one per centroid of its 2^nbits codebook.
        needed = max(config.nlist, 2**config.nbits)
        if train_size < needed:
            raise ValueError(
                f"An IVF-PQ index with nlist={config.nlist} and nbits={config.nbits} needs at least {needed} "
                f"training passages, but {train_size} are available ({num_documents} in the corpus): lower nlist / "
                f"nbits (about 4 * sqrt(passages) cells), or use kind='flat', exact and small enough for this corpus."
            )
        rows = np.sort(np.random.default_rng(config.seed).choice(num_documents, size=train_size, replace=False))
        sample = np.empty((train_size, self._dimension), dtype=np.float32)
        offset = filled = 0
        for shard in shards:  # gathered shard by shard: the whole corpus is never in memory at once
            inside = rows[(rows >= offset) & (rows < offset + len(shard))] - offset
            sample[filled : filled + len(inside)] = shard[inside]
            filled += len(inside)
            offset += len(shard)
        quantizer = faiss.IndexFlatIP(self._dimension)
        index = faiss.IndexIVFPQ(quantizer, self._dimension, config.nlist, config.m, config.nbits,
                                 faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = config.seed
        index.pq.cp.seed = config.seed
        logger.info("Training IVF-PQ (nlist=%d, m=%d, nbits=%d) on %d sampled passages.", config.nlist, config.m,
                    config.nbits, train_size)
        index.train(sample)
        return index

    def _set_search_parameters(self) -> None:
        if self._config.kind == "ivfpq":
            self._index.nprobe = min(self._config.nprobe, self._config.nlist)

    def save(self, directory: Path) -> None:
        self._faiss.write_index(self._index, str(directory / _FAISS_NAME))

    def load(self, directory: Path, num_documents: int) -> None:
        index = self._faiss.read_index(str(directory / _FAISS_NAME))
        if index.ntotal != num_documents or index.d != self._dimension:
            raise ValueError(
                f"index holds {index.ntotal} vectors of dimension {index.d}, expected {num_documents} of {self._dimension}"
            )
        self._index = index
        self._set_search_parameters()

    def discard_resume_state(self) -> None:
        if self.resume_dir is not None:
            shutil.rmtree(self.resume_dir, ignore_errors=True)

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        encoded = self._model.encode_query(
            queries,
            batch_size=self._ENCODE_BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        scores, rows = self._index.search(np.ascontiguousarray(encoded), k)
        results = []
        for query_scores, query_rows in zip(scores, rows, strict=True):
            # -1 marks a slot IVF-PQ could not fill (too few passages in the probed cells).
            hits = [(int(row), float(score)) for row, score in zip(query_rows, query_scores) if row >= 0]
            results.append(sorted(hits, key=lambda hit: (-hit[1], hit[0])))
        return results


def _read_shard(path: Path, rows: int, dimension: int) -> np.ndarray | None:
    """A shard finished by an earlier build, memory-mapped; None when it is missing or not what is expected."""
    try:
        shard = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    return shard if shard.shape == (rows, dimension) and shard.dtype == np.float32 else None


def _write_shard(path: Path, shard: np.ndarray) -> np.ndarray:
    """Write through a temporary name and a rename (a kill leaves the shard whole or absent, never half written);
    the shard comes back memory-mapped from the file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, shard, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    return np.load(path, mmap_mode="r", allow_pickle=False)


def _largest_divisor(number: int, at_most: int) -> int:
    return max(divisor for divisor in range(1, at_most + 1) if number % divisor == 0)


def _load_sentence_transformer(model_name: str, prompts: dict[str, str] | None) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f'retriever="dense" needs the optional sentence-transformers dependency: {DENSE_INSTALL_HINT}'
        ) from error
    model = SentenceTransformer(model_name, prompts=prompts)
    # sentence-transformers saves empty "query" / "document" prompts by default: only non-empty ones are the model's own.
    own_prompts = any(model.prompts.get(role) for role in ("query", "document"))
    if prompts is None and not own_prompts and _E5_NAME.search(str(model_name)):
        model.prompts.update(E5_PROMPTS)
        logger.info("%s is an E5 model: queries and documents get its prefixes %s.", model_name, E5_PROMPTS)
    return model


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError(f'retriever="dense" needs faiss (faiss-cpu or faiss-gpu): {DENSE_INSTALL_HINT}') from error
    return faiss


# ------------------------------------------------------------------------------------------------------------
# Ranking and on-disk helpers.
# ------------------------------------------------------------------------------------------------------------


def _check_top_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
    return top_k


def _top_k(scores: np.ndarray, k: int, *, positive_only: bool) -> list[int]:
    """Rows of the `k` best scores, best first; ties go to the earlier document, so results are reproducible."""
    pool = np.flatnonzero(scores > 0) if positive_only else np.arange(scores.shape[0])
    if pool.size > k:
        # Partition instead of sorting the whole corpus, but keep every row tied with the k-th best score:
        # argpartition alone would pick among ties arbitrarily.
        pool_scores = scores[pool]
        kth_best = np.partition(pool_scores, pool.size - k)[pool.size - k]
        pool = pool[pool_scores >= kth_best]
    order = np.lexsort((pool, -scores[pool]))
    return pool[order[:k]].tolist()
