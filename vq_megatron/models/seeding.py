"""Layout-independent initialisation: one seed builds the same weights at every pipeline layout.

megatron draws every initial weight from one RNG stream, in build order. A pipeline stage builds only its
own layers, so at PP=2 the second stage's first layer draws what layer 0 draws at PP=1 and the last stage's
output layer draws what the embedding draws: the two runs start from different models. With a seed, every
transformer layer and the embedding draw from a stream of their own, derived from (seed, component, global
layer number), and every RNG is restored after each; so a stage builds exactly the weights a PP=1 build
gives the same layers, and the output layer draws from an untouched default stream in every layout. (Across TP the CPU build is invariant already: megatron
initialises the full master weight and keeps its shard. On GPUs megatron draws TP shards from per-rank
streams, which stay per-rank here: PP-invariant, not TP-invariant.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib

import torch

__all__ = ["component_seed", "seeded_init", "seeded_layer_spec", "seeded_embedding"]


def component_seed(seed: int, component: str, index: int = 0) -> int:
    """A seed for one component, independent of build order (62 bits: megatron adds offsets to it)."""
    digest = hashlib.sha256(f"{seed}/{component}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@contextlib.contextmanager
def seeded_init(seed: int):
    """Weights built inside the block draw from `seed`'s stream; every RNG is restored afterwards (the CPU
    and CUDA default generators, and on GPUs megatron's tracked model-parallel streams)."""
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda.is_available()
    tracker = mrandom.get_cuda_rng_tracker() if cuda else None
    saved = tracker.get_states() if tracker is not None else None
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []):
        torch.manual_seed(seed)
        if cuda:   # TP-sharded weights are drawn from the tracker on GPUs (use_cpu_initialization=False)
            mrandom.model_parallel_cuda_manual_seed(seed)
        try:
            yield
        finally:
            if saved is not None:
                tracker.set_states(saved)


def _global_layer_number(config, layer_number: int, kwargs: dict) -> int:
    """The number TransformerLayer.__init__ gives itself: the stage builds layers 1..n and adds its
    pipeline offset (as megatron does, via get_transformer_layer_offset)."""
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.core.utils import get_pg_rank

    if kwargs.get("is_mtp_layer") or not kwargs.get("add_layer_offset", True):
        return layer_number
    groups = kwargs.get("pg_collection")
    pp_rank = get_pg_rank(groups.pp) if groups is not None else None
    return layer_number + get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)


@functools.cache
def _seeded_class(cls: type) -> type:
    """cls (a megatron module built with a layer_number) whose weights come from seeded_init."""

    class Seeded(cls):
        def __init__(self, config, *args, init_seed: int, layer_number: int = 1, **kwargs):
            number = _global_layer_number(config, layer_number, kwargs)
            component = "mtp_layer" if kwargs.get("is_mtp_layer") else "layer"   # MTP layers number from 1 too
            with seeded_init(component_seed(init_seed, component, number)):
                super().__init__(config, *args, layer_number=layer_number, **kwargs)

    Seeded.__name__, Seeded.__qualname__ = cls.__name__, cls.__qualname__
    return Seeded


def seeded_layer_spec(spec, seed: int):
    """The transformer-layer spec (a ModuleSpec, or TransformerBlockSubmodules of them) with every layer
    seeded by its global layer number (layer_number counts across pipeline stages)."""
    if hasattr(spec, "layer_specs"):
        return dataclasses.replace(spec, layer_specs=[seeded_layer_spec(s, seed) for s in spec.layer_specs])
    return dataclasses.replace(spec, module=_seeded_class(spec.module), params={**spec.params, "init_seed": seed})


def _seeded_module(cls: type, seed: int) -> type:
    class Seeded(cls):
        def __init__(self, *args, **kwargs):
            with seeded_init(seed):
                super().__init__(*args, **kwargs)

    Seeded.__name__, Seeded.__qualname__ = cls.__name__, cls.__qualname__
    return Seeded


@contextlib.contextmanager
def seeded_embedding(model_module, seed: int):
    """While a model of `model_module` (megatron's gpt_model or hybrid_model module) is built, its embedding
    draws from a stream of its own. With the layers seeded too, nothing advances the default stream during
    the build, so what draws from it (the output layer, built last) draws the same at every layout: on the
    last stage as after a PP=1 build's embedding and layers."""
    real = model_module.LanguageModelEmbedding
    model_module.LanguageModelEmbedding = _seeded_module(real, component_seed(seed, "embedding"))
    try:
        yield
    finally:
        model_module.LanguageModelEmbedding = real
