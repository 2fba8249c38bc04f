"""Checkpoints: DeepSpeed engine state + per-rank RNG, published atomically, last k kept.

Layout: <save_dir>/step_00000100/ (DeepSpeed's files + rng_rank00000.pt ...) and <save_dir>/latest_complete,
a one-line file naming the newest *complete* tag. The tag is written there (temp file + os.replace) only
after every rank has finished writing, so a run killed mid-save never leaves a half-written checkpoint
marked as the one to resume from; incomplete step dirs are ignored and pruned.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "latest_complete_tag", "rng_state", "set_rng_state"]

LATEST = "latest_complete"


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    from megatron.core.tensor_parallel import random as mrandom

    state = {"torch": torch.get_rng_state(), "tracker": mrandom.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import random as mrandom

    torch.set_rng_state(state["torch"])
    mrandom.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_complete_tag(save_dir: str | Path) -> str | None:
    """The newest checkpoint whose save finished on every rank, or None."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (Path(save_dir) / tag).is_dir():
        raise FileNotFoundError(f"{marker} names {tag}, but {Path(save_dir) / tag} is missing")
    return tag


def _prune(save_dir: Path, keep_last: int, newest: str) -> None:
    tags = sorted(p.name for p in save_dir.glob("step_*") if p.is_dir())
    complete = [t for t in tags if t <= newest]
    for tag in complete[:-keep_last]:
        shutil.rmtree(save_dir / tag, ignore_errors=True)


def save_checkpoint(engine, save_dir: str | Path, step: int, *, client_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    save_dir, tag = Path(save_dir), _tag(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={**client_state, "step": step},
                           save_latest=False)
    torch.save(rng_state(), save_dir / tag / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        _atomic_write_text(save_dir / LATEST, tag)
        _prune(save_dir, keep_last, tag)
    dist.barrier()
    return tag


def load_checkpoint(engine, save_dir: str | Path, tag: str) -> dict:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns the client state."""
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {Path(save_dir) / tag}")
    rng_file = Path(save_dir) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: checkpoint {tag} was written by a run with a "
                                f"different number of ranks")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
