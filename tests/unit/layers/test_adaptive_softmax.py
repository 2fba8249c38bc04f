"""The adaptive-softmax head (the classic peer of the VQ head)."""

import pytest
import torch
import torch.nn.functional as F

from vq_megatron.layers.adaptive_softmax import AdaptiveSoftmaxHead, default_cutoffs, frequency_rank


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
