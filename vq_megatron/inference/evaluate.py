"""`vq-megatron-evaluate RUN_DIR --input FILE...`: perplexity of a trained model on any text/jsonl file.

Documents are read like the data-prep CLI reads them (C4 json/jsonl[.gz], text, WikiText *.tokens),
tokenized with the run's tokenizer, joined with an end-of-document token and evaluated in sequential
windows of the model's sequence length. Prints token-level and word-level (whitespace words) perplexity.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

__all__ = ["evaluate_texts", "main"]


def evaluate_texts(model, tokenizer, docs, *, seq_length: int, micro_batch_size: int = 8,
                   max_tokens: int = 0, device=None) -> dict:
    from vq_megatron.training.data import token_windows
    from vq_megatron.training.evaluation import perplexities, windows_nll

    stream, words = [], 0
    for doc in docs:
        stream += tokenizer.encode(doc) + [tokenizer.eod_id]
        words += len(doc.split())
        if max_tokens and len(stream) > max_tokens:
            break
    full_tokens = len(stream)
    if max_tokens:
        stream = stream[: max_tokens + 1]
    windows = token_windows(torch.tensor(stream, dtype=torch.int64), seq_length, "the input")
    nll, count = windows_nll(model, windows, micro_batch_size=micro_batch_size, device=device or "cpu")
    # Words of the evaluated part, in proportion to the tokens evaluated.
    return {"tokens": count, "words": words * count / full_tokens, **perplexities("eval", nll, count,
                                                                                  words * count / full_tokens)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vq-megatron-evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training run directory (training.save_dir)")
    p.add_argument("--input", nargs="+", required=True, help="text / json / jsonl[.gz] / *.tokens[.gz] files")
    p.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece model (default: the run's)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="bad input lines: stop or skip")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from vq_megatron.data.c4_reader import DocumentReader
    from vq_megatron.inference.loading import trained_run

    with trained_run(args.run_dir, tag=args.tag, tokenizer_model=args.tokenizer_model) as (
            model, cfg, tag, tokenizer, device):
        result = evaluate_texts(model, tokenizer, DocumentReader(args.input, on_error=args.on_error),
                                seq_length=cfg.model.seq_length, micro_batch_size=args.micro_batch_size,
                                max_tokens=args.max_tokens, device=device)
        if dist.get_rank() == 0:
            result = {"run": str(args.run_dir), "checkpoint": tag, "output_layer": cfg.model.output_layer, **result}
            print(json.dumps(result) if args.json else "\n".join(f"{k:>14}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
