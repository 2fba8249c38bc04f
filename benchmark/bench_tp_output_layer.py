"""Tensor-parallel benchmark of the output layer + loss step: Megatron dense head vs VQOutputLayer.

A torchrun worker; every rank of one TP group runs the same step:
  dense                 megatron ColumnParallelLinear(d -> V, gather_output=False, bias=False)
                        + megatron vocab_parallel_cross_entropy (logit shard [s, b, V/T] per rank)
  vq_materialised       VQOutputLayer.materialised_loss: scatter to vocab-parallel logits + vocab-parallel CE
  vq_collapsed          VQOutputLayer.loss: exact O(N·K) collapse, no N x V tensor, split by tokens over TP
                        (vq.tensor_parallel_loss=split: each rank 1/T of the tokens, codebook gradient
                        all-reduced, per-token losses all-gathered)
  vq_collapsed_replicated   the same loss computed whole on every rank (tensor_parallel_loss=replicated)
  vq_collapsed_bias     split, with per_token_bias=True (one packed all-gather of the bias terms per step)
  vq_collapsed_bias_replicated   replicated, with the bias
  vq_refined_r8         the two-level head (refine_rank 8, vocab-sharded U), split
Input hidden [s, b, d] (s·b = N, identical on every rank), labels [s, b]; the step is forward + backward
of the mean per-token loss. A V that is not a multiple of T is padded as Megatron pads it (dense: extra
weight rows; VQ: padded map slots, -inf logits).

Method
  * Time: per variant, `--warmup` untimed steps then `--repeats` timed ones; each timed interval starts
    and ends on a barrier (CUDA: after a synchronize), so it is the slowest rank's step; rank 0's median.
  * Communication: one more step with every torch.distributed collective wrapped (comm_counter.py):
    calls and bytes of the tensors handed to each collective on this rank ("payload": the reduced
    tensor, the gathered output, the scattered input), plus a ring-algorithm estimate of bytes each rank
    sends. Rank 0's numbers are reported (the JSON holds every rank's).
  * Peak memory: one more step per variant, after all timings (bench_utils.measure_step_peak_bytes):
    CUDA max_memory_allocated growth, or on CPU ru_maxrss after the step minus RSS before it with the
    RSS high-water mark reset right before the step; the max over ranks is reported.
  * Head params: per rank (the tensors this rank holds) and in total (TP-sharded ones times T).

Targets (split vs replicated, --tokens 4096 --hidden-size 1024): >= 1.6x faster at TP=2, >= 2.5x at TP=4,
printed as PASS/MISS from the measured ratio.

Run (from the repo root; 2 ranks on a 2-core CPU -> 1 thread each):
  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc_per_node=2 benchmark/bench_tp_output_layer.py
Writes benchmark/results/tp<T>_output_layer.csv and .json (or under --out-dir).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from bench_utils import (MB, RESULTS_DIR, busy_machine_warning, fmt, format_table, load_average,
                         measure_step_peak_bytes, median, ratio, run_metadata, time_steps, write_results)
from comm_counter import CollectiveCounter

VARIANTS = ("dense", "vq_materialised", "vq_collapsed", "vq_collapsed_replicated", "vq_collapsed_bias",
            "vq_collapsed_bias_replicated", "vq_refined_r8")
SPLIT_TARGETS = {2: 1.6, 4: 2.5}   # split vs replicated speed-up at these TP sizes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
INIT_STD = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # No --n / --d here: torchrun's own parser would take them as abbreviations of its options.
    parser.add_argument("--tokens", dest="n", type=int, default=1024, help="tokens per step N = s·b")
    parser.add_argument("--batch", type=int, default=2, help="micro-batch b (s = N / b)")
    parser.add_argument("--hidden-size", dest="d", type=int, default=512, help="hidden size d")
    parser.add_argument("--vocab", type=int, default=50304, help="vocabulary size V")
    parser.add_argument("--codes", type=int, default=1024, help="codebook size K")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: world size)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {VARIANTS}")
    if args.n % args.batch:
        parser.error(f"--tokens {args.n} is not a multiple of --batch {args.batch}")
    return args


# ----------------------------------------------------------------------------- variants
@dataclass
class Case:
    """One variant: its module and the mean loss of (hidden [s, b, d], labels [s, b])."""
    name: str
    module: torch.nn.Module
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_dense(args, tp: int, device: torch.device) -> Case:
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, vocab_parallel_cross_entropy

    config = ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                                 params_dtype=DTYPES[args.dtype])
    # Megatron pads the vocabulary to a multiple of the TP size; the padded rows are ordinary weights.
    padded_vocab = -(-args.vocab // tp) * tp
    layer = ColumnParallelLinear(args.d, padded_vocab, config=config, bias=False, gather_output=False,
                                 init_method=functools.partial(torch.nn.init.normal_, std=INIT_STD))
    layer = layer.to(device)  # CPU initialisation builds the weight on the CPU

    def loss(hidden, labels):
        logits, _ = layer(hidden)
        return vocab_parallel_cross_entropy(logits, labels).mean()

    return Case("dense", layer, loss)


def build_vq(name: str, args, device: torch.device) -> Case:
    from vq_megatron.config import VQLogitsConfig
    from vq_megatron.layers import VQOutputLayer

    config = VQLogitsConfig(vocab_size=args.vocab, hidden_size=args.d, codebook_size=args.codes,
                            per_token_bias="_bias" in name, seed=args.seed, codebook_init_std=INIT_STD,
                            refine_rank=8 if name.startswith("vq_refined") else 0,
                            tensor_parallel_loss="replicated" if name.endswith("_replicated") else "split")
    layer = VQOutputLayer(config, params_dtype=DTYPES[args.dtype], device=device)
    if name == "vq_materialised":
        loss = lambda hidden, labels: layer.materialised_loss(hidden, labels).mean()  # noqa: E731
    else:
        loss = lambda hidden, labels: layer.loss(hidden, labels, validate=False).mean()  # noqa: E731
    return Case(name, layer, loss)


def build_case(name: str, args, tp: int, device: torch.device) -> Case:
    return build_dense(args, tp, device) if name == "dense" else build_vq(name, args, device)


def head_params(module: torch.nn.Module, tp: int) -> tuple[int, int]:
    """(parameters held by this rank, parameters of the whole head: TP-sharded tensors count T times)."""
    per_rank = sum(p.numel() for p in module.parameters())
    total = sum(p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1) for p in module.parameters())
    return per_rank, total


# ----------------------------------------------------------------------------- measurement
@dataclass
class Batch:
    hidden: torch.Tensor
    labels: torch.Tensor


def make_batch(args, device: torch.device) -> Batch:
    """Same seed on every rank: the non-sequence-parallel output layer sees identical hidden states."""
    gen = torch.Generator().manual_seed(args.seed)
    s = args.n // args.batch
    hidden = torch.randn(s, args.batch, args.d, generator=gen).to(device, DTYPES[args.dtype]).requires_grad_()
    labels = torch.randint(0, args.vocab, (s, args.batch), generator=gen).to(device)
    return Batch(hidden, labels)


def make_step(case: Case, batch: Batch):
    def step() -> torch.Tensor:
        loss = case.loss(batch.hidden, batch.labels)
        loss.backward()
        return loss.detach()

    def drop_grads() -> None:
        batch.hidden.grad = None
        case.module.zero_grad(set_to_none=True)

    return step, drop_grads


def count_step_communication(step, drop_grads) -> dict:
    drop_grads()
    with CollectiveCounter() as counter:
        step()
    return {"calls": len(counter.calls), "payload_bytes": counter.payload_bytes,
            "ring_send_bytes": counter.ring_send_bytes, "by_collective": counter.by_name()}


def gather_from_ranks(value):
    """Every rank's `value` (a small picklable object), in rank order."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def benchmark(args, tp: int, device: torch.device) -> list[dict]:
    """Phase 1 times every variant (default allocator); phase 2 counts comm and measures peak memory."""
    batch = make_batch(args, device)
    cases = [build_case(name, args, tp, device) for name in args.variants]
    records = []
    for case in cases:
        step, drop_grads = make_step(case, batch)
        times = time_steps(step, drop_grads, device, args.warmup, args.repeats, barrier=dist.barrier)
        records.append({"case": case, "step": step, "drop_grads": drop_grads, "times": times})
    for record in records:
        record["comm"] = count_step_communication(record["step"], record["drop_grads"])
    for record in records:
        record["drop_grads"]()
        losses = []
        dist.barrier()
        peak, method = measure_step_peak_bytes(lambda: losses.append(record["step"]()), device)
        record["peak_bytes_by_rank"] = gather_from_ranks(peak)
        record["memory_method"] = method
        record["loss"] = float(losses[0])
        record["comm_by_rank"] = gather_from_ranks(record["comm"])
    return [to_row(record, args, tp) for record in records]


def to_row(record: dict, args, tp: int) -> dict:
    case, comm = record["case"], record["comm"]
    per_rank, total = head_params(case.module, tp)
    return {
        "variant": case.name, "ms_per_step": median(record["times"].wall_ms),
        "comm_calls": comm["calls"], "comm_payload_mb": comm["payload_bytes"] / MB,
        "comm_ring_send_mb": comm["ring_send_bytes"] / MB,
        "collectives": " ".join(f"{name}:{v['calls']}" for name, v in sorted(comm["by_collective"].items())) or "-",
        "peak_mb": max(record["peak_bytes_by_rank"]) / MB,
        "peak_mb_by_rank": [b / MB for b in record["peak_bytes_by_rank"]],
        "head_params_per_rank": per_rank, "head_params_total": total, "loss": record["loss"],
        "n": args.n, "s": args.n // args.batch, "b": args.batch, "d": args.d, "vocab": args.vocab,
        "codes": args.codes, "tp": tp, "dtype": args.dtype, "repeats": args.repeats, "warmup": args.warmup,
        "ms_all": record["times"].wall_ms, "ms_min": min(record["times"].wall_ms),
        "cpu_ms_median_rank0": median(record["times"].cpu_ms),
        "involuntary_switches_per_step_rank0": median(record["times"].involuntary_switches),
        "memory_method": record["memory_method"],
        "comm_by_collective": comm["by_collective"], "comm_by_rank": record["comm_by_rank"],
    }


def add_ratios(rows: list[dict]) -> None:
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    by_name = {r["variant"]: r for r in rows}
    for r in rows:
        r["speedup_vs_dense"] = ratio(dense["ms_per_step"], r["ms_per_step"]) if dense else float("nan")
        r["memory_ratio_vs_dense"] = ratio(dense["peak_mb"], r["peak_mb"]) if dense else float("nan")
        r["comm_ratio_vs_dense"] = ratio(dense["comm_payload_mb"], r["comm_payload_mb"]) if dense else float("nan")
        replicated = by_name.get(r["variant"] + "_replicated")
        r["speedup_vs_replicated"] = ratio(replicated["ms_per_step"], r["ms_per_step"]) if replicated else float("nan")


def check_targets(rows: list[dict], tp: int) -> list[dict]:
    """The split loss against its replicated twin, where a target exists for this TP size."""
    if tp not in SPLIT_TARGETS:
        return []
    return [{"variant": r["variant"], "target": f"split vs replicated at TP={tp}", "measured": r["speedup_vs_replicated"],
             "required": SPLIT_TARGETS[tp], "passed": bool(r["speedup_vs_replicated"] >= SPLIT_TARGETS[tp])}
            for r in rows if r["speedup_vs_replicated"] == r["speedup_vs_replicated"]]


def print_report(rows: list[dict], meta: dict) -> None:
    r0 = rows[0]
    print(f"\nTP output layer + loss step (fwd+bwd), TP={r0['tp']}, hidden [s={r0['s']}, b={r0['b']}, d={r0['d']}] "
          f"(N={r0['n']}), V={r0['vocab']} K={r0['codes']} {r0['dtype']}, device={meta['device']} "
          f"({meta['device_name']}), threads/rank={meta['torch_threads']}, "
          f"median of {r0['repeats']} after {r0['warmup']} warmup")
    headers = ["variant", "ms/step", "speedup vs dense", "vs replicated", "comm MB/step", "est. sent MB/rank",
               "collectives/step", "peak MB", "mem ratio vs dense", "head params/rank", "head params total", "loss"]
    print(format_table(headers, [[
        r["variant"], fmt(r["ms_per_step"], ".1f"), fmt(r["speedup_vs_dense"], ".1f", "x"),
        fmt(r["speedup_vs_replicated"], ".2f", "x"),
        fmt(r["comm_payload_mb"], ".3f"), fmt(r["comm_ring_send_mb"], ".3f"), r["collectives"],
        fmt(r["peak_mb"], ".1f"), fmt(r["memory_ratio_vs_dense"], ".1f", "x"),
        f"{r['head_params_per_rank']:,}", f"{r['head_params_total']:,}", fmt(r["loss"], ".5f")] for r in rows]))
    print("(comm MB = payload bytes handed to collectives per rank per step (rank 0); est. sent = ring-algorithm "
          "bytes each rank sends;\n peak MB = max over ranks of what the step adds on top of inputs and params, "
          f"method: {r0['memory_method']}; mem ratio = dense peak / variant peak)")
    for warning in meta["warnings"]:
        print(warning)
    for t in meta["targets"]:
        print(f"{'PASS' if t['passed'] else 'MISS'}  {t['variant']}: {t['measured']:.2f}x faster than replicated "
              f"({t['target']}, target >= {t['required']:g}x)")


def main() -> None:
    args = parse_args()
    from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel

    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = args.tp or world
    init_parallel(tensor_parallel=tp, seed=args.seed + 1234)
    device = local_device()
    loads = [load_average()]
    rows = benchmark(args, tp, device)
    loads.append(load_average())
    if dist.get_rank() == 0:
        add_ratios(rows)
        command = f"torchrun --standalone --nproc_per_node={world} " + " ".join(sys.argv)
        meta = {**run_metadata(device, command), "world_size": world, "backend": dist.get_backend()}
        warning = busy_machine_warning(loads, meta["torch_threads"] * world) if device.type == "cpu" else None
        meta["load_average_start_end"], meta["warnings"] = loads, [warning] if warning else []
        meta["targets"] = check_targets(rows, tp)
        print_report(rows, meta)
        csv_rows = [{k: v for k, v in r.items() if k not in ("comm_by_rank",)} for r in rows]
        csv_path, json_path = write_results(args.out_dir, f"tp{tp}_output_layer", meta, csv_rows,
                                            {"comm_by_rank": {r["variant"]: r["comm_by_rank"] for r in rows},
                                             "targets": meta["targets"]})
        print(f"wrote {csv_path} and {json_path}")
    shutdown_parallel()


if __name__ == "__main__":
    main()
