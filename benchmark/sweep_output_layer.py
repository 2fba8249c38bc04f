"""Sweep of the output-layer loss step over vocabulary and codebook sizes (a benchmark, not a test).

For every V: dense Linear+CE, torch AdaptiveLogSoftmaxWithLoss, materialised VQ scatter+CE (K=1024) and the
collapsed VQ loss for every K, each through benchmark/bench_output_layer.py (one child process per
variant, same inputs, same machine, run back to back). Speed-ups and memory ratios are against the dense
step of the same V in this sweep.

    OMP_NUM_THREADS=2 .venv/bin/python benchmark/sweep_output_layer.py [--vocabs 32000,50304,128000,256000]
        [--codes 256,1024,4096] [--n 1024] [--d 768] [--repeats 3]

Writes benchmark/results/sweep_output_layer.{json,csv,md}; prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def run_bench(vocab: int, codes: int, variants: str, args, out_dir: Path) -> list[dict]:
    cmd = [sys.executable, str(HERE / "bench_output_layer.py"), "--n", str(args.n), "--d", str(args.d),
           "--vocab", str(vocab), "--codes", str(codes), "--variants", variants, "--repeats", str(args.repeats),
           "--warmup", "1", "--out-dir", str(out_dir)]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out_dir / "output_layer.json").read_text())["results"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", type=_ints, default=_ints("32000,50304,128000,256000"), help="V values")
    p.add_argument("--codes", type=_ints, default=_ints("256,1024,4096"), help="K values (collapsed VQ)")
    p.add_argument("--n", type=int, default=1024, help="tokens per step")
    p.add_argument("--d", type=int, default=768, help="hidden size")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in args.vocabs:
            base = run_bench(vocab, 1024, "dense,adaptive,vq_materialised,vq_collapsed", args, Path(tmp))
            dense = next(r for r in base if r["variant"] == "dense")
            results = [dict(r, codes=(r["codes"] if r["variant"].startswith("vq") else None)) for r in base]
            for codes in (k for k in args.codes if k != 1024):
                results += run_bench(vocab, codes, "vq_collapsed", args, Path(tmp))
            for r in results:
                rows.append({"vocab": vocab, "variant": r["variant"], "codes": r.get("codes"),
                             "ms_per_step": round(r["ms_per_step"], 2),
                             "speedup_vs_dense": round(dense["ms_per_step"] / r["ms_per_step"], 2),
                             "peak_mb": round(r["peak_mb"], 1),
                             "memory_ratio_vs_dense": round(dense["peak_mb"] / max(r["peak_mb"], 1e-9), 2),
                             "head_params": r["head_params"], "n": args.n, "d": args.d})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_output_layer.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows},
                                                                indent=1))
    with (RESULTS / "sweep_output_layer.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cols = ["vocab", "variant", "codes", "ms_per_step", "speedup_vs_dense", "peak_mb", "memory_ratio_vs_dense",
            "head_params"]
    table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    table += ["| " + " | ".join("" if r[c] is None else f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])
                                for c in cols) + " |" for r in rows]
    (RESULTS / "sweep_output_layer.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
