"""Convert a dense GPTModel checkpoint's head for a VQ head (two-stage / post-hoc compression).

    python -m vq_megatron.strategies.convert_head DENSE_RUN_DIR --out EMB.pt [--tag step_00000100]

writes the dense output embedding rows [V_pad, d] (output_layer.weight, TP shards concatenated) as one
tensor. Train (or fine-tune) the VQ model from them with
    --set model.output_layer=vq --set model.vq_init_embeddings=EMB.pt --set model.vq.map_init=kmeans
    --set model.vq.codebook_init=kmeans [--set model.init_from=DENSE_RUN_DIR]   # body weights too
    [--set model.vq.refine_rank=R --set model.vq.refine_init=svd]             # the two-level head
With --codebook-size K it also writes EMB.map.pt / EMB.codebook.pt (k-means map [V] and centroids [K, d])
and prints the relative reconstruction error of the rows; with --refine-rank R as well, EMB.refine_weight.pt
/ EMB.refine_proj.pt (U [V, R], P [R, d]: the best rank-R fit of the residuals W - C[M]) and the error of
C[M] + U·P. The training driver computes the same map, codebook and factors itself from EMB.pt (same seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from vq_megatron.integration.checkpoint import resolve_checkpoint
from vq_megatron.strategies.two_stage import dense_output_embeddings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vq_megatron.strategies.convert_head", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="dense run directory (or a step_* checkpoint directory)")
    p.add_argument("--out", required=True, help="output .pt file for the [V_pad, d] rows")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest complete)")
    p.add_argument("--vocab-size", type=int, default=0, help="cut the rows to the real vocabulary V")
    p.add_argument("--codebook-size", type=int, default=0, help="also k-means the rows into K codes")
    p.add_argument("--refine-rank", type=int, default=0,
                   help="with --codebook-size: also the rank-R SVD fit of the residual rows (two-level head)")
    p.add_argument("--kmeans-iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.refine_rank and not args.codebook_size:
        p.error("--refine-rank needs --codebook-size (it fits the residuals of the k-means rows)")

    rows = dense_output_embeddings(args.run_dir, args.tag)
    if args.vocab_size:
        if args.vocab_size > rows.shape[0]:
            p.error(f"--vocab-size {args.vocab_size} exceeds the checkpoint's {rows.shape[0]} rows")
        rows = rows[: args.vocab_size]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rows.contiguous(), out)
    print(f"[convert_head] {resolve_checkpoint(args.run_dir, args.tag)}: output embeddings {tuple(rows.shape)} -> {out}")
    if args.codebook_size:
        from vq_megatron.ops.map_init import build_map

        V = args.vocab_size or rows.shape[0]
        full_map, centroids = build_map("kmeans", V, args.codebook_size, seed=args.seed, embeddings=rows[:V],
                                        kmeans_iters=args.kmeans_iters)
        err = float((rows[:V] - centroids[full_map]).norm() / rows[:V].norm())
        torch.save(full_map, out.with_suffix(".map.pt"))
        torch.save(centroids, out.with_suffix(".codebook.pt"))
        print(f"[convert_head] k-means K={args.codebook_size}: relative row reconstruction error {err:.3f}; "
              f"map -> {out.with_suffix('.map.pt')}, codebook -> {out.with_suffix('.codebook.pt')}")
        if args.refine_rank:
            from vq_megatron.ops.map_init import low_rank_residual

            weight, proj = low_rank_residual(rows[:V], centroids, full_map, args.refine_rank)
            err = float((rows[:V] - centroids[full_map] - weight @ proj).norm() / rows[:V].norm())
            torch.save(weight, out.with_suffix(".refine_weight.pt"))
            torch.save(proj, out.with_suffix(".refine_proj.pt"))
            print(f"[convert_head] + rank-{args.refine_rank} refinement: relative row reconstruction error "
                  f"{err:.3f}; U -> {out.with_suffix('.refine_weight.pt')}, P -> {out.with_suffix('.refine_proj.pt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
