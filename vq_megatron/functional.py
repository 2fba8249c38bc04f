"""Functional entry points of VQ-Logits (single process; tensor parallelism lives in `layers`).

    logits = vq_logits(hidden, codebook, token_to_code, bias=None)                      # [..., V]
    loss = vq_cross_entropy(hidden, codebook, token_to_code, labels, bias=None,
                            ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean")

`vq_cross_entropy` equals F.cross_entropy(vq_logits(...), labels, ...) (+ z_loss·lse²) in value and
gradient, but runs through the exact collapse in O(N·K + V) and never builds the N×V logits.
"""

from __future__ import annotations

import torch

from vq_megatron.ops import code_counts, code_log_mass, code_logits, collapsed_cross_entropy
from vq_megatron.ops import gather_target, scatter_code_logits
from vq_megatron.ops.collapsed_cross_entropy import accumulation_dtype

__all__ = ["vq_logits", "vq_cross_entropy", "check_vq_inputs", "reduce_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def check_vq_inputs(hidden, codebook, token_to_code, bias=None) -> None:
    """Raise ValueError on shapes/dtypes that would otherwise give a silent wrong answer."""
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be [K, d], got shape {tuple(codebook.shape)}")
    if hidden.shape[-1] != codebook.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != codebook dim {codebook.shape[1]}")
    if token_to_code.dim() != 1 or token_to_code.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_to_code must be a 1-D integer tensor, got {token_to_code.dtype} "
                         f"shape {tuple(token_to_code.shape)}")
    if bias is not None and bias.shape != token_to_code.shape:
        raise ValueError(f"bias shape {tuple(bias.shape)} != token_to_code shape {tuple(token_to_code.shape)}")


def _check_map_range(token_to_code: torch.Tensor, num_codes: int) -> None:
    lo, hi = int(token_to_code.min()), int(token_to_code.max())
    if lo < 0 or hi >= num_codes:
        raise ValueError(f"token_to_code has codes in [{lo}, {hi}], outside [0, {num_codes})")


def _check_labels(labels: torch.Tensor, valid: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    real = labels[valid]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= vocab_size):
        raise ValueError(f"labels must be in [0, {vocab_size}) or ignore_index={ignore_index}; "
                         f"got values in [{int(real.min())}, {int(real.max())}]")


def vq_logits(hidden, codebook, token_to_code, bias=None) -> torch.Tensor:
    """Materialised vocabulary logits l_v = (h·Cᵀ)_{M(v)} + b_v, shape [..., V]."""
    check_vq_inputs(hidden, codebook, token_to_code, bias)
    return scatter_code_logits(code_logits(hidden, codebook), token_to_code.long(), bias)


def reduce_loss(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch semantics: 'mean' divides by the number of non-ignored targets."""
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum()


def vq_cross_entropy(hidden, codebook, token_to_code, labels, bias=None, ignore_index: int = -100,
                     label_smoothing: float = 0.0, z_loss: float = 0.0, reduction: str = "mean",
                     validate: bool = True) -> torch.Tensor:
    """Cross-entropy of the VQ softmax through the exact O(N·K) collapse.

    hidden [..., d], codebook [K, d], token_to_code [V] (ints in [0, K)), labels [...] int64,
    bias [V] or None. Returns a scalar ('mean'/'sum') or per-token loss shaped like labels ('none').
    `validate` checks map and label ranges (one device sync); turn it off in hot loops with trusted data.
    """
    check_vq_inputs(hidden, codebook, token_to_code, bias)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} != hidden leading shape {tuple(hidden.shape[:-1])}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    num_codes, vocab_size = codebook.shape[0], token_to_code.shape[0]
    token_to_code = token_to_code.long()
    labels_flat = labels.reshape(-1).long()
    valid = labels_flat != ignore_index
    if validate:
        _check_map_range(token_to_code, num_codes)
        _check_labels(labels_flat, valid, vocab_size, ignore_index)

    target_code, target_bias = gather_target(token_to_code, labels_flat, valid, bias)
    counts = code_counts(token_to_code, num_codes)
    per_token = collapsed_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), codebook,
        log_mass=code_log_mass(token_to_code, num_codes, bias, counts=counts),
        counts=counts,
        target_code=target_code, valid=valid, vocab_size=vocab_size,
        target_bias=target_bias, bias_sum=None if bias is None else bias.sum(dtype=accumulation_dtype(bias.dtype)),
        label_smoothing=label_smoothing, z_loss=z_loss,
    )
    out = reduce_loss(per_token, valid, reduction)
    return out.view(labels.shape) if reduction == "none" else out
