"""Console entry point: `vq-megatron-train --config configs/c4_small.yaml [--set section.field=value ...]`.

Launch it with the DeepSpeed launcher (launch/train_deepspeed.sh), torchrun, or as a single process.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vq-megatron-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (sections model/parallel/data/optim/training)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field (value parsed as YAML); repeatable, e.g. "
                        "--set model.output_layer=dense --set training.steps=50")
    p.add_argument("--exit-after-steps", type=int, default=0,
                   help="stop this invocation after N steps, checkpointing first (a rerun resumes)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # passed by the deepspeed launcher; LOCAL_RANK env is used
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it (4x slower)
    from vq_megatron.training.config import load_run_config

    cfg = load_run_config(args.config, args.overrides)   # config errors surface before any process group
    from vq_megatron.integration.distributed import shutdown_parallel
    from vq_megatron.training.trainer import train

    try:
        train(cfg, exit_after_steps=args.exit_after_steps)
    except BaseException:
        shutdown_parallel(barrier=False)   # peers may be gone: a barrier here would hang
        raise
    shutdown_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
