"""Training driver: YAML config -> megatron-core GPT (dense or VQ head) -> DeepSpeed -> C4."""
