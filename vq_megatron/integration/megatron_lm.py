"""Use the VQ-Logits output layer from a Megatron-LM checkout.

Megatron-LM's ``pretrain_gpt.py`` ends with ``pretrain(train_valid_test_datasets_provider, model_provider,
ModelType.encoder_or_decoder, forward_step, extra_args_provider=...)``. This module gives the two hooks
that call needs:

- :func:`add_vq_args` is an ``extra_args_provider``. It adds the argument group "VQ-Logits output layer"
  with ``--output-layer-type {dense,vq}`` (default ``dense``, so a stock run is unchanged) and the
  ``--vq-*`` options.
- :func:`model_provider` builds the model from Megatron-LM's global ``args``. With
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

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import warnings

import torch

from vq_megatron.config import BIAS_INITS, CODEBOOK_INITS, MAP_INITS, VQLogitsConfig
from vq_megatron.integration.tensor_files import load_tensor_file

__all__ = ["add_vq_args", "vq_config_from_args", "vq_vocab_size_from_args", "load_vq_init_tensors",
           "transformer_config_from_args", "model_provider", "OUTPUT_LAYER_TYPES"]

logger = logging.getLogger(__name__)

OUTPUT_LAYER_TYPES = ("dense", "vq")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(VQLogitsConfig)
             if f.default is not dataclasses.MISSING}

# VQLogitsConfig field -> the command-line flag that sets it (used to rewrite validation errors).
_FLAG_OF_FIELD = {
    "vocab_size": "--vq-vocab-size (or --vocab-size)",
    "hidden_size": "--hidden-size",
    "codebook_size": "--vq-codebook-size",
    "map_init": "--vq-map-init",
    "codebook_init": "--vq-codebook-init",
    "codebook_init_std": "--vq-codebook-init-std",
    "per_token_bias": "--vq-per-token-bias",
    "seed": "--vq-seed",
    "kmeans_iters": "--vq-kmeans-iters",
    "spherical_kmeans": "--vq-spherical-kmeans",
    "label_smoothing": "--vq-label-smoothing",
    "z_loss": "--vq-z-loss",
}


# ----------------------------------------------------------------------------------------- arguments
def add_vq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the "VQ-Logits output layer" argument group.

    All destinations are ``output_layer_type`` or start with ``vq_``. Megatron-LM's parser has neither,
    so they do not collide with its ``--seed``, ``--vocab-size`` and other options.
    """
    group = parser.add_argument_group(title="VQ-Logits output layer")
    group.add_argument("--output-layer-type", type=str, default="dense", choices=OUTPUT_LAYER_TYPES,
                       help="Output layer of the GPT model: 'dense' is Megatron's ColumnParallelLinear "
                            "(the default, a stock run). 'vq' is VQ-Logits: K shared code vectors and a "
                            "fixed token-to-code map, with the exact collapsed cross-entropy. 'vq' needs "
                            "--untie-embeddings-and-output-weights.")
    group.add_argument("--vq-codebook-size", type=int, default=_DEFAULTS["codebook_size"],
                       help="Number of codes K of the VQ-Logits output layer (1 <= K <= vocabulary size).")
    group.add_argument("--vq-vocab-size", type=int, default=None,
                       help="Real (unpadded) vocabulary size V for the token-to-code map. Default: the "
                            "size of Megatron-LM's tokenizer, else --vocab-size, else the padded size.")
    group.add_argument("--vq-map-init", type=str, default=_DEFAULTS["map_init"], choices=MAP_INITS,
                       help="Token-to-code map: 'random' (balanced random), 'contiguous' (blocks of token "
                            "ids), 'frequency' (frequency-balanced; needs --vq-token-counts), 'kmeans' "
                            "(k-means of embedding rows; needs --vq-init-embeddings).")
    group.add_argument("--vq-codebook-init", type=str, default=_DEFAULTS["codebook_init"],
                       choices=CODEBOOK_INITS,
                       help="Codebook initialisation: 'normal' (N(0, std^2), see --vq-codebook-init-std) "
                            "or 'kmeans' (the k-means centroids; needs --vq-map-init kmeans and "
                            "embeddings of width --hidden-size).")
    group.add_argument("--vq-codebook-init-std", type=float, default=_DEFAULTS["codebook_init_std"],
                       help="Standard deviation of the normal codebook initialisation.")
    group.add_argument("--vq-per-token-bias", action="store_true",
                       help="Learn a bias per vocabulary token on top of its code's logit (adds V "
                            "parameters).")
    group.add_argument("--vq-bias-init", type=str, default=_DEFAULTS["bias_init"], choices=BIAS_INITS,
                       help="Per-token bias initialisation: 'zeros', or 'unigram' (log smoothed corpus "
                            "frequencies; needs --vq-per-token-bias and --vq-token-counts).")
    group.add_argument("--vq-seed", type=int, default=None,
                       help="Seed of the map and codebook initialisation, identical on every rank. "
                            "Default: Megatron-LM's --seed.")
    group.add_argument("--vq-kmeans-iters", type=int, default=_DEFAULTS["kmeans_iters"],
                       help="Lloyd iterations of the k-means map initialisation.")
    group.add_argument("--vq-spherical-kmeans", action="store_true",
                       help="Cluster embedding rows by cosine instead of Euclidean distance.")
    group.add_argument("--vq-label-smoothing", type=float, default=_DEFAULTS["label_smoothing"],
                       help="Label smoothing of the VQ training loss (torch semantics over the real "
                            "vocabulary), in [0, 1).")
    group.add_argument("--vq-z-loss", type=float, default=_DEFAULTS["z_loss"],
                       help="Weight of the z-loss (weight * logsumexp^2) added to the VQ training loss.")
    group.add_argument("--vq-token-counts", type=str, default=None, metavar="PATH",
                       help="A .npy or .pt file with corpus token counts of shape [V], for "
                            "--vq-map-init frequency. Entries past V (padding) are dropped.")
    group.add_argument("--vq-init-embeddings", type=str, default=None, metavar="PATH",
                       help="A .npy or .pt file with embedding rows of shape [V, d], for --vq-map-init "
                            "kmeans (e.g. a trained model's output weight). Rows past V (padding) are "
                            "dropped.")
    return parser


def _arg(args, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def _flagged(error: ValueError) -> ValueError:
    """Rewrite 'VQLogitsConfig.codebook_size=...' into '--vq-codebook-size=...' in a validation error."""
    message = re.sub(r"VQLogitsConfig\.(\w+)", lambda m: _FLAG_OF_FIELD.get(m.group(1), m.group(0)),
                     str(error))
    message = re.sub(r"\b(map_init|codebook_init)='(\w+)'",
                     lambda m: f"{_FLAG_OF_FIELD[m.group(1)]} {m.group(2)}", message)
    return ValueError(message)


def vq_config_from_args(args, vocab_size: int, hidden_size: int) -> VQLogitsConfig:
    """Build a VQLogitsConfig from the parsed ``--vq-*`` flags.

    vocab_size is the real vocabulary V; see :func:`vq_vocab_size_from_args`. Missing attributes take
    VQLogitsConfig's defaults, so a hand-made namespace works too. Errors are ValueErrors that name the
    flags.
    """
    map_init = _arg(args, "vq_map_init", _DEFAULTS["map_init"])
    counts, embeddings = _arg(args, "vq_token_counts"), _arg(args, "vq_init_embeddings")
    bias_init = _arg(args, "vq_bias_init", _DEFAULTS["bias_init"])
    uses_counts = map_init == "frequency" or bias_init == "unigram"
    if uses_counts and counts is None:
        raise ValueError("--vq-map-init frequency / --vq-bias-init unigram need --vq-token-counts PATH "
                         "(a .npy/.pt of [V] counts)")
    if map_init == "kmeans" and embeddings is None:
        raise ValueError("--vq-map-init kmeans needs --vq-init-embeddings PATH (a .npy/.pt of [V, d] rows)")
    if counts is not None and not uses_counts:
        raise ValueError(f"--vq-token-counts is only used by --vq-map-init frequency or --vq-bias-init "
                         f"unigram (got {map_init!r}, {bias_init!r})")
    if embeddings is not None and map_init != "kmeans":
        raise ValueError(f"--vq-init-embeddings is only used by --vq-map-init kmeans (got {map_init!r})")
    try:
        return VQLogitsConfig(
            vocab_size=vocab_size, hidden_size=hidden_size,
            codebook_size=_arg(args, "vq_codebook_size", _DEFAULTS["codebook_size"]),
            map_init=map_init,
            codebook_init=_arg(args, "vq_codebook_init", _DEFAULTS["codebook_init"]),
            codebook_init_std=_arg(args, "vq_codebook_init_std", _DEFAULTS["codebook_init_std"]),
            per_token_bias=bool(_arg(args, "vq_per_token_bias", False)),
            bias_init=bias_init,
            seed=_arg(args, "vq_seed", _arg(args, "seed", _DEFAULTS["seed"])),
            kmeans_iters=_arg(args, "vq_kmeans_iters", _DEFAULTS["kmeans_iters"]),
            spherical_kmeans=bool(_arg(args, "vq_spherical_kmeans", False)),
            label_smoothing=_arg(args, "vq_label_smoothing", _DEFAULTS["label_smoothing"]),
            z_loss=_arg(args, "vq_z_loss", _DEFAULTS["z_loss"]),
        )
    except ValueError as error:
        raise _flagged(error) from error


def _megatron_lm_tokenizer_vocab_size() -> int | None:
    """The vocab_size of Megatron-LM's global tokenizer, if one is built. This never imports Megatron-LM:
    inside a Megatron-LM run it has been imported already."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    tokenizer = getattr(global_vars, "_GLOBAL_TOKENIZER", None)
    try:
        size = getattr(tokenizer, "vocab_size", None)
    except Exception:  # some tokenizers compute it lazily; a failure just means "unknown"
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def vq_vocab_size_from_args(args) -> int:
    """Real vocabulary size for the VQ map: --vq-vocab-size, then Megatron-LM's tokenizer, then
    --vocab-size, then padded_vocab_size (with a warning). See the module docstring."""
    padded = getattr(args, "padded_vocab_size", None)
    for source, size in (("--vq-vocab-size", getattr(args, "vq_vocab_size", None)),
                         ("the Megatron-LM tokenizer", _megatron_lm_tokenizer_vocab_size()),
                         ("--vocab-size", getattr(args, "vocab_size", None))):
        if size is not None:
            if padded is not None and size > padded:
                raise ValueError(f"vocabulary size {size} (from {source}) exceeds padded_vocab_size={padded}")
            return int(size)
    if padded is None:
        raise ValueError("cannot tell the vocabulary size: set --vq-vocab-size or --vocab-size "
                         "(args.padded_vocab_size is not set either)")
    warnings.warn(f"VQ-Logits: real vocabulary size unknown, mapping all padded_vocab_size={padded} slots; "
                  "pass --vq-vocab-size so that padding slots take no probability mass", stacklevel=2)
    return int(padded)


def load_vq_init_tensors(args, vocab_size: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Load (token_counts [V], embeddings [V, d]) from --vq-token-counts / --vq-init-embeddings.

    Rows past vocab_size, such as Megatron's padding in a checkpoint's [V_pad, d] weight, are dropped.
    """
    out = []
    for attr, flag, dims in (("vq_token_counts", "--vq-token-counts", 1),
                             ("vq_init_embeddings", "--vq-init-embeddings", 2)):
        path = getattr(args, attr, None)
        if path is None:
            out.append(None)
            continue
        tensor = load_tensor_file(path, flag)
        if tensor.dim() != dims or tensor.shape[0] < vocab_size:
            raise ValueError(f"{flag} {path}: expected {dims}-D with >= {vocab_size} rows (vocabulary size), "
                             f"got shape {tuple(tensor.shape)}")
        out.append(tensor[:vocab_size].contiguous())
    return out[0], out[1]


# ----------------------------------------------------------------------------------------- model
def _is_full_megatron_lm_namespace(args) -> bool:
    """True for a namespace from Megatron-LM's own parser. Only then is Megatron-LM's
    core_transformer_config_from_args used, because it reads dozens of attributes directly."""
    return all(hasattr(args, name) for name in (
        "multi_latent_attention", "heterogeneous_layers_config_path", "no_persist_layer_norm",
        "overlap_p2p_comm", "swiglu", "cp_comm_type", "rope_type", "decoder_first_pipeline_num_layers"))


def transformer_config_from_args(args):
    """A TransformerConfig from args: Megatron-LM's core_transformer_config_from_args for a full
    Megatron-LM namespace (if importable); otherwise every TransformerConfig field that args has, plus
    Megatron-LM's renames (num_experts, swiglu, group_query_attention, params_dtype -> pipeline_dtype)."""
    from megatron.core.transformer import TransformerConfig

    if _is_full_megatron_lm_namespace(args):
        try:
            from megatron.training.arguments import core_transformer_config_from_args
        except ImportError:
            pass
        else:
            return core_transformer_config_from_args(args)

    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(TransformerConfig)
              if f.init and getattr(args, f.name, None) is not None}
    params_dtype = kwargs.setdefault("params_dtype", torch.float32)
    kwargs.setdefault("pipeline_dtype", params_dtype)
    kwargs.setdefault("bf16", params_dtype == torch.bfloat16)
    kwargs.setdefault("fp16", params_dtype == torch.float16)
    kwargs.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    if getattr(args, "num_experts", None) is not None:
        kwargs["num_moe_experts"] = args.num_experts
    if getattr(args, "swiglu", False):
        kwargs["activation_func"] = torch.nn.functional.silu
        kwargs["gated_linear_unit"] = True
    if not getattr(args, "group_query_attention", False):
        kwargs.pop("num_query_groups", None)
    if kwargs.get("transformer_impl") == "transformer_engine" and not _have_te():
        kwargs["transformer_impl"] = "local"
    if not kwargs.get("sequence_parallel") or kwargs.get("tensor_model_parallel_size", 1) == 1:
        kwargs["sequence_parallel"] = False
    return TransformerConfig(**kwargs)


def _have_te() -> bool:
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except ImportError:
        return False
    return bool(HAVE_TE)


def _layer_spec(args, config, vp_stage):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )

    if getattr(args, "spec", None) is not None:
        from megatron.core.transformer.spec_utils import import_module

        return import_module(args.spec)
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    if use_te and not _have_te():
        warnings.warn("--transformer-impl transformer_engine but Transformer Engine is not installed: "
                      "using megatron-core's local layer spec", stacklevel=3)
        use_te = False
    normalization = getattr(args, "normalization", None)
    if getattr(args, "num_experts", None):
        return get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=normalization,
                                          qk_l2_norm=getattr(args, "qk_l2_norm", False), vp_stage=vp_stage)
    common = (None, getattr(args, "moe_grouped_gemm", False), getattr(args, "qk_layernorm", False),
              getattr(args, "multi_latent_attention", False))
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(*common,
                                                          qk_l2_norm=getattr(args, "qk_l2_norm", False))
    return get_gpt_layer_local_spec(*common, normalization=normalization,
                                    qk_l2_norm=getattr(args, "qk_l2_norm", False))


def _check_supported(args) -> None:
    unsupported = {
        "use_legacy_models": "--use-legacy-models",
        "mtp_num_layers": "--mtp-num-layers",
        "heterogeneous_layers_config_path": "--heterogeneous-layers-config-path",
        "experimental_attention_variant": "--experimental-attention-variant",
        "yaml_cfg": "--yaml-cfg",
    }
    used = [flag for name, flag in unsupported.items() if getattr(args, name, None) not in (None, False, 0)]
    if used:
        raise ValueError(f"vq_megatron's model_provider does not support {', '.join(used)}; use "
                         "Megatron-LM's own gpt_builder for those")


def _global_args():
    try:
        from megatron.training import get_args
    except ImportError as error:
        raise ImportError("model_provider needs Megatron-LM's global args: pass args= or install "
                          "Megatron-LM (megatron.training is not importable)") from error
    try:
        return get_args()
    except AssertionError as error:  # Megatron-LM asserts "args is not initialized."
        raise RuntimeError("Megatron-LM's global args are not initialised (model_provider is called "
                           "inside pretrain()); pass args= to call it directly") from error


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                   config=None, pg_collection=None, *, args=None):
    """Megatron-LM model_provider: a GPTModel (--output-layer-type dense) or a VQGPTModel (vq).

    args defaults to Megatron-LM's ``get_args()``. config (a TransformerConfig) defaults to one built
    from args. The vocabulary is ``args.padded_vocab_size``. ``pre_process``, ``post_process``,
    ``vp_stage`` and ``pg_collection`` are passed on to GPTModel.
    """
    from megatron.core.models.gpt import GPTModel

    from vq_megatron.models import VQGPTModel

    if args is None:
        args = _global_args()
    output_layer = getattr(args, "output_layer_type", "dense")
    if output_layer not in OUTPUT_LAYER_TYPES:
        raise ValueError(f"--output-layer-type {output_layer!r} is not one of {OUTPUT_LAYER_TYPES}")
    _check_supported(args)
    padded = getattr(args, "padded_vocab_size", None)
    if padded is None:
        raise ValueError("args.padded_vocab_size is not set (Megatron-LM sets it when it builds the "
                         "tokenizer; set --padded-vocab-size, or set it on args)")
    tie = not getattr(args, "untie_embeddings_and_output_weights", False)
    if output_layer == "vq" and tie:
        raise ValueError("--output-layer-type vq has no [V, d] output weight to tie to the input embedding: "
                         "pass --untie-embeddings-and-output-weights")
    if config is None:
        config = transformer_config_from_args(args)

    max_seq = getattr(args, "max_position_embeddings", None) or getattr(args, "seq_length", None)
    if max_seq is None:
        raise ValueError("set --max-position-embeddings or --seq-length")
    kwargs = dict(
        config=config, transformer_layer_spec=_layer_spec(args, config, vp_stage), vocab_size=padded,
        max_sequence_length=max_seq, pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=getattr(args, "fp16_lm_cross_entropy", False), parallel_output=True,
        position_embedding_type=getattr(args, "position_embedding_type", "learned_absolute"),
        rotary_percent=getattr(args, "rotary_percent", 1.0), rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=getattr(args, "use_rope_scaling", False), vp_stage=vp_stage, pg_collection=pg_collection)
    if getattr(args, "rope_scaling_factor", None) is not None:
        kwargs["rope_scaling_factor"] = args.rope_scaling_factor

    if output_layer == "dense":
        logger.info("building GPT model with a dense output layer (V=%d)", padded)
        return GPTModel(share_embeddings_and_output_weights=tie, **kwargs)

    vocab_size = vq_vocab_size_from_args(args)
    vq_config = vq_config_from_args(args, vocab_size=vocab_size, hidden_size=config.hidden_size)
    token_counts = embeddings = None
    if post_process:  # only the last pipeline stage holds the output layer
        token_counts, embeddings = load_vq_init_tensors(args, vocab_size)
    logger.info("building GPT model with a VQ-Logits output layer (V=%d, padded %d, K=%d, map %s)",
                vocab_size, padded, vq_config.codebook_size, vq_config.map_init)
    try:
        return VQGPTModel(vq_config=vq_config, token_counts=token_counts, embeddings=embeddings, **kwargs)
    except ValueError as error:
        raise _flagged(error) from error
