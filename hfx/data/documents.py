"""Documents in, model-ready datasets out: loading, NSP pairs, MLM chunks and causal-LM blocks.

A *documents* dataset is a ``datasets.Dataset`` with a ``sentences`` column (list of str, one
document per row) and a ``text`` column. :func:`load_documents` builds one from

- a ``.txt`` file or a folder of them, in BERT's raw format: one sentence per line, documents
  separated by a blank line (``hfx.data.write_embedded_data`` writes ``corpus.txt`` like this);
- a ``.json``/``.jsonl``/``.csv``/``.parquet`` file with a text column (or a ``sentences`` column);
- the name ``"embedded"``: the embedded corpus (``hfx.data.embedded``);
- any other string: a ``datasets`` name for ``datasets.load_dataset``.

Problems with the input are reported here, before a model or Trainer exists.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
EMBEDDED = "embedded"
# NSP labels follow BERT (and HfxForPreTraining): 0 = B follows A, 1 = B is random.
IS_NEXT, NOT_NEXT = 0, 1

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
    """Split prose on sentence-final punctuation followed by whitespace; drops empty pieces."""
    return [s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _read_text_file(path: Path) -> list[list[str]]:
    documents, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


def _from_sentences(documents: list[list[str]]) -> Dataset:
    return Dataset.from_dict({"sentences": documents, "text": [" ".join(doc) for doc in documents]})


def _looks_like_path(source: str) -> bool:
    return "/" in source or "\\" in source or source.startswith(".") or Path(source).suffix.lower() in (
        *TEXT_SUFFIXES,
        *TABLE_SUFFIXES,
    )


def load_documents(
    source: str,
    text_column: str | None = None,
    split: str = "train",
    dataset_config: str | None = None,
) -> Dataset:
    """A documents dataset (``sentences``, ``text``) from a path, ``"embedded"`` or a datasets name.

    For a table or datasets name, ``text_column`` given is the column read (split into sentences):
    it must exist, and it is used even when the data has a ``sentences`` column. Left out (None),
    the ``text`` column is read, or else a ``sentences`` column as it is.
    """
    if source == EMBEDDED:
        from .embedded import embedded_corpus

        rows = embedded_corpus()["corpus_train" if split == "train" else "corpus_validation"]
        return _from_sentences([row["sentences"] for row in rows])
    path = Path(source)
    if path.exists():
        return _load_path(path, text_column)
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"data file or folder {source!r} does not exist (resolved to {path.resolve()}). Pass a .txt file or folder "
            f"(one sentence per line, blank line between documents), a {'/'.join(TABLE_SUFFIXES)} file, "
            f"'{EMBEDDED}', or a datasets name."
        )
    dataset = load_dataset(source, dataset_config, split=split)
    return _with_sentences(dataset, text_column, source)


def _load_path(path: Path, text_column: str | None) -> Dataset:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"folder {str(path)!r} contains no {'/'.join(TEXT_SUFFIXES)} files.")
        documents = [doc for f in files for doc in _read_text_file(f)]
    elif path.suffix.lower() in TEXT_SUFFIXES:
        documents = _read_text_file(path)
    elif path.suffix.lower() in TABLE_SUFFIXES:
        dataset = load_dataset(TABLE_SUFFIXES[path.suffix.lower()], data_files=str(path), split="train")
        return _with_sentences(dataset, text_column, str(path))
    else:
        raise ValueError(
            f"cannot read {str(path)!r}: unknown suffix {path.suffix!r}; use one of "
            f"{list(TEXT_SUFFIXES) + list(TABLE_SUFFIXES)} or a folder of .txt files."
        )
    if not documents:
        raise ValueError(f"{str(path)!r} contains no text.")
    return _from_sentences(documents)


def _with_sentences(dataset: Dataset, text_column: str | None, source: str) -> Dataset:
    columns = dataset.column_names
    if text_column is None:  # left out: 'text', else a 'sentences' column; a text column given must exist
        if "sentences" in columns and "text" not in columns:
            return dataset.map(lambda row: {"text": " ".join(row["sentences"])})
        text_column = "text"
    if text_column not in columns:
        raise ValueError(f"text column {text_column!r} not found in {source!r}; its columns are {columns}.")
    keep = [c for c in columns if c != text_column]
    dataset = dataset.map(lambda row: {"sentences": split_sentences(row[text_column] or "")}, remove_columns=keep)
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    return dataset.filter(lambda row: len(row["sentences"]) > 0)


def build_nsp_pairs(
    documents: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    seed: int = 0,
    sentences_column: str = "sentences",
) -> Dataset:
    """Next-sentence-prediction pairs from a documents dataset.

    For every sentence A that has a successor in its document: with probability 1/2, B is that
    successor (``next_sentence_label`` 0); otherwise B is a sentence drawn from a *different*
    document whose text also differs from the true successor (label 1). Each pair is tokenized
    as ``[CLS] A [SEP] B [SEP]`` with token_type_ids 0/1, truncated longest-first to
    ``max_length``. Columns: ``input_ids``, ``token_type_ids``, ``attention_mask``,
    ``next_sentence_label``.
    """
    if sentences_column not in documents.column_names:
        raise ValueError(
            f"column {sentences_column!r} not found; columns are {documents.column_names}. "
            "load_documents() returns a 'sentences' column."
        )
    docs = documents[sentences_column]
    short = [i for i, doc in enumerate(docs) if len(doc) < 2]
    if short:
        raise ValueError(
            f"next-sentence prediction needs documents of at least two sentences; {len(short)} of {len(docs)} have "
            f"fewer (first: row {short[0]}: {docs[short[0]]!r}). Remove them first, e.g. "
            f"documents.filter(lambda d: len(d[{sentences_column!r}]) >= 2)."
        )
    if len(docs) < 2:
        raise ValueError("next-sentence prediction needs at least two documents to draw random sentences from.")
    rng = random.Random(seed)
    owner = [d for d, doc in enumerate(docs) for _ in doc]
    flat = [sentence for doc in docs for sentence in doc]
    first, second, labels = [], [], []
    for d, doc in enumerate(docs):
        for i in range(len(doc) - 1):
            first.append(doc[i])
            if rng.random() < 0.5:
                second.append(doc[i + 1])
                labels.append(IS_NEXT)
                continue
            second.append(_random_other_sentence(rng, flat, owner, d, doc[i + 1]))
            labels.append(NOT_NEXT)
    pairs = Dataset.from_dict({"a": first, "b": second, "next_sentence_label": labels})
    return pairs.map(
        lambda batch: tokenizer(batch["a"], batch["b"], truncation="longest_first", max_length=max_length),
        batched=True,
        remove_columns=["a", "b"],
    )


def _random_other_sentence(rng: random.Random, flat, owner, document: int, true_next: str) -> str:
    for _ in range(1000):
        j = rng.randrange(len(flat))
        if owner[j] != document and flat[j] != true_next:
            return flat[j]
    raise ValueError("could not find a sentence from another document that differs from the true next sentence.")


def tokenize_for_mlm(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 128, text_column: str = "text"
) -> Dataset:
    """Each document as ``[CLS] ... [SEP]`` chunks of at most ``max_length`` tokens (for ``HfxForMaskedLM``)."""
    if text_column not in documents.column_names:
        raise ValueError(f"text column {text_column!r} not found; columns are {documents.column_names}.")

    def encode(batch):
        encoded = tokenizer(batch[text_column], truncation=True, max_length=max_length, return_overflowing_tokens=True)
        encoded.pop("overflow_to_sample_mapping", None)
        return encoded

    return documents.map(encode, batched=True, remove_columns=documents.column_names)


def pack_for_causal_lm(
    documents: Dataset, tokenizer: PreTrainedTokenizerBase, block_size: int = 128, text_column: str = "text"
) -> Dataset:
    """Documents concatenated, each followed by the EOS token, and cut into ``block_size`` blocks.

    Tokens are encoded without [CLS]/[SEP]; the tail that does not fill a block is dropped
    (per map batch of 1000 documents, so memory stays bounded).
    Columns: ``input_ids``, ``attention_mask`` (all ones). Use with
    ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``, which copies inputs into labels.
    """
    if text_column not in documents.column_names:
        raise ValueError(f"text column {text_column!r} not found; columns are {documents.column_names}.")
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"causal-LM packing separates documents with the EOS token; {type(tokenizer).__name__} has none "
            f"(special tokens: {tokenizer.all_special_tokens})."
        )
    eos = tokenizer.eos_token_id

    def pack(batch):
        ids = tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]
        stream = [token for doc in ids for token in doc + [eos]]
        blocks = [stream[i : i + block_size] for i in range(0, len(stream) - block_size + 1, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks]}

    # Packing happens per map batch of 1000 documents; each batch drops its own tail.
    packed = documents.map(pack, batched=True, batch_size=1000, remove_columns=documents.column_names)
    if len(packed) == 0:
        raise ValueError(f"the documents hold fewer tokens than one block of {block_size}.")
    return packed


__all__ = [
    "IS_NEXT",
    "NOT_NEXT",
    "build_nsp_pairs",
    "load_documents",
    "pack_for_causal_lm",
    "split_sentences",
    "tokenize_for_mlm",
]
