"""The training loop: megatron-core GPT (dense or VQ head) under DeepSpeed, with eval and checkpoints."""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vq_megatron.integration.deepspeed_mpu import MegatronMPU
from vq_megatron.integration.distributed import init_parallel, local_device
from vq_megatron.integration.sequence_parallel import reduce_sequence_parallel_grads
from vq_megatron.models import build_gpt_model, head_parameter_count
from vq_megatron.integration.checkpoint import latest_complete_tag, load_checkpoint, save_checkpoint
from vq_megatron.training.config import RunConfig
from vq_megatron.training.evaluation import perplexities, windows_nll
from vq_megatron.integration.tensor_files import load_tensor_file
from vq_megatron.layers import VQOutputLayer
from vq_megatron.training.data import (Batch, build_train_dataset, causal_mask, check_token_range,
                                       check_vocab_consistency, corpus_token_counts, eval_windows, read_meta,
                                       train_batch)
from vq_megatron.training.metrics import MetricsLogger
from vq_megatron.training.pipeline import pipeline_train_step, pipeline_windows_nll

__all__ = ["train", "evaluate", "deepspeed_config"]


def _print0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)   # no decay on norms, biases, per-token bias
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr_lambda(cfg: RunConfig):
    o, steps = cfg.optim, cfg.training.steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return (o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))) / o.lr
    return factor


def _vq_init_data(cfg: RunConfig) -> dict:
    """Token counts (frequency map / unigram bias) and embedding rows (k-means map) the VQ head needs."""
    if cfg.model.output_layer == "adaptive":   # frequency ranking of the adaptive softmax clusters
        return {"token_counts": corpus_token_counts(cfg.data.train_prefix, cfg.model.vocab_size)}
    if cfg.model.output_layer != "vq":
        return {}
    vq, out = cfg.model.vq_config(), {}
    if vq.needs_token_counts:
        out["token_counts"] = corpus_token_counts(cfg.data.train_prefix, cfg.model.vocab_size)
    if vq.map_init == "kmeans":
        rows = load_tensor_file(cfg.model.vq_init_embeddings, "model.vq_init_embeddings")
        if rows.dim() != 2 or rows.shape[0] < cfg.model.vocab_size:
            raise ValueError(f"model.vq_init_embeddings: need [>= {cfg.model.vocab_size}, d] rows, got "
                             f"{tuple(rows.shape)}")
        out["embeddings"] = rows[: cfg.model.vocab_size].float()
    return out


def _maybe_recluster(model, cfg: RunConfig, step: int) -> None:
    """Every vq.recluster_interval steps (not after the last), re-cluster the VQ map from the model's input
    embedding rows (gathered across TP, cut to V); see VQLogitsConfig.recluster_*. The map is computed once
    and broadcast over TP and data parallel; a re-initialised codebook is written into the optimizer's
    fp32 master copy too (ZeRO keeps one: writing the module parameter alone is undone by the next step)."""
    layer = getattr(model, "output_layer", None)
    if not isinstance(layer, VQOutputLayer):
        return
    vq = layer.config
    if not vq.recluster_interval or step % vq.recluster_interval or step >= cfg.training.steps:
        return
    from deepspeed.utils import safe_set_full_fp32_param
    from megatron.core import parallel_state as ps

    from vq_megatron.strategies.recluster import recluster_from_input_embeddings

    replicas = ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None
    changed = recluster_from_input_embeddings(model, method=vq.recluster_method,
                                              reinit_codebook=vq.recluster_reinit_codebook, replica_group=replicas)
    if vq.recluster_method == "kmeans" and vq.recluster_reinit_codebook:
        safe_set_full_fp32_param(layer.codebook, layer.codebook.detach().float())
    _print0(f"[train] step {step}: re-clustered the VQ map ({vq.recluster_method}), {changed:.1%} of tokens moved")


def deepspeed_config(cfg: RunConfig, data_parallel: int) -> dict:
    """The DeepSpeed JSON with batch sizes, clipping and precision taken from the run config."""
    path = Path(cfg.training.deepspeed_config)
    if not path.is_file():
        raise FileNotFoundError(f"training.deepspeed_config {path} does not exist")
    ds = json.loads(path.read_text())
    ga = cfg.gradient_accumulation(data_parallel)
    ds.update(train_micro_batch_size_per_gpu=cfg.training.micro_batch_size, gradient_accumulation_steps=ga,
              train_batch_size=cfg.training.global_batch_size, gradient_clipping=cfg.optim.clip_grad,
              steps_per_print=10 ** 9)
    if cfg.parallel.pipeline_parallel > 1:
        # megatron's schedule runs the step's micro-batches and divides their losses by their number; its
        # backward calls are plain torch ones. DeepSpeed must neither divide again (its hooks divide output
        # gradients by gradient_accumulation_steps) nor reduce at a micro-batch boundary it counts itself:
        # engine.step() is the one accumulation boundary.
        ds.update(gradient_accumulation_steps=1, managed_gradient_accumulation=False,
                  train_batch_size=cfg.training.micro_batch_size * data_parallel)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.training.precision == "bf16"}
    ds.setdefault("zero_allow_untested_optimizer", True)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage == 0 and cfg.parallel.pipeline_parallel > 1:
        raise ValueError(f"training.deepspeed_config {path}: ZeRO stage 0 cannot train with "
                         f"parallel.pipeline_parallel={cfg.parallel.pipeline_parallel}: megatron's pipeline "
                         "schedule runs its own backward, which DeepSpeed accumulates only with a ZeRO optimizer; "
                         "use configs/deepspeed/zero1_fp32.json or zero2_fp32.json")
    if stage not in (0, 1, 2):
        raise ValueError(f"training.deepspeed_config {path}: ZeRO stage {stage} is not supported: stage 3 partitions "
                         "the parameters and gathers them only around module forwards, but the output layer's "
                         "loss reads its codebook outside its own forward; use ZeRO stage 1 or 2 "
                         "(configs/deepspeed/zero1_fp32.json, zero2_fp32.json), which shard the optimizer state "
                         "(and gradients)")
    return ds


def _mtp_losses(depths: int, micro_batches: int) -> dict:
    """The step's loss of every MTP depth (megatron's tracker, summed over the micro-batches), averaged over
    data parallel; the tracker is cleared for the next step."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    values = MTPLossLoggingHelper.tracker.get("loss_values")
    if not depths or values is None:
        return {}
    values = values.detach().clone() / micro_batches
    dist.all_reduce(values, group=ps.get_data_parallel_group())
    values /= ps.get_data_parallel_world_size()
    MTPLossLoggingHelper.clean_metrics_in_tracker()
    return {f"mtp_{depth + 1}_loss": float(v) for depth, v in enumerate(values)}


def _head_parameters(model, device) -> int:
    """head_parameter_count of the whole model: the output layer lives on the last pipeline stage only."""
    from megatron.core import parallel_state as ps

    count = torch.tensor(head_parameter_count(model), dtype=torch.int64, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
    return int(count)


class _NonFiniteGuard:
    """Applies training.nan_policy to NaN/Inf losses, identically on every rank (one flag all-reduce)."""

    def __init__(self, policy: str, max_in_a_row: int):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.total = self.in_a_row = 0

    def should_skip(self, loss: torch.Tensor, step: int, micro: int | str) -> bool:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if not bad.item():
            self.in_a_row = 0
            return False
        where = f"step {step + 1} micro-batch {micro} (loss {float(loss)} on rank {dist.get_rank()})"
        if self.policy == "stop":
            raise FloatingPointError(f"non-finite training loss at {where}; set training.nan_policy=skip "
                                     f"to skip such micro-batches")
        self.total += 1
        self.in_a_row += 1
        _print0(f"[train] skipped non-finite micro-batch at {where}; {self.total} skipped so far")
        if self.in_a_row > self.max_in_a_row:
            raise FloatingPointError(f"{self.in_a_row} non-finite micro-batches in a row (last at {where}): "
                                     f"stopping (training.max_skipped_microbatches={self.max_in_a_row})")
        return True


def _global_grad_norm(engine) -> float:
    """The global gradient norm (before clipping) of the last optimizer step, NaN where DeepSpeed has none."""
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def _zero_gradient_loss(engine) -> torch.Tensor:
    """A loss whose gradient is exactly 0 for every parameter (even NaN ones), so DeepSpeed's gradient
    accumulation and reduction run as usual but the micro-batch contributes nothing."""
    return sum((p.sum() * 0.0 for p in engine.module.parameters() if p.requires_grad),
               torch.zeros((), device=next(engine.module.parameters()).device))


def _forward_loss(engine, batch: Batch, mask) -> torch.Tensor:
    per_token = engine(batch.tokens, batch.position_ids, mask, labels=batch.labels, loss_mask=batch.loss_mask)
    return (per_token.float() * batch.loss_mask).sum() / batch.loss_mask.sum().clamp(min=1)


def _accumulated_step(engine, batches: list[Batch], mask, guard: _NonFiniteGuard, step: int) -> torch.Tensor:
    """One optimizer step as DeepSpeed's gradient accumulation: forward, backward and engine.step() per
    micro-batch (the engine steps the optimizer at the last). Returns the mean micro-batch loss."""
    from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

    # MTP losses reach the backward through MTPLossAutoScaler, outside the loss DeepSpeed divides by the
    # number of accumulated micro-batches: give them the same 1/GA (megatron's schedules do this too).
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0 / len(batches), device=mask.device))
    step_loss = torch.zeros((), device=mask.device)
    for micro, batch in enumerate(batches):
        loss = _forward_loss(engine, batch, mask)
        if guard.should_skip(loss, step, micro):
            loss = _zero_gradient_loss(engine)
        engine.backward(loss)
        engine.step()
        step_loss += loss.detach() / len(batches)
    return step_loss


def _pipeline_step(engine, batches: list[Batch], mask, guard: _NonFiniteGuard, step: int) -> torch.Tensor:
    """One optimizer step through megatron's pipeline schedule, stepped only when the loss is finite
    (nan_policy=stop: a skipped micro-batch would need its gradient taken out of every stage, refused)."""
    step_loss = pipeline_train_step(engine, batches, mask)
    guard.should_skip(step_loss, step, "(one of them)")
    engine.step()
    return step_loss


@torch.no_grad()
def evaluate(engine, cfg: RunConfig, device, max_tokens: int | None = None) -> dict:
    """Sequential perplexity on every data.eval_sets entry (token-level; word-level with a meta file).

    max_tokens caps each set (default data.eval_tokens; 0 = all)."""
    from megatron.core import parallel_state as ps

    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    engine.eval()
    results = {}
    for name, prefix in cfg.data.eval_sets.items():
        cap = cfg.data.eval_tokens if max_tokens is None else max_tokens
        windows = eval_windows(prefix, cfg.model.seq_length, cap)
        if cfg.parallel.pipeline_parallel > 1:   # the forward-only schedule drives the megatron module
            nll_of, model = pipeline_windows_nll, engine.module
        else:
            nll_of, model = windows_nll, engine
        nll, count = nll_of(model, windows[dp_rank::dp], micro_batch_size=cfg.training.micro_batch_size,
                            device=device, group=ps.get_data_parallel_group())
        meta = read_meta(prefix)
        words = None
        if meta.get("words") and meta.get("tokens"):
            # Words covered by the evaluated tokens (all of them unless an eval cap truncates the set).
            words = meta["words"] * count / meta["tokens"]
        results.update(perplexities(name, nll, count, words))
    engine.train()
    return results


def _build_engine(cfg: RunConfig, model, data_parallel: int):
    import deepspeed
    from megatron.core import parallel_state

    o = cfg.optim
    optimizer = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, data_parallel),
                                           mpu=MegatronMPU(parallel_state))
    return engine


def train(cfg: RunConfig, *, exit_after_steps: int = 0) -> dict:
    """Run (or resume) training as configured. Returns the summary also written to save_dir/summary.json.

    exit_after_steps: stop this invocation after that many steps (checkpointing first), like
    Megatron-LM's --exit-interval; a later call resumes.
    """
    import deepspeed
    from megatron.core import parallel_state as ps

    t = cfg.training
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    init_parallel(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel, seed=t.seed)
    device = local_device()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    ga = cfg.gradient_accumulation(dp)
    pp = cfg.parallel.pipeline_parallel
    print(f"[rank {dist.get_rank()}/{dist.get_world_size()}] host={socket.gethostname()} "
          f"local_rank={os.environ.get('LOCAL_RANK', 0)} tp_rank={ps.get_tensor_model_parallel_rank()}/"
          f"{ps.get_tensor_model_parallel_world_size()} pp_rank={ps.get_pipeline_model_parallel_rank()}/{pp} "
          f"dp_rank={dp_rank}/{dp} backend={dist.get_backend()} device={device} grad_accumulation={ga}",
          flush=True)
    save_dir = Path(t.save_dir)
    if dist.get_rank() == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    dist.barrier()

    check_vocab_consistency(cfg.model.vocab_size, [cfg.data.train_prefix, *cfg.data.eval_sets.values()],
                            cfg.data.tokenizer_model)
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    # Seeded per layer: the same model at every pipeline layout (models/seeding.py).
    model = build_gpt_model(cfg.model, tensor_parallel=cfg.parallel.tensor_parallel, pipeline_parallel=pp,
                            sequence_parallel=cfg.parallel.sequence_parallel, params_dtype=dtype,
                            pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                            init_seed=t.seed, **_vq_init_data(cfg)).to(device)
    head_params = _head_parameters(model, device)
    if cfg.parallel.sequence_parallel:   # DeepSpeed does not reduce these over TP; megatron's DDP would
        reduce_sequence_parallel_grads(model, ps.get_tensor_model_parallel_group())
    if cfg.model.init_from:   # two-stage: body weights of a dense run (a resumed checkpoint overrides them)
        from vq_megatron.strategies.two_stage import load_body_weights

        _print0(f"[train] body initialised from {load_body_weights(model, cfg.model.init_from)}")
    engine = _build_engine(cfg, model, dp)
    dataset = None if t.steps == 0 else build_train_dataset(
        cfg.data.train_prefix, seq_length=cfg.model.seq_length, num_samples=t.steps * t.global_batch_size,
        seed=t.seed, vocab_size=cfg.model.vocab_size, cache_dir=cfg.data.cache_dir)

    start_step = 0
    tag = (t.resume_tag or latest_complete_tag(save_dir)) if t.resume else None
    if tag is not None:
        start_step = load_checkpoint(engine, save_dir, tag, verify=t.verify_checkpoints)["step"]
        _print0(f"[train] resumed from {save_dir / tag} at step {start_step}")

    logger = MetricsLogger(save_dir, enabled=dist.get_rank() == 0)
    mask = causal_mask(cfg.model.seq_length, device)
    tokens_per_step = t.global_batch_size * cfg.model.seq_length
    progress = _progress(start_step, t.steps)
    losses, grad_norms, step_times, mtp_history = {}, {}, [], {}
    guard = _NonFiniteGuard(t.nan_policy, t.max_skipped_microbatches)
    step = start_step
    stop_at = min(t.steps, start_step + exit_after_steps) if exit_after_steps else t.steps
    while step < stop_at:
        began = time.perf_counter()
        batches = []
        for micro in range(ga):
            batch = train_batch(dataset, step=step, dp_rank=dp_rank, micro=micro, micro_batch_size=t.micro_batch_size,
                                data_parallel=dp, grad_accumulation=ga)
            check_token_range(batch, cfg.model.vocab_size)
            batches.append(batch.to(device))
        step_loss = (_pipeline_step if pp > 1 else _accumulated_step)(engine, batches, mask, guard, step)
        dist.all_reduce(step_loss, group=ps.get_data_parallel_group())
        step_loss /= dp
        step += 1
        _maybe_recluster(engine.module, cfg, step)
        step_times.append(time.perf_counter() - began)
        losses[step] = float(step_loss)
        grad_norms[step] = _global_grad_norm(engine)
        mtp_losses = _mtp_losses(cfg.model.mtp_num_layers, ga)
        for name, value in mtp_losses.items():
            mtp_history.setdefault(name, []).append(value)
        progress.update(1, losses[step])
        if t.log_interval and (step % t.log_interval == 0 or step == t.steps):
            logger.log(step, "train", {"loss": losses[step], "lr": engine.get_lr()[0],
                                       "grad_norm": grad_norms[step],
                                       "tokens_per_s": tokens_per_step / step_times[-1],
                                       "skipped_microbatches": guard.total, **mtp_losses})
        if t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
            logger.log(step, "eval", evaluate(engine, cfg, device, cfg.data.interval_eval_tokens))
        if (t.save_interval and step % t.save_interval == 0) or step == stop_at:
            save_checkpoint(engine, save_dir, step, client_state={}, keep_last=t.keep_last)
    if t.steps == 0 and tag is None:   # the initial model itself is the result (e.g. a converted head)
        save_checkpoint(engine, save_dir, 0, client_state={}, keep_last=t.keep_last)
    progress.close()

    summary = {"output_layer": cfg.model.output_layer, "head_parameters": head_params,
               "skipped_microbatches": guard.total,
               "steps_run": sorted(losses), "train_losses": [losses[s] for s in sorted(losses)],
               "grad_norms": [grad_norms[s] for s in sorted(grad_norms)], "final_step": step}
    if mtp_history:   # per step, like train_losses
        summary["mtp_losses"] = mtp_history
    if step_times:
        steady = step_times[2:] or step_times
        summary["tokens_per_s"] = tokens_per_step * len(steady) / sum(steady)
    if step == t.steps:
        summary["eval"] = evaluate(engine, cfg, device) if cfg.data.eval_sets else {}
        logger.log(step, "eval", summary["eval"])
    logger.close()
    if dist.get_rank() == 0:
        name = "summary.json" if step == t.steps else f"summary_until_{step}.json"
        (save_dir / name).write_text(json.dumps(summary, indent=2))
    return summary


class _progress:
    """A tqdm bar on global rank 0 only (other ranks stay quiet)."""

    def __init__(self, start: int, total: int):
        self.bar = None
        if dist.get_rank() == 0:
            import sys

            from tqdm import tqdm

            # In a log file (not a terminal) a redraw per step would flood it: update every 10 s instead.
            interval = 0.1 if sys.stderr.isatty() else 10.0
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=interval)

    def update(self, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)  # redraws follow mininterval
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
