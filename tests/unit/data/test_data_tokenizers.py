"""Tokenizers: GPT-2 BPE known ids, SentencePiece training/loading, pickling."""

import os
import pickle
from itertools import islice
from pathlib import Path

import pytest

from vq_megatron.data.c4_reader import DataError, read_documents
from vq_megatron.data.tokenizers import (
    GPT2BPETokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    load_gpt2,
    load_sentencepiece,
    train_sentencepiece,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SLICE_TRAIN = REPO_ROOT / "data" / "c4_slice" / "c4-train.slice.jsonl.gz"
SLICE_VALID = REPO_ROOT / "data" / "c4_slice" / "c4-validation.slice.jsonl.gz"
SHARED_DATA = Path(os.environ.get("VQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
GPT2_VOCAB = SHARED_DATA / "gpt2" / "gpt2-vocab.json.gz"
GPT2_MERGES = SHARED_DATA / "gpt2" / "gpt2-merges.txt"

# Reference ids from tiktoken's GPT-2 encoding (encode_ordinary) on the same vocab/merges.
GPT2_KNOWN = {
    "Hello world": [15496, 995],
    "I'm here, they'll see   it's 2024!\n\nNew   line\ttab": [
        40, 1101, 994, 11, 484, 1183, 766, 220, 220, 340, 338, 48609, 0, 198, 198, 3791, 220, 220, 1627, 197, 8658,
    ],
    "na\u00efve caf\u00e9 \u2014 \u6771\u4eac \U0001f642 x\u00b2": [
        2616, 38776, 40304, 851, 10545, 251, 109, 12859, 105, 32485, 2124, 31185,
    ],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # plain text, not the special id
}


@pytest.fixture(scope="module")
def gpt2() -> GPT2BPETokenizer:
    return load_gpt2(GPT2_VOCAB, GPT2_MERGES)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    docs = islice(read_documents([SLICE_TRAIN]), 200)
    return train_sentencepiece(docs, tmp_path_factory.mktemp("sp") / "c4_bpe1000", vocab_size=1000, num_threads=2)


def test_gpt2_known_ids(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eod_id == 50256
    for text, ids in GPT2_KNOWN.items():
        assert gpt2.encode(text) == ids, text
        assert gpt2.decode(ids) == text


def test_gpt2_round_trip_and_pickle(gpt2):
    docs = list(read_documents([SLICE_VALID], max_docs=20))
    clone = pickle.loads(pickle.dumps(gpt2))
    for doc in docs:
        ids = gpt2.encode(doc)
        assert gpt2.decode(ids) == doc
        assert clone.encode(doc) == ids
    assert isinstance(gpt2, TextTokenizer)


def test_gpt2_plain_vocab_and_missing_files(tmp_path, gpt2):
    import gzip

    plain = tmp_path / "vocab.json"
    plain.write_bytes(gzip.decompress(GPT2_VOCAB.read_bytes()))
    assert load_gpt2(plain, GPT2_MERGES).encode("Hello world") == [15496, 995]
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_gpt2(plain, tmp_path / "merges.txt")


def test_sentencepiece_trains_small_bpe(sp_model):
    assert sp_model.name == "c4_bpe1000.model" and sp_model.is_file()
    assert not [p for p in sp_model.parent.iterdir() if p.name.endswith(".tmp")]
    tok = load_sentencepiece(sp_model)
    assert tok.vocab_size == 1000
    assert tok.eod_id == 2
    assert isinstance(tok, TextTokenizer)


def test_sentencepiece_exact_round_trip_without_unk(sp_model):
    tok = load_sentencepiece(sp_model)
    texts = list(read_documents([SLICE_VALID], max_docs=30))
    texts.append("Unseen script \u65e5\u672c\u8a9e \u2603\n\n  tabs\there")
    for text in texts:
        ids = tok.encode(text)
        assert 0 not in ids  # byte fallback: no <unk>
        assert max(ids) < tok.vocab_size
        assert tok.decode(ids) == text


def test_sentencepiece_training_is_deterministic(sp_model, tmp_path):
    docs = islice(read_documents([SLICE_TRAIN]), 200)
    again = train_sentencepiece(docs, tmp_path / "again", vocab_size=1000, num_threads=2)
    assert again.read_bytes() == sp_model.read_bytes()


def test_sentencepiece_pickles(sp_model):
    tok = load_sentencepiece(sp_model)
    clone = pickle.loads(pickle.dumps(tok))
    text = "The quick brown fox."
    assert clone.encode(text) == tok.encode(text)
    assert clone.vocab_size == tok.vocab_size and clone.eod_id == tok.eod_id


def test_sentencepiece_unigram(tmp_path):
    docs = islice(read_documents([SLICE_TRAIN]), 80)
    path = train_sentencepiece(docs, tmp_path / "uni", vocab_size=600, model_type="unigram", num_threads=2)
    tok = SentencePieceTokenizer(path)
    assert tok.vocab_size == 600
    assert tok.decode(tok.encode("Hello there, world.")) == "Hello there, world."


def test_sentencepiece_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="model_type"):
        train_sentencepiece(["x"], tmp_path / "m", vocab_size=100, model_type="wordpiece")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_sentencepiece(tmp_path / "nope.model")


def test_sentencepiece_training_reports_input_errors_and_failures(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "hello world"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: broken JSON"):
        train_sentencepiece(read_documents([bad]), tmp_path / "m", vocab_size=300)
    with pytest.raises(ValueError, match="SentencePiece training failed"):
        train_sentencepiece(["tiny text"] * 3, tmp_path / "m", vocab_size=5000)
    assert list(tmp_path.iterdir()) == [bad]
