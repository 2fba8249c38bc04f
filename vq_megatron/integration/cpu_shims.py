"""CPU shims for megatron-core, applied only on machines without a GPU.

megatron-core 0.19 hard-codes CUDA in a few places that a CPU/gloo run reaches: ~40 allocations on `torch.cuda.current_device()`, CUDA RNG state
tracking for tensor-parallel seeding, `torch.cuda.synchronize()` in dist_checkpointing, and the default
causal mask built on "cuda". With a GPU none of this is touched. The patches are process-wide while in
force; remove_cpu_shims() (or leaving a `with cpu_shims():` block) puts the original objects back.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CPURNGStatesTracker", "apply_cpu_shims", "remove_cpu_shims", "cpu_shims", "model_parallel_seed",
           "cpu_shims_active", "cuda_factories_on_cpu"]

# (owner, attribute, original object) of every patch in force, in the order applied.
_ORIGINALS: list[tuple[object, str, object]] = []


class CPURNGStatesTracker:
    """Drop-in for megatron's CudaRNGStatesTracker that forks the CPU generator instead."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.states_, self.seeds_, self._is_initialized = {}, set(), False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


def cpu_shims_active() -> bool:
    return bool(_ORIGINALS)


def _causal_mask(sq):
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def _patches() -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for every CUDA-only call site we reach."""
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    return [(torch.cuda, "current_device", lambda: torch.device("cpu")),
            (torch.cuda, "synchronize", lambda *args, **kwargs: None),
            (transformer_utils, "get_default_causal_mask", _causal_mask),
            (fused_softmax, "get_default_causal_mask", _causal_mask)]


def apply_cpu_shims() -> bool:
    """Patch megatron's CUDA-only call sites when there is no GPU. Idempotent; returns whether applied."""
    if torch.cuda.is_available():
        return False
    if not _ORIGINALS:
        for owner, name, replacement in _patches():
            _ORIGINALS.append((owner, name, getattr(owner, name)))
            setattr(owner, name, replacement)
    return True


def remove_cpu_shims() -> None:
    """Restore exactly the objects apply_cpu_shims() replaced. Idempotent."""
    while _ORIGINALS:
        owner, name, original = _ORIGINALS.pop()
        setattr(owner, name, original)


@contextlib.contextmanager
def cpu_shims():
    """The shims for the duration of a block (a no-op with a GPU); restored on exit unless they were
    already applied before the block."""
    owned = not cpu_shims_active() and apply_cpu_shims()
    try:
        yield
    finally:
        if owned:
            remove_cpu_shims()


def model_parallel_seed(seed: int) -> None:
    """megatron's model_parallel_cuda_manual_seed on GPU; the same RNG streams on CPU."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    torch.manual_seed(seed)
    tracker = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME,
                seed + 1024 + 100 * ps.get_expert_model_parallel_rank() + ps.get_expert_tensor_parallel_rank())


class _CudaFactoryToCPU(TorchFunctionMode):
    """Rewrites an explicit device='cuda' keyword of any torch call to 'cpu'; nothing else is touched.

    megatron-core 0.19.2's pipeline schedules allocate their token counter with a literal
    `torch.zeros([], dtype=torch.int, device="cuda")` (forward_backward_no_pipelining and
    forward_backward_pipelining_without_interleaving), which apply_cpu_shims() cannot reach.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_factories_on_cpu():
    """Context for running megatron's pipeline schedules without a GPU (a no-op with one)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaFactoryToCPU():
        yield
