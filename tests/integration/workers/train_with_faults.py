"""vq-megatron-train with test-only faults patched in (never part of the library).

  --fault-nan-at-step N     the training loss of step N (1-based), micro-batch 0, becomes non-finite on every rank
  --fault-value nan|inf     which non-finite value (default nan)
  --fault-from-step N       every micro-batch from step N on is non-finite (a run that keeps failing)
  --fault-mask-at-step N    the loss mask of step N, micro-batch 0, is all zeros (the "masked out" reference
                            for a skipped micro-batch: zero loss, exactly zero gradient)
  --fault-sleep-per-step S  sleep S seconds per micro-batch, so a test can kill the run mid-training
Remaining arguments go to vq_megatron.train.main unchanged.
"""

import argparse
import sys
import time

import torch

from vq_megatron.train import main
from vq_megatron.training import trainer


def install_faults(faults) -> None:
    forward_loss, train_batch = trainer._forward_loss, trainer.train_batch
    # The driver builds all micro-batches of a step before the first forward: the forwards that follow
    # are that step's micro-batches 0, 1, ... in order.
    calls = {"step": -1, "forwards": 0}
    bad = torch.tensor(float(faults.fault_value))

    def faulty_train_batch(*args, **kwargs):
        if faults.fault_sleep_per_step:
            time.sleep(faults.fault_sleep_per_step)
        step, micro = kwargs["step"], kwargs["micro"]
        batch = train_batch(*args, **kwargs)
        if step == faults.fault_mask_at_step - 1 and micro == 0:
            batch.loss_mask.zero_()
        if micro == 0:
            calls["step"], calls["forwards"] = step, 0
        return batch

    def faulty_forward_loss(engine, batch, mask):
        loss = forward_loss(engine, batch, mask)
        step, micro = calls["step"], calls["forwards"]
        calls["forwards"] += 1
        if (step == faults.fault_nan_at_step - 1 and micro == 0) or \
                (faults.fault_from_step and step >= faults.fault_from_step - 1):
            return loss * bad
        return loss

    trainer.train_batch, trainer._forward_loss = faulty_train_batch, faulty_forward_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-nan-at-step", type=int, default=0)
    parser.add_argument("--fault-value", choices=("nan", "inf"), default="nan")
    parser.add_argument("--fault-from-step", type=int, default=0)
    parser.add_argument("--fault-mask-at-step", type=int, default=0)
    parser.add_argument("--fault-sleep-per-step", type=float, default=0.0)
    faults, rest = parser.parse_known_args()
    install_faults(faults)
    sys.exit(main(rest))
