"""Two-stage / post-hoc conversion of a dense head: convert_head and init_from."""

import pytest
import torch

from vq_megatron.integration.checkpoint import _write_manifest


def _fake_run(tmp_path, shards):
    run = tmp_path / "dense"
    tag = run / "step_00000010"
    tag.mkdir(parents=True)
    for rank, state in enumerate(shards):
        torch.save({"module": state, "step": 10}, tag / f"mp_rank_{rank:02d}_model_states.pt")
    _write_manifest(tag)                       # as save_checkpoint publishes a finished checkpoint
    (run / "latest_complete").write_text("step_00000010")
    return run


def test_convert_head_concatenates_tp_shards(tmp_path):
    from vq_megatron.strategies import convert_head
    from vq_megatron.strategies.two_stage import dense_output_embeddings

    w0, w1 = torch.randn(6, 4), torch.randn(6, 4)
    run = _fake_run(tmp_path, [{"output_layer.weight": w0, "embedding.word_embeddings.weight": w0 * 0},
                               {"output_layer.weight": w1, "embedding.word_embeddings.weight": w1 * 0}])
    assert torch.equal(dense_output_embeddings(run), torch.cat([w0, w1]))
    out = tmp_path / "emb.pt"
    assert convert_head.main([str(run), "--out", str(out), "--vocab-size", "10", "--codebook-size", "3"]) == 0
    rows = torch.load(out)
    assert torch.equal(rows, torch.cat([w0, w1])[:10])
    assert torch.load(out.with_suffix(".map.pt")).shape == (10,)
    assert torch.load(out.with_suffix(".codebook.pt")).shape == (3, 4)


def test_convert_head_fits_the_residuals_with_a_low_rank_refinement(tmp_path):
    """--refine-rank R: U·P is the best rank-R fit of W - C[M]; at full rank it reconstructs W exactly."""
    from vq_megatron.strategies import convert_head

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 4, generator=g)
    run = _fake_run(tmp_path, [{"output_layer.weight": w, "embedding.word_embeddings.weight": w * 0}])
    errors = []
    for rank in (1, 2, 4):
        out = tmp_path / f"emb{rank}.pt"
        assert convert_head.main([str(run), "--out", str(out), "--codebook-size", "3", "--refine-rank",
                                  str(rank)]) == 0
        full_map, codebook = torch.load(out.with_suffix(".map.pt")), torch.load(out.with_suffix(".codebook.pt"))
        U, P = torch.load(out.with_suffix(".refine_weight.pt")), torch.load(out.with_suffix(".refine_proj.pt"))
        assert U.shape == (12, rank) and P.shape == (rank, 4)
        residual = w - codebook[full_map]
        errors.append(float((residual - U @ P).norm()))
        # Eckart–Young: no rank-R matrix fits the residual better than the truncated SVD
        s = torch.linalg.svdvals(residual)
        assert errors[-1] == pytest.approx(float(s[rank:].norm()), abs=1e-5)
    assert errors[0] >= errors[1] >= errors[2] and errors[2] < 1e-5
    with pytest.raises(SystemExit):
        convert_head.main([str(run), "--out", str(tmp_path / "x.pt"), "--refine-rank", "2"])


def test_convert_head_rejects_a_vq_checkpoint(tmp_path):
    from vq_megatron.strategies.two_stage import dense_output_embeddings

    run = _fake_run(tmp_path, [{"output_layer.codebook": torch.randn(3, 4),
                                "embedding.word_embeddings.weight": torch.randn(6, 4)}])
    with pytest.raises(KeyError, match="not a dense"):
        dense_output_embeddings(run)
    with pytest.raises(FileNotFoundError):
        dense_output_embeddings(tmp_path / "nothing")


def test_load_body_weights_copies_everything_but_the_head(tmp_path):
    from vq_megatron.strategies.two_stage import load_body_weights

    src = torch.nn.ModuleDict({"embedding": torch.nn.Linear(3, 4), "output_layer": torch.nn.Linear(4, 5)})
    dst = torch.nn.ModuleDict({"embedding": torch.nn.Linear(3, 4), "output_layer": torch.nn.Linear(4, 2)})
    run = _fake_run(tmp_path, [src.state_dict()])
    head_before = dst.output_layer.weight.clone()
    load_body_weights(dst, run)
    assert torch.equal(dst.embedding.weight, src.embedding.weight)
    assert torch.equal(dst.output_layer.weight, head_before)
    other = torch.nn.ModuleDict({"embedding": torch.nn.Linear(3, 7)})
    with pytest.raises(ValueError, match="shape"):
        load_body_weights(other, run)
