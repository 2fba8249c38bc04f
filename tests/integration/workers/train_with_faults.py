"""vq-megatron-train with test-only faults patched in (never part of the library).

  --fault-nan-at-step N     the training loss of step N (1-based), micro-batch 0, becomes NaN on every rank
  --fault-sleep-per-step S  sleep S seconds per micro-batch, so a test can kill the run mid-training
Remaining arguments go to vq_megatron.train.main unchanged.
"""

import argparse
import sys
import time

import torch

from vq_megatron.train import main
from vq_megatron.training import trainer


def install_faults(nan_at_step: int, sleep: float) -> None:
    forward_loss, train_batch = trainer._forward_loss, trainer.train_batch
    calls = {"micro": 0}

    def faulty_train_batch(*args, **kwargs):
        if sleep:
            time.sleep(sleep)
        calls["step"], calls["micro"] = kwargs["step"], kwargs["micro"]
        return train_batch(*args, **kwargs)

    def faulty_forward_loss(engine, batch, mask):
        loss = forward_loss(engine, batch, mask)
        if calls.get("step") == nan_at_step - 1 and calls["micro"] == 0:
            return loss * torch.tensor(float("nan"))
        return loss

    trainer.train_batch, trainer._forward_loss = faulty_train_batch, faulty_forward_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-nan-at-step", type=int, default=0)
    parser.add_argument("--fault-sleep-per-step", type=float, default=0.0)
    faults, rest = parser.parse_known_args()
    install_faults(faults.fault_nan_at_step, faults.fault_sleep_per_step)
    sys.exit(main(rest))
