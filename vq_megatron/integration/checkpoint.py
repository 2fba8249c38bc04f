"""Checkpoints: DeepSpeed engine state + per-rank RNG, published atomically, verified on load, last k kept.

Also the one reader of a run's checkpoints outside the engine: `resolve_checkpoint` (a run directory, a
tag, or a step directory -> a verified checkpoint directory) and `load_model_shards` (the model state of
every TP rank), used by inference, the two-stage strategy and post-hoc conversion.

Layout: <save_dir>/step_00000100/ holds DeepSpeed's files (mp_rank_XX: XX = pipeline stage · TP + TP rank,
see integration/deepspeed_mpu.py), rng_rank<r>.pt per rank, layout.json (the TP/PP/DP sizes it was
written at) and MANIFEST.json (size and SHA-256 of every file); <save_dir>/latest_complete names the newest complete tag. Both are
written by rank 0 only after every rank finished writing (temp file + os.replace), so a run killed
mid-save never leaves a half-written checkpoint marked as complete: a step dir without MANIFEST.json is
ignored (and pruned by the next save). On load the manifest is checked, so a truncated or corrupted file
(or manifest) is reported by name, with the previous complete checkpoint offered.
"""

from __future__ import annotations

import importlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from vq_megatron.integration.deepspeed_mpu import split_model_parallel_file_rank
from vq_megatron.files import atomic_write_json, atomic_write_text, sha256_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_complete_tag", "complete_tags", "verify_checkpoint",
           "CheckpointError", "rng_state", "set_rng_state", "resolve_checkpoint", "load_model_shards", "safe_load",
           "checkpoint_layout", "merge_pipeline_stages", "TRUSTED_GLOBALS", "MANIFEST", "LATEST", "LAYOUT"]

LATEST = "latest_complete"
MANIFEST = "MANIFEST.json"
LAYOUT = "layout.json"


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


def _write_manifest(tag_dir: Path) -> None:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(tag_dir)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(tag_dir / MANIFEST, entries, indent=1)


def complete_tags(save_dir: str | Path) -> list[str]:
    """Tags whose save finished on every rank (they have a manifest), oldest first."""
    return sorted(p.parent.name for p in Path(save_dir).glob(f"step_*/{MANIFEST}"))


def _refusal(save_dir: str | Path, tag: str, problem: str) -> CheckpointError:
    """The error for an unusable checkpoint: the problem, then what to resume from instead."""
    older = [t for t in complete_tags(save_dir) if t < tag]
    offer = (f"the previous complete checkpoint is {older[-1]}: resume from it with "
             f"--set training.resume_tag={older[-1]}" if older else "no older complete checkpoint exists")
    return CheckpointError(f"{problem}; {offer}")


def latest_complete_tag(save_dir: str | Path) -> str | None:
    """The newest complete checkpoint, or None when there is none."""
    marker = Path(save_dir) / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    manifest = Path(save_dir) / tag / MANIFEST
    if not manifest.is_file():
        raise _refusal(save_dir, tag, f"{marker} names {tag}, but {manifest} is missing; "
                                      f"complete checkpoints: {complete_tags(save_dir) or 'none'}")
    return tag


def _is_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str))


def _read_manifest(save_dir: str | Path, tag: str) -> dict[str, dict]:
    """{file name: {"bytes", "sha256"}}; a manifest damaged on disk is refused like any damaged file."""
    path = Path(save_dir) / tag / MANIFEST
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:            # invalid JSON or UTF-8
        raise _refusal(save_dir, tag, f"checkpoint manifest {path} is not valid JSON ({err})") from err
    if not (isinstance(entries, dict) and all(_is_entry(e) for e in entries.values())):
        raise _refusal(save_dir, tag, f'checkpoint manifest {path} is not a mapping of file name to '
                                      f'{{"bytes": int, "sha256": str}} (corrupted)')
    return entries


def _file_problem(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return "is missing"
    if path.stat().st_size != expected["bytes"]:
        return f"has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated?)"
    if sha256_file(path) != expected["sha256"]:
        return "does not match its SHA-256 checksum (corrupted)"
    return None


def verify_checkpoint(save_dir: str | Path, tag: str) -> None:
    """Check every file of a checkpoint against its manifest; raise CheckpointError naming the first bad one."""
    tag_dir = Path(save_dir) / tag
    if not tag_dir.is_dir():
        raise _refusal(save_dir, tag, f"checkpoint {tag_dir} does not exist")
    if not (tag_dir / MANIFEST).is_file():
        raise _refusal(save_dir, tag, f"checkpoint {tag_dir} is incomplete (no {MANIFEST}): it was not finished")
    for name, expected in _read_manifest(save_dir, tag).items():
        problem = _file_problem(tag_dir / name, expected)
        if problem:
            raise _refusal(save_dir, tag, f"checkpoint file {tag_dir / name} {problem}")


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
        atomic_write_json(save_dir / tag / LAYOUT, _current_layout())
        _write_manifest(save_dir / tag)
        atomic_write_text(save_dir / LATEST, tag)
        _prune(save_dir, keep_last, tag)
    dist.barrier()
    return tag


# Besides tensors and plain containers, the files of a ZeRO-1/2 checkpoint the driver writes hold exactly these
# classes (torch.serialization.get_unsafe_globals_in_checkpoint on them). Anything else in a pickle is refused.
TRUSTED_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                   "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                   "deepspeed.runtime.zero.config.ZeroStageEnum")


def _trusted_globals() -> list:
    found = []
    for name in TRUSTED_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):   # another DeepSpeed version: what it lacks cannot be in a file
            continue
    return found


def safe_load(path: str | Path, map_location="cpu"):
    """torch.load with weights_only=True, allowing the few classes our own checkpoints contain: a
    checkpoint someone else made cannot run code while it is read. Raises CheckpointError naming the file."""
    try:
        with torch.serialization.safe_globals(_trusted_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"refusing to load {path}: its pickle asks for objects a vq_megatron checkpoint never "
                              f"contains, and unpickling them could run code ({reason}). Load only checkpoints "
                              "written by this project's driver, or convert the file yourself if you trust "
                              "it") from None


def _current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"tensor_parallel": ps.get_tensor_model_parallel_world_size(),
            "pipeline_parallel": ps.get_pipeline_model_parallel_world_size(),
            "data_parallel": ps.get_data_parallel_world_size()}


def checkpoint_layout(tag_dir: str | Path) -> dict:
    """The parallel sizes a checkpoint was written at (checkpoints older than layout.json: PP=1)."""
    path = Path(tag_dir) / LAYOUT
    return json.loads(path.read_text()) if path.is_file() else {"pipeline_parallel": 1}


def _check_resumable_layout(save_dir: Path, tag: str) -> None:
    """DeepSpeed restores model and optimizer files only at the model-parallel layout they were written at;
    elsewhere it would load another stage's or shard's file, or fail deep inside. Stop clearly instead."""
    written, now = checkpoint_layout(save_dir / tag), _current_layout()
    keys = ("tensor_parallel", "pipeline_parallel")
    if "tensor_parallel" in written and any(written[k] != now[k] for k in keys):
        have = ", ".join(f"{k}={written[k]}" for k in keys)
        want = ", ".join(f"{k}={now[k]}" for k in keys)
        raise CheckpointError(f"checkpoint {save_dir / tag} was written at {have}, but this run has {want}: "
                              "training resumes only at the layout a checkpoint was written at (set parallel.* "
                              "back, or use another training.save_dir); vq-megatron-generate and "
                              "vq-megatron-evaluate read it at any layout")


def load_checkpoint(engine, save_dir: str | Path, tag: str, *, verify: bool = True) -> dict:
    """Restore engine (model, optimizer, LR schedule) and this rank's RNG; returns the client state.

    Every file is read through safe_load (DeepSpeed's own engine would unpickle anything)."""
    if verify:
        verify_checkpoint(save_dir, tag)
    _check_resumable_layout(Path(save_dir), tag)
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
    path, client_state = engine.load_checkpoint(str(save_dir), tag=tag)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {Path(save_dir) / tag}")
    rng_file = Path(save_dir) / tag / f"rng_rank{dist.get_rank():05d}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{rng_file} is missing: checkpoint {tag} was written by a run with a "
                              f"different number of ranks")
    set_rng_state(safe_load(rng_file))
    return client_state


_SHARD = re.compile(r"mp_rank_(\d+)_model_states\.pt$")


def _has_shards(path: Path) -> bool:
    return any(_SHARD.search(p.name) for p in path.glob("mp_rank_*_model_states.pt"))


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> Path:
    """A verified checkpoint directory from a run directory (its latest complete checkpoint), a run
    directory + tag, or a step_* directory itself. A checkpoint without a manifest, or whose files do not
    match it, is refused (CheckpointError names the file and offers the previous complete checkpoint)."""
    path = Path(path)
    if tag is None and _has_shards(path):         # a step directory: verify it within its run directory
        run_dir, tag = path.parent, path.name
    else:
        run_dir = path
        tag = tag or latest_complete_tag(run_dir)
        if tag is None:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint (no {LATEST} file and no step_* "
                                    f"directory with {MANIFEST})")
    verify_checkpoint(run_dir, tag)
    if not _has_shards(run_dir / tag):
        raise _refusal(run_dir, tag, f"{run_dir / tag}: no DeepSpeed model states (mp_rank_XX_model_states.pt)")
    return run_dir / tag


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def merge_pipeline_stages(stages: list[dict]) -> dict:
    """One state dict from the state dicts of consecutive pipeline stages: each stage numbers its
    transformer layers from 0, so they are renumbered to their global index; everything else (embedding on
    the first stage, final norm and output layer on the last) is kept as it is."""
    merged, offset = {}, 0
    for state in stages:
        local = {int(m.group(1)) for key in state if (m := _LAYER.match(key))}
        for key, value in state.items():
            m = _LAYER.match(key)
            name = key if m is None else f"decoder.layers.{int(m.group(1)) + offset}.{key[m.end():]}"
            if name in merged:
                raise ValueError(f"pipeline stages both hold {name}")
            merged[name] = value
        offset += max(local) + 1 if local else 0
    return merged


def load_model_shards(path: str | Path, tag: str | None = None) -> list[dict]:
    """The model state dicts of every TP shard of a checkpoint, ordered by TP rank; the stages of a
    pipeline-parallel checkpoint are merged into one model per TP rank."""
    ckpt = resolve_checkpoint(path, tag)
    shards = sorted((int(_SHARD.search(p.name).group(1)), p) for p in ckpt.glob("mp_rank_*_model_states.pt"))
    if [r for r, _ in shards] != list(range(len(shards))):
        raise _refusal(ckpt.parent, ckpt.name,
                       f"{ckpt}: model-parallel files {[r for r, _ in shards]} are not 0..{len(shards) - 1}")
    pp = checkpoint_layout(ckpt).get("pipeline_parallel", 1)
    if len(shards) % pp:
        raise _refusal(ckpt.parent, ckpt.name, f"{ckpt}: {len(shards)} model-parallel files for {pp} stages")
    tp = len(shards) // pp
    stages = [[None] * pp for _ in range(tp)]
    for rank, file in shards:
        state = safe_load(file)
        if "module" not in state:
            raise _refusal(ckpt.parent, ckpt.name,
                           f"{file}: no 'module' state dict (not a DeepSpeed model-states file)")
        stage, tp_rank = split_model_parallel_file_rank(rank, tp)
        stages[tp_rank][stage] = state["module"]
    return [merge_pipeline_stages(per_rank) if pp > 1 else per_rank[0] for per_rank in stages]
