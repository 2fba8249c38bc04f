"""Load a trained run (config.json + DeepSpeed checkpoint) into a megatron GPT at any TP size.

DeepSpeed writes one mp_rank_XX_model_states.pt per TP rank. Every tensor that carries megatron's partition
tags (`tensor_model_parallel`, `partition_dim`; the VQ map buffer carries them too, see
parallel/vocab_sharding.py) is concatenated along its partition dim and re-split for the new TP size;
vocabulary-sharded tensors are re-padded (Megatron pads V to a multiple of 128·TP) with the tensor's own
`vocab_pad_value` (-1 for the map, 0 otherwise). Gated MLPs (SwiGLU), whose shards interleave two halves,
are not resharded: load them at the training TP size.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path

import torch

from vq_megatron.integration.checkpoint import CheckpointError, load_model_shards, resolve_checkpoint
from vq_megatron.parallel import vocab_pad_value
from vq_megatron.training.config import RunConfig, run_config_from_dict

__all__ = ["read_run_config", "init_inference_parallel", "load_trained_model", "reshard_state_dict",
           "load_tokenizer", "trained_run"]


def read_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a training run directory")
    return run_config_from_dict(json.loads(path.read_text()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_inference_parallel(tensor_parallel: int | None = None) -> int:
    """torch.distributed + megatron groups for inference: TP = world size (one process works too)."""
    from vq_megatron.integration.distributed import init_parallel

    if "RANK" not in os.environ:   # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    tp = tensor_parallel or int(os.environ["WORLD_SIZE"])
    init_parallel(tensor_parallel=tp)
    return tp


def _resize_rows(full: torch.Tensor, rows: int, fill) -> torch.Tensor:
    out = full.new_full((rows, *full.shape[1:]), fill)
    n = min(rows, full.shape[0])
    out[:n] = full[:n]
    return out


def reshard_state_dict(shards: list[dict], model: torch.nn.Module, tp_rank: int, tp_size: int) -> dict:
    """This rank's state dict for `model` (built at tp_size) from the checkpoint's per-TP-rank shards."""
    out = {}
    for name, target in model.state_dict(keep_vars=True).items():
        if name not in shards[0]:
            raise CheckpointError(f"checkpoint has no entry for {name}: was it written by another model?")
        pieces = [shard[name] for shard in shards]
        if target is None or pieces[0] is None:
            out[name] = pieces[0]
            continue
        if not getattr(target, "tensor_model_parallel", False):
            out[name] = pieces[0]
            continue
        dim = target.partition_dim
        full = torch.cat(pieces, dim=dim).movedim(dim, 0)
        full = _resize_rows(full, target.shape[dim] * tp_size, vocab_pad_value(target))
        out[name] = full.chunk(tp_size, dim=0)[tp_rank].movedim(0, dim).contiguous()
    return out


def load_trained_model(run_dir: str | Path, *, tag: str | None = None, device=None):
    """(model in eval mode, run config, tag). Call init_inference_parallel() first."""
    from megatron.core import parallel_state as ps

    from vq_megatron.models import build_gpt_model

    cfg = read_run_config(run_dir)
    checkpoint = resolve_checkpoint(run_dir, tag)
    tag = checkpoint.name
    tp = ps.get_tensor_model_parallel_world_size()
    # Every weight (the VQ map included) comes from the checkpoint: no data-dependent initialisation.
    model = build_gpt_model(cfg.model, tensor_parallel=tp, weights_from_checkpoint=True)
    shards = load_model_shards(checkpoint)
    model.load_state_dict(reshard_state_dict(shards, model, ps.get_tensor_model_parallel_rank(), tp))
    if device is not None:
        model = model.to(device)
    return model.eval(), cfg, tag


def load_tokenizer(cfg: RunConfig):
    """The run's own tokenizer: data.tokenizer_model (sentencepiece) when set, else the one the training data
    was prepared with, as `<data.train_prefix>.meta.json` records it (sentencepiece or GPT-2 BPE files)."""
    from vq_megatron.data.tokenizers import load_gpt2, load_sentencepiece
    from vq_megatron.training.data import read_meta

    path = cfg.data.tokenizer_model
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"the run's data.tokenizer_model {path!r} is not a file: pass --tokenizer-model")
        return load_sentencepiece(path)
    meta = read_meta(cfg.data.train_prefix) if cfg.data.train_prefix else {}
    kind, files = meta.get("tokenizer"), meta.get("tokenizer_files") or []
    missing = [f for f in files if not Path(f).is_file()]
    if kind == "gpt2" and len(files) == 2 and not missing:
        return load_gpt2(*files)
    if kind == "sentencepiece" and len(files) == 1 and not missing:
        return load_sentencepiece(files[0])
    raise FileNotFoundError(f"cannot tell the run's tokenizer: data.tokenizer_model is empty and "
                            f"{cfg.data.train_prefix}.meta.json names {kind!r} with files {files} "
                            f"({'missing: ' + str(missing) if missing else 'unusable'}); pass --tokenizer-model")


@contextmanager
def trained_run(run_dir: str | Path, *, tag: str | None = None, tokenizer_model: str | None = None):
    """Process groups + (model, config, tag, tokenizer, device) of a run; tears the groups down after."""
    from vq_megatron.integration.distributed import local_device, shutdown_parallel

    init_inference_parallel()
    try:
        device = local_device()
        model, cfg, tag = load_trained_model(run_dir, tag=tag, device=device)
        if tokenizer_model:
            cfg.data.tokenizer_model = tokenizer_model
        yield model, cfg, tag, load_tokenizer(cfg), device
    finally:
        shutdown_parallel()
