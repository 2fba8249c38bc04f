"""Vocabulary sharding metadata and the single-rank fast paths of the TP mappings."""

import torch

from vq_megatron.config import VQLogitsConfig
from vq_megatron.layers import VQOutputLayer
from vq_megatron.parallel import (combine_over_tensor_parallel_region, is_vocab_sharded, mark_vocab_sharded,
                                  padded_vocab_size, vocab_pad_value)


def test_padded_vocab_size_is_megatrons_rule():
    assert padded_vocab_size(8000, 128, 1) == 8064
    assert padded_vocab_size(8000, 128, 2) == 8192
    assert padded_vocab_size(300, 128, 2) == 512


def test_tags_survive_retagging_and_module_conversion():
    t = mark_vocab_sharded(torch.zeros(4, dtype=torch.int64), pad_value=-1)
    assert is_vocab_sharded(t) and vocab_pad_value(t) == -1 and t.partition_dim == 0
    mark_vocab_sharded(t, pad_value=-1)                       # megatron's setter would refuse a second tag
    layer = VQOutputLayer(VQLogitsConfig(vocab_size=50, hidden_size=4, codebook_size=5, per_token_bias=True,
                                         refine_rank=2), padded_vocab_size=64)
    layer = layer.to(torch.float64)                            # Module._apply replaces buffers
    assert is_vocab_sharded(layer.token_to_code) and vocab_pad_value(layer.token_to_code) == -1
    assert is_vocab_sharded(layer.bias) and vocab_pad_value(layer.bias) == 0
    assert is_vocab_sharded(layer.refine_weight)
    assert not layer.codebook.tensor_model_parallel and not layer.refine_proj.tensor_model_parallel


def test_combine_is_the_identity_on_one_rank():
    a, b = torch.randn(3), torch.randn(2, 2)
    out = combine_over_tensor_parallel_region([(a, "logsumexp"), (b, "sum")], None)
    assert out[0] is a and out[1] is b
    assert combine_over_tensor_parallel_region([], None) == []
