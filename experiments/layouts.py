"""Layout equivalence of the training driver: the same tiny run in every parallel layout, head and ZeRO
stage, with the largest per-step loss difference against the single-process run.

    .venv/bin/python experiments/layouts.py [--out docs/results/layout_equivalence]

Layouts: (TP=1, DP=1, gradient accumulation 2), (TP=1, DP=2), (TP=2, DP=1), (TP=2, DP=2), pipeline parallel
(PP=2) alone, with TP=2 and with DP=2 (the schedule's 2 or 1 micro-batches), and TP=2 with sequence
parallelism (also under PP=2); heads: dense, VQ-Logits (refine_rank 0), the two-level VQ head (refine_rank 4);
ZeRO 1 and 2. Same global batch (8 x 32 tokens), seed and data everywhere; gradient clipping at 0.05 acts
on every step. Each run is one torchrun launch of `python -m vq_megatron.train` on this machine (gloo on
CPU, NCCL on GPUs). tests/integration/test_layouts.py asserts the same comparisons on a subset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLICE = ROOT / "data" / "c4_slice"

CLIP = 0.05
STEPS = 5
LAYOUTS = {  # name: (processes, tensor_parallel, pipeline_parallel); DP = processes / (TP · PP);
    # accumulation = 8 / (4 · DP) micro-batches (the pipeline schedule's micro-batches under PP)
    "tp1_dp1_ga2": (1, 1, 1), "tp1_dp2": (2, 1, 1), "tp2_dp1": (2, 2, 1), "tp2_dp2": (4, 2, 1),
    "pp2_dp1": (2, 1, 2), "pp2_tp2": (4, 2, 2), "pp2_dp2": (4, 1, 2)}
HEADS = {"dense": ["model.output_layer=dense"],
         "vq": ["model.output_layer=vq", "model.vq.refine_rank=0"],
         "vq_refined": ["model.output_layer=vq", "model.vq.refine_rank=4"]}
TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=32",
        "model.vocab_size=500", "model.vq.codebook_size=32", "training.micro_batch_size=4",
        "training.global_batch_size=8", f"training.steps={STEPS}", f"optim.clip_grad={CLIP}",
        "optim.warmup_steps=2", "training.log_interval=1", "data.eval_tokens=2048", "training.save_interval=0"]


def prepare_tiny_data(root: Path) -> Path:
    """A 500-piece tokenizer and train/val sets from the bundled C4 slice."""
    prep = [sys.executable, "-m", "vq_megatron.data.prepare", "--no-progress"]
    for args in (["--input", str(SLICE / "c4-train.slice.jsonl.gz"), "--max-docs", "150", "--output-prefix",
                  str(root / "train"), "--train-sp", "--vocab-size", "500", "--sp-model-prefix", str(root / "sp")],
                 ["--input", str(SLICE / "c4-validation.slice.jsonl.gz"), "--max-docs", "20", "--output-prefix",
                  str(root / "val"), "--sp-model", str(root / "sp.model")]):
        subprocess.run(prep + args, cwd=ROOT, check=True, capture_output=True)
    return root


def train(data: Path, run_dir: Path, layout: str, head: str, zero: int = 1, sp: bool = False,
          extra: tuple = ()) -> dict:
    """One launch (extra: more `section.field=value` settings); returns its summary.json. Raises with the
    tail of the output when it fails."""
    nproc, tp, pp = LAYOUTS[layout]
    sets = [f"data.train_prefix={data / 'train'}", "data.eval_sets={val: " + str(data / "val") + "}",
            f"data.tokenizer_model={data / 'sp.model'}", f"training.save_dir={run_dir}",
            f"parallel.tensor_parallel={tp}", f"parallel.pipeline_parallel={pp}", f"training.deepspeed_config=configs/deepspeed/zero{zero}_fp32.json",
            f"parallel.sequence_parallel={str(sp).lower()}", *TINY, *HEADS[head], *extra]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vq_megatron.train", "--config", "configs/c4_small.yaml", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"{layout} {head} zero{zero} sp={sp} failed:\n{(proc.stdout + proc.stderr)[-6000:]}")
    expected = f"grad_accumulation={8 // (4 * (nproc // (tp * pp)))}"
    if expected not in proc.stdout:
        raise RuntimeError(f"{layout}: the driver did not report {expected}")
    return json.loads((run_dir / "summary.json").read_text())


def max_step_diff(reference: dict, other: dict) -> float:
    if len(other["train_losses"]) != STEPS:
        raise ValueError(f"expected {STEPS} steps, got {len(other['train_losses'])}")
    return max(abs(a - b) for a, b in zip(reference["train_losses"], other["train_losses"]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/results/layout_equivalence", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_tiny_data(Path(tmp))
        for head in HEADS:
            reference = train(data, Path(tmp) / f"{head}_ref", "tp1_dp1_ga2", head)
            cases = [(layout, zero, False) for zero in (1, 2) for layout in LAYOUTS] + [
                ("tp2_dp1", 1, True), ("tp2_dp2", 2, True), ("pp2_tp2", 1, True)]
            for layout, zero, sp in cases:
                name = f"{head}_{layout}_z{zero}{'_sp' if sp else ''}"
                run = reference if (layout, zero, sp) == ("tp1_dp1_ga2", 1, False) else \
                    train(data, Path(tmp) / name, layout, head, zero, sp)
                rows.append({"head": head, "layout": layout, "zero": zero, "sequence_parallel": sp,
                             "max_step_loss_diff": max_step_diff(reference, run),
                             "eval_ppl": run["eval"]["val_ppl"], "reference_eval_ppl": reference["eval"]["val_ppl"],
                             "min_grad_norm": min(run["grad_norms"]), "clip": CLIP})
                print(json.dumps(rows[-1]), flush=True)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    lines = ["| head | layout | ZeRO | SP | max per-step loss diff vs TP=1 PP=1 DP=1 GA=2 | eval ppl | reference ppl |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['head']} | {r['layout']} | {r['zero']} | {'on' if r['sequence_parallel'] else 'off'} | "
              f"{r['max_step_loss_diff']:.2e} | {r['eval_ppl']:.4f} | {r['reference_eval_ppl']:.4f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
