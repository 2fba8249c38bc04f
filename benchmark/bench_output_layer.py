"""Single-process benchmark of the output layer + loss step: dense head vs VQ-Logits (materialised, collapsed).

Variants (each times forward + backward of the loss; hidden states require grad, head params get grads):
  dense            F.cross_entropy(F.linear(h, W), y)                      W [V, d]
  vq_materialised  F.cross_entropy(vq_logits(h, C, map), y)                C [K, d], builds N x V logits
  vq_collapsed     vq_cross_entropy(h, C, map, y, validate=False)          exact O(N·K) collapse
  vq_refined_r8    vq_cross_entropy(..., refine_weight=U, refine_proj=P)   two-level head, U [V, 8], P [8, d]
  vq_refined_r16   the same at rank 16 (collapse + within-code term over each target's code members)

Method
  * Every variant runs in its own child process (this script re-run with the hidden --_one-variant
    flag), so one variant's allocations, caches and high-water marks never leak into another's numbers.
  * Time: `--warmup` untimed steps, then the median wall time of `--repeats` steps (CUDA: synchronised).
    Gradients are dropped (set to None, as optimizer.zero_grad does) before each step, outside the timer.
  * Peak memory of the loss step, measured on one more step after the timed ones (see bench_utils):
      CUDA: max_memory_allocated (reset before the step) minus memory allocated before the step;
      CPU:  ru_maxrss after the step minus the RSS read from /proc/self/statm right before it, with the
            RSS high-water mark reset just before the step and glibc returning freed blocks to the OS.
    Inputs and head parameters exist before the step, so the number is what the step itself adds:
    logits, saved activations, gradients (including the head's weight gradient), temporaries.
  * Head parameters: numel of the trainable head tensors the variant really builds (W, or C).
  * Targets (CPU): collapsed >= 40x faster and >= 20x less peak memory than dense, and >= 98% fewer head
    parameters; the two-level variants >= 40x faster and >= 20x less peak memory than dense; printed as
    PASS/MISS from the measured numbers.

Run (from the repo root):
  OMP_NUM_THREADS=2 .venv/bin/python benchmark/bench_output_layer.py
Writes benchmark/results/output_layer.csv and .json (or under --out-dir).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_utils import (MB, RESULTS_DIR, busy_machine_warning, command_line, fmt, format_table, load_average,
                         measure_step_peak_bytes, median, pick_device, ratio, run_metadata, time_steps,
                         write_results)

VARIANTS = ("dense", "adaptive", "vq_materialised", "vq_collapsed", "vq_refined_r8", "vq_refined_r16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESULT_MARKER = "BENCH_RESULT "
TARGET_SPEEDUP, TARGET_MEMORY_RATIO, TARGET_PARAM_REDUCTION = 40.0, 20.0, 0.98
INIT_STD = 0.02


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", "--tokens", dest="n", type=int, default=2048, help="tokens per step N")
    parser.add_argument("--d", "--hidden-size", dest="d", type=int, default=768, help="hidden size d")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size V")
    parser.add_argument("--codes", type=int, default=1024, help="codebook size K")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), or a torch device")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step per variant")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per variant process")
    parser.add_argument("--_one-variant", dest="one_variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    return args


def child_argv(args: argparse.Namespace, variant: str) -> list[str]:
    """The command that benchmarks one variant in a fresh process with the same settings."""
    return [sys.executable, str(Path(__file__).resolve()), "--n", str(args.n), "--d", str(args.d),
            "--vocab", str(args.vocab), "--codes", str(args.codes), "--dtype", args.dtype,
            "--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--seed", str(args.seed), *(["--profile"] if args.profile else []), "--_one-variant", variant]


# ----------------------------------------------------------------------------- one variant (child process)
@dataclass
class LossInputs:
    """Everything a loss step reads; `trainable` are the tensors that receive gradients."""
    hidden: torch.Tensor
    labels: torch.Tensor
    head: dict[str, torch.Tensor]

    @property
    def trainable(self) -> list[torch.Tensor]:
        return [self.hidden, *(t for t in self.head.values() if isinstance(t, torch.Tensor) and t.requires_grad)]

    def drop_grads(self) -> None:
        for tensor in self.trainable:
            tensor.grad = None


def make_inputs(variant: str, args: argparse.Namespace, device: torch.device) -> LossInputs:
    """Seeded on the CPU, then moved, so every variant and device sees the same hidden states and labels."""
    from vq_megatron.ops.map_init import random_balanced_map

    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    hidden = torch.randn(args.n, args.d, generator=gen).to(device, dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.n,), generator=gen).to(device)
    if variant == "dense":
        weight = torch.randn(args.vocab, args.d, generator=gen) * INIT_STD
        head = {"weight": weight.to(device, dtype).requires_grad_()}
    elif variant == "adaptive":
        # The classic exact peer: frequent-first cutoffs at 5% and 20% of V, div_value 4.
        torch.manual_seed(args.seed)
        module = torch.nn.AdaptiveLogSoftmaxWithLoss(args.d, args.vocab, [args.vocab // 20, args.vocab // 5],
                                                     div_value=4.0).to(device, dtype)
        head = {f"p{i}": p for i, p in enumerate(module.parameters())}
        head["module"] = module
    else:
        codebook = torch.randn(args.codes, args.d, generator=gen) * INIT_STD
        head = {"codebook": codebook.to(device, dtype).requires_grad_(),
                "token_to_code": random_balanced_map(args.vocab, args.codes, seed=args.seed).to(device)}
        if variant.startswith("vq_refined_r"):
            rank = int(variant.rsplit("_r", 1)[1])
            head["refine_weight"] = (torch.randn(args.vocab, rank, generator=gen) * INIT_STD).to(
                device, dtype).requires_grad_()
            head["refine_proj"] = (torch.randn(rank, args.d, generator=gen) * INIT_STD).to(
                device, dtype).requires_grad_()
    return LossInputs(hidden, labels, head)


def dense_loss(inputs: LossInputs) -> torch.Tensor:
    return F.cross_entropy(F.linear(inputs.hidden, inputs.head["weight"]), inputs.labels)


def vq_materialised_loss(inputs: LossInputs) -> torch.Tensor:
    from vq_megatron.functional import vq_logits

    logits = vq_logits(inputs.hidden, inputs.head["codebook"], inputs.head["token_to_code"])
    return F.cross_entropy(logits, inputs.labels)


def vq_collapsed_loss(inputs: LossInputs) -> torch.Tensor:
    from vq_megatron.functional import vq_cross_entropy

    return vq_cross_entropy(inputs.hidden, inputs.head["codebook"], inputs.head["token_to_code"],
                            inputs.labels, validate=False)


def vq_refined_loss(inputs: LossInputs) -> torch.Tensor:
    from vq_megatron.functional import vq_cross_entropy

    head = inputs.head
    return vq_cross_entropy(inputs.hidden, head["codebook"], head["token_to_code"], inputs.labels,
                            refine_weight=head["refine_weight"], refine_proj=head["refine_proj"], validate=False)


def adaptive_loss(inputs: LossInputs) -> torch.Tensor:
    return inputs.head["module"](inputs.hidden, inputs.labels).loss


LOSSES = {"dense": dense_loss, "adaptive": adaptive_loss, "vq_materialised": vq_materialised_loss,
          "vq_collapsed": vq_collapsed_loss, "vq_refined_r8": vq_refined_loss, "vq_refined_r16": vq_refined_loss}


def make_step(variant: str, inputs: LossInputs):
    """forward + backward of the mean loss; returns the loss (detached)."""
    loss_fn = LOSSES[variant]

    def step() -> torch.Tensor:
        loss = loss_fn(inputs)
        loss.backward()
        return loss.detach()

    return step


def print_profile(step, inputs: LossInputs, variant: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs.hidden.is_cuda else [])
    inputs.drop_grads()
    with profile(activities=activities) as prof:
        step()
    sort_by = "self_cuda_time_total" if inputs.hidden.is_cuda else "self_cpu_time_total"
    print(f"--- profile of one {variant} step (sorted by {sort_by}) ---")
    print(prof.key_averages().table(sort_by=sort_by, row_limit=15))


def benchmark_one_variant(args: argparse.Namespace) -> dict:
    """Runs in the child process: time the step, then measure its peak memory on one more step."""
    variant = args.one_variant
    device = pick_device(args.device)
    inputs = make_inputs(variant, args, device)
    step = make_step(variant, inputs)
    times = time_steps(step, inputs.drop_grads, device, args.warmup, args.repeats)
    inputs.drop_grads()
    losses = []
    peak_bytes, memory_method = measure_step_peak_bytes(lambda: losses.append(step()), device)
    if args.profile:
        print_profile(step, inputs, variant)
    head_params = sum(t.numel() for t in inputs.head.values() if isinstance(t, torch.Tensor) and t.requires_grad)
    return {"variant": variant, "ms_median": median(times.wall_ms), "ms_all": times.wall_ms,
            "cpu_ms_all": times.cpu_ms, "involuntary_switches": times.involuntary_switches,
            "peak_bytes": peak_bytes, "memory_method": memory_method, "head_params": head_params,
            "loss": float(losses[0]), "device": str(device), "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- orchestration (parent process)
def run_variant_process(args: argparse.Namespace, variant: str) -> dict:
    """Run one variant in a fresh interpreter; echo what it prints; return its result record."""
    proc = subprocess.run(child_argv(args, variant), capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            result = json.loads(line[len(RESULT_MARKER):])
        else:
            print(line)
    if result is None:
        raise SystemExit(f"variant {variant} printed no result")
    return result


def to_rows(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """Add the side-by-side ratios against dense (NaN when dense did not run)."""
    dense = next((r for r in results if r["variant"] == "dense"), None)
    rows = []
    for r in results:
        rows.append({
            "variant": r["variant"], "ms_per_step": r["ms_median"],
            "speedup_vs_dense": ratio(dense["ms_median"], r["ms_median"]) if dense else float("nan"),
            "peak_mb": r["peak_bytes"] / MB,
            "memory_ratio_vs_dense": ratio(dense["peak_bytes"], r["peak_bytes"]) if dense else float("nan"),
            "head_params": r["head_params"],
            "head_params_fewer_pct": (100 * (1 - ratio(r["head_params"], dense["head_params"])) if dense
                                      else float("nan")),
            "loss": r["loss"], "n": args.n, "d": args.d, "vocab": args.vocab, "codes": args.codes,
            "dtype": args.dtype, "device": r["device"], "torch_threads": r["torch_threads"],
            "repeats": args.repeats, "warmup": args.warmup, "ms_all": r["ms_all"],
            "ms_min": min(r["ms_all"]), "cpu_ms_median": median(r["cpu_ms_all"]),
            "involuntary_switches_per_step": median(r["involuntary_switches"]),
            "memory_method": r["memory_method"],
        })
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The targets, judged from the measured numbers of each VQ loss variant vs dense."""
    if not any(r["variant"] == "dense" for r in rows):
        return []
    checks = []
    for r in rows:
        if r["variant"] != "vq_collapsed" and not r["variant"].startswith("vq_refined"):
            continue
        checks += [(r["variant"], "speed", "x faster than dense", r["speedup_vs_dense"], TARGET_SPEEDUP),
                   (r["variant"], "memory", "x less peak memory than dense", r["memory_ratio_vs_dense"],
                    TARGET_MEMORY_RATIO)]
        if r["variant"] == "vq_collapsed":
            checks.append((r["variant"], "head params", "% fewer head parameters", r["head_params_fewer_pct"],
                           100 * TARGET_PARAM_REDUCTION))
    return [{"variant": variant, "target": name, "what": what, "measured": value, "required": required,
             "passed": bool(value >= required)} for variant, name, what, value, required in checks]


def print_report(rows: list[dict], targets: list[dict], meta: dict) -> None:
    print(f"\nOutput layer + loss step (fwd+bwd), N={rows[0]['n']} d={rows[0]['d']} V={rows[0]['vocab']} "
          f"K={rows[0]['codes']} {rows[0]['dtype']}, device={meta['device']} ({meta['device_name']}), "
          f"threads={meta['torch_threads']}, median of {rows[0]['repeats']} after {rows[0]['warmup']} warmup")
    headers = ["variant", "ms/step", "speedup vs dense", "peak MB", "mem ratio vs dense", "head params", "loss"]
    print(format_table(headers, [[r["variant"], fmt(r["ms_per_step"], ".1f"), fmt(r["speedup_vs_dense"], ".1f", "x"),
                                  fmt(r["peak_mb"], ".1f"), fmt(r["memory_ratio_vs_dense"], ".1f", "x"),
                                  f"{r['head_params']:,}", fmt(r["loss"], ".5f")] for r in rows]))
    print(f"(peak MB = MiB the step adds on top of inputs and params, method: {rows[0]['memory_method']}; "
          f"mem ratio = dense peak / variant peak)")
    for warning in meta["warnings"]:
        print(warning)
    for t in targets:
        verdict = "PASS" if t["passed"] else "MISS"
        print(f"{verdict}  {t['target']}: {t['variant']} {t['measured']:.2f}{t['what']} (target >= {t['required']:g})")


def main() -> None:
    args = parse_args()
    if args.one_variant:
        print(RESULT_MARKER + json.dumps(benchmark_one_variant(args)), flush=True)
        return
    loads = [load_average()]
    results = []
    for variant in args.variants:
        print(f"running {variant} ...", flush=True)
        results.append(run_variant_process(args, variant))
    rows = to_rows(results, args)
    targets = check_targets(rows)
    meta = run_metadata(torch.device(results[0]["device"]), command_line())
    meta["torch_threads"] = results[0]["torch_threads"]  # the children's, which did the work
    loads.append(load_average())
    warning = busy_machine_warning(loads, meta["torch_threads"]) if meta["device"] == "cpu" else None
    meta["load_average_start_end"], meta["warnings"] = loads, [warning] if warning else []
    print_report(rows, targets, meta)
    csv_path, json_path = write_results(args.out_dir, "output_layer", meta, rows, {"targets": targets})
    print(f"wrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
