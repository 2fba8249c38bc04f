"""HybridModel with the VQ head (model.backbone: hybrid) under tensor parallelism, from a TP=1 dist checkpoint.

Run (twice, same DIR):
  torchrun --nproc_per_node=1 hybrid_checks.py save  DIR        # TP=1 reference
  torchrun --nproc_per_node=2 hybrid_checks.py check DIR        # TP=2 (also with sequence parallelism)

'save' builds VQHybridModel (two-level head, r=3) and the dense HybridModel at TP=1, moves every parameter
off its init, saves each with megatron dist_checkpointing (model.sharded_state_dict()), and records the
per-token training loss on a fixed batch and every parameter's gradient.
'check' builds both at TP=2 from other seeds (another VQ map and codebook), loads the TP=1 checkpoints
(dist_checkpointing reshards vocab-sharded tensors), and checks on every rank, with sequence parallelism
off and on: the loss equals TP=1; the loss equals the cross-entropy of the model's own logits gathered over
TP; every gradient (TP shards gathered, replicated ones identical across ranks) equals TP=1.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from pp_checks import assert_close, full_tensor

from vq_megatron.integration.distributed import init_parallel, shutdown_parallel
from vq_megatron.integration.sequence_parallel import reduce_sequence_parallel_grads
from vq_megatron.models import ModelConfig, build_gpt_model

HEADS = ("vq", "dense")


def model_config(head: str, vq_seed: int) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=203,
                       make_vocab_size_divisible_by=8, output_layer=head, backbone="hybrid",
                       vq={"codebook_size": 16, "per_token_bias": True, "refine_rank": 3, "seed": vq_seed})


def batch():
    gen = torch.Generator().manual_seed(11)
    b, s = 2, 16
    tokens, labels = torch.randint(0, 203, (b, s), generator=gen), torch.randint(0, 203, (b, s), generator=gen)
    return tokens, torch.arange(s).expand(b, s), torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1), labels


def loss_and_grads(model):
    model.zero_grad(set_to_none=True)
    tokens, positions, mask, labels = batch()
    loss = model(tokens, positions, mask, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def save(out_dir: Path):
    init_parallel(tensor_parallel=1, seed=1)
    for head in HEADS:
        model = build_gpt_model(model_config(head, vq_seed=5), init_seed=1, token_counts=torch.arange(203) + 1)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        (out_dir / head).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out_dir / head))
        loss, grads = loss_and_grads(model)
        torch.save({"loss": loss, "grads": {n: g.clone() for n, g in grads.items()}}, out_dir / f"{head}.pt")
        print(f"hybrid_checks: saved TP=1 {head} reference, loss {float(loss.mean()):.7f}", flush=True)
    shutdown_parallel()


def check(out_dir: Path):
    init_parallel(tensor_parallel=2, seed=99)
    for head in HEADS:
        ref = torch.load(out_dir / f"{head}.pt")
        for sp in (False, True):
            model = build_gpt_model(model_config(head, vq_seed=42), tensor_parallel=2, sequence_parallel=sp,
                                    init_seed=99, token_counts=torch.arange(203) + 1)
            model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(out_dir / head)))
            if sp:   # what the driver does: sum the sequence-sharded gradients of replicated parameters over TP
                reduce_sequence_parallel_grads(model, ps.get_tensor_model_parallel_group())
            loss, grads = loss_and_grads(model)
            assert_close(loss, ref["loss"], f"{head} sp={sp}: loss vs TP=1")
            tokens, positions, mask, labels = batch()
            with torch.no_grad():
                shard = model(tokens, positions, mask)                     # [b, s, V_pad / 2]
                copies = [torch.empty_like(shard) for _ in range(2)]
                dist.all_gather(copies, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
                logits = torch.cat(copies, dim=-1)
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            assert_close(loss.reshape(-1), ce, f"{head} sp={sp}: loss vs its own gathered logits")
            worst = 0.0
            for name, p in model.named_parameters():
                worst = max(worst, assert_close(full_tensor(grads[name], p), ref["grads"][name],
                                                f"{head} sp={sp}: grad of {name}"))
            print(f"hybrid_checks: rank {dist.get_rank()} {head} sp={sp}: loss and {len(grads)} grads match TP=1 "
                  f"(max abs diff {worst:.2e})", flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        print("hybrid_checks: TP=2 HybridModel (dense and VQ, SP off and on) matches TP=1")
    shutdown_parallel()


if __name__ == "__main__":
    {"save": save, "check": check}[sys.argv[1]](Path(sys.argv[2]))
