"""`vq-megatron-generate RUN_DIR --prompt TEXT`: continue a prompt with a trained dense or VQ model.

The VQ head never builds the V logits: the last hidden state goes through the exact O(K + cluster)
sampler (vq_megatron.ops.sampling); the dense head samples its gathered logits with the same rules.
Runs in one process, or under torchrun with TP = number of processes (any TP the run was trained with).
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["generate_ids", "main"]


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], *, max_new_tokens: int, seq_length: int, vocab_size: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
                 seed: int = 0, eod_id: int | None = None, device=None) -> list[int]:
    """Autoregressive continuation (no KV cache: each step re-reads the last seq_length tokens)."""
    from vq_megatron.layers import VQOutputLayer
    from vq_megatron.ops.sampling import sample_from_logits
    from vq_megatron.training.data import causal_mask

    device = device or torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = list(prompt_ids)
    head = model.output_layer
    for _ in range(max_new_tokens):
        window = torch.tensor([ids[-seq_length:]], device=device)
        s = window.shape[1]
        positions = torch.arange(s, device=device).unsqueeze(0)
        mask = causal_mask(s, device)
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, greedy=greedy)
        if isinstance(head, VQOutputLayer):
            hidden = model(window, positions, mask, output_processor=lambda hidden_states, **_: hidden_states)
            token = head.sample(hidden[-1], **options)       # hidden: [s, b, d]
        else:
            logits = model(window, positions, mask, runtime_gather_output=True)[:, -1, :vocab_size]
            token = sample_from_logits(logits, **options)
            token = _same_on_all_tp_ranks(token)
        ids.append(int(token[0]))
        if eod_id is not None and ids[-1] == eod_id:
            break
    return ids


def _same_on_all_tp_ranks(token: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    from vq_megatron.parallel import broadcast_from_first_rank

    return broadcast_from_first_rank(token.contiguous(), ps.get_tensor_model_parallel_group())


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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import torch.distributed as dist

    from vq_megatron.inference.loading import trained_run

    with trained_run(args.run_dir, tag=args.tag, tokenizer_model=args.tokenizer_model) as (
            model, cfg, tag, tokenizer, device):
        ids = generate_ids(model, tokenizer.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                           seq_length=cfg.model.seq_length, vocab_size=cfg.model.vocab_size,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           greedy=args.greedy, seed=args.seed,
                           eod_id=tokenizer.eod_id if args.stop_at_eod else None, device=device)
        if dist.get_rank() == 0:
            print(f"[generate] {args.run_dir} ({cfg.model.output_layer} head, checkpoint {tag})")
            print(tokenizer.decode(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
