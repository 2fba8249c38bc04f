"""The model side of the Megatron-LM adapter: :func:`model_provider` and what it reads besides the config.

:func:`vq_vocab_size_from_args` resolves the real vocabulary V, :func:`load_vq_init_tensors` reads the
init files, :func:`transformer_config_from_args` and the layer spec follow Megatron-LM's gpt_builder.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import warnings

import torch

from vq_megatron.integration.megatron_lm.args import OUTPUT_LAYER_TYPES, flagged_error, vq_config_from_args
from vq_megatron.integration.tensor_files import load_tensor_file

__all__ = ["vq_vocab_size_from_args", "load_vq_init_tensors", "transformer_config_from_args", "model_provider"]

logger = logging.getLogger(__name__)


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
    --vocab-size, then padded_vocab_size (with a warning). See the package docstring."""
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
    kwargs.setdefault("cuda_graph_modules", [])   # megatron's default "full" warns that it is deprecated
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


def _use_transformer_engine(args) -> bool:
    use_te = getattr(args, "transformer_impl", "local") == "transformer_engine"
    if use_te and not _have_te():
        warnings.warn("--transformer-impl transformer_engine but Transformer Engine is not installed: "
                      "using megatron-core's local layer spec", stacklevel=4)
        use_te = False
    return use_te


def _mtp_block_spec(args, config, layer_spec, vp_stage):
    """Megatron-LM gpt_builder's MTP block (--mtp-num-layers); with a VQ head every depth's loss is the
    collapsed one (vq_megatron/models/mtp.py)."""
    if not getattr(args, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    return get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=_use_transformer_engine(args),
                                  vp_stage=vp_stage)


def _layer_spec(args, config, vp_stage):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec, get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec,
    )

    if getattr(args, "spec", None) is not None:
        from megatron.core.transformer.spec_utils import import_module

        return import_module(args.spec)
    use_te = _use_transformer_engine(args)
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
    layer_spec = _layer_spec(args, config, vp_stage)
    kwargs = dict(
        config=config, transformer_layer_spec=layer_spec, vocab_size=padded,
        mtp_block_spec=_mtp_block_spec(args, config, layer_spec, vp_stage),
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
        raise flagged_error(error) from error
