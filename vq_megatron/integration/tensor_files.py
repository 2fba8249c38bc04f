"""Load a tensor handed over in a file (token counts, embedding rows for k-means initialisation)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_tensor_file"]


def load_tensor_file(path: str, what: str) -> torch.Tensor:
    """A .npy array, or a .pt/.pth tensor (or a dict holding exactly one tensor). `what` names the
    option in error messages."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        import numpy as np

        return torch.from_numpy(np.load(path, allow_pickle=False))
    if suffix in (".pt", ".pth"):
        value = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(value, dict):
            tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
            if len(tensors) != 1:
                raise ValueError(f"{what} {path}: expected a tensor or a dict holding exactly one tensor, "
                                 f"got keys {sorted(map(str, value))}")
            value = next(iter(tensors.values()))
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{what} {path}: expected a tensor, got {type(value).__name__}")
        return value
    raise ValueError(f"{what} {path}: unsupported file type {suffix!r} (use .npy or .pt)")
