"""Checkpoint manifests on fake checkpoints: what verify/resolve/load accept, and how they refuse damage."""

import json

import pytest
import torch

from vq_megatron.files import atomic_write_text
from vq_megatron.integration.checkpoint import (LATEST, MANIFEST, CheckpointError, _write_manifest, complete_tags,
                                                latest_complete_tag, load_model_shards, resolve_checkpoint,
                                                verify_checkpoint)

OFFER_4 = "resume from it with --set training.resume_tag=step_00000004"


def _tag(step):
    return f"step_{step:08d}"


def _step_dir(run, step, ranks=(0,)):
    """What DeepSpeed and save_checkpoint leave in a step directory, without the manifest."""
    tag_dir = run / _tag(step)
    tag_dir.mkdir(parents=True)
    for rank in ranks:
        torch.save({"module": {"weight": torch.full((2,), float(rank))}}, tag_dir / f"mp_rank_{rank:02d}_model_states.pt")
    (tag_dir / "rng_rank00000.pt").write_bytes(b"rng state of rank 0")
    return tag_dir


def _publish(run, step, ranks=(0,)):
    """A complete checkpoint, published as save_checkpoint does on rank 0."""
    tag_dir = _step_dir(run, step, ranks)
    _write_manifest(tag_dir)
    atomic_write_text(run / LATEST, tag_dir.name)
    return tag_dir


@pytest.fixture
def run(tmp_path):
    _publish(tmp_path, 4)
    _publish(tmp_path, 8)
    return tmp_path


def _refusal(call, *args):
    with pytest.raises(CheckpointError) as info:
        call(*args)
    return str(info.value)


def test_resolve_a_run_dir_a_run_dir_and_tag_or_a_step_dir(run):
    assert complete_tags(run) == [_tag(4), _tag(8)] and latest_complete_tag(run) == _tag(8)
    assert resolve_checkpoint(run) == run / _tag(8)
    assert resolve_checkpoint(run, _tag(4)) == run / _tag(4)
    assert resolve_checkpoint(run / _tag(4)) == run / _tag(4)


def test_a_step_dir_without_manifest_is_not_complete(run):
    _step_dir(run, 12)                      # a save killed before rank 0 wrote the manifest
    assert complete_tags(run) == [_tag(4), _tag(8)] and latest_complete_tag(run) == _tag(8)
    message = _refusal(resolve_checkpoint, run / _tag(12))
    assert f"checkpoint {run / _tag(12)} is incomplete" in message
    assert "resume from it with --set training.resume_tag=step_00000008" in message


def test_no_checkpoint_and_an_unknown_tag(run, tmp_path_factory):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path_factory.mktemp("empty"))
    message = _refusal(resolve_checkpoint, run, _tag(6))
    assert f"checkpoint {run / _tag(6)} does not exist" in message and OFFER_4 in message


def _truncate(path):
    path.write_bytes(path.read_bytes()[:10])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF            # same size: only the checksum can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (_truncate, "(truncated?)"),
    (_flip_a_byte, "does not match its SHA-256 checksum (corrupted)"),
    (lambda path: path.unlink(), "is missing"),
])
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "rng_rank00000.pt"])
def test_a_damaged_file_is_named_and_the_previous_checkpoint_offered(run, damage, problem, name):
    victim = run / _tag(8) / name
    damage(victim)
    message = _refusal(resolve_checkpoint, run)
    assert f"checkpoint file {victim} " in message and problem in message and OFFER_4 in message


def test_damage_in_the_oldest_checkpoint_offers_nothing_older(run):
    _truncate(run / _tag(4) / "rng_rank00000.pt")
    message = _refusal(verify_checkpoint, run, _tag(4))
    assert "(truncated?)" in message and "no older complete checkpoint exists" in message


@pytest.mark.parametrize("text", [
    '{"mp_rank_00_model_states.pt": {"bytes": 12',          # cut off mid-write
    b"\xff\xfe not text",                                   # not UTF-8
    '["mp_rank_00_model_states.pt"]',                       # JSON, but not a mapping
    '{"mp_rank_00_model_states.pt": {"bytes": "12"}}',      # a mapping with a malformed entry
])
def test_a_corrupt_manifest_is_named_and_the_previous_checkpoint_offered(run, text):
    manifest = run / _tag(8) / MANIFEST
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = _refusal(resolve_checkpoint, run)
    assert f"checkpoint manifest {manifest} is not" in message and OFFER_4 in message


def test_latest_complete_naming_a_tag_without_manifest_offers_the_previous_one(run):
    (run / _tag(8) / MANIFEST).unlink()
    message = _refusal(latest_complete_tag, run)
    assert f"{run / LATEST} names {_tag(8)}" in message and OFFER_4 in message


def test_model_shards_come_in_tp_rank_order(tmp_path):
    _publish(tmp_path, 4, ranks=(2, 0, 1))
    shards = load_model_shards(tmp_path)
    assert [float(shard["weight"][0]) for shard in shards] == [0.0, 1.0, 2.0]


def test_a_gap_in_shard_numbers_is_refused(run):
    _publish(run, 12, ranks=(0, 2))
    message = _refusal(load_model_shards, run)
    assert f"{run / _tag(12)}: model-parallel files [0, 2] are not 0..1" in message
    assert "resume from it with --set training.resume_tag=step_00000008" in message


def test_a_shard_without_module_state_is_refused(run):
    tag_dir = _step_dir(run, 12)
    torch.save({"optimizer": {}}, tag_dir / "mp_rank_00_model_states.pt")
    _write_manifest(tag_dir)
    message = _refusal(load_model_shards, tag_dir)
    assert "mp_rank_00_model_states.pt: no 'module' state dict" in message


def test_manifest_lists_size_and_checksum_of_every_file(run):
    entries = json.loads((run / _tag(8) / MANIFEST).read_text())
    assert sorted(entries) == ["mp_rank_00_model_states.pt", "rng_rank00000.pt"]
    assert entries["rng_rank00000.pt"]["bytes"] == len(b"rng state of rank 0")
    verify_checkpoint(run, _tag(8))


# ------------------------------------------------------------------ loading runs no code from a checkpoint
class _RunsCode:
    """What a malicious checkpoint pickles: unpickling it calls a function of the attacker's choice."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_naming_the_file(tmp_path):
    from vq_megatron.integration.checkpoint import load_model_shards, safe_load

    run = tmp_path / "run"
    tag = run / "step_00000001"
    tag.mkdir(parents=True)
    evil = tag / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "payload": _RunsCode()}, evil)
    _write_manifest(tag)
    (run / "latest_complete").write_text("step_00000001")
    with pytest.raises(CheckpointError, match=r"refusing to load .*mp_rank_00_model_states\.pt.*could run code"):
        load_model_shards(run)
    with pytest.raises(CheckpointError, match="refusing to load"):
        safe_load(evil)


def test_what_our_checkpoints_contain_still_loads(tmp_path):
    """Tensors, plain containers, torch.Size, RNG states and the DeepSpeed classes of TRUSTED_GLOBALS."""
    from collections import OrderedDict

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from vq_megatron.integration.checkpoint import safe_load

    state = {"module": OrderedDict(w=torch.ones(3)), "param_shapes": [OrderedDict(w=torch.Size([3]))],
             "rng": torch.get_rng_state(), "ds_version": "0.19.8", "sparse_tensor_module_names": set(),
             "zero_stage": ZeroStageEnum.optimizer_states, "loss_scaler": LossScaler(1.0),
             "param_slice_mappings": [OrderedDict(w=fragment_address(numel=3, start=0))]}
    path = tmp_path / "ok.pt"
    torch.save(state, path)
    loaded = safe_load(path)
    assert torch.equal(loaded["module"]["w"], torch.ones(3)) and loaded["zero_stage"] == ZeroStageEnum.optimizer_states
    assert loaded["param_slice_mappings"][0]["w"].numel == 3


def test_pipeline_stages_are_merged_into_one_model_per_tp_rank(tmp_path):
    """A PP=2 × TP=2 checkpoint (mp_rank = stage · TP + TP rank): each TP rank's two stages become one state
    dict whose stage-local layer numbers are global again."""
    from vq_megatron.files import atomic_write_json
    from vq_megatron.integration.checkpoint import LAYOUT

    tag_dir = tmp_path / _tag(3)
    tag_dir.mkdir()
    for stage in (0, 1):
        for tp_rank in (0, 1):
            local = {f"decoder.layers.{i}.mlp.weight": torch.tensor([10.0 * stage + i, tp_rank]) for i in (0, 1)}
            local.update({"embedding.word_embeddings.weight": torch.tensor([tp_rank])} if stage == 0 else
                         {"output_layer.codebook": torch.tensor([tp_rank]),
                          "decoder.final_layernorm.weight": torch.ones(1)})
            torch.save({"module": local}, tag_dir / f"mp_rank_{2 * stage + tp_rank:02d}_model_states.pt")
    atomic_write_json(tag_dir / LAYOUT, {"tensor_parallel": 2, "pipeline_parallel": 2, "data_parallel": 1})
    _write_manifest(tag_dir)
    atomic_write_text(tmp_path / LATEST, tag_dir.name)

    shards = load_model_shards(tmp_path)
    assert len(shards) == 2
    for tp_rank, state in enumerate(shards):
        assert sorted(k for k in state if k.startswith("decoder.layers")) == [
            f"decoder.layers.{i}.mlp.weight" for i in range(4)]
        for i, (stage, local) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert state[f"decoder.layers.{i}.mlp.weight"].tolist() == [10.0 * stage + local, tp_rank]
        assert state["output_layer.codebook"].item() == tp_rank == state["embedding.word_embeddings.weight"].item()


def test_merging_refuses_a_parameter_on_two_stages():
    from vq_megatron.integration.checkpoint import merge_pipeline_stages

    with pytest.raises(ValueError, match="pipeline stages both hold embedding.weight"):
        merge_pipeline_stages([{"embedding.weight": 1}, {"embedding.weight": 2}])


def test_deepspeed_model_parallel_rank_is_unique_per_stage_and_tp_rank():
    from types import SimpleNamespace

    from vq_megatron.integration.deepspeed_mpu import MegatronMPU, split_model_parallel_file_rank

    seen = set()
    for stage in range(3):
        for tp_rank in range(2):
            ps = SimpleNamespace(get_pipeline_model_parallel_rank=lambda s=stage: s,
                                 get_tensor_model_parallel_rank=lambda t=tp_rank: t,
                                 get_tensor_model_parallel_world_size=lambda: 2,
                                 get_pipeline_model_parallel_world_size=lambda: 3)
            mpu = MegatronMPU(ps)
            rank = mpu.get_model_parallel_rank()
            assert split_model_parallel_file_rank(rank, 2) == (stage, tp_rank)
            assert mpu.get_tensor_model_parallel_rank() == tp_rank   # ZeRO's norm filter reads this one
            assert mpu.get_model_parallel_world_size() == 6
            seen.add(rank)
    assert seen == set(range(6))
