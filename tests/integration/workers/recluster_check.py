"""vq-megatron-train with a probe around the re-clustering step (test-only, never part of the library).

At step R (--recluster-step, = vq.recluster_interval) the probe first perturbs the input embedding rows on
every data-parallel rank but the first, so a k-means computed on each rank separately would disagree; after
the re-clustering it checks that the map is identical on every rank of every TP and DP group and records
the codebook (the centroids). After step R+1 it checks that the codebook equals those centroids moved by one
optimizer step only (|Δ| <= 10·lr), not the codebook from before the re-clustering (which a ZeRO master copy
would restore). Prints "recluster probe: ok" on rank 0; any failed check raises.
"""

import argparse
import sys

import torch
import torch.distributed as dist

from vq_megatron.train import main
from vq_megatron.training import trainer


def all_equal(tensor: torch.Tensor) -> bool:
    copies = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, tensor.contiguous())
    return all(torch.equal(c, tensor) for c in copies)


def install_probe(step_r: int, lr: float) -> None:
    from megatron.core import parallel_state as ps

    recluster, seen = trainer._maybe_recluster, {}

    def probe(model, cfg, step):
        layer = model.output_layer
        if step == step_r:
            seen["before"] = layer.codebook.detach().clone()
            if ps.get_data_parallel_rank() > 0:
                with torch.no_grad():
                    model.embedding.word_embeddings.weight.add_(0.05 * torch.randn_like(
                        model.embedding.word_embeddings.weight))
        recluster(model, cfg, step)
        if step == step_r:
            if not all_equal(layer.global_token_to_code) or not all_equal(layer.codebook.detach()):
                raise AssertionError("after re-clustering, the map or codebook differs between ranks")
            seen["centroids"] = layer.codebook.detach().clone()
            if torch.equal(seen["centroids"], seen["before"]):
                raise AssertionError("the codebook was not re-initialised")
        if step == step_r + 1:
            moved = float((layer.codebook.detach() - seen["centroids"]).abs().max())
            reverted = float((layer.codebook.detach() - seen["before"]).abs().max())
            if not 0 < moved <= 10 * lr < reverted:
                raise AssertionError(f"after one more step the codebook moved {moved:.2e} from the centroids "
                                     f"(allowed {10 * lr:.1e}) and is {reverted:.2e} from the old codebook")
            if dist.get_rank() == 0:
                print(f"recluster probe: ok (moved {moved:.1e} from the centroids, {reverted:.1e} from the old "
                      "codebook)", flush=True)

    trainer._maybe_recluster = probe


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--recluster-step", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    probe_args, rest = parser.parse_known_args()
    install_probe(probe_args.recluster_step, probe_args.lr)
    sys.exit(main(rest))
