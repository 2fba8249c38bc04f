"""Decoding: per-token latency of the output head (logits + sampling) and end-to-end decode tokens/s,
dense head vs VQ heads, at V in {50304, 131072} and d in {768, 2048}, K=1024 (the paper's "6x faster logit
computation" claim, measured).

Head step (one decoding step of the head alone, hidden [b, d] -> token ids [b]):
  dense          logits = h·Wᵀ [b, V] (W [V, d]) + the dense sampler (temperature 1, no filter)
  dense_top_p    the same with top-p 0.9 (a sort over V per row)
  vq             VQOutputLayer.sample: code logits h·Cᵀ [b, K], then exact code-then-token sampling
  vq_top_p       the same with top-p 0.9 (exact threshold search over the CodeIndex, no V logits)
  vq_refined     the two-level head (r=8) at temperature 1: code, then token inside the code (O(K·d + n·r))
End to end: a 2-layer GPT (megatron-core, through vq_megatron.models) decodes `--new-tokens` tokens after a
16-token prompt with the KV cache (inference/decoding.py), greedy; tokens/s = b · new tokens / time.

Run (from the repo root):
  OMP_NUM_THREADS=2 .venv/bin/python benchmark/bench_decode.py
Writes benchmark/results/decode.csv and .json (or under --out-dir). Target: the VQ head step >= 6x faster
than the dense head + sampling at V=131072 (PASS/MISS printed from the measured ratios).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch

from bench_utils import RESULTS_DIR, fmt, format_table, median, pick_device, run_metadata, synchronize, write_results

TARGET_V, TARGET_SPEEDUP = 131072, 6.0
HEADS = ("dense", "dense_top_p", "vq", "vq_top_p", "vq_refined")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocabs", default="50304,131072")
    p.add_argument("--hidden-sizes", default="768,2048")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--codes", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=7, help="timed head steps per case (median)")
    p.add_argument("--new-tokens", type=int, default=8, help="decoded tokens per end-to-end case")
    p.add_argument("--no-end-to-end", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def timed(fn, device, repeats: int) -> float:
    fn()                                            # warm-up
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000)
    return median(times)


def head_steps(V: int, d: int, b: int, args, device) -> list[dict]:
    from vq_megatron.config import VQLogitsConfig
    from vq_megatron.layers import VQOutputLayer
    from vq_megatron.ops.sampling import sample_from_logits

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, d, generator=gen).to(device)
    weight = (torch.randn(V, d, generator=gen) * 0.02).to(device)
    sampler = torch.Generator(device=device).manual_seed(1)
    vq = VQOutputLayer(VQLogitsConfig(vocab_size=V, hidden_size=d, codebook_size=args.codes, per_token_bias=True,
                                      codebook_init_std=0.5), device=device)
    refined = VQOutputLayer(VQLogitsConfig(vocab_size=V, hidden_size=d, codebook_size=args.codes, per_token_bias=True,
                                           codebook_init_std=0.5, refine_rank=8), device=device)
    with torch.no_grad():
        for layer in (vq, refined):
            layer.bias.normal_(generator=gen)
        refined.refine_weight.normal_(generator=gen)
        vq.code_index(), refined.code_index()     # built once per map, not per token
    steps = {
        "dense": lambda: sample_from_logits(hidden @ weight.t(), generator=sampler),
        "dense_top_p": lambda: sample_from_logits(hidden @ weight.t(), top_p=0.9, generator=sampler),
        "vq": lambda: vq.sample(hidden, generator=sampler),
        "vq_top_p": lambda: vq.sample(hidden, top_p=0.9, generator=sampler),
        "vq_refined": lambda: refined.sample(hidden, generator=sampler),
    }
    rows = []
    with torch.no_grad():
        for name in HEADS:
            rows.append({"kind": "head_step", "head": name, "vocab": V, "d": d, "batch": b,
                         "ms": timed(steps[name], device, args.repeats)})
    dense = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_dense"] = dense / r["ms"]
    return rows


def end_to_end(V: int, d: int, batches: list[int], args, device) -> list[dict]:
    from vq_megatron.inference.decoding import generate_batch
    from vq_megatron.models import ModelConfig, build_gpt_model

    rows = []
    for head, vq in (("dense", {}), ("vq", {"codebook_size": args.codes, "per_token_bias": True}),
                     ("vq_refined", {"codebook_size": args.codes, "per_token_bias": True, "refine_rank": 8})):
        torch.manual_seed(0)
        cfg = ModelConfig(num_layers=2, hidden_size=d, num_attention_heads=16, seq_length=64, vocab_size=V,
                          output_layer="vq" if head.startswith("vq") else "dense", vq=vq)
        model = build_gpt_model(cfg).to(device).eval()
        for b in batches:
            prompts = torch.randint(0, V, (b, 16), generator=torch.Generator().manual_seed(2)).to(device)
            run = lambda: generate_batch(model, prompts, max_new_tokens=args.new_tokens, seq_length=64,  # noqa: E731
                                         vocab_size=V, greedy=True)
            ms = timed(run, device, 1)
            rows.append({"kind": "end_to_end", "head": head, "vocab": V, "d": d, "batch": b, "ms": ms,
                         "tokens_per_s": b * args.new_tokens / (ms / 1000), "new_tokens": args.new_tokens})
        del model
    for r in rows:
        dense = next(o for o in rows if o["head"] == "dense" and o["batch"] == r["batch"])
        r["speedup_vs_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
    return rows


def main() -> None:
    args = parse_args()
    from vq_megatron.integration.distributed import init_parallel, shutdown_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(s.getsockname()[1]))
    init_parallel(tensor_parallel=1)
    device = pick_device(args.device)
    vocabs, dims, batches = ([int(x) for x in a.split(",")] for a in (args.vocabs, args.hidden_sizes, args.batches))
    rows = []
    for V in vocabs:
        for d in dims:
            for b in batches:
                rows += head_steps(V, d, b, args, device)
            if not args.no_end_to_end:
                rows += end_to_end(V, d, batches, args, device)
            print(f"[decode] V={V} d={d} done", flush=True)
    print(f"\nDecoding on {device}, K={args.codes}, threads={torch.get_num_threads()}")
    print("Head step (hidden [b, d] -> token ids; median of", args.repeats, "):")
    print(format_table(["V", "d", "batch", "head", "ms/step", "speed-up vs dense"],
                       [[str(r["vocab"]), str(r["d"]), str(r["batch"]), r["head"], fmt(r["ms"], ".3f"),
                         fmt(r["speedup_vs_dense"], ".1f", "x")] for r in rows if r["kind"] == "head_step"]))
    if not args.no_end_to_end:
        print(f"End to end ({args.new_tokens} new tokens after a 16-token prompt, 2 layers, KV cache, greedy):")
        print(format_table(["V", "d", "batch", "head", "tokens/s", "vs dense"],
                           [[str(r["vocab"]), str(r["d"]), str(r["batch"]), r["head"], fmt(r["tokens_per_s"], ".1f"),
                             fmt(r["speedup_vs_dense"], ".2f", "x")] for r in rows if r["kind"] == "end_to_end"]))
    targets = [{"case": f"V={r['vocab']} d={r['d']} batch={r['batch']}", "measured": r["speedup_vs_dense"],
                "required": TARGET_SPEEDUP, "passed": bool(r["speedup_vs_dense"] >= TARGET_SPEEDUP)}
               for r in rows if r["kind"] == "head_step" and r["head"] == "vq" and r["vocab"] == TARGET_V]
    for t in targets:
        print(f"{'PASS' if t['passed'] else 'MISS'}  VQ head step {t['measured']:.1f}x faster than dense head + "
              f"sampling at {t['case']} (target >= {TARGET_SPEEDUP:g}x)")
    meta = run_metadata(device, " ".join(sys.argv))
    csv_path, json_path = write_results(args.out_dir, "decode", meta, rows, {"targets": targets})
    print(f"wrote {csv_path} and {json_path}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
