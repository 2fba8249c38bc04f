"""Use a trained run: load its checkpoint at any TP size, generate text, evaluate perplexity."""
