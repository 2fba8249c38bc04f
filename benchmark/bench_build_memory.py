"""Peak memory of building a GPT model with a dense head vs a VQ head (no dense weight is ever allocated).

Each variant is built in its own process (this script re-run with --_one), single rank (gloo), CPU
initialisation: megatron-core's GPTModel with V=131072, d=2048, 1 layer by default, through
vq_megatron.models.build_gpt_model. Reported: the process's peak resident set (ru_maxrss) after the
build, the RSS before it (imports, process group), their difference (what building the model cost) and the
model's parameter count, and the VQ builds' peak against the dense one. The VQ head's map is a random
balanced map (no data files needed).

Run (from the repo root):
  .venv/bin/python benchmark/bench_build_memory.py
Writes benchmark/results/build_memory.csv and .json (or under --out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

from bench_utils import MB, RESULTS_DIR, current_rss_bytes, fmt, format_table, run_metadata, write_results

VARIANTS = {"dense": {"output_layer": "dense"},
            "vq_K1024": {"output_layer": "vq", "vq": {"codebook_size": 1024}},
            "vq_K1024_r8": {"output_layer": "vq", "vq": {"codebook_size": 1024, "refine_rank": 8}}}
MARKER = "BUILD_RESULT "


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=131072)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--_one", dest="one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_one(args) -> dict:
    import torch

    from vq_megatron.integration.distributed import init_parallel, shutdown_parallel
    from vq_megatron.models import ModelConfig, build_gpt_model, head_parameter_count

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    init_parallel(tensor_parallel=1, backend="gloo")
    before = current_rss_bytes()
    cfg = ModelConfig(num_layers=args.layers, hidden_size=args.hidden_size, num_attention_heads=16, seq_length=128,
                      vocab_size=args.vocab, **VARIANTS[args.one])
    model = build_gpt_model(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"variant": args.one, "rss_before_mb": before / MB, "peak_rss_mb": peak / MB,
              "build_peak_mb": (peak - before) / MB, "params": sum(p.numel() for p in model.parameters()),
              "head_params": head_parameter_count(model), "torch": torch.__version__}
    shutdown_parallel()
    return result


def main() -> None:
    args = parse_args()
    if args.one:
        print(MARKER + json.dumps(build_one(args)), flush=True)
        return
    rows = []
    for name in args.variants.split(","):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--vocab", str(args.vocab), "--hidden-size",
               str(args.hidden_size), "--layers", str(args.layers), "--_one", name]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(next(l for l in proc.stdout.splitlines() if l.startswith(MARKER))[len(MARKER):]))
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        r["peak_vs_dense"] = r["peak_rss_mb"] / dense["peak_rss_mb"] if dense else float("nan")
    print(f"\nBuilding a GPT model, V={args.vocab}, d={args.hidden_size}, {args.layers} layer(s), CPU, one rank")
    print(format_table(["variant", "params", "head params", "RSS before MB", "peak RSS MB", "build adds MB",
                        "peak vs dense"],
                       [[r["variant"], f"{r['params']:,}", f"{r['head_params']:,}", fmt(r["rss_before_mb"], ".0f"),
                         fmt(r["peak_rss_mb"], ".0f"), fmt(r["build_peak_mb"], ".0f"), fmt(r["peak_vs_dense"], ".2f", "x")]
                        for r in rows]))
    meta = run_metadata(__import__("torch").device("cpu"), " ".join(sys.argv))
    csv_path, json_path = write_results(args.out_dir, "build_memory", meta, rows)
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
