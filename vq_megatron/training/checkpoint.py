"""Checkpoints: DeepSpeed engine state + per-rank RNG, published atomically, verified on load, last k kept.

Layout: <save_dir>/step_00000100/ holds DeepSpeed's files, rng_rank<r>.pt per rank and MANIFEST.json
(size and SHA-256 of every file); <save_dir>/latest_complete names the newest complete tag. Both are
written by rank 0 only after every rank finished writing (temp file + os.replace), so a run killed
mid-save never leaves a half-written checkpoint marked as complete: a step dir without MANIFEST.json is
ignored (and pruned by the next save). On load the manifest is checked, so a truncated or corrupted file
is reported by name, with the previous complete checkpoint offered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["save_checkpoint", "load_checkpoint", "latest_complete_tag", "complete_tags", "verify_checkpoint",
           "CheckpointError", "rng_state", "set_rng_state"]

LATEST = "latest_complete"
MANIFEST = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, truncated or corrupted)."""


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(tag_dir: Path) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    _atomic_write_text(tag_dir / MANIFEST, json.dumps(entries, indent=1))


def complete_tags(save_dir: str | Path) -> list[str]:
    """Tags whose save finished on every rank (they have a manifest), oldest first."""
    return sorted(p.parent.name for p in Path(save_dir).glob(f"step_*/{MANIFEST}"))


def latest_complete_tag(save_dir: str | Path) -> str | None:
    """The newest complete checkpoint, or None when there is none."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (Path(save_dir) / tag / MANIFEST).is_file():
        raise CheckpointError(f"{marker} names {tag}, but {Path(save_dir) / tag / MANIFEST} is missing; "
                              f"complete checkpoints: {complete_tags(save_dir) or 'none'}")
    return tag


def verify_checkpoint(save_dir: str | Path, tag: str) -> None:
    """Check every file of a checkpoint against its manifest; raise CheckpointError naming the first bad one."""
    tag_dir = Path(save_dir) / tag
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete (no {MANIFEST}): it was not finished")
    for name, expected in json.loads(manifest_path.read_text()).items():
        path = tag_dir / name
        problem = None
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != expected["bytes"]:
            problem = f"has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
        elif _sha256(path) != expected["sha256"]:
            problem = "does not match its SHA-256 checksum (corrupted)"
        if problem:
            older = [t for t in complete_tags(save_dir) if t < tag]
            offer = (f"the previous complete checkpoint is {older[-1]}: resume from it with "
                     f"--set training.resume_tag={older[-1]}" if older else "no older complete checkpoint exists")
            raise CheckpointError(f"checkpoint file {path} {problem}; {offer}")


def _prune(save_dir: Path, keep_last: int, newest: str) -> None:
    complete = [t for t in complete_tags(save_dir) if t <= newest]
    for tag in complete[:-keep_last]:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
    for p in save_dir.glob("step_*"):   # leftovers of saves that were killed
        if p.is_dir() and not (p / MANIFEST).exists() and p.name < newest:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(engine, save_dir: str | Path, step: int, *, client_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it. Returns the tag written."""
    save_dir, tag = Path(save_dir), _tag(step)
    engine.save_checkpoint(str(save_dir), tag=tag, client_state={**client_state, "step": step},
                           save_latest=False)
    torch.save(rng_state(), save_dir / tag / f"rng_rank{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        _write_manifest(save_dir / tag)
        _atomic_write_text(save_dir / LATEST, tag)
        _prune(save_dir, keep_last, tag)
    dist.barrier()
    return tag


def load_checkpoint(engine, save_dir: str | Path, tag: str, *, verify: bool = True) -> dict:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns the client state."""
    if verify:
        verify_checkpoint(save_dir, tag)
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(save_dir) / tag}")
    rng_file = Path(save_dir) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file} is missing: checkpoint {tag} was written by a run with a "
                              f"different number of ranks")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
