"""The "VQ-Logits output layer" arguments of Megatron-LM, driven by one table.

:data:`VQ_CONFIG_FLAGS` maps each VQLogitsConfig field that a command-line user sets to its flag. The
argument group (:func:`add_vq_args`), the config (:func:`vq_config_from_args`) and the rewriting of
validation errors to name flags instead of fields (:func:`flagged_error`) are all derived from it, so a
new VQLogitsConfig field takes one row here, or an entry in :data:`UNEXPOSED_FIELDS` saying why
Megatron-LM does not get it.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass

from vq_megatron.config import (BIAS_INITS, CODEBOOK_INITS, MAP_INITS, REFINE_INITS, TENSOR_PARALLEL_LOSSES,
                                VQLogitsConfig)

__all__ = ["VQFlag", "VQ_CONFIG_FLAGS", "UNEXPOSED_FIELDS", "OUTPUT_LAYER_TYPES", "add_vq_args",
           "vq_config_from_args", "flagged_error"]

OUTPUT_LAYER_TYPES = ("dense", "vq")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(VQLogitsConfig)
             if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class VQFlag:
    """The flag of one VQLogitsConfig field. It defaults to the field's default and takes a value of that
    default's type; a bool field is a switch (store_true).

    fallback: a Megatron-LM argument whose value is the default instead (--vq-seed falls back to --seed).
    """

    flag: str
    help: str
    choices: tuple[str, ...] | None = None
    fallback: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")  # argparse's own rule


VQ_CONFIG_FLAGS: dict[str, VQFlag] = {
    "codebook_size": VQFlag(
        "--vq-codebook-size",
        "Number of codes K of the VQ-Logits output layer (1 <= K <= vocabulary size)."),
    "map_init": VQFlag(
        "--vq-map-init",
        "Token-to-code map: 'random' (balanced random), 'contiguous' (blocks of token ids), 'frequency' "
        "(frequency-balanced; needs --vq-token-counts), 'kmeans' (k-means of embedding rows; needs "
        "--vq-init-embeddings).", choices=MAP_INITS),
    "codebook_init": VQFlag(
        "--vq-codebook-init",
        "Codebook initialisation: 'normal' (N(0, std^2), see --vq-codebook-init-std) or 'kmeans' (the "
        "k-means centroids; needs --vq-map-init kmeans and embeddings of width --hidden-size).",
        choices=CODEBOOK_INITS),
    "codebook_init_std": VQFlag(
        "--vq-codebook-init-std", "Standard deviation of the normal codebook initialisation."),
    "per_token_bias": VQFlag(
        "--vq-per-token-bias",
        "Learn a bias per vocabulary token on top of its code's logit (adds V parameters)."),
    "bias_init": VQFlag(
        "--vq-bias-init",
        "Per-token bias initialisation: 'zeros', or 'unigram' (log smoothed corpus frequencies; needs "
        "--vq-per-token-bias and --vq-token-counts).", choices=BIAS_INITS),
    "seed": VQFlag(
        "--vq-seed",
        "Seed of the map and codebook initialisation, identical on every rank. Default: Megatron-LM's "
        "--seed.", fallback="seed"),
    "kmeans_iters": VQFlag(
        "--vq-kmeans-iters", "Lloyd iterations of the k-means map initialisation."),
    "spherical_kmeans": VQFlag(
        "--vq-spherical-kmeans", "Cluster embedding rows by cosine instead of Euclidean distance."),
    "label_smoothing": VQFlag(
        "--vq-label-smoothing",
        "Label smoothing of the VQ training loss (torch semantics over the real vocabulary), in [0, 1). "
        "Not with --vq-refine-rank > 0."),
    "z_loss": VQFlag(
        "--vq-z-loss", "Weight of the z-loss (weight * logsumexp^2) added to the VQ training loss."),
    "refine_rank": VQFlag(
        "--vq-refine-rank",
        "Rank r of the within-code refinement, which makes the head two-level: a token's logit is its "
        "code's logit plus u_v . P h, with U [V, r] and P [r, d] learned. 0 (the default) is VQ-Logits as "
        "in the paper: within a code the distribution is fixed. r > 0 makes it depend on the context, for "
        "V*r + r*d more parameters; the loss stays exact and never builds [tokens, V] logits."),
    "refine_init": VQFlag(
        "--vq-refine-init",
        "Initialisation of the refinement (with --vq-refine-rank > 0): 'zeros' (U = 0, so training starts "
        "exactly as VQ-Logits) or 'svd' (the best rank-r fit of the k-means residuals of the embedding "
        "rows, to convert a trained dense head; needs --vq-map-init kmeans and --vq-codebook-init "
        "kmeans).", choices=REFINE_INITS),
    "refine_init_std": VQFlag(
        "--vq-refine-init-std",
        "Standard deviation of the normal initialisation of P with --vq-refine-init zeros (U starts at "
        "0, so P sets the scale of the features P h that U's first updates see)."),
    "tensor_parallel_loss": VQFlag(
        "--vq-tensor-parallel-loss",
        "How the VQ training loss uses tensor parallelism: 'split' (each TP rank computes the loss of 1/TP "
        "of the tokens; the work shrinks with TP) or 'replicated' (every TP rank computes every token).",
        choices=TENSOR_PARALLEL_LOSSES),
}

_RECLUSTER = ("re-clustering during training needs a hook in the training loop, which only vq_megatron's own "
              "training driver has (Megatron-LM's pretrain() has none)")
# The VQLogitsConfig fields without a row, and why.
UNEXPOSED_FIELDS: dict[str, str] = {
    "vocab_size": "the real vocabulary V, resolved by vq_vocab_size_from_args (--vq-vocab-size, else "
                  "Megatron-LM's tokenizer, else --vocab-size)",
    "hidden_size": "Megatron-LM's own --hidden-size",
    "recluster_interval": _RECLUSTER,
    "recluster_method": _RECLUSTER,
    "recluster_reinit_codebook": _RECLUSTER,
}
# What an error names instead of a field: its flag, or for the fields without a row the flag that sets
# them. V may come from the tokenizer or --vocab-size instead, so "vocab_size=500" reads "the vocabulary
# size 500". A switch is named without its value ("per_token_bias=true" reads "--vq-per-token-bias").
_FLAG_OF_FIELD = {"vocab_size": "the vocabulary size (--vq-vocab-size)", "hidden_size": "--hidden-size",
                  **{field: row.flag for field, row in VQ_CONFIG_FLAGS.items()}}
_WITH_VALUE = {"vocab_size": "the vocabulary size {}"}
_SWITCHES = {field for field in VQ_CONFIG_FLAGS if isinstance(_DEFAULTS[field], bool)}


def add_vq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: add the "VQ-Logits output layer" argument group.

    All destinations are ``output_layer_type`` or start with ``vq_``. Megatron-LM's parser has neither,
    so they do not collide with its ``--seed``, ``--vocab-size`` and other options.
    """
    group = parser.add_argument_group(title="VQ-Logits output layer")
    group.add_argument("--output-layer-type", type=str, default="dense", choices=OUTPUT_LAYER_TYPES,
                       help="Output layer of the GPT model: 'dense' is Megatron's ColumnParallelLinear "
                            "(the default, a stock run). 'vq' is VQ-Logits: K shared code vectors and a "
                            "fixed token-to-code map, with the exact collapsed cross-entropy. 'vq' needs "
                            "--untie-embeddings-and-output-weights.")
    group.add_argument("--vq-vocab-size", type=int, default=None,
                       help="Real (unpadded) vocabulary size V for the token-to-code map. Default: the "
                            "size of Megatron-LM's tokenizer, else --vocab-size, else the padded size.")
    for field, row in VQ_CONFIG_FLAGS.items():
        default = _DEFAULTS[field]
        if field in _SWITCHES:
            group.add_argument(row.flag, action="store_true", help=row.help)
        else:
            group.add_argument(row.flag, type=type(default), choices=row.choices, help=row.help,
                               default=None if row.fallback else default)
    group.add_argument("--vq-token-counts", type=str, default=None, metavar="PATH",
                       help="A .npy or .pt file with corpus token counts of shape [V], for "
                            "--vq-map-init frequency or --vq-bias-init unigram. Entries past V (padding) "
                            "are dropped.")
    group.add_argument("--vq-init-embeddings", type=str, default=None, metavar="PATH",
                       help="A .npy or .pt file with embedding rows of shape [V, d], for --vq-map-init "
                            "kmeans (e.g. a trained model's output weight). Rows past V (padding) are "
                            "dropped.")
    return parser


def _option(args, field: str, row: VQFlag):
    """The flag's value, else its fallback's, else the field's default. None counts as unset, and a
    missing attribute too, so a hand-made namespace works."""
    for name in filter(None, (row.dest, row.fallback)):
        value = getattr(args, name, None)
        if value is not None:
            return value
    return _DEFAULTS[field]


def _check_init_files(args, map_init: str, bias_init: str) -> None:
    """Each init file is given exactly when the chosen initialisation reads it."""
    counts, embeddings = getattr(args, "vq_token_counts", None), getattr(args, "vq_init_embeddings", None)
    uses_counts = map_init == "frequency" or bias_init == "unigram"
    if uses_counts and counts is None:
        raise ValueError("--vq-map-init frequency / --vq-bias-init unigram need --vq-token-counts PATH "
                         "(a .npy/.pt of [V] counts)")
    if map_init == "kmeans" and embeddings is None:
        raise ValueError("--vq-map-init kmeans needs --vq-init-embeddings PATH (a .npy/.pt of [V, d] rows)")
    if counts is not None and not uses_counts:
        raise ValueError(f"--vq-token-counts is only used by --vq-map-init frequency or --vq-bias-init "
                         f"unigram (got {map_init!r}, {bias_init!r})")
    if embeddings is not None and map_init != "kmeans":
        raise ValueError(f"--vq-init-embeddings is only used by --vq-map-init kmeans (got {map_init!r})")


def vq_config_from_args(args, vocab_size: int, hidden_size: int) -> VQLogitsConfig:
    """Build a VQLogitsConfig from the parsed ``--vq-*`` flags.

    vocab_size is the real vocabulary V; see :func:`vq_vocab_size_from_args`. Missing attributes take
    VQLogitsConfig's defaults, so a hand-made namespace works too. Errors are ValueErrors that name the
    flags.
    """
    options = {field: _option(args, field, row) for field, row in VQ_CONFIG_FLAGS.items()}
    _check_init_files(args, options["map_init"], options["bias_init"])
    try:
        return VQLogitsConfig(vocab_size=vocab_size, hidden_size=hidden_size, **options)
    except ValueError as error:
        raise flagged_error(error) from error


# VQLogitsConfig and the layers word their errors with field names: "VQLogitsConfig.codebook_size must
# ...", "needs map_init='kmeans'", "(refine_rank=8)". A bare word is left alone ("seed" is English too).
_FIELD_IN_MESSAGE = re.compile(r"(VQLogitsConfig\.)?\b(\w+)(?:=('?)([\w.+-]*)\3)?")


def _as_flag(match: re.Match) -> str:
    prefix, field, _, value = match.groups()
    flag = _FLAG_OF_FIELD.get(field)
    if flag is None or (prefix is None and value is None):
        return match.group(0)
    if value is None or (field in _SWITCHES and value.lower() == "true"):
        return flag
    return _WITH_VALUE.get(field, flag + " {}").format(value)


def flagged_error(error: ValueError) -> ValueError:
    """The error with each field replaced by its flag: "VQLogitsConfig.codebook_size=600 exceeds
    vocab_size=500" becomes "--vq-codebook-size 600 exceeds the vocabulary size 500"."""
    return ValueError(_FIELD_IN_MESSAGE.sub(_as_flag, str(error)))
