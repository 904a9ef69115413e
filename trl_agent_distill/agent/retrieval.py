"""Local document retrieval, exposed to agents as the `web_search(query)` tool.

The Agent Distillation teacher (Kang et al., arXiv 2505.17612) answers factual questions with a `web_search` tool
that returns the top-3 Wikipedia documents. Generating trajectories, training and evaluating students must run
offline and give the same observations every time, so this module serves that tool from a local corpus (a JSONL file
or a `datasets.Dataset` of `id` / `title` / `text`) with BM25 (`bm25s`) or, optionally, a dense sentence-transformers
retriever. An index is built once, saved atomically beside the corpus together with a fingerprint of the corpus and
the settings, and reused by later runs as long as both match.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bm25s
import numpy as np

from ..storage import as_stored, publish_folder, read_fingerprint, remove_stale_work_dirs

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

RETRIEVERS = ("bm25", "dense")
CORPUS_FIELDS = ("id", "title", "text")
DENSE_INSTALL_HINT = 'pip install "trl-agent-distill[dense]"'
# Bump when the on-disk layout changes, so indexes written by older code are rebuilt rather than misread.
INDEX_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_EMBEDDINGS_NAME = "embeddings.npy"
# Documents tokenized / embedded per step while indexing: bounds memory spikes without slowing small corpora.
_INDEX_BATCH_SIZE = 4096


@dataclass(frozen=True)
class Document:
    """One retrieved document; `score` is the retriever's relevance (BM25 score or cosine similarity)."""

    id: str
    title: str
    text: str
    score: float


class RetrievalTool:
    """Top-k retrieval over a local corpus with the call shape of the paper's `web_search` tool.

    `corpus` is a JSONL file (one `{"id", "title", "text"}` object per line), a directory written by
    `Dataset.save_to_disk`, or an in-memory `datasets.Dataset` with those columns. `retriever="bm25"` indexes
    title and text with `bm25s`; `retriever="dense"` embeds them with the sentence-transformers model `dense_model`
    (name or local path) and ranks by cosine similarity.

    The index is saved in `index_dir`, by default beside a corpus that lives on disk (`<corpus>.bm25s/`, or
    `<corpus>.dense-<model>/`); an in-memory Dataset keeps its index in memory unless `index_dir` is given.

    Extra knobs beyond the tool interface:
    - `stemming`: `None` stems English words with PyStemmer when it is installed, `True` requires it, `False` never
      stems. What was used is part of the index settings, so an index is only reused with the same choice.
    - `dense_prompts`: prompts handed to the sentence-transformers model, e.g. `{"query": "query: ",
      "document": "passage: "}` for the E5 models the paper used, which expect these prefixes.
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
    ):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be a Python identifier (the agent calls it as a function), got {name!r}.")
        if retriever not in RETRIEVERS:
            raise ValueError(f"retriever must be one of {RETRIEVERS}, got {retriever!r}.")
        if retriever == "dense" and not dense_model:
            raise ValueError('retriever="dense" needs dense_model: a sentence-transformers model name or local path.')
        if retriever != "dense" and (dense_model is not None or dense_prompts is not None):
            raise ValueError('dense_model and dense_prompts are only used with retriever="dense".')
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
            self._index = _DenseIndex(dense_model, dense_prompts)

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
        scores = self._index.score([queries[position] for position in asked]) if asked else []
        for position, query_scores in zip(asked, scores, strict=True):
            if query_scores is None:
                continue
            best = _top_k(query_scores, k, positive_only=self._index.positive_only)
            results[position] = [self._document(int(row), float(query_scores[row])) for row in best]
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
                "settings": self._index.settings(),
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
    positive_only: bool  # whether a zero score means "no match" (BM25) rather than "least similar" (dense)

    @abc.abstractmethod
    def settings(self) -> dict:
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
    def score(self, queries: list[str]) -> list[np.ndarray | None]:
        """Per query, the score of every document in corpus order (None: nothing in the query can match)."""


def _index_text(title: str, text: str) -> str:
    return f"{title}\n{text}"


class _BM25Index(_Index):
    dir_suffix = ".bm25s"
    positive_only = True
    # bm25s' default variant and parameters, written down so the manifest notices if they ever change.
    _BM25_PARAMS = {"method": "lucene", "k1": 1.5, "b": 0.75}
    _STOPWORDS = "en"

    def __init__(self, stemming: bool | None):
        self._stemmer, self._stemmer_id = _english_stemmer(stemming)
        # PyStemmer objects are not thread-safe, and an agent runtime may search from several threads.
        self._tokenize_lock = threading.Lock()
        self._model: bm25s.BM25 | None = None

    def settings(self) -> dict:
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

    def score(self, queries: list[str]) -> list[np.ndarray | None]:
        scores: list[np.ndarray | None] = []
        for tokens in self._tokenize(queries, return_ids=False):
            token_ids = self._model.get_tokens_ids(tokens)
            scores.append(self._model.get_scores_from_ids(token_ids) if token_ids else None)
        return scores


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
    positive_only = False
    _ENCODE_BATCH_SIZE = 64

    def __init__(self, model_name: str, prompts: dict[str, str] | None):
        self._model_name = model_name
        self._model = _load_sentence_transformer(model_name, prompts)
        # A slug of the model name keeps caches of different models side by side instead of overwriting each other.
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_name)).strip("_")[-80:]
        self.dir_suffix = f".dense-{slug}"
        self._embeddings: np.ndarray | None = None

    def settings(self) -> dict:
        local = Path(self._model_name)
        return {
            "model": str(local.resolve()) if local.is_dir() else self._model_name,
            "document_prompt": self._model.prompts.get("document", ""),
            "max_seq_length": self._model.max_seq_length,
            "dimension": self._model.get_embedding_dimension(),
            "normalized": True,
            "fields": "title + text",
        }

    def build(self, corpus: _Corpus) -> None:
        embeddings = np.empty((len(corpus), self._model.get_embedding_dimension()), dtype=np.float32)
        start = 0
        for titles, texts in corpus.title_text_batches(_INDEX_BATCH_SIZE):
            batch = self._model.encode_document(
                [_index_text(title, text) for title, text in zip(titles, texts, strict=True)],
                batch_size=self._ENCODE_BATCH_SIZE,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            embeddings[start : start + len(batch)] = batch
            start += len(batch)
        self._embeddings = embeddings

    def save(self, directory: Path) -> None:
        np.save(directory / _EMBEDDINGS_NAME, self._embeddings, allow_pickle=False)

    def load(self, directory: Path, num_documents: int) -> None:
        # Memory-mapped: a large cache is paged in by the matrix product instead of read whole at start-up.
        embeddings = np.load(directory / _EMBEDDINGS_NAME, mmap_mode="r", allow_pickle=False)
        expected = (num_documents, self._model.get_embedding_dimension())
        if embeddings.shape != expected or embeddings.dtype != np.float32:
            raise ValueError(
                f"embeddings have shape {embeddings.shape} {embeddings.dtype}, expected {expected} float32"
            )
        self._embeddings = embeddings

    def score(self, queries: list[str]) -> list[np.ndarray | None]:
        encoded = self._model.encode_query(
            queries,
            batch_size=self._ENCODE_BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype(np.float32, copy=False)
        # Both sides are unit vectors, so the dot product is the cosine similarity.
        return list(encoded @ self._embeddings.T)


def _load_sentence_transformer(model_name: str, prompts: dict[str, str] | None) -> Any:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ImportError(
            f'retriever="dense" needs the optional sentence-transformers dependency: {DENSE_INSTALL_HINT}'
        ) from error
    return SentenceTransformer(model_name, prompts=prompts)


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
