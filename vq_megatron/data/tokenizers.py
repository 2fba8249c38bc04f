"""Tokenizers for data preparation: SentencePiece (train or load) and GPT-2 byte-level BPE.

Every tokenizer here has the same small interface -- ``vocab_size``, ``eod_id``,
``encode(text) -> list[int]`` and ``decode(ids) -> str`` -- and can be pickled, so
worker processes can receive it.

The GPT-2 tokenizer is pure Python. Megatron-core 0.19 only offers GPT-2 BPE through
Hugging Face ``transformers`` (not a dependency here), and the reference
pre-tokenizer pattern needs the third-party ``regex`` module for ``\\p{L}``/``\\p{N}``.
Instead the same pattern is built for the stdlib ``re`` with explicit character
classes generated from :mod:`unicodedata`. This matches ``regex`` exactly except
for code points assigned in Unicode versions newer than the Python runtime's
database (Python 3.12: Unicode 15.0), which do not occur in practice.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

import sentencepiece as spm

from ..files import atomic_write_bytes

__all__ = [
    "TextTokenizer",
    "SentencePieceTokenizer",
    "GPT2BPETokenizer",
    "train_sentencepiece",
    "load_sentencepiece",
    "load_gpt2",
    "GPT2_EOD_TOKEN",
]

GPT2_EOD_TOKEN = "<|endoftext|>"


@runtime_checkable
class TextTokenizer(Protocol):
    """What the dataset writer needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eod_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer:
    """A loaded SentencePiece model; the end-of-document id is the model's ``eos`` id."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {self.model_path}")
        self._load(self.model_path.read_bytes())

    def _load(self, model_proto: bytes) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.eos_id() < 0:
            raise ValueError(f"{self.model_path}: model has no eos piece, so no end-of-document id")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod_id(self) -> int:
        return self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    # The C++ processor does not pickle; ship the serialized model instead.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "model_proto": self._sp.serialized_model_proto()}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["model_proto"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def load_sentencepiece(model_path: str | Path) -> SentencePieceTokenizer:
    """Load an existing SentencePiece ``.model`` file."""
    return SentencePieceTokenizer(model_path)


def _truncated(texts: Iterable[str], max_bytes: int, errors: list[BaseException]) -> Iterator[str]:
    # The trainer silently drops sentences longer than max_sentence_length; keep their head.
    try:
        for text in texts:
            if not text.strip():
                continue
            data = text.encode("utf-8")
            yield text if len(data) <= max_bytes else data[:max_bytes].decode("utf-8", "ignore")
    except Exception as err:
        # The C++ trainer turns this into a RuntimeError; keep the original (e.g. DataError).
        errors.append(err)
        raise


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    num_threads: int = 4,
    input_sentence_size: int = 1_000_000,
    max_sentence_length: int = 65536,
    character_coverage: float = 0.9995,
) -> Path:
    """Train a SentencePiece model on documents and write ``<model_prefix>.model`` atomically.

    Each document is one training "sentence" (cut to ``max_sentence_length`` bytes),
    so newlines inside documents are learned too. Settings are deterministic: no
    input shuffling (the first ``input_sentence_size`` documents are used), identity
    normalization (``decode(encode(t)) == t``), byte fallback (no unknown tokens),
    digits split. The result depends on ``num_threads``; keep it fixed for
    reproducible models. Special ids: unk=0, bos=1, eos=2 (the end-of-document id),
    no pad.

    Returns:
        The path of the written model.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    model_path = Path(f"{model_prefix}.model")
    buffer = io.BytesIO()
    input_errors: list[BaseException] = []
    options = dict(
        sentence_iterator=_truncated(texts, max_sentence_length, input_errors),
        model_writer=buffer,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        shuffle_input_sentence=False,
        input_sentence_size=input_sentence_size,
        max_sentence_length=max_sentence_length,
        num_threads=num_threads,
        minloglevel=1,  # INFO output is thousands of lines; keep warnings
    )
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as err:
        if input_errors:
            raise input_errors[0] from None
        raise ValueError(f"SentencePiece training failed: {err}") from err
    if not buffer.getvalue():
        raise RuntimeError("SentencePiece training produced no model (was the input empty?)")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(model_path, buffer.getvalue())
    return model_path


# --------------------------------------------------------------------------- GPT-2 BPE


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _char_class(predicate) -> str:
    """A ``re`` character-class body listing every code point that satisfies predicate."""
    parts, start = [], None
    for cp in range(sys.maxunicode + 2):
        inside = cp <= sys.maxunicode and predicate(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            end = cp - 1
            parts.append(re.escape(chr(start)) if start == end else f"{re.escape(chr(start))}-{re.escape(chr(end))}")
            start = None
    return "".join(parts)


@lru_cache(maxsize=1)
def _gpt2_pattern() -> re.Pattern:
    """GPT-2's pre-tokenizer regex for stdlib ``re`` (about 0.3 s to build, once per process).

    Reference: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
    ``regex``'s ``\\s`` is Unicode White_Space, which unlike ``str.isspace`` excludes U+001C..U+001F.
    """
    letters = _char_class(lambda c: unicodedata.category(c)[0] == "L")
    numbers = _char_class(lambda c: unicodedata.category(c)[0] == "N")
    spaces = _char_class(lambda c: c.isspace() and not "\x1c" <= c <= "\x1f")
    return re.compile(
        rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{spaces}{letters}{numbers}]+"""
        rf"""|[{spaces}]+(?![^{spaces}])|[{spaces}]+"""
    )


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


class GPT2BPETokenizer:
    """GPT-2 byte-level BPE from ``vocab.json`` (optionally ``.gz``) and ``merges.txt``.

    ``<|endoftext|>`` (50256 in GPT-2) is the end-of-document id. As in GPT-2, that
    string inside text is encoded as ordinary characters, never as the special id.
    """

    _CACHE_LIMIT = 200_000  # words; bounds memory on long runs

    def __init__(self, vocab_path: str | Path, merges_path: str | Path):
        self.vocab_path, self.merges_path = Path(vocab_path), Path(merges_path)
        for path in (self.vocab_path, self.merges_path):
            if not path.is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file not found: {path}")
        with _open_text(self.vocab_path) as handle:
            self.encoder: dict[str, int] = json.load(handle)
        with _open_text(self.merges_path) as handle:
            lines = handle.read().split("\n")
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{self.merges_path}: malformed merge rule {' '.join(bad[0])!r}")
        if GPT2_EOD_TOKEN not in self.encoder:
            raise ValueError(f"{self.vocab_path}: vocabulary has no {GPT2_EOD_TOKEN} token")
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._init_derived()

    def _init_derived(self) -> None:
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self._pattern = _gpt2_pattern()
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    @property
    def eod_id(self) -> int:
        return self.encoder[GPT2_EOD_TOKEN]

    def _bpe(self, word: str) -> list[str]:
        """Apply merges to one pre-token (already mapped to byte characters)."""
        parts = list(word)
        ranks = self.bpe_ranks
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._pattern.findall(text):
            cached = cache.get(piece)
            if cached is None:
                word = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                cached = [self.encoder[token] for token in self._bpe(word)]
                if len(cache) >= self._CACHE_LIMIT:
                    cache.clear()
                cache[piece] = cached
            ids.extend(cached)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytes(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    # Derived tables and the compiled pattern are rebuilt rather than pickled.
    def __getstate__(self) -> dict:
        return {
            "vocab_path": self.vocab_path,
            "merges_path": self.merges_path,
            "encoder": self.encoder,
            "bpe_ranks": self.bpe_ranks,
        }

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_derived()

    def __repr__(self) -> str:
        return f"GPT2BPETokenizer({str(self.vocab_path)!r}, {str(self.merges_path)!r})"


def load_gpt2(vocab_path: str | Path, merges_path: str | Path) -> GPT2BPETokenizer:
    """Load GPT-2 BPE from a vocab JSON (plain or ``.gz``) and a merges file."""
    return GPT2BPETokenizer(vocab_path, merges_path)
