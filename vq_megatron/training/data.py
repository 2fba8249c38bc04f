"""Batches for training (megatron-core GPTDataset) and sequential windows for evaluation.

Sample order is a pure function of (step, data-parallel rank, micro-batch), so resuming at step t reads
exactly the batches an uninterrupted run would, and every TP rank of a DP replica sees the same batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vq_megatron.checks import check_token_ids

__all__ = ["Batch", "build_train_dataset", "train_batch", "eval_windows", "check_token_range",
           "causal_mask", "read_meta", "token_windows", "corpus_token_counts", "check_vocab_consistency"]


@dataclass
class Batch:
    tokens: torch.Tensor        # [b, s] int64
    labels: torch.Tensor        # [b, s] int64
    loss_mask: torch.Tensor     # [b, s] float
    position_ids: torch.Tensor  # [b, s] int64

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.tokens, self.labels, self.loss_mask, self.position_ids)))


def causal_mask(seq_length: int, device) -> torch.Tensor:
    """Megatron's boolean attention mask: True = masked (future positions)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), 1).view(
        1, 1, seq_length, seq_length)


def _check_prefix(prefix: str) -> None:
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise FileNotFoundError(f"indexed dataset file {prefix + suffix} is missing; build it with "
                                    f"vq-megatron-prepare-data (see launch/prepare_c4.sh)")


def build_train_dataset(prefix: str, *, seq_length: int, num_samples: int, seed: int, vocab_size: int,
                        cache_dir: str = ""):
    """megatron-core GPTDataset over one indexed prefix; rank 0 builds the sample index cache first."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    _check_prefix(prefix)
    cache = cache_dir or str(Path(prefix).parent / "index_cache")
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="100,0,0",
        tokenizer=NullTokenizer(vocab_size=vocab_size), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=cache)

    def build():
        return BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True, config).build()[0]

    if dist.is_initialized():
        # Rank 0 writes the index cache; the others then read it instead of racing to write it.
        dataset = build() if dist.get_rank() == 0 else None
        dist.barrier()
        return dataset if dataset is not None else build()
    return build()


def train_batch(dataset, *, step: int, dp_rank: int, micro: int, micro_batch_size: int,
                data_parallel: int, grad_accumulation: int) -> Batch:
    """The micro-batch that (step, dp_rank, micro) reads: a contiguous, deterministic slice of samples."""
    global_batch = micro_batch_size * data_parallel * grad_accumulation
    first = step * global_batch + (micro * data_parallel + dp_rank) * micro_batch_size
    samples = [dataset[(first + i) % len(dataset)] for i in range(micro_batch_size)]

    def stack(key, dtype):
        return torch.stack([torch.as_tensor(np.asarray(s[key])) for s in samples]).to(dtype)

    return Batch(stack("tokens", torch.int64), stack("labels", torch.int64),
                 stack("loss_mask", torch.float32), stack("position_ids", torch.int64))


def check_token_range(batch: Batch, vocab_size: int) -> None:
    """Token ids >= V (a tokenizer/model mismatch) would index out of the embedding: stop clearly."""
    # One check of both: the batch is still on the CPU, and one range read costs less than two.
    check_token_ids(torch.stack((batch.tokens, batch.labels)), vocab_size, name="training data tokens and labels",
                    hint=f"the data was built with another tokenizer than model.vocab_size={vocab_size} assumes")


def token_windows(stream: torch.Tensor, seq_length: int, what: str) -> torch.Tensor:
    """A token stream cut into [n, seq_length + 1] windows (consecutive windows overlap by one token, so
    every token but the first is predicted exactly once)."""
    n = (len(stream) - 1) // seq_length
    if n < 1:
        raise ValueError(f"{what} has {len(stream)} tokens, fewer than one window of {seq_length + 1}")
    return stream[torch.arange(n).unsqueeze(1) * seq_length + torch.arange(seq_length + 1)]


def eval_windows(prefix: str, seq_length: int, max_tokens: int = 0) -> torch.Tensor:
    """All documents of an indexed dataset concatenated and cut into [n, seq_length + 1] windows."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _check_prefix(prefix)
    data = IndexedDataset(prefix)
    stream = np.concatenate([np.asarray(data[i], dtype=np.int64) for i in range(len(data))])
    if max_tokens:
        stream = stream[: max_tokens + 1]
    return token_windows(torch.from_numpy(stream), seq_length, f"eval set {prefix}")


def read_meta(prefix: str) -> dict:
    """Optional sidecar `<prefix>.meta.json` (e.g. {"words": ...} for word-level perplexity)."""
    path = Path(prefix + ".meta.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def corpus_token_counts(prefix: str, vocab_size: int, chunk: int = 1 << 24) -> torch.Tensor:
    """Occurrences of every token id in an indexed dataset's .bin (for frequency maps / unigram bias)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _check_prefix(prefix)
    tokens = np.memmap(prefix + ".bin", dtype=IndexedDataset(prefix).index.dtype, mode="r")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk], dtype=np.int64)
        if part.size and part.max() >= vocab_size:
            raise ValueError(f"{prefix}.bin has token id {int(part.max())} >= model.vocab_size={vocab_size}: "
                             f"the data was built with another tokenizer")
        counts += np.bincount(part, minlength=vocab_size)
    return torch.from_numpy(counts)


def check_vocab_consistency(model_vocab: int, prefixes: list[str], tokenizer_model: str = "") -> None:
    """Tokenizer, data and model must agree on the vocabulary size: a mismatch trains a silently wrong
    model (or indexes out of the embedding), so stop with a message naming both sizes."""
    if tokenizer_model:
        if not Path(tokenizer_model).is_file():
            raise FileNotFoundError(f"data.tokenizer_model {tokenizer_model} does not exist")
        import sentencepiece

        size = sentencepiece.SentencePieceProcessor(model_file=tokenizer_model).get_piece_size()
        if size != model_vocab:
            raise ValueError(f"tokenizer {tokenizer_model} has {size} pieces but model.vocab_size={model_vocab}")
    for prefix in prefixes:
        size = read_meta(prefix).get("vocab_size")
        if size is not None and size != model_vocab:
            raise ValueError(f"{prefix} was tokenized with a {size}-token vocabulary (see {prefix}.meta.json) "
                             f"but model.vocab_size={model_vocab}")
