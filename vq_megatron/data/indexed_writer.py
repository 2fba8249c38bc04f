"""Tokenize documents in worker processes and write a Megatron ``.bin/.idx`` dataset.

Output is deterministic (chunks are written in input order whatever the number of
workers) and atomic: both files are built under temporary names in the target
directory, read back and checked, and only then renamed to ``<prefix>.bin/.idx``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..files import temp_path
from .tokenizers import TextTokenizer

__all__ = ["WriteStats", "write_indexed_dataset", "optimal_dtype"]

logger = logging.getLogger(__name__)

# Chunks in flight per worker: enough to keep workers busy, small enough to bound memory
# (Pool.imap would read the whole input ahead of the workers).
_IN_FLIGHT_PER_WORKER = 4


@dataclass
class WriteStats:
    """What :func:`write_indexed_dataset` wrote."""

    documents: int  # documents written
    tokens: int  # token ids written, one EOD per document included
    skipped: int  # documents that encoded to no tokens (not written)
    words: int  # whitespace-separated words in the written documents (for word-level perplexity)
    characters: int  # characters in the written documents
    bin_path: Path
    idx_path: Path
    dtype: str
    seconds: float


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's choice: uint16 while every id fits with margin, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer


_Encoded = tuple[list[np.ndarray | None], int, int]  # arrays, words, characters


def _encode_chunk(texts: Sequence[str], tokenizer: TextTokenizer | None = None) -> _Encoded:
    """Encode texts to int32 arrays ending in EOD (None for a text with no tokens), plus counts."""
    tokenizer = tokenizer or _worker_tokenizer
    vocab_size, eod = tokenizer.vocab_size, tokenizer.eod_id
    encoded: list[np.ndarray | None] = []
    words = characters = 0
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            encoded.append(None)
            continue
        array = np.asarray(ids + [eod], dtype=np.int32)
        if array.min() < 0 or array.max() >= vocab_size:
            raise ValueError(f"token id out of range [0, {vocab_size}) in document {text[:60]!r}...")
        encoded.append(array)
        words += len(text.split())
        characters += len(text)
    return encoded, words, characters


def _chunks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _encoded_chunks(
    texts: Iterable[str], tokenizer: TextTokenizer, workers: int, chunk_size: int
) -> Iterator[_Encoded]:
    """Yield encoded chunks in input order, using ``workers`` processes when > 1."""
    if workers <= 1:
        for chunk in _chunks(texts, chunk_size):
            yield _encode_chunk(chunk, tokenizer)
        return
    # Not fork: callers (pytest, a training driver) may run threads, and a forked child can
    # inherit their locks held. The tokenizer is pickled once per worker by the initializer.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for chunk in _chunks(texts, chunk_size):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= workers * _IN_FLIGHT_PER_WORKER:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _verify(prefix: str, documents: int, tokens: int) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    found_docs = len(dataset.document_indices) - 1
    found_tokens = int(dataset.sequence_lengths.sum())
    del dataset  # release the memory maps before the files are renamed
    if (found_docs, found_tokens) != (documents, tokens):
        raise RuntimeError(
            f"read-back check failed for {prefix}: {found_docs} docs / {found_tokens} tokens, "
            f"expected {documents} / {tokens}"
        )


def _publish(tmp_prefix: str, prefix: Path) -> None:
    final_bin, final_idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    # Remove an old index first: meanwhile a reader finds no dataset, never a new .bin with an old .idx.
    final_idx.unlink(missing_ok=True)
    os.replace(f"{tmp_prefix}.bin", final_bin)
    os.replace(f"{tmp_prefix}.idx", final_idx)


def write_indexed_dataset(
    texts: Iterable[str],
    tokenizer: TextTokenizer,
    output_prefix: str | Path,
    workers: int = 1,
    chunk_size: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> WriteStats:
    """Tokenize ``texts`` and write ``<output_prefix>.bin`` and ``<output_prefix>.idx``.

    Each document becomes one Megatron sequence: ``encode(text) + [eod_id]``. The
    dtype is uint16 for vocabularies below 65,500 ids, else int32.

    Args:
        texts: documents in output order (any iterable; read lazily).
        tokenizer: object with ``vocab_size``, ``eod_id`` and ``encode``; it must pickle when workers > 1.
        output_prefix: path prefix of the output files; parent directories are created.
        workers: tokenizer processes; 1 encodes in this process. Output does not depend on it.
            Workers start with forkserver (or spawn), which imports the caller's main module
            again: a calling script needs the usual ``if __name__ == "__main__":`` guard.
        chunk_size: documents per task sent to a worker.
        progress: show a tqdm bar with documents and tokens.
        total: number of documents expected, for the progress bar only.

    Returns:
        :class:`WriteStats`. On any error (including KeyboardInterrupt) the temporary
        files are removed and files already at the final names are left untouched.
    """
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    start = time.perf_counter()
    prefix = Path(output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = optimal_dtype(tokenizer.vocab_size)
    # Same directory as the result so that the final os.replace is an atomic rename.
    tmp_prefix = str(temp_path(prefix, suffix=""))
    documents = tokens = skipped = words = characters = 0
    builder = None
    try:
        builder = IndexedDatasetBuilder(f"{tmp_prefix}.bin", dtype=dtype)
        bar = tqdm(total=total, unit=" docs", disable=not progress, mininterval=1.0, desc=prefix.name)
        with warnings.catch_warnings(), bar:
            # megatron calls numpy.array(tensor, dtype), which torch answers with one
            # DeprecationWarning per document.
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            for encoded, chunk_words, chunk_characters in _encoded_chunks(texts, tokenizer, workers, chunk_size):
                words += chunk_words
                characters += chunk_characters
                for array in encoded:
                    if array is None:
                        skipped += 1
                        continue
                    builder.add_document(torch.from_numpy(array.astype(np.int64)), [len(array)])
                    documents += 1
                    tokens += len(array)
                bar.set_postfix(tokens=f"{tokens:,}", refresh=False)
                bar.update(len(encoded))
        if documents == 0:
            raise ValueError(f"no documents to write to {prefix} (input empty or all documents empty)")
        builder.finalize(f"{tmp_prefix}.idx")
        _verify(tmp_prefix, documents, tokens)
        _publish(tmp_prefix, prefix)
    except BaseException:
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(f"{tmp_prefix}{suffix}").unlink(missing_ok=True)
        raise
    if skipped:
        logger.warning("%d document(s) produced no tokens and were not written", skipped)
    return WriteStats(
        documents=documents,
        tokens=tokens,
        skipped=skipped,
        words=words,
        characters=characters,
        bin_path=Path(f"{prefix}.bin"),
        idx_path=Path(f"{prefix}.idx"),
        dtype=np.dtype(dtype).name,
        seconds=time.perf_counter() - start,
    )
