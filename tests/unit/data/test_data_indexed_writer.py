"""Writer: Megatron .bin/.idx round trip, worker-count independence, atomicity."""

from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from vq_megatron.data.c4_reader import read_documents
from vq_megatron.data.indexed_writer import optimal_dtype, write_indexed_dataset
from vq_megatron.data.tokenizers import load_sentencepiece, train_sentencepiece

REPO_ROOT = Path(__file__).resolve().parents[3]
SLICE_TRAIN = REPO_ROOT / "data" / "c4_slice" / "c4-train.slice.jsonl.gz"


# Worker processes import this module to unpickle the test tokenizers below, so
# megatron (seconds to import) is imported inside the tests, not at module level.


class CodepointTokenizer:
    """Tiny picklable tokenizer: one id per character, vocabulary above uint16 range."""

    vocab_size = 70_000
    eod_id = 69_999

    def encode(self, text):
        return [min(ord(ch), 69_998) for ch in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


class FailingTokenizer(CodepointTokenizer):
    def encode(self, text):
        if text == "boom":
            raise RuntimeError("tokenizer failed on purpose")
        return super().encode(text)


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    docs = islice(read_documents([SLICE_TRAIN]), 150)
    model = train_sentencepiece(docs, tmp_path_factory.mktemp("sp") / "bpe1000", vocab_size=1000, num_threads=2)
    return load_sentencepiece(model)


@pytest.fixture(scope="module")
def docs():
    return list(read_documents([SLICE_TRAIN], max_docs=120))


def _read_back(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))], dataset


def test_round_trip_equals_encode_plus_eod(tmp_path, sp_tokenizer, docs):
    stats = write_indexed_dataset(docs, sp_tokenizer, tmp_path / "out" / "train", progress=False)
    expected = [sp_tokenizer.encode(doc) + [sp_tokenizer.eod_id] for doc in docs]
    got, dataset = _read_back(tmp_path / "out" / "train")
    assert got == expected
    assert dataset.index.dtype == np.uint16 and stats.dtype == "uint16"
    assert list(dataset.document_indices) == list(range(len(docs) + 1))
    assert stats.documents == len(docs) and stats.skipped == 0
    assert stats.tokens == sum(map(len, expected))
    assert stats.bin_path == tmp_path / "out" / "train.bin" and stats.idx_path.is_file()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train.bin", "train.idx"]


def test_workers_do_not_change_output(tmp_path, sp_tokenizer, docs):
    one = write_indexed_dataset(docs, sp_tokenizer, tmp_path / "w1", workers=1, progress=False)
    two = write_indexed_dataset(iter(docs), sp_tokenizer, tmp_path / "w2", workers=2, chunk_size=7, progress=True)
    assert (one.documents, one.tokens) == (two.documents, two.tokens)
    assert one.bin_path.read_bytes() == two.bin_path.read_bytes()
    assert one.idx_path.read_bytes() == two.idx_path.read_bytes()


def test_large_vocab_uses_int32(tmp_path):
    texts = ["abc", "\u4e2d\u6587", "x" * 10]
    stats = write_indexed_dataset(texts, CodepointTokenizer(), tmp_path / "big", workers=2, progress=False)
    got, dataset = _read_back(tmp_path / "big")
    assert dataset.index.dtype == np.int32 and stats.dtype == "int32"
    assert got == [[ord(c) for c in t] + [69_999] for t in texts]
    assert optimal_dtype(65_499) is np.uint16 and optimal_dtype(65_500) is np.int32


def test_empty_documents_are_skipped_and_counted(tmp_path, sp_tokenizer):
    stats = write_indexed_dataset(["one", "", "two"], sp_tokenizer, tmp_path / "e", progress=False)
    assert (stats.documents, stats.skipped) == (2, 1)
    with pytest.raises(ValueError, match="no documents"):
        write_indexed_dataset(["", ""], sp_tokenizer, tmp_path / "none", progress=False)
    assert not list(tmp_path.glob("none*")) and not list(tmp_path.glob(".none*"))


def _failing_texts(docs, after):
    for i, doc in enumerate(docs):
        if i == after:
            raise RuntimeError("input failed on purpose")
        yield doc


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_mid_write_leaves_no_files(tmp_path, sp_tokenizer, docs, workers):
    with pytest.raises(RuntimeError, match="on purpose"):
        write_indexed_dataset(_failing_texts(docs, 90), sp_tokenizer, tmp_path / "broken", workers=workers,
                              chunk_size=8, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_worker_exception_propagates_and_cleans_up(tmp_path):
    texts = ["fine"] * 50 + ["boom"] + ["fine"] * 50
    with pytest.raises(RuntimeError, match="tokenizer failed on purpose"):
        write_indexed_dataset(texts, FailingTokenizer(), tmp_path / "w", workers=2, chunk_size=4, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_previous_dataset(tmp_path, sp_tokenizer, docs):
    prefix = tmp_path / "keep"
    first = write_indexed_dataset(docs[:10], sp_tokenizer, prefix, progress=False)
    old_bin, old_idx = first.bin_path.read_bytes(), first.idx_path.read_bytes()
    with pytest.raises(RuntimeError):
        write_indexed_dataset(_failing_texts(docs, 50), sp_tokenizer, prefix, progress=False)
    assert first.bin_path.read_bytes() == old_bin and first.idx_path.read_bytes() == old_idx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.bin", "keep.idx"]
    # A successful rewrite replaces both files.
    write_indexed_dataset(docs[:20], sp_tokenizer, prefix, progress=False)
    assert len(_read_back(prefix)[0]) == 20
