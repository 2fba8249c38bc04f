"""Data preparation: C4/WikiText reader -> tokenizer -> Megatron ``.bin/.idx`` dataset.

The writer and CLI import torch and megatron-core, so they load on first use.
"""

from .c4_reader import DataError, DocumentReader, read_documents
from .tokenizers import GPT2BPETokenizer, SentencePieceTokenizer, load_gpt2, load_sentencepiece, train_sentencepiece

__all__ = [
    "DataError",
    "DocumentReader",
    "read_documents",
    "GPT2BPETokenizer",
    "SentencePieceTokenizer",
    "load_gpt2",
    "load_sentencepiece",
    "train_sentencepiece",
    "write_indexed_dataset",
]

# The CLI entry point is vq_megatron.data.prepare.prepare (not re-exported: the
# submodule attribute would shadow a function of the same name).
_LAZY = {"write_indexed_dataset": "indexed_writer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
