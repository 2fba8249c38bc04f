"""The one home of the input checks every layer of vq_megatron shares (pure torch, imports nothing of ours).

Each check turns an input that would otherwise index out of range or give a silent wrong answer into a
ValueError that names the tensor, the expected range and what was found. Range checks read two scalars
back from the device: callers in hot loops offer `validate=False` for trusted data.
"""

from __future__ import annotations

import torch

__all__ = ["check_token_ids", "check_map", "check_vq_shapes", "check_refine_shapes", "check_loss_options",
           "check_sampling_args", "check_reduction",
           "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")


def _value_range(values: torch.Tensor) -> tuple[int, int]:
    return int(values.min()), int(values.max())


def check_token_ids(ids: torch.Tensor, vocab_size: int, *, name: str = "labels", ignore_index: int | None = None,
                    hint: str = "") -> None:
    """Every entry of `ids` (other than ignore_index) is a token id in [0, vocab_size)."""
    real = ids if ignore_index is None else ids[ids != ignore_index]
    if not real.numel():
        return
    lo, hi = _value_range(real)
    if lo < 0 or hi >= vocab_size:
        allowed = "" if ignore_index is None else f" or ignore_index={ignore_index}"
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}){allowed}; got values in [{lo}, {hi}]"
                         + (f": {hint}" if hint else ""))


def _check_map_layout(token_to_code: torch.Tensor, suffix: str = "") -> None:
    if token_to_code.dim() != 1 or token_to_code.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_to_code must be a 1-D integer tensor, got {token_to_code.dtype} "
                         f"shape {tuple(token_to_code.shape)}{suffix}")


def check_map(token_to_code: torch.Tensor, num_codes: int, *, vocab_size: int | None = None,
              context: str = "") -> None:
    """A token→code map: 1-D integers of length vocab_size (when given), every entry a code in [0, K).

    Negative entries (padded vocabulary slots) are internal to the tensor-parallel layer and rejected here.
    """
    suffix = f" ({context})" if context else ""
    _check_map_layout(token_to_code, suffix)
    if vocab_size is not None and token_to_code.shape[0] != vocab_size:
        raise ValueError(f"token_to_code must have shape [{vocab_size}] (vocab_size), got "
                         f"{tuple(token_to_code.shape)}{suffix}")
    if token_to_code.numel():
        lo, hi = _value_range(token_to_code)
        if lo < 0 or hi >= num_codes:
            raise ValueError(f"token_to_code has codes in [{lo}, {hi}], outside [0, {num_codes}){suffix}")


def check_vq_shapes(hidden: torch.Tensor, codebook: torch.Tensor, token_to_code: torch.Tensor,
                    bias: torch.Tensor | None = None) -> None:
    """Shapes and dtypes of the VQ head's tensors agree (cheap: no device sync)."""
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [K, d], got shape {tuple(codebook.shape)}")
    if hidden.shape[-1] != codebook.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != codebook dim {codebook.shape[1]}")
    _check_map_layout(token_to_code)
    if bias is not None and bias.shape != token_to_code.shape:
        raise ValueError(f"bias shape {tuple(bias.shape)} != token_to_code shape {tuple(token_to_code.shape)}")


def check_refine_shapes(hidden: torch.Tensor, vocab_size: int, refine_weight: torch.Tensor | None,
                        refine_proj: torch.Tensor | None) -> None:
    """The within-code refinement: both or neither of U [V, r] and P [r, d], with matching r."""
    if (refine_weight is None) != (refine_proj is None):
        raise ValueError("refine_weight [V, r] and refine_proj [r, d] are given together or not at all")
    if refine_weight is None:
        return
    if refine_weight.dim() != 2 or refine_weight.shape[0] != vocab_size:
        raise ValueError(f"refine_weight must be [V={vocab_size}, r], got shape {tuple(refine_weight.shape)}")
    if refine_proj.dim() != 2 or refine_proj.shape != (refine_weight.shape[1], hidden.shape[-1]):
        raise ValueError(f"refine_proj must be [r={refine_weight.shape[1]}, d={hidden.shape[-1]}], got shape "
                         f"{tuple(refine_proj.shape)}")


def check_loss_options(label_smoothing: float, z_loss: float, refine_rank: int = 0, *, prefix: str = "") -> None:
    """Label smoothing in [0, 1), z-loss >= 0; smoothing is not defined cheaply for the two-level head.

    Smoothing needs the mean log-probability over all V tokens, and with a within-code refinement that
    needs every code's normaliser L_k(g) for every token: O(N·V·r), the cost the collapse avoids.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{prefix}label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"{prefix}z_loss must be >= 0, got {z_loss}")
    if label_smoothing > 0 and refine_rank > 0:
        raise ValueError(f"{prefix}label_smoothing={label_smoothing} cannot be combined with a within-code "
                         f"refinement (refine_rank={refine_rank}): it would need every code's within-code "
                         "normaliser for every token, O(N·V·r); use label_smoothing=0 or refine_rank=0")


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """temperature finite and >= 0 (0 = greedy); top_k an integer >= 0 (0 = off); top_p in [0, 1] (1 = off)."""
    if not (temperature >= 0.0) or temperature == float("inf"):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not (0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be in [0, 1] (1 = off), got {top_p}")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
