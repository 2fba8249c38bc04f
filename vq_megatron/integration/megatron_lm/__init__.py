"""Use the VQ-Logits output layer from a Megatron-LM checkout.

Megatron-LM's ``pretrain_gpt.py`` ends with ``pretrain(train_valid_test_datasets_provider, model_provider,
ModelType.encoder_or_decoder, forward_step, extra_args_provider=...)``. This package gives the two hooks
that call needs:

- :func:`add_vq_args` is an ``extra_args_provider``. It adds the argument group "VQ-Logits output layer"
  with ``--output-layer-type {dense,vq}`` (default ``dense``, so a stock run is unchanged) and the
  ``--vq-*`` options. The options of the VQ head are one table, :data:`VQ_CONFIG_FLAGS` (module ``args``):
  a row per VQLogitsConfig field, from which the flags, :func:`vq_config_from_args` and its errors
  (they name flags, never fields) are derived.
- :func:`model_provider` (module ``provider``) builds the model from Megatron-LM's global ``args``. With
  ``--output-layer-type dense`` it builds a megatron-core ``GPTModel``; with ``vq`` it builds a
  :class:`~vq_megatron.models.VQGPTModel`. With labels, VQGPTModel returns the per-token
  loss ``[b, s]``, just as GPTModel does, so ``forward_step`` and ``loss_func`` stay unchanged.

Usage in a Megatron-LM checkout. Save this as ``pretrain_gpt_vq.py`` next to ``pretrain_gpt.py``::

    import pretrain_gpt  # Megatron-LM's own script: its datasets provider and forward_step
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    from vq_megatron.integration.megatron_lm import add_vq_args, model_provider

    if __name__ == "__main__":
        pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
        pretrain(pretrain_gpt.train_valid_test_datasets_provider, model_provider,
                 ModelType.encoder_or_decoder, pretrain_gpt.forward_step,
                 args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
                 extra_args_provider=add_vq_args)

Then launch it the same way as ``pretrain_gpt.py``, and add for example::

    --output-layer-type vq --untie-embeddings-and-output-weights --vq-codebook-size 2048 \\
    --vq-map-init frequency --vq-token-counts /data/token_counts.npy

and ``--vq-refine-rank 8`` for the two-level head: a context-dependent refinement of rank 8 inside each
code (0, the default, is VQ-Logits as in the paper).

If the script already has an ``extra_args_provider``, chain both:
``extra_args_provider=lambda parser: add_vq_args(their_provider(parser))``.
:func:`model_provider` takes the same keyword arguments that Megatron-LM's ``get_model`` passes
(``pre_process``, ``post_process``, ``vp_stage``, ``config``, ``pg_collection``). Outside Megatron-LM (for
tests or notebooks), pass ``args=`` an ``argparse.Namespace``; megatron-core's parallel state must
already be set up.

Vocabulary sizes: the embedding and the logit axis use ``args.padded_vocab_size``. Megatron-LM sets it
after it pads the tokenizer's vocabulary to a multiple of make_vocab_size_divisible_by · TP. The VQ map
needs the real vocabulary V, because padding slots must not take probability mass from real tokens. It
is resolved by :func:`vq_vocab_size_from_args` in this order:

1. ``--vq-vocab-size``, if given;
2. the ``vocab_size`` of Megatron-LM's global tokenizer, if one is built. This is the authoritative
   size: depending on the Megatron-LM version, ``--vocab-size`` may or may not count the EOD token;
3. ``--vocab-size`` (``args.vocab_size``), if set;
4. ``args.padded_vocab_size``, with a warning. Padding slots then get codes, and so some probability
   mass.

Scope: this provider covers the options that Megatron-LM's own ``gpt_builder`` uses for a plain GPT:
local or Transformer Engine layer specs, ``--spec``, MoE (``--num-experts``), learned or RoPE
positions, and tied or untied embeddings. It raises a ValueError for legacy models, multi-token
prediction, heterogeneous layers, experimental attention variants and --yaml-cfg, instead of building
a different model without saying so.
"""

from vq_megatron.integration.megatron_lm.args import (
    OUTPUT_LAYER_TYPES, UNEXPOSED_FIELDS, VQ_CONFIG_FLAGS, add_vq_args, vq_config_from_args,
)
from vq_megatron.integration.megatron_lm.provider import (
    load_vq_init_tensors, model_provider, transformer_config_from_args, vq_vocab_size_from_args,
)

__all__ = ["add_vq_args", "vq_config_from_args", "vq_vocab_size_from_args", "load_vq_init_tensors",
           "transformer_config_from_args", "model_provider", "OUTPUT_LAYER_TYPES", "VQ_CONFIG_FLAGS",
           "UNEXPOSED_FIELDS"]
