"""Glue to megatron-core and DeepSpeed: process groups, CPU shims, model factory."""
