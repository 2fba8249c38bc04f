"""KV-cached decoding (inference/decoding.py) against decoding that re-reads the whole window every step."""

import json

import pytest
import torch

from vq_megatron.inference.decoding import KVCacheDecoder, generate_batch
from vq_megatron.layers import VQOutputLayer
from vq_megatron.models.hybrid import final_hidden_states


def tiny_model(head: str, backbone: str = "gpt", **vq):
    from vq_megatron.models import ModelConfig, build_gpt_model

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=200,
                      make_vocab_size_divisible_by=8, output_layer=head, backbone=backbone,
                      vq={"codebook_size": 16, "per_token_bias": True, **vq})
    return build_gpt_model(cfg).eval()


def greedy_by_recompute(model, prompts, new_tokens):
    """The reference: every step runs the body over the whole sequence so far, without a cache."""
    ids = prompts
    for _ in range(new_tokens):
        s = ids.shape[1]
        mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool), 1)
        hidden = final_hidden_states(model, ids, torch.arange(s).expand(ids.shape[0], s), mask)[-1]
        if isinstance(model.output_layer, VQOutputLayer):
            token = model.output_layer.sample(hidden, greedy=True)
        else:
            token = model.output_layer(hidden.unsqueeze(0))[0][0, :, :200].argmax(-1)
        ids = torch.cat([ids, token.unsqueeze(1)], 1)
    return ids


@pytest.mark.parametrize("head,vq,backbone", [("dense", {}, "gpt"), ("vq", {}, "gpt"), ("vq", {"refine_rank": 3}, "gpt"),
                                              ("dense", {}, "hybrid"), ("vq", {"refine_rank": 3}, "hybrid")])
def test_cached_greedy_decoding_equals_recomputing_the_window(parallel, head, vq, backbone):
    model = tiny_model(head, backbone, **vq)
    prompts = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cached = generate_batch(model, prompts, max_new_tokens=8, seq_length=16, vocab_size=200, greedy=True)
        reference = greedy_by_recompute(model, prompts, 8)
    assert torch.equal(cached, reference)


def test_cache_hidden_states_equal_the_full_forward(parallel):
    model = tiny_model("vq", refine_rank=2)
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mask = torch.triu(torch.ones(1, 1, 12, 12, dtype=torch.bool), 1)
        full = model(ids, torch.arange(12).expand(2, 12), mask, output_processor=lambda hidden_states, **_: hidden_states)
        decoder = KVCacheDecoder(model, max_batch_size=2, max_sequence_length=16)
        steps = [decoder.prefill(ids[:, :7])] + [decoder.step(ids[:, t]) for t in range(7, 12)]
    torch.testing.assert_close(torch.stack(steps), full[6:], rtol=1e-5, atol=1e-5)
    assert decoder.position == 12


def test_sampling_decodes_past_the_window_and_respects_the_batch_limit(parallel):
    model = tiny_model("vq")
    prompts = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = generate_batch(model, prompts, max_new_tokens=20, seq_length=16, vocab_size=200, top_k=5,
                             generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 30) and torch.equal(out[:, :10], prompts) and bool((out < 200).all())
    with pytest.raises(ValueError, match=r"decode batch of 3 rows exceeds max_batch_size=2 \(--max-batch-size\)"):
        generate_batch(model, torch.zeros(3, 4, dtype=torch.int64), max_new_tokens=1, seq_length=16,
                       vocab_size=200, max_batch_size=2)


def test_the_runs_own_gpt2_tokenizer_is_found_from_the_data_meta(tmp_path):
    from types import SimpleNamespace

    from vq_megatron.data.tokenizers import GPT2BPETokenizer
    from vq_megatron.inference.loading import load_tokenizer

    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab.write_text(json.dumps({"a": 0, "b": 1, "ab": 2, "<|endoftext|>": 3}))
    merges.write_text("#version: 0.2\na b\n")
    prefix = tmp_path / "train"
    (tmp_path / "train.meta.json").write_text(json.dumps({"tokenizer": "gpt2", "tokenizer_files": [str(vocab),
                                                                                                  str(merges)]}))
    cfg = SimpleNamespace(data=SimpleNamespace(tokenizer_model="", train_prefix=str(prefix)))
    assert isinstance(load_tokenizer(cfg), GPT2BPETokenizer)
    (tmp_path / "train.meta.json").write_text(json.dumps({"tokenizer": "gpt2", "tokenizer_files": ["/nope", "/no"]}))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer(cfg)
