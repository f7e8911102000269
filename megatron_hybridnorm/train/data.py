"""Training data: token streams with a held-out split, and deterministic batches.

The default corpus is the running Python's standard library, read at byte level: real text that
every machine has, with no download (``corpora.py`` names the others and picks the one a run asked for). Batches are random windows drawn from a generator seeded by
(seed, step), so every scheme sees the same data in the same order, a resumed run sees what an
uninterrupted one would, and the global batch does not depend on the data-parallel size.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BYTE_VOCAB = 256
HELD_OUT_EVERY = 20  # every 20th document is validation


class DataError(ValueError):
    """A data source that cannot be read or used."""


class TokenStream:
    """Documents of token ids, read as one concatenated stream."""

    def __init__(self, docs_or_reader, lengths=None):
        if lengths is None:  # a list of 1-D integer arrays
            self._docs = [np.asarray(d) for d in docs_or_reader if len(d)]
            self._lengths = np.array([len(d) for d in self._docs], dtype=np.int64)
            self._read = lambda i, off, n: self._docs[i][off : off + n]
        else:  # a reader(doc, offset, length) over documents of the given lengths
            self._lengths = np.asarray(lengths, dtype=np.int64)
            self._read = docs_or_reader
        self._starts = np.concatenate([[0], np.cumsum(self._lengths)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        out, pos = [], start
        doc = int(np.searchsorted(self._starts, start, side="right") - 1)
        while length > 0:
            off = pos - int(self._starts[doc])
            n = min(length, int(self._lengths[doc]) - off)
            out.append(np.asarray(self._read(doc, off, n)))
            pos, length, doc = pos + n, length - n, doc + 1
        return np.concatenate(out)


@dataclass
class Corpus:
    train: TokenStream
    val: TokenStream
    vocab_size: int
    description: str


def _split(docs: list, what: str) -> tuple[list, list]:
    if len(docs) >= HELD_OUT_EVERY:
        val = docs[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        train = [d for i, d in enumerate(docs) if (i + 1) % HELD_OUT_EVERY]
        return train, val
    # too few documents: hold out the last 10% of the tokens
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    cut = int(len(stream) * 0.9)
    if cut == 0 or cut == len(stream):
        raise DataError(f"{what} holds too little text to split into training and validation")
    return [stream[:cut]], [stream[cut:]]


def _as_bytes(text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(data, dtype=np.uint8).astype(np.int64)


def documents_up_to(texts, max_bytes: int) -> list[np.ndarray]:
    """Documents (str or bytes, read lazily) as byte arrays, until they hold ``max_bytes`` (the
    one that crosses the limit included)."""
    docs, total = [], 0
    for text in texts:
        docs.append(_as_bytes(text))
        total += len(docs[-1])
        if total >= max_bytes:
            break
    return docs


def _readable(paths):
    for path in paths:
        try:
            yield path.read_bytes()
        except OSError:
            continue


def stdlib_corpus(max_bytes: int) -> Corpus:
    """The standard library's ``.py`` files in sorted order, up to ``max_bytes`` in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    docs = documents_up_to(_readable(files), max_bytes)
    total = sum(len(d) for d in docs)
    if not docs:
        raise DataError(f"found no Python sources under {root}; pass --text or --data-path")
    train, val = _split(docs, f"the standard library at {root}")
    return Corpus(TokenStream(train), TokenStream(val), BYTE_VOCAB,
                  f"Python {sys.version.split()[0]} standard library, {len(docs)} files, "
                  f"{total / 1e6:.1f} MB, bytes")


def text_corpus(path: str, max_bytes: int) -> Corpus:
    """A plain text file, or JSONL with a "text" field per line, at byte level."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--text {path}: no such file")
    if p.suffix in (".jsonl", ".json"):
        def texts(f):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"--text {path}, line {n}: expected a JSON object with a "
                                    f'"text" field ({type(e).__name__}: {e})') from None

        with p.open("r", encoding="utf-8") as f:
            docs = documents_up_to(texts(f), max_bytes)
    else:
        try:
            with p.open("rb") as f:
                docs = [_as_bytes(f.read(max_bytes))]
        except OSError as e:
            raise DataError(f"--text {path}: {e}") from None
    if not any(len(d) for d in docs):
        raise DataError(f"--text {path} holds no text")
    train, val = _split([d for d in docs if len(d)], f"--text {path}")
    return Corpus(TokenStream(train), TokenStream(val), BYTE_VOCAB, f"{path}, bytes")


def indexed_corpus(prefix: str, vocab_size: int | None) -> Corpus:
    """Megatron's tokenized ``PREFIX.bin``/``PREFIX.idx`` (from ``preprocess_data.py``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"--data-path {prefix}: {prefix + ext} does not exist")
    if vocab_size is None:
        raise DataError("--data-path needs --vocab-size (the tokenizer's vocabulary size)")
    try:
        ds = IndexedDataset(prefix)
        lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any reader failure is a data error to the user
        raise DataError(f"--data-path {prefix}: not a readable Megatron indexed dataset "
                        f"({type(e).__name__}: {e})") from None
    if len(lengths) == 0 or lengths.sum() == 0:
        raise DataError(f"--data-path {prefix} holds no tokens")
    idx = np.arange(len(lengths))
    if len(lengths) >= HELD_OUT_EVERY:
        val_idx = idx[HELD_OUT_EVERY - 1 :: HELD_OUT_EVERY]
        train_idx = idx[(idx + 1) % HELD_OUT_EVERY != 0]
    else:
        raise DataError(f"--data-path {prefix} has {len(lengths)} sequences; at least "
                        f"{HELD_OUT_EVERY} are needed to hold out a validation split")

    def reader(ids):
        return lambda i, off, n: ds.get(int(ids[i]), offset=off, length=n).astype(np.int64)

    top = max(int(ds[int(i)].max()) for i in idx[: min(len(idx), 64)])
    if top >= vocab_size:
        raise DataError(f"--data-path {prefix} has token id {top} >= --vocab-size {vocab_size}")
    return Corpus(TokenStream(reader(train_idx), lengths[train_idx]),
                  TokenStream(reader(val_idx), lengths[val_idx]), vocab_size,
                  f"{prefix} (Megatron indexed dataset, {len(lengths)} sequences)")


def get_batch(stream: TokenStream, seed: int, step: int, batch_size: int, seq_len: int):
    """Global batch ``step``: (tokens, labels), each [batch_size, seq_len]."""
    import torch

    if len(stream) <= seq_len + 1:
        raise DataError(f"the data ({len(stream)} tokens) is shorter than --seq-len {seq_len} + 1")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len - 1, (batch_size,), generator=g)
    rows = np.stack([stream.window(int(s), seq_len + 1) for s in starts])
    rows = torch.from_numpy(rows).long()
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
