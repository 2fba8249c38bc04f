"""CLI and Python entry point: text files -> tokenizer -> Megatron ``.bin/.idx``.

Example (bundled C4 slice, train a 1,000-piece SentencePiece BPE on the fly)::

    vq-megatron-prepare-data --input data/c4_slice/c4-train.slice.jsonl.gz \\
        --output-prefix runs/data/c4_slice_train --train-sp --vocab-size 1000 --workers 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..files import atomic_write_json
from .c4_reader import ON_ERROR_CHOICES, DataError, DocumentReader
from .tokenizers import TextTokenizer, load_gpt2, load_sentencepiece, train_sentencepiece

__all__ = ["PrepareResult", "prepare", "build_parser", "main"]

logger = logging.getLogger("vq_megatron.data.prepare")  # not __name__: "__main__" under -m


@dataclass
class PrepareResult:
    """Outcome of :func:`prepare`; ``skipped`` counts bad input lines plus documents with no tokens."""

    documents: int
    tokens: int
    skipped: int
    words: int
    characters: int
    bin_path: Path
    idx_path: Path
    meta_path: Path
    tokenizer_model: Path | None  # the SentencePiece model used or trained; None for GPT-2
    vocab_size: int
    eod_id: int
    dtype: str
    seconds: float

    def summary(self) -> str:
        """Human-readable multi-line summary."""
        lines = [
            f"documents : {self.documents:,}",
            f"tokens    : {self.tokens:,} (EOD included)",
            f"skipped   : {self.skipped:,}",
            f"vocab     : {self.vocab_size:,} (eod id {self.eod_id}, dtype {self.dtype})",
            f"output    : {self.bin_path}",
            f"            {self.idx_path}",
            f"            {self.meta_path}",
        ]
        if self.tokenizer_model is not None:
            lines.append(f"tokenizer : {self.tokenizer_model}")
        lines.append(f"seconds   : {self.seconds:.1f}")
        return "\n".join(lines)


def _build_tokenizer(
    reader: DocumentReader,
    tokenizer: str,
    output_prefix: Path,
    sp_model: str | Path | None,
    train_sp: bool,
    vocab_size: int | None,
    sp_type: str,
    sp_train_docs: int,
    sp_model_prefix: str | Path | None,
    sp_threads: int,
    gpt2_vocab: str | Path | None,
    gpt2_merges: str | Path | None,
) -> tuple[TextTokenizer, Path | None]:
    if tokenizer == "gpt2":
        if sp_model or train_sp:
            raise ValueError("--sp-model/--train-sp apply to --tokenizer sentencepiece only")
        if not (gpt2_vocab and gpt2_merges):
            raise ValueError("--tokenizer gpt2 needs --gpt2-vocab and --gpt2-merges")
        return load_gpt2(gpt2_vocab, gpt2_merges), None
    if tokenizer != "sentencepiece":
        raise ValueError(f"unknown tokenizer {tokenizer!r}; choose sentencepiece or gpt2")
    if bool(sp_model) == bool(train_sp):
        raise ValueError("give exactly one of --sp-model PATH or --train-sp")
    if sp_model:
        return load_sentencepiece(sp_model), Path(sp_model)
    if not vocab_size:
        raise ValueError("--train-sp needs --vocab-size")
    model_prefix = Path(sp_model_prefix) if sp_model_prefix else Path(f"{output_prefix}_sp{vocab_size}")
    # Train on the head of the same document selection that gets tokenized.
    train_reader = DocumentReader(
        reader.files,
        on_error=reader.on_error,
        skip_docs=reader.skip_docs,
        max_docs=sp_train_docs if reader.max_docs is None else min(sp_train_docs, reader.max_docs),
    )
    started = time.perf_counter()
    model_path = train_sentencepiece(
        train_reader, model_prefix, vocab_size, model_type=sp_type, num_threads=sp_threads
    )
    logger.info(
        "trained %s SentencePiece (%d pieces) on %d docs in %.1fs -> %s",
        sp_type, vocab_size, train_reader.stats.documents, time.perf_counter() - started, model_path,
    )
    return load_sentencepiece(model_path), model_path


def prepare(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tokenizer: str = "sentencepiece",
    sp_model: str | Path | None = None,
    train_sp: bool = False,
    vocab_size: int | None = None,
    sp_type: str = "bpe",
    sp_train_docs: int = 100_000,
    sp_model_prefix: str | Path | None = None,
    sp_threads: int = 4,
    gpt2_vocab: str | Path | None = None,
    gpt2_merges: str | Path | None = None,
    workers: int = 1,
    on_error: str = "stop",
    max_docs: int | None = None,
    skip_docs: int = 0,
    progress: bool = True,
) -> PrepareResult:
    """Read documents, build or load a tokenizer, and write ``<output_prefix>.bin/.idx``.

    Same options as the CLI (see ``vq-megatron-prepare-data --help``). Besides the
    ``.bin/.idx`` pair it writes ``<output_prefix>.meta.json`` with the counts
    (documents, tokens, words, characters), tokenizer and input selection. With
    ``train_sp`` the model is written to ``<sp_model_prefix>.model`` (default
    ``<output_prefix>_sp<vocab_size>.model``), trained on the first
    ``sp_train_docs`` of the selected documents.

    Raises:
        FileNotFoundError: an input is missing (the message says what to download).
        DataError: bad input under ``on_error="stop"``.
        ValueError: inconsistent options.
    """
    from .indexed_writer import write_indexed_dataset  # torch + megatron: import on use

    started = time.perf_counter()
    output_prefix = Path(output_prefix)
    reader = DocumentReader(inputs, on_error=on_error, skip_docs=skip_docs, max_docs=max_docs)
    tok, model_path = _build_tokenizer(
        reader, tokenizer, output_prefix, sp_model, train_sp, vocab_size, sp_type,
        sp_train_docs, sp_model_prefix, sp_threads, gpt2_vocab, gpt2_merges,
    )
    stats = write_indexed_dataset(
        reader, tok, output_prefix, workers=workers, progress=progress, total=max_docs
    )
    result = PrepareResult(
        documents=stats.documents,
        tokens=stats.tokens,
        skipped=reader.stats.skipped + stats.skipped,
        words=stats.words,
        characters=stats.characters,
        bin_path=stats.bin_path,
        idx_path=stats.idx_path,
        meta_path=Path(f"{output_prefix}.meta.json"),
        tokenizer_model=model_path,
        vocab_size=tok.vocab_size,
        eod_id=tok.eod_id,
        dtype=stats.dtype,
        seconds=time.perf_counter() - started,
    )
    meta = {
        "documents": result.documents,
        "tokens": result.tokens,  # EOD included
        "words": result.words,  # whitespace-separated, no end-of-line token
        "characters": result.characters,
        "skipped": result.skipped,
        "vocab_size": result.vocab_size,
        "eod_id": result.eod_id,
        "dtype": result.dtype,
        "tokenizer": tokenizer,
        "tokenizer_files": [str(p) for p in ([model_path] if model_path else [gpt2_vocab, gpt2_merges])],
        "inputs": [str(p) for p in reader.files],
        "skip_docs": skip_docs,
        "max_docs": max_docs,
    }
    atomic_write_json(result.meta_path, meta)
    return result


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vq-megatron-prepare-data``."""
    parser = argparse.ArgumentParser(
        prog="vq-megatron-prepare-data",
        description="Tokenize C4 / JSON Lines / text / WikiText files into a Megatron indexed "
        "dataset (<prefix>.bin + <prefix>.idx), one EOD token after each document.",
    )
    io_group = parser.add_argument_group("input and output")
    io_group.add_argument(
        "--input", nargs="+", required=True, metavar="FILE",
        help="input files, directories or glob patterns, read in the given order: *.json(l)[.gz] "
        "with a 'text' key per line (C4 shards), or *.txt / *.tokens[.gz] with one document per line",
    )
    io_group.add_argument("--output-prefix", required=True, help="write PREFIX.bin and PREFIX.idx")
    io_group.add_argument("--skip-docs", type=_non_negative_int, metavar="N", default=0,
                          help="leave out this many leading documents, counted over all inputs (default: 0)")
    io_group.add_argument("--max-docs", type=_non_negative_int, metavar="N", default=None,
                          help="use at most this many documents after --skip-docs (default: all)")
    io_group.add_argument("--on-error", choices=ON_ERROR_CHOICES, default="stop",
                          help="on a bad input line: stop with file:line, or skip it with a warning and "
                          "count it (default: stop)")

    tok_group = parser.add_argument_group("tokenizer")
    tok_group.add_argument("--tokenizer", choices=("sentencepiece", "gpt2"), default="sentencepiece",
                           help="tokenizer family (default: sentencepiece)")
    tok_group.add_argument("--sp-model", metavar="PATH", help="existing SentencePiece .model to use")
    tok_group.add_argument("--train-sp", action="store_true",
                           help="train a SentencePiece model on the selected documents first")
    tok_group.add_argument("--vocab-size", type=_positive_int, metavar="N",
                           help="vocabulary size for --train-sp (required with it)")
    tok_group.add_argument("--sp-type", choices=("bpe", "unigram"), default="bpe",
                           help="SentencePiece model type for --train-sp (default: bpe)")
    tok_group.add_argument("--sp-train-docs", type=_positive_int, metavar="N", default=100_000,
                           help="--train-sp uses the first N selected documents (default: 100000)")
    tok_group.add_argument("--sp-model-prefix", metavar="PREFIX",
                           help="--train-sp writes PREFIX.model (default: OUTPUT_PREFIX_sp<vocab-size>)")
    tok_group.add_argument("--sp-threads", type=_positive_int, metavar="N", default=4,
                           help="SentencePiece training threads; the trained model depends on it, "
                           "so keep it fixed (default: 4)")
    tok_group.add_argument("--gpt2-vocab", metavar="PATH", help="GPT-2 vocab.json (may be .gz) for --tokenizer gpt2")
    tok_group.add_argument("--gpt2-merges", metavar="PATH", help="GPT-2 merges.txt for --tokenizer gpt2")

    run_group = parser.add_argument_group("execution")
    run_group.add_argument("--workers", type=_positive_int, metavar="N", default=1,
                           help="tokenizer processes; the output does not depend on it (default: 1)")
    run_group.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 error; argparse exits 2 on bad usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vq_megatron").setLevel(logging.INFO)  # megatron's INFO lines are noise here
    try:
        result = prepare(
            inputs=args.input,
            output_prefix=args.output_prefix,
            tokenizer=args.tokenizer,
            sp_model=args.sp_model,
            train_sp=args.train_sp,
            vocab_size=args.vocab_size,
            sp_type=args.sp_type,
            sp_train_docs=args.sp_train_docs,
            sp_model_prefix=args.sp_model_prefix,
            sp_threads=args.sp_threads,
            gpt2_vocab=args.gpt2_vocab,
            gpt2_merges=args.gpt2_merges,
            workers=args.workers,
            on_error=args.on_error,
            max_docs=args.max_docs,
            skip_docs=args.skip_docs,
            progress=not args.no_progress,
        )
    except (DataError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
