"""Pipeline-stage balance (as the Vocabulary Parallelism paper, arXiv 2411.05288, measures it): forward +
backward time and peak memory of each pipeline stage of a GPT, dense head vs VQ heads, at V=50304.

A torchrun worker, PP = world size (2 by default), TP=1; every rank builds its own stage of the same model
(megatron-core GPTModel through vq_megatron.models.build_gpt_model: the embedding on the first stage, the
output layer and loss on the last) and times its stage's forward + backward in isolation on fixed inputs:
the first stage from token ids (backward from a fixed output gradient), the last from a fixed hidden-state
input to the per-token loss. No point-to-point traffic is timed: the number is the stage's own compute, the
quantity that sets the pipeline's bubble. Peak memory as bench_utils.measure_step_peak_bytes.

Run (from the repo root; 2 ranks on a 2-core CPU -> 1 thread each):
  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 benchmark/bench_pipeline_stages.py
Writes benchmark/results/pipeline_stages.csv and .json (or under --out-dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bench_utils import MB, RESULTS_DIR, fmt, format_table, measure_step_peak_bytes, median, run_metadata, time_steps, \
    write_results

VARIANTS = {"dense": {"output_layer": "dense"},
            "vq_K1024": {"output_layer": "vq", "vq": {"codebook_size": 1024}},
            "vq_K1024_r8": {"output_layer": "vq", "vq": {"codebook_size": 1024, "refine_rank": 8}}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden-size", type=int, default=768)
    p.add_argument("--layers", type=int, default=4, help="transformer layers in total (split over the stages)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def stage_step(model, args, first: bool, last: bool, device):
    """forward + backward of this rank's stage on fixed inputs; returns (step, drop_grads)."""
    gen = torch.Generator().manual_seed(0)
    s, b, d = args.seq, args.batch, args.hidden_size
    tokens = torch.randint(0, args.vocab, (b, s), generator=gen).to(device)
    labels = torch.randint(0, args.vocab, (b, s), generator=gen).to(device)
    positions = torch.arange(s, device=device).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=device), 1)
    hidden_in = torch.randn(s, b, d, generator=gen).to(device).requires_grad_()
    out_grad = torch.randn(s, b, d, generator=gen).to(device) * 1e-3

    def step():
        if not first:
            model.set_input_tensor(hidden_in)
        out = model(tokens if first else None, positions, mask, labels=labels if last else None)
        if last:
            out.float().mean().backward()
        else:
            out.backward(out_grad)

    def drop_grads():
        model.zero_grad(set_to_none=True)
        hidden_in.grad = None

    return step, drop_grads


def main() -> None:
    args = parse_args()
    from megatron.core import parallel_state as ps

    from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel
    from vq_megatron.models import ModelConfig, build_gpt_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    init_parallel(tensor_parallel=1, pipeline_parallel=world)
    device = local_device()
    rank, stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    first, last = rank == 0, rank == stages - 1
    rows = []
    for name in args.variants.split(","):
        cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden_size, num_attention_heads=12,
                          seq_length=args.seq, vocab_size=args.vocab, **VARIANTS[name])
        torch.manual_seed(0)
        model = build_gpt_model(cfg, pipeline_parallel=stages, pre_process=first, post_process=last).to(device)
        step, drop_grads = stage_step(model, args, first, last, device)
        times = time_steps(step, drop_grads, device, args.warmup, args.repeats)
        drop_grads()
        peak, method = measure_step_peak_bytes(step, device)
        params = sum(p.numel() for p in model.parameters())
        rows.append({"variant": name, "stage": rank, "stages": stages, "first": first, "last": last,
                     "ms_fwd_bwd": median(times.wall_ms), "ms_all": times.wall_ms, "peak_mb": peak / MB,
                     "memory_method": method, "stage_params": params, "layers_on_stage": len(model.decoder.layers)})
        del model
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, rows)
    if dist.get_rank() == 0:
        rows = [r for per_rank in gathered for r in per_rank]
        for r in rows:
            first_stage = next(o for o in rows if o["variant"] == r["variant"] and o["first"])
            r["time_vs_first_stage"] = r["ms_fwd_bwd"] / first_stage["ms_fwd_bwd"]
            r["memory_vs_first_stage"] = r["peak_mb"] / first_stage["peak_mb"]
        rows.sort(key=lambda r: (list(VARIANTS).index(r["variant"]), r["stage"]))
        print(f"\nPipeline stages of a GPT ({args.layers} layers over {stages} stages, d={args.hidden_size}, "
              f"V={args.vocab}, micro-batch {args.batch} x {args.seq}), forward + backward per stage, "
              f"median of {args.repeats}, CPU threads/rank={torch.get_num_threads()}")
        print(format_table(["variant", "stage", "layers", "params", "ms fwd+bwd", "vs first stage", "peak MB",
                            "vs first stage"],
                           [[r["variant"], f"{r['stage']}{' (last)' if r['last'] else ''}", str(r["layers_on_stage"]),
                             f"{r['stage_params']:,}", fmt(r["ms_fwd_bwd"], ".1f"), fmt(r["time_vs_first_stage"], ".2f", "x"),
                             fmt(r["peak_mb"], ".1f"), fmt(r["memory_vs_first_stage"], ".2f", "x")] for r in rows]))
        meta = {**run_metadata(device, "torchrun --standalone --nproc_per_node=%d " % world + " ".join(sys.argv)),
                "world_size": world}
        csv_path, json_path = write_results(args.out_dir, "pipeline_stages", meta, rows)
        print(f"wrote {csv_path} and {json_path}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
