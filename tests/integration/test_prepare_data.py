"""End to end: bundled C4 slice -> CLI -> .bin/.idx -> megatron IndexedDataset and GPTDataset."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

from vq_megatron.data.c4_reader import read_documents
from vq_megatron.data.prepare import build_parser, main, prepare
from vq_megatron.data.tokenizers import load_gpt2, load_sentencepiece

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE_TRAIN = REPO_ROOT / "data" / "c4_slice" / "c4-train.slice.jsonl.gz"
SLICE_VALID = REPO_ROOT / "data" / "c4_slice" / "c4-validation.slice.jsonl.gz"
SHARED_DATA = Path(os.environ.get("VQ_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
GPT2_VOCAB = SHARED_DATA / "gpt2" / "gpt2-vocab.json.gz"
GPT2_MERGES = SHARED_DATA / "gpt2" / "gpt2-merges.txt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run the CLI once: train a 1,000-piece BPE and tokenize 300 train documents with 2 workers."""
    out = tmp_path_factory.mktemp("prepared")
    argv = [
        "--input", str(SLICE_TRAIN), "--output-prefix", str(out / "c4_train"),
        "--train-sp", "--vocab-size", "1000", "--sp-train-docs", "200", "--sp-threads", "2",
        "--max-docs", "300", "--workers", "2", "--no-progress",
    ]
    assert main(argv) == 0
    return out


def test_cli_writes_megatron_dataset(trained, capsys):
    prefix = trained / "c4_train"
    tok = load_sentencepiece(trained / "c4_train_sp1000.model")
    dataset = IndexedDataset(str(prefix))
    docs = list(read_documents([SLICE_TRAIN], max_docs=300))
    assert len(dataset) == 300
    for i in (0, 1, 150, 299):
        assert dataset[i].tolist() == tok.encode(docs[i]) + [tok.eod_id]
    assert dataset.index.dtype == np.uint16
    assert sorted(p.name for p in trained.iterdir()) == [
        "c4_train.bin", "c4_train.idx", "c4_train.meta.json", "c4_train_sp1000.model",
    ]
    meta = json.loads((trained / "c4_train.meta.json").read_text())
    assert meta["documents"] == 300 and meta["tokens"] == sum(len(dataset[i]) for i in range(300))
    assert meta["words"] == sum(len(d.split()) for d in docs)
    assert meta["characters"] == sum(map(len, docs))
    assert (meta["vocab_size"], meta["eod_id"], meta["max_docs"]) == (1000, 2, 300)


def test_dataset_feeds_megatron_gpt_dataset(trained, tmp_path):
    prefix = str(trained / "c4_train")
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=64,
        blend=([prefix], None),
        split="90,5,5",
        tokenizer=NullTokenizer(vocab_size=1000, eod_id=2),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=str(tmp_path / "cache"),
    )
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [100, 10, 10], lambda: True, config).build()
    assert len(train) >= 100 and len(valid) >= 10 and len(test) >= 10
    sample = train[0]
    assert sample["tokens"].shape == (64,) and sample["labels"].shape == (64,)
    assert int(sample["tokens"].max()) < 1000
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])


def test_eval_selection_reuses_model(trained, capsys):
    """Tokenize documents 100..149 of the validation slice with the trained model (--skip/--max-docs)."""
    model = trained / "c4_train_sp1000.model"
    prefix = trained.parent / "eval_sel" / "c4_valid"
    argv = ["--input", str(SLICE_VALID), "--output-prefix", str(prefix), "--sp-model", str(model),
            "--skip-docs", "100", "--max-docs", "50", "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "documents : 50" in out and "skipped   : 0" in out and f"{prefix}.bin" in out
    tok = load_sentencepiece(model)
    expected = [tok.encode(d) + [tok.eod_id] for d in list(read_documents([SLICE_VALID]))[100:150]]
    dataset = IndexedDataset(str(prefix))
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected


def test_wikitext_word_count_matches_published_size(trained, tmp_path):
    """WikiText-2 valid: one document per non-empty line; 213,886 words without <eos> (published size)."""
    result = prepare([SHARED_DATA / "wikitext-2" / "wiki.valid.tokens.gz"], tmp_path / "wt2_valid",
                     sp_model=trained / "c4_train_sp1000.model", workers=2, progress=False)
    assert result.words == 213_886
    assert json.loads(result.meta_path.read_text())["words"] == 213_886
    assert result.documents == len(IndexedDataset(str(tmp_path / "wt2_valid")))


def test_gpt2_tokenizer_through_python_api(tmp_path):
    result = prepare(
        [SLICE_VALID], tmp_path / "gpt2_valid", tokenizer="gpt2",
        gpt2_vocab=GPT2_VOCAB, gpt2_merges=GPT2_MERGES, max_docs=40, workers=2, progress=False,
    )
    assert (result.documents, result.vocab_size, result.eod_id, result.dtype) == (40, 50257, 50256, "uint16")
    tok = load_gpt2(GPT2_VOCAB, GPT2_MERGES)
    dataset = IndexedDataset(str(tmp_path / "gpt2_valid"))
    docs = list(read_documents([SLICE_VALID], max_docs=40))
    assert [dataset[i].tolist() for i in range(40)] == [tok.encode(d) + [50256] for d in docs]
    assert result.tokens == sum(len(tok.encode(d)) + 1 for d in docs)


def test_skip_policy_reported_in_summary(tmp_path, trained, capsys):
    lines = gzip.decompress(SLICE_VALID.read_bytes()).splitlines(keepends=True)[:20]
    lines.insert(5, b"{not json\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"".join(lines))
    base = ["--input", str(bad), "--output-prefix", str(tmp_path / "out"), "--no-progress",
            "--sp-model", str(trained / "c4_train_sp1000.model")]
    assert main(base) == 1
    err = capsys.readouterr().err
    assert f"{bad}:6: broken JSON" in err
    assert not list(tmp_path.glob("out*"))
    assert main(base + ["--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "documents : 20" in out and "skipped   : 1" in out


def test_cli_errors_and_help(tmp_path, capsys):
    missing = tmp_path / "shared" / "data" / "c4" / "c4-train.00000-of-01024.json.gz"
    argv = ["--input", str(missing), "--output-prefix", str(tmp_path / "x"), "--train-sp", "--vocab-size", "500"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "launch/prepare_c4.sh" in err
    # Neither or both of --sp-model / --train-sp.
    assert main(["--input", str(SLICE_VALID), "--output-prefix", str(tmp_path / "x")]) == 1
    assert "--sp-model" in capsys.readouterr().err
    assert main(["--input", str(SLICE_VALID), "--output-prefix", str(tmp_path / "x"), "--tokenizer", "gpt2"]) == 1
    assert "--gpt2-vocab" in capsys.readouterr().err
    help_text = build_parser().format_help()
    for flag in ("--input", "--output-prefix", "--tokenizer", "--sp-model", "--train-sp", "--vocab-size",
                 "--sp-type", "--sp-train-docs", "--gpt2-vocab", "--gpt2-merges", "--workers", "--on-error",
                 "--max-docs", "--skip-docs"):
        assert flag in help_text
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0


def test_prepare_c4_script_with_file_mirror(tmp_path):
    """launch/prepare_c4.sh: download from a file:// mirror, train the tokenizer, tokenize both splits."""
    mirror = tmp_path / "mirror" / "en"
    mirror.mkdir(parents=True)
    shutil.copy(SLICE_TRAIN, mirror / "c4-train.00000-of-01024.json.gz")
    shutil.copy(SLICE_VALID, mirror / "c4-validation.00000-of-00008.json.gz")
    env = dict(
        os.environ, PYTHON=sys.executable, C4_BASE_URL=(tmp_path / "mirror").as_uri(),
        RAW_DIR=str(tmp_path / "raw"), OUT_DIR=str(tmp_path / "out"), VOCAB_SIZE="800",
        SP_TRAIN_DOCS="100", WORKERS="2", OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        ["bash", str(REPO_ROOT / "launch" / "prepare_c4.sh"), "--max-docs", "120", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "c4_en_sp800_bpe.model").is_file()
    assert len(IndexedDataset(str(out / "c4_en_train_text_document"))) == 120
    assert len(IndexedDataset(str(out / "c4_en_validation_text_document"))) == 120
    assert (tmp_path / "raw" / "c4-train.00000-of-01024.json.gz").read_bytes() == SLICE_TRAIN.read_bytes()
