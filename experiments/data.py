"""Tokenized data for the experiment grids, prepared once per tokenizer from ../shared/data (see its README).

Training: the C4 train sample (1,000 docs) + the first 1,500 documents of the C4 validation sample.
Evaluation: C4 = the last 500 validation documents (no overlap with training); WikiText-2 valid;
WikiText-103 valid. Token- and word-level perplexity (the prepare step records words per set).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["prepare_data", "vocabulary_size", "SHARED"]

GPT2_VOCAB = 50257

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def _call(cmd: list[str]) -> None:
    print("[experiments] $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def vocabulary_size(data: dict) -> int:
    """V of a grid's `data:` section: GPT-2 BPE's 50257, or the sentencepiece `vocab` (8000 by default)."""
    return GPT2_VOCAB if data.get("tokenizer") == "gpt2" else data.get("vocab", 8000)


def prepare_data(data_dir: str | Path, *, tokenizer: str = "sentencepiece", vocab: int = 8000) -> dict:
    """Tokenize once into data_dir. Returns {vocab, tokenizer_model, train, eval: {name: prefix}, tag}."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"{SHARED} not found: the experiment grids read the corpora in ../shared/data")
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    c4 = SHARED / "c4"
    train_in = [str(c4 / "c4-train.00000-of-01024.first1000.jsonl.gz"), str(c4 / "c4-validation.sample2000.jsonl.gz")]
    if tokenizer == "gpt2":
        vocab, tag, sp_model = GPT2_VOCAB, "gpt2", ""
        tok = ["--tokenizer", "gpt2", "--gpt2-vocab", str(SHARED / "gpt2" / "gpt2-vocab.json.gz"),
               "--gpt2-merges", str(SHARED / "gpt2" / "gpt2-merges.txt")]
    elif tokenizer == "sentencepiece":
        tag = f"sp{vocab}"
        sp_model = str(d / f"c4_{tag}.model")
        tok = ["--sp-model", sp_model]
    else:
        raise ValueError(f"data.tokenizer must be sentencepiece or gpt2, got {tokenizer!r}")
    prep = [sys.executable, "-m", "vq_megatron.data.prepare", "--workers", "2", "--no-progress"]
    out = {"vocab": vocab, "tokenizer_model": sp_model, "train": str(d / f"c4_train_{tag}"), "eval": {}, "tag": tag}
    if not Path(out["train"] + ".idx").is_file():
        extra = (tok if tokenizer == "gpt2" else
                 ["--train-sp", "--vocab-size", str(vocab), "--sp-model-prefix", sp_model[: -len(".model")]])
        _call(prep + ["--input", *train_in, "--max-docs", "2500", "--output-prefix", out["train"], *extra])
    evals = {"c4": ["--input", train_in[1], "--skip-docs", "1500"],
             "wikitext2": ["--input", str(SHARED / "wikitext-2" / "wiki.valid.tokens.gz")],
             "wikitext103": ["--input", str(SHARED / "wikitext-103" / "wiki.valid.tokens.gz")]}
    for name, inputs in evals.items():
        prefix = str(d / f"{name}_eval_{tag}")
        if not Path(prefix + ".idx").is_file():
            _call(prep + inputs + ["--output-prefix", prefix, *tok])
        out["eval"][name] = prefix
    return out
