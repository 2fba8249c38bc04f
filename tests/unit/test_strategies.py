"""Adaptive softmax head, two-stage head conversion and in-training re-clustering (issue 6)."""


import pytest
import torch
import torch.nn.functional as F

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import VQOutputLayer
from vq_megatron.layers.adaptive_softmax import AdaptiveSoftmaxHead, default_cutoffs, frequency_rank


# ------------------------------------------------------------------ adaptive softmax head
def test_frequency_rank_orders_by_count_and_breaks_ties_by_id():
    counts = torch.tensor([5, 50, 5, 0, 7])
    assert frequency_rank(counts, 5).tolist() == [2, 0, 3, 4, 1]
    assert frequency_rank(None, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="shape"):
        frequency_rank(counts, 6)


def test_adaptive_head_loss_is_the_nll_of_its_log_probabilities():
    torch.manual_seed(0)
    V, d = 50, 8
    counts = torch.randint(0, 100, (V,))
    head = AdaptiveSoftmaxHead(d, V, padded_vocab_size=64, cutoffs=[10, 30], token_counts=counts)
    h = torch.randn(6, 2, d)
    y = torch.randint(0, V, (6, 2))
    logp, _ = head(h)
    assert logp.shape == (6, 2, 64)
    assert torch.isinf(logp[..., V:]).all()                    # padding slots never predicted
    assert torch.allclose(torch.logsumexp(logp, -1), torch.zeros(6, 2), atol=1e-5)   # normalised over V
    nll = head.loss(h, y)
    assert torch.allclose(nll, -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(F.cross_entropy(logp.reshape(-1, 64), y.reshape(-1)), nll.mean(), atol=1e-5)


def test_adaptive_head_puts_frequent_tokens_in_the_head_cluster():
    V, d = 40, 4
    counts = torch.zeros(V, dtype=torch.int64)
    counts[35:] = 1000                                          # the 5 most frequent ids are the largest
    head = AdaptiveSoftmaxHead(d, V, cutoffs=[5, 20], token_counts=counts)
    assert sorted(head.rank_of_token[35:].tolist()) == [0, 1, 2, 3, 4]
    assert head.asm.head.weight.shape[0] == 5 + 2               # shortlist + 2 cluster logits


def test_adaptive_head_ignores_masked_labels_and_checks_range():
    head = AdaptiveSoftmaxHead(4, 20, cutoffs=[5])
    h = torch.randn(3, 4)
    loss = head.loss(h, torch.tensor([1, -100, 19]))
    assert loss[1] == 0 and loss[0] > 0 and loss[2] > 0
    with pytest.raises(ValueError, match="labels must be token ids in \\[0, 20\\)"):
        head.loss(h, torch.tensor([1, 2, 20]))
    with pytest.raises(ValueError, match="cutoffs"):
        AdaptiveSoftmaxHead(4, 20, cutoffs=[25])
    assert default_cutoffs(8000) == [1000, 4000]


def _model_cfg(**kw):
    from vq_megatron.models import ModelConfig

    base = dict(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=100,
                make_vocab_size_divisible_by=8)
    base.update(kw)
    return ModelConfig(**base)


def test_adaptive_gpt_model_loss_matches_its_logits(parallel):
    from vq_megatron.models import build_gpt_model
    from vq_megatron.models import AdaptiveGPTModel

    torch.manual_seed(0)
    model = build_gpt_model(_model_cfg(output_layer="adaptive", adaptive_cutoffs=[20, 60]),
                            token_counts=torch.randint(0, 50, (100,)))
    assert isinstance(model, AdaptiveGPTModel) and isinstance(model.output_layer, AdaptiveSoftmaxHead)
    tokens = torch.randint(0, 100, (2, 8))
    labels = torch.randint(0, 100, (2, 8))
    pos = torch.arange(8).expand(2, 8)
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), 1)
    loss = model(tokens, pos, mask, labels=labels)
    assert loss.shape == (2, 8)
    logits = model(tokens, pos, mask)                       # [b, s, V_pad] log-probabilities
    ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
    assert torch.allclose(loss.reshape(-1), ref, atol=1e-4)
    loss.mean().backward()
    assert model.output_layer.asm.head.weight.grad is not None


def test_adaptive_refuses_tensor_parallel_and_tying():
    from vq_megatron.models import build_gpt_model

    with pytest.raises(ValueError, match="tie_embeddings"):
        _model_cfg(output_layer="adaptive", tie_embeddings=True)
    with pytest.raises(ValueError, match="tensor_parallel=1 only"):
        build_gpt_model(_model_cfg(output_layer="adaptive"), tensor_parallel=2)


# ------------------------------------------------------------------ two-stage conversion
from vq_megatron.integration.checkpoint import _write_manifest  # noqa: E402
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


# ------------------------------------------------------------------ re-clustering
class _TinyVQModel(torch.nn.Module):
    def __init__(self, vocab, padded, d, codes):
        super().__init__()
        self.embedding = torch.nn.Module()
        self.embedding.word_embeddings = torch.nn.Embedding(padded, d)
        self.output_layer = VQOutputLayer(VQLogitsConfig(vocab_size=vocab, hidden_size=d, codebook_size=codes,
                                                         kmeans_iters=20), padded_vocab_size=padded)


def test_recluster_groups_tokens_with_close_input_embeddings():
    from vq_megatron.strategies.recluster import recluster_from_input_embeddings

    torch.manual_seed(0)
    V, d, K = 60, 8, 4
    model = _TinyVQModel(V, 64, d, K)
    centres = torch.randn(K, d) * 10
    truth = torch.arange(V) % K
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:V] = centres[truth] + 0.01 * torch.randn(V, d)
    moved = recluster_from_input_embeddings(model, method="kmeans", reinit_codebook=True)
    assert 0 < moved <= 1
    new = model.output_layer.global_token_to_code
    # same partition as the truth (code ids may be permuted)
    for k in range(K):
        assert new[truth == k].unique().numel() == 1
    assert model.output_layer.code_counts.tolist() == torch.bincount(new, minlength=K).tolist()
    assert torch.equal(model.output_layer.token_to_code[:V], new)
    assert (model.output_layer.token_to_code[V:] == -1).all()
    # codebook re-initialised from the centroids
    assert torch.allclose(model.output_layer.codebook[new[0]], centres[truth[0]], atol=0.1)
    assert recluster_from_input_embeddings(model, method="kmeans") == 0.0    # stable afterwards


def test_recluster_config_validation():
    with pytest.raises(ValueError, match="recluster_interval"):
        VQLogitsConfig(vocab_size=10, hidden_size=4, codebook_size=2, recluster_interval=-1)
    with pytest.raises(ValueError, match="recluster_method"):
        VQLogitsConfig(vocab_size=10, hidden_size=4, codebook_size=2, recluster_method="pca")


def test_trainer_recluster_hook_fires_on_interval_only():
    from types import SimpleNamespace

    from vq_megatron.training.trainer import _maybe_recluster

    model = _TinyVQModel(60, 64, 8, 4)
    model.output_layer.config.recluster_interval = 5
    before = model.output_layer.global_token_to_code.clone()
    with torch.no_grad():
        model.embedding.word_embeddings.weight[:60] = torch.randn(4, 8)[torch.arange(60) % 4] * 10
    cfg = SimpleNamespace(training=SimpleNamespace(steps=20))
    _maybe_recluster(model, cfg, 3)
    assert torch.equal(model.output_layer.global_token_to_code, before)
    _maybe_recluster(model, cfg, 20)                          # never after the last step
    assert torch.equal(model.output_layer.global_token_to_code, before)
    _maybe_recluster(model, cfg, 10)
    assert not torch.equal(model.output_layer.global_token_to_code, before)
