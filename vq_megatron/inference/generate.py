"""`vq-megatron-generate RUN_DIR --prompt TEXT`: continue a prompt with a trained dense or VQ model.

Decoding is incremental (megatron-core's KV cache, inference/decoding.py). The VQ head never builds the
V logits: the last hidden state goes through the exact sampler (vq_megatron.ops.sampling); the dense head
samples its gathered logits with the same rules. Runs in one process, or under torchrun with TP = number of
processes (any TP, whatever the run was trained with), with the run's own tokenizer (sentencepiece or GPT-2 BPE).
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["generate_ids", "main"]


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, seq_length: int, vocab_size: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 seed: int = 0, eod_id: int | None = None, device=None, num_samples: int = 1,
                 max_batch_size: int | None = None) -> list[list[int]]:
    """num_samples continuations of one prompt, decoded together with the KV cache (inference/decoding.py)."""
    from vq_megatron.inference.decoding import generate_batch

    if not prompt_ids:
        raise ValueError("the prompt is empty: nothing to continue")
    device = device or torch.device("cpu")
    prompts = torch.tensor([prompt_ids] * num_samples, device=device)
    ids = generate_batch(model, prompts, max_new_tokens=max_new_tokens, seq_length=seq_length,
                         vocab_size=vocab_size, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                         generator=torch.Generator(device=device).manual_seed(seed), max_batch_size=max_batch_size,
                         eod_id=eod_id)
    rows = ids.tolist()
    if eod_id is not None:   # cut each row after its first end-of-document token
        start = len(prompt_ids)
        rows = [row[: start + row[start:].index(eod_id) + 1] if eod_id in row[start:] else row for row in rows]
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vq-megatron-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="training run directory (training.save_dir) with config.json and checkpoints")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=50, help="tokens to generate (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--tokenizer-model", default=None, help="sentencepiece model (default: the run's)")
    p.add_argument("--stop-at-eod", action="store_true", help="stop at the end-of-document token")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the prompt, decoded as one batch")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="rows the KV cache is allocated for (default 8); --num-samples may not exceed it")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from vq_megatron.inference.loading import trained_run

    with trained_run(args.run_dir, tag=args.tag, tokenizer_model=args.tokenizer_model) as (
            model, cfg, tag, tokenizer, device):
        rows = generate_ids(model, tokenizer.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                            seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            greedy=args.greedy, seed=args.seed,
                            eod_id=tokenizer.eod_id if args.stop_at_eod else None, device=device,
                            num_samples=args.num_samples, max_batch_size=args.max_batch_size)
        if dist.get_rank() == 0:
            print(f"[generate] {args.run_dir} ({cfg.model.output_layer} head, checkpoint {tag})")
            print("\n---\n".join(tokenizer.decode(ids) for ids in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
