"""VQGPTModel under megatron-core pipeline parallelism: the VQ head as the last stage's output layer.

Run (twice, same DIR):
  torchrun --nproc_per_node=1 pp_checks.py save  DIR             # PP=1, TP=1 reference
  torchrun --nproc_per_node=N pp_checks.py check DIR TP PP       # N = TP·PP (DP=1), e.g. 2 1 2 / 4 2 2

'save' builds the full model (PP=1, TP=1), moves every parameter off its init with seeded noise, saves
it with megatron dist_checkpointing (model.sharded_state_dict()), then runs megatron-core's
forward_backward_no_pipelining over NUM_MICROBATCHES seeded microbatches and writes the per-microbatch
losses and every parameter's gradient (keyed by its global name) to DIR/reference.pt.

'check' builds only this rank's pipeline stage (pre_process = first stage, post_process = last stage)
from *different* seeds, loads the PP=1 checkpoint (dist_checkpointing reshards PP=1 -> PP=P, TP=1 ->
TP=T), runs megatron-core's 1F1B schedule (forward_backward_pipelining_without_interleaving, gloo p2p
on CPU / NCCL on GPU) over the same microbatches, once with batched p2p (batch_isend_irecv, megatron's
default) and once with per-op isend/irecv, and checks on every rank after each run:
  - the VQOutputLayer exists only on the last stage, the embedding only on the first, and the stages
    together hold exactly the reference's parameters, each on exactly one stage (per TP rank);
  - the schedule's per-microbatch losses (last stage) equal the PP=1 losses;
  - every parameter gradient on this stage (TP shards gathered to the full tensor, replicated ones
    checked identical across TP) equals the PP=1 gradient: VQ codebook, VQ per-token bias, word and
    position embeddings and all transformer-layer weights (rtol 1e-5);
  - the VQ codebook/bias and embedding gradients are non-zero (the comparison is not vacuous).
Any mismatch raises and fails the launch.
"""

import os
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from vq_megatron.integration.cpu_shims import cuda_factories_on_cpu
from vq_megatron.integration.distributed import init_parallel, local_device, shutdown_parallel
from vq_megatron.models import ModelConfig, build_gpt_model
from vq_megatron.layers import VQOutputLayer

NUM_MICROBATCHES, MICRO_BATCH_SIZE = 4, 2
RTOL = 1e-5


def model_config(vq_seed: int) -> ModelConfig:
    # V=203 is not divisible by TP; make_vocab_size_divisible_by=8 pads it to 208 at TP=1 and TP=2
    # alike, so the vocab-sharded embedding (which, unlike the VQ layer, cannot load across paddings)
    # reshards from the TP=1 checkpoint.
    return ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=203,
                       make_vocab_size_divisible_by=8, output_layer="vq", hidden_dropout=0.0,
                       attention_dropout=0.0,
                       vq={"codebook_size": 16, "per_token_bias": True, "seed": vq_seed})


def microbatches(cfg: ModelConfig, device):
    """NUM_MICROBATCHES seeded batches, identical on every rank and in every run."""
    gen = torch.Generator().manual_seed(20240607)
    b, s = MICRO_BATCH_SIZE, cfg.seq_length
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), 1).view(1, 1, s, s).to(device)
    out = []
    for _ in range(NUM_MICROBATCHES):
        tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
        labels = torch.randint(0, cfg.vocab_size, (b, s), generator=gen)
        loss_mask = (torch.rand(b, s, generator=gen) > 0.2).float()
        loss_mask[0, 0] = 1.0
        positions = torch.arange(s).unsqueeze(0).expand(b, s).contiguous()
        out.append(dict(tokens=tokens.to(device), labels=labels.to(device), loss_mask=loss_mask.to(device),
                        position_ids=positions.to(device), attention_mask=mask))
    return out


def loss_func(loss_mask, output_tensor):
    """Megatron's legacy 2-tuple contract: the schedule divides the returned loss by num_microbatches."""
    loss = (output_tensor.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    batch = next(data_iterator)  # every stage consumes one microbatch per step; only the ends use it
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def model_sharded_state_dict(model):
    return model.sharded_state_dict()


def run_schedule(model, batches, cfg):
    fb = get_forward_backward_func()
    model.zero_grad(set_to_none=True)
    with cuda_factories_on_cpu():
        store = fb(forward_step_func=forward_step, data_iterator=iter(batches), model=[model],
                   num_microbatches=NUM_MICROBATCHES, seq_length=cfg.seq_length,
                   micro_batch_size=MICRO_BATCH_SIZE, forward_only=False)
    return fb.__name__, [float(d["lm loss"]) for d in store]


def global_name(model, name: str) -> str:
    """decoder.layers.<local i>.… -> decoder.layers.<global i>.… (layer_number is global, 1-based)."""
    parts = name.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
    return ".".join(parts)


def full_tensor(t: torch.Tensor, param) -> torch.Tensor:
    """Gather a TP-sharded tensor along its partition dim; check a replicated one is identical."""
    group, T = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    if T == 1:
        return t.detach().cpu()
    copies = [torch.empty_like(t) for _ in range(T)]
    dist.all_gather(copies, t.detach().contiguous(), group=group)
    if getattr(param, "tensor_model_parallel", False):
        return torch.cat(copies, dim=param.partition_dim).cpu()
    for other in copies:
        if not torch.equal(other, copies[0]):
            raise AssertionError("replicated tensor differs across TP ranks")
    return copies[0].cpu()


def where() -> str:
    return (f"[rank {dist.get_rank()} pp {ps.get_pipeline_model_parallel_rank()}/"
            f"{ps.get_pipeline_model_parallel_world_size()} tp {ps.get_tensor_model_parallel_rank()}/"
            f"{ps.get_tensor_model_parallel_world_size()}]")


def assert_close(actual, expected, what):
    expected = expected.to(actual.dtype)
    if actual.shape != expected.shape:
        raise AssertionError(f"{where()} {what}: shape {tuple(actual.shape)} != reference "
                             f"{tuple(expected.shape)}")
    atol = RTOL * max(float(expected.abs().max()), 1e-12)
    if not torch.allclose(actual, expected, rtol=RTOL, atol=atol):
        diff = float((actual - expected).abs().max())
        raise AssertionError(f"{where()} {what} mismatch: max abs diff {diff:.3e} "
                             f"(reference max {float(expected.abs().max()):.3e})")
    return float((actual - expected).abs().max())


def save(out_dir: Path):
    if int(os.environ["WORLD_SIZE"]) != 1:
        raise SystemExit("the reference ('save') runs in one process (PP=1, TP=1)")
    init_parallel(tensor_parallel=1, pipeline_parallel=1, seed=1234)
    device = local_device()
    cfg = model_config(vq_seed=5)
    model = build_gpt_model(cfg, tensor_parallel=1, pipeline_parallel=1)
    assert isinstance(model.output_layer, VQOutputLayer)
    gen = torch.Generator().manual_seed(77)
    with torch.no_grad():  # off the init: layernorm weights != 1, biases != 0, VQ bias != 0
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
    ckpt = out_dir / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model_sharded_state_dict(model), str(ckpt))

    batches = microbatches(cfg, device)
    schedule, losses = run_schedule(model, batches, cfg)
    assert schedule == "forward_backward_no_pipelining", schedule
    # The schedule's loss is the model's: recompute microbatch 0 directly.
    with torch.no_grad():
        direct = loss_func(batches[0]["loss_mask"], forward_step(iter(batches), model)[0])[0]
    assert abs(float(direct) - losses[0]) <= 1e-6 * abs(losses[0]), (float(direct), losses[0])
    grads = {name: p.grad.detach().cpu().clone() for name, p in model.named_parameters()}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    torch.save({"losses": losses, "grads": grads, "codebook": model.output_layer.codebook.detach().cpu(),
                "map": model.output_layer.global_token_to_code.cpu()}, out_dir / "reference.pt")
    print(f"pp_checks: saved PP=1 reference, {len(grads)} parameters, losses "
          + " ".join(f"{x:.7f}" for x in losses))
    shutdown_parallel()


def check(out_dir: Path, tp: int, pp: int):
    if int(os.environ["WORLD_SIZE"]) != tp * pp:
        raise SystemExit(f"'check' needs TP·PP = {tp * pp} processes (DP=1)")
    init_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=4321)  # not the reference's seed
    device = local_device()
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    cfg = model_config(vq_seed=99)  # another map and codebook: the checkpoint must restore them
    # No sequence parallelism: megatron-core's local layer spec without Apex uses torch LayerNorm,
    # which asserts `not config.sequence_parallel` (torch_norm.py), so a full GPT cannot use SP here.
    model = build_gpt_model(cfg, tensor_parallel=tp, pipeline_parallel=pp, pre_process=first,
                            post_process=last)

    # The VQ head lives only on the last stage, the embedding only on the first.
    vq_layers = [m for m in model.modules() if isinstance(m, VQOutputLayer)]
    assert model.pre_process == first and model.post_process == last, where()
    if last:
        assert isinstance(getattr(model, "output_layer", None), VQOutputLayer) and len(vq_layers) == 1, \
            f"{where()} last stage must hold exactly one VQOutputLayer"
    else:
        assert getattr(model, "output_layer", None) is None and not vq_layers, \
            f"{where()} a non-last stage must not build an output layer"
    assert hasattr(model, "embedding") == first, f"{where()} embedding must exist exactly on the first stage"

    ref = torch.load(out_dir / "reference.pt")
    if last:  # other seeds, another codebook and map: the load below is what makes them equal
        assert not torch.equal(model.output_layer.codebook.detach().cpu(), ref["codebook"])
        assert not torch.equal(model.output_layer.global_token_to_code.cpu(), ref["map"])
    sharded = model_sharded_state_dict(model)
    loaded = dist_checkpointing.load(sharded, str(out_dir / "ckpt"))
    model.load_state_dict(loaded)

    names = {global_name(model, n): p for n, p in model.named_parameters()}
    # Every reference parameter sits on exactly one stage (per TP rank); nothing extra exists.
    per_stage = [None] * pp
    dist.all_gather_object(per_stage, sorted(names), group=ps.get_pipeline_model_parallel_group())
    seen = [n for stage in per_stage for n in stage]
    assert len(seen) == len(set(seen)), f"{where()} a parameter is on two stages"
    assert set(seen) == set(ref["grads"]), (f"{where()} stage parameters != reference: missing "
                                            f"{sorted(set(ref['grads']) - set(seen))}, extra "
                                            f"{sorted(set(seen) - set(ref['grads']))}")

    batches = microbatches(cfg, device)
    # Both of megatron's p2p paths: batch_isend_irecv (default batch_p2p_comm=True) and per-op
    # isend/irecv (_p2p_ops, which for a 2-stage pipeline sends one direction over the WORLD group).
    report = []
    for batch_p2p in (True, False):
        model.config.batch_p2p_comm = batch_p2p
        mode = "batched" if batch_p2p else "unbatched"
        schedule, losses = run_schedule(model, batches, cfg)
        assert schedule == "forward_backward_pipelining_without_interleaving", schedule
        if last:
            assert len(losses) == NUM_MICROBATCHES, f"{where()} got {len(losses)} losses"
            assert_close(torch.tensor(losses, dtype=torch.float64),
                         torch.tensor(ref["losses"], dtype=torch.float64), f"{mode} p2p: schedule loss vs PP=1")
        else:
            assert losses == [], f"{where()} a non-last stage returned losses {losses}"
        worst = 0.0
        for name, p in sorted(names.items()):
            assert p.grad is not None, f"{where()} {mode} p2p: {name} got no gradient"
            grad = full_tensor(p.grad, p)
            worst = max(worst, assert_close(grad, ref["grads"][name], f"{mode} p2p: grad of {name}"))
        must_be_nonzero = (["output_layer.codebook", "output_layer.bias"] if last else []) + (
            ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight"] if first else [])
        for name in must_be_nonzero:
            assert float(names[name].grad.abs().sum()) > 0, f"{where()} {name} has a zero gradient"
        report.append(f"{mode} p2p max abs diff {worst:.2e}")
    if last:  # restored from the checkpoint, on every TP rank
        assert torch.equal(model.output_layer.codebook.detach().cpu(), ref["codebook"]), where()
        assert torch.equal(model.output_layer.global_token_to_code.cpu(), ref["map"]), where()

    tag = "+".join(["first"] * first + ["last"] * last) or "middle"
    print(f"pp_checks: {where()} {tag} stage: {len(names)} parameter grads match PP=1 ({', '.join(report)})"
          + (f", losses {' '.join(f'{x:.7f}' for x in losses)}" if last else ""), flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        print(f"pp_checks: PP={pp} TP={tp} matches PP=1 (loss and all gradients incl. VQ "
              f"output layer, batched and unbatched p2p)")
    shutdown_parallel()


def main():
    mode, out_dir = sys.argv[1], Path(sys.argv[2])
    if mode == "save":
        save(out_dir)
    elif mode == "check":
        check(out_dir, tp=int(sys.argv[3]), pp=int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
